"""Shared fixtures: a tiny ResNet for transport tests (kB, published through the real
export path), the trained digits demo model for accuracy tests (once per session), and
small helpers. Test doubles live in ``tests.helpers``, process helpers in ``service.host.processes``."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from service.model.contract import PreprocessContract
from service.model.repository import load_spec

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a console script of this project as a user would, capturing its output."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def tree_digest(path: Path) -> dict[str, str]:
    """relative path -> sha256 for every file under ``path`` (hidden ones included)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".resnet-export.lock"
    }


@dataclass(frozen=True)
class Demo:
    repository: Path
    images: Path
    stdout: str

    @property
    def model_dir(self) -> Path:
        return self.repository / "digits"

    @property
    def contract(self) -> PreprocessContract:
        return load_spec(self.model_dir).contract

    def pngs(self) -> list[tuple[Path, int]]:
        return sorted((p, int(p.parent.name)) for p in self.images.rglob("*.png"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """`resnet-export demo` run once, for real: trains ResNet-18 on the digits and exports it."""
    base = tmp_path_factory.mktemp("demo")
    repo, images = base / "repo", base / "digits_png"
    proc = run_cli("resnet-export", "demo", "--repository", str(repo), "--images-out", str(images))
    assert proc.returncode == 0, proc.stderr
    return Demo(repo, images, proc.stdout)


TINY_LABELS = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


TINY_CONTRACT = PreprocessContract(
    arch="tiny",
    input_name="input",
    output_name="logits",
    channels="RGB",
    resize=36,
    crop=32,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    num_classes=10,
)


def contract(**changes: object) -> PreprocessContract:
    """The one contract of the tests (``TINY_CONTRACT``), with ``changes``, validated as a
    published one is (model_copy would not check them)."""
    return PreprocessContract(**{**TINY_CONTRACT.model_dump(), **changes})


@dataclass(frozen=True)
class Tiny:
    """A ResNet of a few kB (random weights, 10 classes, RGB 32x32): every transport test
    runs on it in milliseconds."""

    repository: Path
    name: str = "tiny"

    @property
    def model_dir(self) -> Path:
        return self.repository / self.name

    @property
    def contract(self) -> PreprocessContract:
        return load_spec(self.model_dir).contract


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    """A real image file: random RGB pixels, encoded by Pillow."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def assert_same_predictions(ours: list[dict], theirs: list[dict]) -> None:
    """Two answers' prediction lists for one image (REST ``predictions[i]``): the same
    classes in the same order, the same probabilities within float32 rounding."""
    assert [p["index"] for p in ours] == [p["index"] for p in theirs]
    np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in theirs], atol=1e-5)


@functools.cache
def slow_to_decode() -> bytes:
    """A 36-megapixel PNG of 0.5 MB, within the default pixel limit: ~0.45 s to decode on
    these machines, ~300 MB of memory while it is."""
    import io

    from PIL import Image

    x = np.linspace(0, 255, 6000).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([np.tile(x, (6000, 1))] * 3, axis=2), "RGB").save(
        buf, "PNG", compress_level=1
    )
    return buf.getvalue()


def publish_tiny(repository: Path, name: str, contract: PreprocessContract) -> Tiny:
    """The tiny network (the same weights every time: seed 0) published as ``name``."""
    import torch

    from export.models import BasicBlock, ResNet
    from export.pipeline import export_and_publish
    from export.repository import ServingConfig

    torch.manual_seed(0)
    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=10, channels=(4, 8, 8, 8))
    export_and_publish(
        model=model,
        contract=contract,
        labels=TINY_LABELS,
        name=name,
        repository=repository,
        flavor="onnxruntime",
        serving=ServingConfig(max_batch_size=8),
        opset=17,
        real_images=[image_bytes(seed=s) for s in range(2)],
        source="tests",
        log=lambda _: None,
    )
    return Tiny(repository, name)


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
