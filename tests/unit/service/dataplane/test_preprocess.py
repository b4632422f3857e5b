"""Preprocessing: formats by magic bytes, colour models, EXIF, limits, and parity with a
straightforward reference implementation of torchvision's eval transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.dataplane.preprocess import (
    BOX_RESIZE_TOLERANCE,
    DEFAULT_LIMITS,
    DecodeLimits,
    normalized,
    open_image,
    preprocess,
    sniff_format,
)
from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from service.model.contract import PreprocessContract, input_fields
from tests.helpers.images import photos
from tests.helpers.models import GREY, RGB
from tests.helpers.timing import fastest_of

NO_DRAFT = DecodeLimits(jpeg_draft=False)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def reference(data: bytes, c: PreprocessContract) -> np.ndarray:
    """The obvious implementation (torchvision's Resize(int) + CenterCrop + Normalize on PIL)."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    img = img.convert(c.channels)
    w, h = img.size
    if w <= h:
        size = (c.resize, int(c.resize * h / w))
    else:
        size = (int(c.resize * w / h), c.resize)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    img = img.resize(size, resample[c.interpolation])
    top = int(round((size[1] - c.crop) / 2.0))
    left = int(round((size[0] - c.crop) / 2.0))
    img = img.crop((left, top, left + c.crop, top + c.crop))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = (arr - np.array(c.mean, dtype=np.float32)) / np.array(c.std, dtype=np.float32)
    return arr.transpose(2, 0, 1)


def assert_matches(got: np.ndarray, data: bytes, c: PreprocessContract) -> None:
    """``got`` is the reference transform of ``data`` within the crop-box resize's stated
    tolerance: no value more than BOX_RESIZE_TOLERANCE 8-bit steps off, fewer than 1 % of
    the values off at all."""
    want = reference(data, c)
    steps = np.abs(got - want) * 255 * np.asarray(c.std, np.float32).reshape(-1, 1, 1)
    assert steps.max() <= BOX_RESIZE_TOLERANCE + 1e-3, steps.max()
    assert (steps > 1e-3).mean() < 0.01, (steps > 1e-3).mean()


def noise_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "LA": 2}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)


# --- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_parity_with_reference_on_real_photos(index):
    data = photos()[index]
    got = preprocess(data, RGB, NO_DRAFT)
    assert got.shape == (3, 224, 224) and got.dtype == np.float32 and got.flags.c_contiguous
    assert_matches(got, data, RGB)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (257, 1000), (1001, 256)])
@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_parity_with_reference_sizes_and_interpolations(size, interp, fmt):
    c = RGB.model_copy(update={"interpolation": interp})
    data = encode(noise_image(*size), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert_matches(preprocess(data, c), data, c)


@pytest.mark.parametrize("contract", [RGB, GREY], ids=["RGB", "L"])
def test_a_uint8_contract_gets_the_pixels_the_float_planes_are_made_of(contract):
    """--input uint8: the cropped image's pixels as decoded (H, W, C), no arithmetic; the
    float contract's planes are exactly those pixels through the normalization table."""
    pixels_contract = contract.model_copy(update=input_fields("uint8"))
    data = photos()[1]
    pixels = preprocess(data, pixels_contract)
    side, channels = contract.crop, contract.num_channels
    assert pixels.dtype == np.uint8 and pixels.shape == (side, side, channels)
    np.testing.assert_array_equal(normalized(pixels, contract), preprocess(data, contract))
    out = np.zeros((2, side, side, channels), np.uint8)
    assert np.shares_memory(preprocess(data, pixels_contract, out=out[1]), out)  # its batch row
    np.testing.assert_array_equal(out[1], pixels)


def test_parity_greyscale_contract_from_colour_photo():
    data = photos()[0]
    assert_matches(preprocess(data, GREY, NO_DRAFT), data, GREY)


def test_upscaling_small_images():
    data = encode(noise_image(8, 8, "L"), "PNG")
    assert_matches(preprocess(data, GREY), data, GREY)


@pytest.mark.parametrize("size", [(4000, 100), (100, 4000)])
def test_panoramas_up_to_the_bound_are_exact(size):
    """Aspect ratio 40:1 still takes the exact path (the bound is 64x the crop's pixels)."""
    data = encode(noise_image(*size), "PNG")
    np.testing.assert_allclose(preprocess(data, RGB), reference(data, RGB), atol=1e-5)


@pytest.mark.parametrize("size", [(20_000, 200), (200, 20_000)])
def test_beyond_the_bound_only_the_crop_is_resampled_and_stays_close(size):
    """100:1: the crop box of the source goes straight to the crop. Not bit-identical to
    resizing the whole strip (Pillow's float rounding of filter positions): on smooth
    content, within two 8-bit steps."""
    x = np.linspace(0, 255, max(size)).astype(np.uint8)
    pixels = (
        np.tile(x, (min(size), 1)) if size[0] > size[1] else np.tile(x[:, None], (1, min(size)))
    )
    data = encode(Image.fromarray(pixels, "L"), "PNG")
    diff = np.abs(preprocess(data, GREY) - reference(data, GREY)) * 255 * 0.25
    assert diff.max() <= 2 + 1e-3, diff.max()


@pytest.mark.parametrize("size", [(1, 20_000), (100_000, 1), (1, 1_000_000), (3, 40_000)])
def test_extreme_aspect_ratios_cost_only_the_crop(size):
    """A 1 x 1,000,000 PNG is 277 bytes; resized whole to 256 on its shorter side it would be
    gigabytes. The crop is computed from the source directly: fast and small."""
    import tracemalloc

    data = encode(Image.new("L", size, 128), "PNG")
    tracemalloc.start()
    out = preprocess(data, RGB)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out[0], (128 / 255 - 0.485) / 0.229, atol=1e-5)
    assert peak < 64 * 2**20, peak  # numpy's share; Pillow's buffers are bounded the same way
    # Its cost against what nothing can avoid, both timed here first: decoding these very
    # bytes, and preprocessing an image the size of the crop. Resized whole, it was seconds.
    crop_sized = encode(Image.new("L", (RGB.crop, RGB.crop), 128), "PNG")
    floor = fastest_of(lambda: open_image(data, RGB, DEFAULT_LIMITS))
    floor += fastest_of(lambda: preprocess(crop_sized, RGB))
    elapsed = fastest_of(lambda: preprocess(data, RGB))
    assert elapsed < 3 * floor, (elapsed, floor)


def test_jpeg_draft_stays_close_to_full_decode_and_is_faster():
    big = Image.open(io.BytesIO(photos()[1])).resize((4032, 3024), Image.BICUBIC)
    data = encode(big, "JPEG", quality=92)
    full = preprocess(data, RGB, NO_DRAFT)
    drafted = preprocess(data, RGB)
    t_draft = fastest_of(lambda: preprocess(data, RGB))
    t_full = fastest_of(lambda: preprocess(data, RGB, NO_DRAFT))
    # Same picture: in 0..1 pixel units the mean difference is under 1%.
    assert np.abs(full - drafted).mean() * 0.226 < 0.01
    assert t_draft < t_full


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("BMP", {}), ("GIF", {}), ("TIFF", {})],
)
def test_every_supported_format_decodes(fmt, kw):
    data = encode(noise_image(64, 48), fmt, **kw)
    assert sniff_format(data) == fmt
    assert preprocess(data, RGB).shape == (3, 224, 224)


def test_format_comes_from_magic_bytes_not_names():
    data = encode(noise_image(40, 40), "PNG")
    assert sniff_format(data) == "PNG"
    with pytest.raises(UnsupportedMediaType):
        preprocess(b"%PDF-1.4 not an image", RGB)
    with pytest.raises(UnsupportedMediaType):
        preprocess(b"<svg xmlns='http://www.w3.org/2000/svg'/>", RGB)


def test_empty_is_invalid():
    with pytest.raises(InvalidImage, match="empty"):
        preprocess(b"", RGB)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_images_are_400(fmt):
    data = encode(noise_image(300, 200), fmt)
    with pytest.raises(InvalidImage, match="cannot decode"):
        preprocess(data[: len(data) // 2], RGB)


def test_a_file_no_decoder_can_read_is_400_without_internal_names():
    """Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" is not echoed."""
    with pytest.raises(InvalidImage) as err:
        preprocess(encode(noise_image(48, 40), "PNG")[:40], RGB)
    assert err.value.message == "cannot decode PNG image: no PNG decoder can read it"


def test_corrupt_png_crc_is_400():
    data = bytearray(encode(noise_image(50, 50), "PNG"))
    data[40] ^= 0xFF  # inside the first IDAT chunk
    with pytest.raises(InvalidImage):
        preprocess(bytes(data), RGB)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = preprocess(buf.getvalue(), RGB)
    red = (1.0 - 0.485) / 0.229
    assert np.allclose(out[0], red, atol=0.05)


def test_multipage_tiff_uses_first_page():
    pages = [Image.new("L", (32, 32), v) for v in (0, 255)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    out = preprocess(buf.getvalue(), GREY)
    assert np.allclose(out, (0.0 - 0.5) / 0.25)


# --- colour models ---------------------------------------------------------------------------


def _pixel(out: np.ndarray, c: PreprocessContract) -> np.ndarray:
    """Back from normalised tensor to 0..255 values (center pixel)."""
    mid = out[:, out.shape[1] // 2, out.shape[2] // 2]
    return np.rint((mid * np.array(c.std) + np.array(c.mean)) * 255)


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    assert list(_pixel(preprocess(encode(rgba, "PNG"), RGB), RGB)) == [255, 255, 255]
    half = Image.new("RGBA", (40, 40), (0, 0, 0, 128))
    assert list(_pixel(preprocess(encode(half, "PNG"), RGB), RGB)) == [127, 127, 127]
    la = Image.new("LA", (40, 40), (0, 0))
    assert list(_pixel(preprocess(encode(la, "PNG"), GREY), GREY)) == [255]


def test_palette_with_transparency():
    p = Image.new("P", (40, 40), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    p.info["transparency"] = 0
    assert list(_pixel(preprocess(encode(p, "PNG", transparency=0), RGB), RGB)) == [255, 255, 255]
    p2 = Image.new("P", (40, 40), 0)
    p2.putpalette([10, 20, 30] + [0] * 765)
    assert list(_pixel(preprocess(encode(p2, "PNG"), RGB), RGB)) == [10, 20, 30]


def test_greyscale_is_replicated_to_rgb():
    data = encode(Image.new("L", (40, 40), 200), "PNG")
    assert list(_pixel(preprocess(data, RGB), RGB)) == [200, 200, 200]


def test_cmyk_jpeg_converts():
    data = encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=100)
    r, g, b = _pixel(preprocess(data, RGB), RGB)
    assert r > 240 and g < 15 and b < 15


def test_16bit_greyscale_is_scaled_not_clipped():
    arr = np.full((40, 40), 32896, dtype=np.uint16)  # 128 * 257
    img = Image.fromarray(arr)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert list(_pixel(preprocess(data, GREY), GREY)) == [128]
    full = encode(Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)), "PNG")
    assert list(_pixel(preprocess(full, GREY), GREY)) == [255]


def test_bilevel_image():
    data = encode(Image.new("1", (40, 40), 1), "PNG")
    assert list(_pixel(preprocess(data, RGB), RGB)) == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: left half becomes the top half
    data = encode(img, "JPEG", exif=exif, quality=100)
    c = RGB.model_copy(
        update={"resize": 30, "crop": 30, "channels": "L", "mean": (0.0,), "std": (1.0,)}
    )
    out = preprocess(data, c)[0]
    assert out[:10].mean() > 0.9 and out[-10:].mean() < 0.1


# --- limits -----------------------------------------------------------------------------------


def _forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (the bytes that follow are not that image)."""
    import struct
    import zlib

    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_forged_header_is_413_without_decoding():
    forged = _forged_png(100_000, 100_000)

    def refuse() -> None:
        with pytest.raises(PayloadTooLarge, match="100000x100000"):
            preprocess(forged, RGB)

    # Refused sooner than the same file with its true header (1 x 1) is preprocessed, timed
    # here first: nothing of the 10-gigapixel image it claims was decoded.
    honest = encode(Image.new("L", (1, 1)), "PNG")
    assert fastest_of(refuse) < fastest_of(lambda: preprocess(honest, RGB))


def test_decompression_bomb_is_413():
    bomb = encode(Image.new("L", (8000, 6000), 0), "PNG")  # 48 Mpx in ~50 KB
    assert len(bomb) < 200_000
    with pytest.raises(PayloadTooLarge, match="the limit is 40000000"):
        preprocess(bomb, RGB)


def test_pixel_limit_is_configurable():
    data = encode(noise_image(100, 100), "PNG")
    with pytest.raises(PayloadTooLarge):
        preprocess(data, RGB, DecodeLimits(max_pixels=9_999))
    assert preprocess(data, RGB, DecodeLimits(max_pixels=10_000)).shape == (3, 224, 224)
