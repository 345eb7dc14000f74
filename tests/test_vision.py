"""Tests for qvl_data.vision: LLaMA-Factory pre-resize, Qwen2-VL pixels, uint8 storage, file errors."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl_data.vision import (
    MAX_IMAGE_PIXELS,
    ImageError,
    ProcessedImage,
    image_token_count,
    open_image,
    patches_to_image,
    pixel_values_from_uint8,
    pixel_values_from_uint8_torch,
    preresize_image,
    process_image,
)

# Qwen2.5-VL-Instruct preprocessor_config values.
MIN_PIXELS = 3136
MAX_PIXELS = 12845056
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


def _rgb_array(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradient plus noise: exercises the resampling filters better than pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rgb = Image.fromarray(_rgb_array(width, height, seed))
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        alpha = np.random.default_rng(seed + 1).integers(0, 256, size=(height, width), dtype=np.uint8)
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha]))
    if mode == "P":
        return rgb.quantize(colors=64, method=Image.Quantize.FASTOCTREE)
    return rgb.convert(mode)  # L, CMYK


# File format per mode: each written, then read back through open_image like the pipeline does.
_SUFFIX = {"RGB": ".jpg", "RGBA": ".png", "L": ".png", "P": ".png", "CMYK": ".tiff"}


def _write(tmp_path: Path, mode: str, width: int, height: int, seed: int = 0) -> Path:
    path = tmp_path / f"{mode}_{width}x{height}{_SUFFIX[mode]}"
    img = _make_image(mode, width, height, seed)
    if path.suffix == ".jpg":
        img.save(path, quality=90)
    else:
        img.save(path)
    return path


# ---------------------------------------------------------------- pre-resize arithmetic


def test_preresize_downscale_arithmetic() -> None:
    w, h, max_px = 1000, 800, 262144
    f = math.sqrt(max_px / (w * h))
    expected = (int(w * f), int(h * f))
    assert expected == (572, 457)
    out = preresize_image(_make_image("RGB", w, h), image_max_pixels=max_px, image_min_pixels=1024)
    assert out.size == expected
    assert out.mode == "RGB"


def test_preresize_upscale_then_min_side() -> None:
    w, h = 20, 10  # 200 px < 1024
    f = math.sqrt(1024 / (w * h))
    up = (int(w * f), int(h * f))
    assert up == (45, 22)
    out = preresize_image(_make_image("RGB", w, h))
    # The short side (22) is then raised to 28, the long side kept.
    assert out.size == (max(up[0], 28), max(up[1], 28)) == (45, 28)


def test_preresize_aspect_clamp() -> None:
    # 10000x20 = 200000 px: no down/up-scale; short side -> 28 gives 10000x28 (ratio 357 > 200) -> 28*180 x 28.
    out = preresize_image(_make_image("L", 10000, 20))
    assert out.size == (28 * 180, 28)
    tall = preresize_image(_make_image("RGB", 20, 10000))
    assert tall.size == (28, 28 * 180)


def test_preresize_matches_reference_resize_calls() -> None:
    # Independently replay the reference steps with plain PIL and compare pixels, not only sizes.
    img = _make_image("RGB", 1200, 900, seed=3)
    f = math.sqrt(262144 / (1200 * 900))
    expected = img.resize((int(1200 * f), int(900 * f)))
    assert np.array_equal(np.asarray(preresize_image(img)), np.asarray(expected))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_preresize_converts_to_rgb(mode: str) -> None:
    if mode == "I;16":
        img = Image.fromarray(np.random.default_rng(0).integers(0, 300, size=(64, 64), dtype=np.uint16))
        assert img.mode == "I;16"
    else:
        img = _make_image(mode, 64, 64)
    out = preresize_image(img)  # 4096 px: no resize, only the mode conversion
    assert out.mode == "RGB" and out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def test_preresize_rgba_drops_alpha_without_compositing() -> None:
    # The reference uses convert("RGB"), which discards alpha (HF's convert_to_rgb would composite on white).
    img = _make_image("RGBA", 64, 64)
    assert np.array_equal(np.asarray(preresize_image(img)), np.asarray(img)[..., :3])


@pytest.mark.parametrize("size", [(13, 9), (20, 10), (29, 29), (40, 25), (1000, 1), (10000, 20), (1200, 900)])
def test_preresize_is_idempotent(size) -> None:
    # Callers may pre-resize and then hand the result to process_image (which pre-resizes again); that is
    # only safe because a second pass is a no-op, pixels included.
    once = preresize_image(_make_image("L", *size))
    twice = preresize_image(once)
    assert twice.size == once.size
    assert np.array_equal(np.asarray(twice), np.asarray(once))


def test_preresize_degenerate_image_rejected() -> None:
    with pytest.raises(ImageError) as exc:
        preresize_image(Image.new("L", (1_000_000, 1)))
    assert exc.value.code == "image_unreadable"


# ---------------------------------------------------------------- grids and token counts


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    [((300, 168), (1, 12, 22), 66), ((300, 199), (1, 14, 22), 77)],
)
@pytest.mark.parametrize("pixel_format", ["uint8", "float32"])
def test_demo_like_grids(processor, size, grid, tokens, pixel_format) -> None:
    result = process_image(_make_image("RGB", *size), processor, pixel_format)
    assert isinstance(result, ProcessedImage)
    assert result.grid_thw == grid
    assert image_token_count(result.grid_thw) == tokens
    assert result.original_size == size and result.resized_size == size
    assert result.processed_size == (grid[2] * 14, grid[1] * 14)
    assert result.pixels.shape[0] == grid[0] * grid[1] * grid[2]


def test_image_token_count() -> None:
    assert image_token_count([1, 12, 22]) == 66
    assert image_token_count(np.array([1, 14, 22])) == 77
    assert image_token_count((1, 4, 4), merge_size=1) == 16


# ---------------------------------------------------------------- pixel equality with the HF processor

MODES = ["RGB", "RGBA", "L", "P", "CMYK"]
SIZES = {"tiny": (13, 9), "huge": (1200, 900)}


@pytest.mark.parametrize("size_name", sorted(SIZES))
@pytest.mark.parametrize("mode", MODES)
def test_pixels_match_processor(processor, tmp_path, mode, size_name) -> None:
    import torch

    path = _write(tmp_path, mode, *SIZES[size_name], seed=len(mode))
    img = open_image(path)
    assert img.mode == mode
    preresized = preresize_image(img)
    ref = processor(images=[preresized], return_tensors="np")
    ref_pv, ref_grid = ref["pixel_values"], tuple(int(x) for x in ref["image_grid_thw"][0])

    as_f32 = process_image(img, processor, "float32")
    as_u8 = process_image(img, processor, "uint8")
    assert as_f32.grid_thw == as_u8.grid_thw == ref_grid
    assert as_f32.original_size == as_u8.original_size == SIZES[size_name]
    assert as_f32.resized_size == preresized.size

    assert as_f32.pixels.dtype == np.float32 and as_f32.pixels.shape == ref_pv.shape
    assert np.array_equal(as_f32.pixels, ref_pv)

    assert as_u8.pixels.dtype == np.uint8 and as_u8.pixels.shape == (ref_pv.shape[0], 588)
    rebuilt = pixel_values_from_uint8(as_u8.pixels, processor.image_mean, processor.image_std)
    assert rebuilt.dtype == np.float32 and rebuilt.shape == ref_pv.shape
    assert float(np.abs(rebuilt - ref_pv).max()) <= 1e-5
    # The lookup table mirrors HF's float ops, so in practice the match is bit-exact.
    assert np.array_equal(rebuilt, ref_pv)

    rebuilt_t = pixel_values_from_uint8_torch(
        torch.from_numpy(as_u8.pixels), processor.image_mean, processor.image_std, processor.rescale_factor
    )
    assert rebuilt_t.dtype == torch.float32 and tuple(rebuilt_t.shape) == ref_pv.shape
    assert np.array_equal(rebuilt_t.numpy(), ref_pv)


def test_fast_uint8_path_matches_processor_on_200_random_images(processor) -> None:
    """process_image makes the processor's PIL resize itself and patchifies uint8 with a reshape; over 200
    random sizes (below the min-pixel bound, around 28, above max pixels, extreme aspect ratios) and modes
    it must equal the processor's own un-normalized output (first temporal copy) and normalized output."""
    rng = np.random.default_rng(20261129)
    for k in range(200):
        mode = MODES[int(rng.integers(len(MODES)))]
        kind = k % 4
        if kind == 0:  # small: the upscale branch and the 28-pixel floor
            w, h = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        elif kind == 1:  # around the image_max_pixels bound
            w, h = int(rng.integers(300, 800)), int(rng.integers(300, 800))
        elif kind == 2:  # long and thin
            w, h = int(rng.integers(1, 12)), int(rng.integers(200, 2000))
            w, h = (w, h) if rng.integers(2) else (h, w)
        else:
            w, h = int(rng.integers(28, 400)), int(rng.integers(28, 400))
        image = _make_image(mode, w, h, seed=k)
        try:
            preresized = preresize_image(image)
        except ImageError:
            continue  # degenerate sizes are rejected before the processor (tested above)
        raw = processor(images=[preresized], do_rescale=False, do_normalize=False, return_tensors="np")
        n = raw["pixel_values"].shape[0]
        first_frame = raw["pixel_values"].reshape(n, 3, 2, 196)[:, :, 0, :].reshape(n, 588)
        as_u8 = process_image(image, processor, "uint8")
        assert as_u8.grid_thw == tuple(int(x) for x in raw["image_grid_thw"][0]), (mode, w, h)
        assert np.array_equal(as_u8.pixels, first_frame.astype(np.uint8)), (mode, w, h)
        if k % 10 == 0:  # the float path through the processor's rescale + normalize, on a subset
            ref = processor(images=[preresized], return_tensors="np")["pixel_values"]
            assert np.array_equal(process_image(image, processor, "float32").pixels, ref), (mode, w, h)


def test_torch_expansion_covers_every_pair_of_values(processor) -> None:
    """The torch path gathers two adjacent values at once (a 65536-entry pair table per channel): every
    (first, second) pair of uint8 values, in every channel, must give the numpy path's float32 bits."""
    import torch

    first, second = np.divmod(np.arange(65536), 256)
    words = np.zeros(-(-65536 * 2 // 196) * 196, dtype=np.uint8)  # every pair, padded to whole patches
    words[0 : 65536 * 2 : 2], words[1 : 65536 * 2 : 2] = first, second
    patches = np.repeat(words.reshape(-1, 1, 196), 3, axis=1).reshape(-1, 588)  # same pairs per channel
    args = (processor.image_mean, processor.image_std, processor.rescale_factor)
    expected = pixel_values_from_uint8(patches, *args)
    got = pixel_values_from_uint8_torch(torch.from_numpy(patches), *args)
    assert got.is_contiguous() and got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))
    # a strided view and an empty batch take the same path
    strided = torch.from_numpy(np.repeat(patches[:50], 2, axis=1))[:, ::2]
    assert np.array_equal(pixel_values_from_uint8_torch(strided, *args).numpy(), expected[:50])
    assert pixel_values_from_uint8_torch(torch.zeros((0, 588), dtype=torch.uint8), *args).shape == (0, 1176)


def test_uint8_storage_is_one_eighth(processor) -> None:
    img = _make_image("RGB", 300, 168)
    u8 = process_image(img, processor, "uint8").pixels
    f32 = process_image(img, processor, "float32").pixels
    n = u8.shape[0]
    assert u8.nbytes // n == 588 and f32.nbytes // n == 4704
    assert u8.nbytes * 8 == f32.nbytes


def test_patches_to_image_roundtrip(processor) -> None:
    img = _make_image("RGB", 1200, 900, seed=7)
    result = process_image(img, processor, "uint8")
    pre = preresize_image(img)
    # The HF PIL backend resizes uint8 through PIL bicubic, so a plain PIL resize is the expected image.
    expected = np.asarray(pre.resize(result.processed_size, resample=Image.BICUBIC))
    restored = patches_to_image(result.pixels, result.grid_thw)
    assert restored.dtype == np.uint8 and restored.shape == expected.shape
    assert np.array_equal(restored, expected)


def test_unknown_pixel_format_rejected(processor) -> None:
    with pytest.raises(ValueError):
        process_image(_make_image("RGB", 64, 64), processor, "float16")  # type: ignore[arg-type]


# ---------------------------------------------------------------- open_image


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` but whose pixel data is a few bytes (never decodable)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_open_image_missing(tmp_path) -> None:
    with pytest.raises(ImageError) as exc:
        open_image(tmp_path / "nope.jpg")
    assert exc.value.code == "image_missing"
    with pytest.raises(ImageError) as exc:
        open_image(tmp_path)  # a directory is not an image file
    assert exc.value.code == "image_missing"


def test_open_image_garbage(tmp_path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=2048, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError) as exc:
        open_image(path)
    assert exc.value.code == "image_unreadable"
    # the rejection names the path itself (field images[k] 'path': ...): the message does not repeat it
    assert exc.value.message == "not an image Pillow can read (cannot identify image file)"


def test_open_image_truncated(tmp_path) -> None:
    path = _write(tmp_path, "RGB", 256, 256)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as exc:
        open_image(path)
    assert exc.value.code == "image_unreadable"


def test_open_image_too_large_from_header(tmp_path) -> None:
    # Between PIL's warning and error thresholds, so only *our* check rejects it. The pixel data is bogus:
    # had the image been decoded, the error would have been image_unreadable instead.
    path = tmp_path / "bomb.png"
    _png_header_only(path, 30000, 3000)
    assert 30000 * 3000 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as exc:
        open_image(path)
    assert exc.value.code == "image_too_large"

    # Far beyond PIL's own hard limit: still our error code.
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 20000, 20000)
    with pytest.raises(ImageError) as exc:
        open_image(huge)
    assert exc.value.code == "image_too_large"


def test_open_image_custom_limit(tmp_path) -> None:
    path = _write(tmp_path, "L", 64, 64)
    with pytest.raises(ImageError) as exc:
        open_image(path, max_pixels=64 * 64 - 1)
    assert exc.value.code == "image_too_large"
    assert open_image(path, max_pixels=64 * 64).size == (64, 64)


def test_open_image_loads_and_ignores_exif_orientation(tmp_path) -> None:
    path = tmp_path / "rot.jpg"
    img = _make_image("RGB", 40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" - the reference does not apply it, so neither do we
    img.save(path, exif=exif)
    loaded = open_image(path)
    assert loaded.size == (40, 30)
    assert loaded.getexif().get(0x0112) == 6
    # Fully decoded: pixel access works although open_image closed the file.
    assert np.asarray(loaded).shape == (30, 40, 3)
