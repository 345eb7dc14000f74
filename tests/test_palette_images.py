"""Palette images with a transparency key get the reference's pixels.

The reference (LLaMA-Factory 0.9.5) converts a P image with a plain ``convert("RGB")``; its
transformers then used the RGB pixels as they were. Pillow keeps ``info["transparency"]`` after that
conversion and recent transformers' ``convert_to_rgb`` composites such pixels onto white, so without
care the transparent-keyed pixels turn white.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl_data.vision import open_image, preresize_image, process_image


def _palette_png_with_transparency(path: Path, size: tuple[int, int], mode: str = "P") -> Image.Image:
    rng = np.random.default_rng(1)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 200, (h, w, 3), dtype=np.uint8), "RGB")  # no white pixels
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        key = int(np.bincount(np.asarray(image).ravel()).argmax())  # the most used palette entry
        image.save(path, transparency=key)
    else:
        key_color = tuple(int(c) for c in np.asarray(rgb)[0, 0])
        rgb.save(path, transparency=key_color)
    reopened = Image.open(path)
    reopened.load()
    assert reopened.mode == mode and "transparency" in reopened.info
    return reopened


@pytest.mark.parametrize(("mode", "size"), [("P", (64, 48)), ("P", (700, 500)), ("RGB", (64, 48))])
def test_transparency_key_does_not_blend_onto_white(tmp_path: Path, image_processor, mode, size):
    path = tmp_path / "keyed.png"
    _palette_png_with_transparency(path, size, mode)
    image = open_image(path)
    resized = preresize_image(image, 262144, 1024)
    assert "transparency" not in resized.info
    assert "transparency" in image.info  # the caller's image is left as it was

    # The reference's pixels: the same pre-resize, then a plain convert("RGB"), nothing composited.
    plain = image.resize(resized.size) if resized.size != image.size else image
    reference = np.asarray(plain.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(resized), reference)

    # What the processor makes of it equals what it makes of those plain pixels.
    expected = image_processor(images=[Image.fromarray(reference)], return_tensors="np")
    got = image_processor(images=[resized], return_tensors="np")
    np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"])
    processed = process_image(image, image_processor, "float32", 262144, 1024)
    np.testing.assert_allclose(processed.pixels, expected["pixel_values"], atol=1e-5, rtol=0)
