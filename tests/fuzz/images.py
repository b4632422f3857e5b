"""What the image fuzzers share: the property, the contract, and seed files.

The property: ``preprocess`` on any bytes returns a finite tensor of the contract's shape,
or raises one of the gateway's own client errors (400 / 413 / 415): never another
exception, never a hang. ``tests/fuzz/test_images.py`` checks it with
hypothesis (structured mutations of real files), ``tests/fuzz/atheris_images.py`` with
coverage-guided fuzzing; what either finds is kept in ``tests/data/fuzz/`` and replayed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from service.dataplane.preprocess import DecodeLimits, preprocess
from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from tests.helpers.models import TINY_CONTRACT

CONTRACT = TINY_CONTRACT
#: Small enough that a forged header cannot make one example slow.
LIMITS = DecodeLimits(max_pixels=2_000_000)
CLIENT_ERRORS = (InvalidImage, PayloadTooLarge, UnsupportedMediaType)
REGRESSIONS = Path(__file__).resolve().parents[1] / "data" / "fuzz"
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")


def check(data: bytes) -> None:
    """The property; raises AssertionError (or the unexpected exception) if it fails."""
    try:
        out = preprocess(data, CONTRACT, LIMITS)
    except CLIENT_ERRORS:
        return
    assert out.shape == CONTRACT.input_shape and out.dtype == np.float32
    assert np.isfinite(out).all()


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def seeds() -> dict[str, bytes]:
    """One small real file per format and a few colour models."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8), "RGB")
    out = {f"{fmt.lower()}-rgb": encode(rgb, fmt) for fmt in FORMATS}
    out["png-rgba"] = encode(rgb.convert("RGBA"), "PNG")
    out["png-p"] = encode(rgb.convert("P"), "PNG")
    out["png-i16"] = encode(Image.new("I;16", (9, 7), 1234), "PNG")
    out["tiff-cmyk"] = encode(rgb.convert("CMYK"), "TIFF")
    out["gif-l"] = encode(rgb.convert("L"), "GIF")
    return out
