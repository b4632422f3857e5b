"""Real image files for the tests: random ones, a slow one to decode, photos, and the
contracts they are preprocessed with."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    """A real image file: random RGB pixels, encoded by Pillow."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


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


def photos() -> list[bytes]:
    from sklearn.datasets import load_sample_images

    return [Path(f).read_bytes() for f in load_sample_images().filenames]
