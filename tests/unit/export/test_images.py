"""Image folders for calibration, the accuracy gate and evaluate: read as the gateway reads."""

from __future__ import annotations

import pytest

from export.errors import ExportError
from export.images import load_images, split_holdout, spread
from service.host.files import image_files
from tests.helpers.images import image_bytes
from tests.helpers.models import TINY_CONTRACT


def test_corrupt_files_are_skipped_with_the_gateways_reason(tmp_path):
    for n, fmt in enumerate(("PNG", "JPEG", "WEBP")):
        (tmp_path / f"{n}.img").write_bytes(image_bytes(fmt, seed=n))
    (tmp_path / "truncated.png").write_bytes(image_bytes("PNG")[:60])
    (tmp_path / "notes.txt").write_text("not an image")
    warnings: list[str] = []
    loaded = load_images(image_files(tmp_path, "--x"), TINY_CONTRACT, "--x", warnings.append)
    assert loaded.tensors.shape == (3, *TINY_CONTRACT.input_shape)
    assert sorted(p.name for p, _ in loaded.skipped) == ["notes.txt", "truncated.png"]
    assert len(warnings) == 2
    assert all(w.startswith("warning: skipping ") for w in warnings)


def test_a_folder_of_no_images_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ExportError, match=r"--calibration-dir: none of the 1 files is an image"):
        load_images([tmp_path / "a.txt"], TINY_CONTRACT, "--calibration-dir", lambda _: None)


def test_holdout_is_stable_and_never_empty(tmp_path):
    files = []
    for n in range(50):
        path = tmp_path / f"{n:03d}.png"
        path.write_bytes(b"x")
        files.append(path)
    calib, held = split_holdout(files, tmp_path)
    assert set(calib).isdisjoint(held) and len(calib) + len(held) == 50
    assert 3 <= len(held) <= 20
    # Adding images never moves an old one across the split.
    more = [*files, tmp_path / "new.png"]
    calib2, held2 = split_holdout(more, tmp_path)
    assert set(held) <= set(held2) and set(calib) <= set(calib2)
    one, other = split_holdout(files[:2], tmp_path)
    assert len(one) == 1 and len(other) == 1


def test_spread_takes_every_class_of_an_imagefolder(tmp_path):
    files = [tmp_path / c / f"{n}.png" for c in "abcde" for n in range(20)]
    picked = spread(files, 10)
    assert len(picked) == 10
    assert {p.parent.name for p in picked} == set("abcde")
    assert spread(files, 500) == files
