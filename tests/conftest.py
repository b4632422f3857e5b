"""Session fixtures: a tiny ResNet for transport tests (kB, published through the real
export path), the trained digits demo model for accuracy tests (once per session). What
they are built with is in ``tests.helpers.models``."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.model.repository import load_spec
from tests.helpers.cli import run_cli
from tests.helpers.models import TINY_CONTRACT, Demo, Tiny, publish_tiny


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """`resnet-export demo` run once, for real: trains ResNet-18 on the digits and exports it
    (and keeps its trained weights: what tests export with other options)."""
    base = tmp_path_factory.mktemp("demo")
    repo, images, checkpoint = base / "repo", base / "digits_png", base / "digits.pth"
    proc = run_cli("resnet-export", "demo", "--repository", str(repo), "--images-out",
                   str(images), "--checkpoint-out", str(checkpoint))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return Demo(repo, images, checkpoint, proc.stdout)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return publish_tiny(tmp_path_factory.mktemp("tiny") / "repo", "tiny", TINY_CONTRACT)


@pytest.fixture(scope="session")
def tiny_pixels(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """The tiny network taking uint8 pixels (``--input uint8``), as "tinypixels"."""
    from service.model.contract import input_fields

    contract = TINY_CONTRACT.model_copy(update=input_fields("uint8"))
    return publish_tiny(tmp_path_factory.mktemp("pixels") / "repo", "tinypixels", contract)


@pytest.fixture(scope="session")
def two_models(tiny, tmp_path_factory) -> Path:
    """A repository serving the tiny model twice, as "tiny" and "other": what one model's
    traffic does to another's."""
    import json

    from export.repository import Publication, ServingConfig, publish

    repo = tmp_path_factory.mktemp("two") / "repo"
    spec = load_spec(tiny.model_dir)
    report = json.loads((spec.model_path.parent / "export_report.json").read_text())
    for name in ("tiny", "other"):
        publish(
            repo,
            Publication(
                name,
                spec.contract,
                list(spec.labels),
                spec.model_path,
                "onnxruntime",
                ServingConfig(max_batch_size=8),
                report,
            ),
        )
    return repo
