"""What the phases start from: ResNet-50 exported through ``resnet-export`` (random weights:
speed does not depend on them), and real photographs (scikit-learn's two) as JPEG."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np

from deploy.benchmarks.common import NAME, log

BIN = Path(sys.executable).parent


def test_jpeg(width: int = 500, height: int = 375) -> bytes:
    """A real photograph (scikit-learn's china.jpg) at the requested size, as JPEG."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    img = Image.open(load_sample_images().filenames[0]).convert("RGB")
    img = img.resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def export_model(repo: Path, *args: str) -> None:
    log(f"exporting ResNet-50 (random weights) {' '.join(args)} ...")
    subprocess.run(
        [
            str(BIN / "resnet-export"),
            "export",
            "--arch",
            "resnet50",
            "--weights",
            "random",
            "--name",
            NAME,
            "--repository",
            str(repo),
            "--max-batch-size",
            "16",
            *args,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def onnx_of(repo: Path) -> Path:
    """The FP32 graph export_model published into ``repo``."""
    return repo / NAME / "1" / "model.onnx"


def calibration_images(folder: Path, count: int = 32, seed: int = 0) -> Path:
    """Crops of scikit-learn's two photographs, as JPEG files: real image statistics."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(f).convert("RGB") for f in load_sample_images().filenames]
    for n in range(count):
        img = photos[n % len(photos)]
        side = int(rng.integers(200, min(img.size)))
        x, y = (int(rng.integers(0, d - side)) for d in img.size)
        img.crop((x, y, x + side, y + side)).save(folder / f"{n}.jpg", quality=90)
    return folder
