"""Image bytes -> model input tensor, exactly as the model's ``preprocess.json`` says.

Nothing here is specific to one model: every size, statistic and colour model comes from
the :class:`~service.model.contract.PreprocessContract`. The same code runs in the gateway and
in ``resnet-export demo`` (which trains on what this module produces from PNG files), so
training and serving cannot drift apart.

Decoding rules (documented in docs/data-plane.md, "Preprocessing"):

* The format is taken from the magic bytes, never from a file name or content type:
  JPEG, PNG, WebP, BMP, GIF (first frame), TIFF (first page). Anything else is 415.
* The pixel count is read from the header and checked against ``max_pixels`` *before*
  any pixel is decoded (decompression bombs, forged headers): 413.
* EXIF orientation is applied.
* Colour conversion to the contract's ``channels``:
  - alpha (LA, RGBA, PA, P with a transparent index) is composited over white;
  - 16-bit and 32-bit integer greyscale (I;16*, I) is scaled to 8 bits (v / 257,
    i.e. 65535 -> 255), not clipped; float greyscale (F) is clipped to 0..255;
  - CMYK, YCbCr, LAB, HSV, 1-bit and palette images go through Pillow's conversions;
  - to ``L``, colour is reduced with ITU-R 601-2 luma (Pillow's ``convert("L")``);
  - to ``RGB``, greyscale is replicated into three planes.
* Large JPEGs are decoded at a reduced DCT scale (libjpeg's 1/2, 1/4, 1/8) when the
  reduced image still has at least ``draft_margin`` times the pixels the resize needs on
  its shorter side. This is what keeps a 12-megapixel photo in tens of milliseconds.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType, brief
from service.host import memory
from service.model.contract import PreprocessContract

# The gateway enforces its own pixel limit per request from the header (below), before
# decoding; Pillow's global bomb check would otherwise warn or raise with its own limit.
Image.MAX_IMAGE_PIXELS = None
# A truncated file is an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# Magic bytes -> Pillow format name. Order matters only for readability.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds applied to every image before it is decoded."""

    max_pixels: int = 40_000_000
    jpeg_draft: bool = True
    draft_margin: float = 2.0


DEFAULT_LIMITS = DecodeLimits()


def sniff_format(data: bytes) -> str:
    """Pillow format name for ``data`` from its magic bytes, or raise 415."""
    if not data:
        raise InvalidImage("empty image")
    for magic, offset, fmt in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise UnsupportedMediaType(
        "unsupported image format; send one of: " + ", ".join(SUPPORTED_FORMATS)
    )


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side equal to ``shorter``, torchvision's rounding."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def open_image(data: bytes, contract: PreprocessContract, limits: DecodeLimits) -> Image.Image:
    """Decode ``data`` into a Pillow image in the contract's colour model (not resized)."""
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            # Pillow warns about oddities of real-world files (EXIF, ICC, palette
            # transparency as bytes); they are not errors for a classifier.
            warnings.simplefilter("ignore")
            img: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            if width <= 0 or height <= 0:
                raise InvalidImage("image has no pixels")
            if width * height > limits.max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {limits.max_pixels}"
                )
            if fmt == "JPEG" and limits.jpeg_draft:
                _draft(img, contract, limits.draft_margin)
            img.load()
            # In place: without an orientation tag (most images) it copies nothing.
            ImageOps.exif_transpose(img, in_place=True)
            return _to_channels(img, contract.channels)
    except (InvalidImage, PayloadTooLarge):
        raise
    except (Image.DecompressionBombError, MemoryError) as exc:  # pragma: no cover - guarded
        raise PayloadTooLarge("image is too large to decode") from exc
    except UnidentifiedImageError as exc:
        # Pillow's message names its file object ("<_io.BytesIO object at 0x...>").
        raise InvalidImage(f"cannot decode {fmt} image: no {fmt} decoder can read it") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated data, corrupt chunks, bad CRCs, impossible headers.
        raise InvalidImage(f"cannot decode {fmt} image: {brief(exc)}") from exc
    except Exception as exc:
        # Fed corrupt data, Pillow's decoders raise other types too (a TypeError from a
        # forged TIFF strip offset: tests/data/fuzz/): still the file's fault, not ours.
        raise InvalidImage(f"cannot decode {fmt} image (corrupt data)") from exc


def _draft(img: Image.Image, contract: PreprocessContract, margin: float) -> None:
    """Let libjpeg decode at 1/2..1/8 scale if the result is still comfortably large."""
    width, height = img.size
    short = min(width, height)
    need = contract.resize * margin
    if short < 2 * need:
        return  # no power-of-two reduction would leave enough pixels
    scale = need / short
    mode = "L" if contract.channels == "L" else "RGB"
    img.draft(mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _to_channels(img: Image.Image, channels: str) -> Image.Image:
    mode = img.mode
    if mode == channels:
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit range scaled to 8-bit (65535 -> 255), rounded, never clipped in range.
        arr8 = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr8, mode="L")
    elif mode == "F":
        arr8 = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr8, mode="L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")

    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        img = _composite_on_white(img)
    if img.mode != channels:
        img = img.convert(channels)
    return img


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


#: Past this many times the crop's pixels (aspect ratios beyond ~49:1 for 256/224), the
#: resized intermediate is not materialised. At 64 it is at most ~10 MB for a 224 RGB crop.
MAX_RESIZE_FACTOR = 64

#: How far the crop-box resize may be from torchvision's resize-then-crop, in 8-bit steps
#: of one pixel value before normalization (tests/unit/service/dataplane/test_preprocess.py holds it
#: on real photos and the synthetic corpus; fewer than 1 % of the values differ at all).
BOX_RESIZE_TOLERANCE = 1


def resize_and_crop(img: Image.Image, contract: PreprocessContract) -> Image.Image:
    """torchvision's Resize(shorter side) + CenterCrop, with work bounded by the crop.

    Downscaling with bilinear or bicubic (photos: nearly every image): Pillow resamples
    only the crop's box of the source straight to the crop, with the same filter and the
    same source positions as resizing the whole image and cropping, within
    BOX_RESIZE_TOLERANCE of it (float rounding of the filter positions). It costs the
    crop's pixels, not the resized image's: on a 500x375 photo about 0.6 of the exact
    path. Upscaling (the resized image is barely larger than the crop, and the box path
    drifts to 2 steps there) and nearest (box and whole resize can pick different source
    pixels, 132 steps apart on a photo) resize whole and crop, exactly; except beyond
    MAX_RESIZE_FACTOR times the crop's pixels (degenerate strips: a 277-byte
    1 x 1,000,000 PNG would resize to 256 x 256,000,000), where only the box is bounded."""
    width, height = img.size
    new_w, new_h = resized_size(width, height, contract.resize)
    crop = contract.crop
    top = round((new_h - crop) / 2.0)  # round-half-even, as torchvision's center_crop
    left = round((new_w - crop) / 2.0)
    resample = _RESAMPLE[contract.interpolation]
    boxed = contract.interpolation != "nearest" and new_w < width
    if (new_w, new_h) == (width, height) or (
        not boxed and new_w * new_h <= MAX_RESIZE_FACTOR * crop * crop
    ):
        if (new_w, new_h) != (width, height):
            img = img.resize((new_w, new_h), resample=resample)
        return img.crop((left, top, left + crop, top + crop))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return img.resize((crop, crop), resample=resample, box=box)


@functools.lru_cache(maxsize=64)
def _lookup(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(channels, 256) float32: every 8-bit value's normalized value, per channel (the
    same float32 arithmetic as computing it per pixel)."""
    values = np.arange(256, dtype=np.float32)[None, :]
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return np.ascontiguousarray((values / np.float32(255.0) - m) / s, dtype=np.float32)


def normalized(pixels: np.ndarray, contract: PreprocessContract) -> np.ndarray:
    """8-bit pixels (..., H, W, C) -> float32 planes (..., C, H, W), with the same table as
    :func:`normalize` (what a float-input graph is fed for the same image)."""
    table = _lookup(contract.mean, contract.std)
    return np.stack([table[k][pixels[..., k]] for k in range(pixels.shape[-1])], axis=-3)


def normalize(
    img: Image.Image, contract: PreprocessContract, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 image -> float32 (C, H, W), (x/255 - mean) / std per channel: a table lookup
    per value, written straight into ``out`` (e.g. its row of the request's batch)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    table = _lookup(contract.mean, contract.std)
    if out is None:
        out = np.empty(contract.input_shape, dtype=np.float32)
    for k in range(arr.shape[2]):
        np.take(table[k], arr[:, :, k], out=out[k], mode="clip")  # unbuffered: 8-bit indexes
    return out


def pixels(
    img: Image.Image, contract: PreprocessContract, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 image -> its pixels (H, W, C) as decoded, for a graph that normalizes them
    itself (a uint8 contract): no arithmetic, one copy into ``out`` at most."""
    arr = np.asarray(img).reshape(contract.input_shape)
    if out is None:
        return arr
    out[...] = arr
    return out


def preprocess(
    data: bytes,
    contract: PreprocessContract,
    limits: DecodeLimits = DEFAULT_LIMITS,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Encoded image bytes -> one tensor of ``contract.input_shape`` and ``contract.dtype``."""
    img = open_image(data, contract, limits)
    large = img.width * img.height >= memory.LARGE_IMAGE_PIXELS
    cropped = resize_and_crop(img, contract)
    del img  # the large buffer is free before the trim
    if large:
        memory.trim()
    if contract.dtype == "uint8":
        return pixels(cropped, contract, out)
    return normalize(cropped, contract, out)
