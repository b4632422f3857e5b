"""The gateway's preprocessing against torchvision's eval transform, and what the difference
does to the model's answers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from deploy.benchmarks.common import NAME, log
from deploy.benchmarks.inputs import onnx_of

#: Synthetic images of the parity corpus (random pixels, PNG): sizes that take every path of
#: the resize (landscape, portrait, square, near-square strips, a large photo's size).
PARITY_SIZES = ((640, 480), (480, 640), (300, 300), (257, 1000), (1001, 256), (1920, 1440))


def preprocessing_parity(repo: Path, photos: Path) -> dict[str, Any]:
    """The gateway's preprocessing against torchvision's eval transform written out (the
    tutorial server's: resize the whole image, center-crop, normalize in float), on real
    photos (scikit-learn's two and ``photos``' crops, JPEG) and PARITY_SIZES, with the
    repository's contract in bilinear and bicubic: the largest difference in 8-bit steps,
    the share of values that differ at all, and how often the repository's model (ResNet-50)
    gives the same top-1 class and how far its logits move."""
    import onnxruntime as ort

    from deploy.tutorial_server import eval_transform
    from service.dataplane.preprocess import preprocess
    from service.model.repository import load_spec

    corpus = _corpus(photos)
    session = ort.InferenceSession(str(onnx_of(repo)), providers=["CPUExecutionProvider"])
    base = load_spec(repo / NAME).contract
    out: dict[str, Any] = {"images": len(corpus)}
    for interpolation in ("bilinear", "bicubic"):
        c = base.model_copy(update={"interpolation": interpolation})
        ours = np.stack([preprocess(d, c) for d in corpus])
        ref = np.concatenate([eval_transform(c)(d) for d in corpus])
        steps = np.abs(ours - ref) * 255 * np.asarray(c.std, np.float32).reshape(1, -1, 1, 1)
        logits = [session.run(None, {c.input_name: x})[0] for x in (ours, ref)]
        out[interpolation] = {
            "max_steps": round(float(steps.max()), 3),
            "values_differing_pct": round(float((steps > 1e-3).mean() * 100), 4),
            "top1_agreement_pct": round(
                float((logits[0].argmax(1) == logits[1].argmax(1)).mean() * 100), 2
            ),
            "max_logit_diff_pct_of_largest": round(
                float(np.abs(logits[0] - logits[1]).max() / np.abs(logits[1]).max() * 100), 3
            ),
        }
    log(f"  preprocessing parity: {out}")
    return out


def _corpus(photos: Path) -> list[bytes]:
    """scikit-learn's two photographs, ``photos``' JPEG crops, and PARITY_SIZES' noise."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    corpus = [Path(f).read_bytes() for f in load_sample_images().filenames]
    corpus += [p.read_bytes() for p in sorted(photos.glob("*.jpg"))]
    rng = np.random.default_rng(0)
    for w, h in PARITY_SIZES:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        corpus.append(buf.getvalue())
    return corpus
