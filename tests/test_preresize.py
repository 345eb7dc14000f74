"""qvl_data.vision.preresize_image: the reference's pre-resize truncates both scaled sides with ``int()``, in
the downscale branch (above image_max_pixels) and in the upscale branch (below image_min_pixels).

The sizes are chosen so that ``int()`` and ``round()`` give different sides, and the expected sizes are worked
out by hand below (not by the code under test). The pixels are compared with a plain PIL ``resize`` to that
size (the reference's call: PIL's default filter, bicubic for RGB).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from qvl_data.vision import preresize_image


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_downscale_truncates_both_sides():
    # 1000 x 700 = 700,000 px > 262,144: f = sqrt(262144 / 700000) = sqrt(0.374491...) = 0.611957...
    # width 1000 f = 611.957 -> int 611 (round would give 612); height 700 f = 428.370 -> 428.
    image = _image(1000, 700)
    out = preresize_image(image, image_max_pixels=262_144, image_min_pixels=1024)
    assert out.size == (611, 428)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((611, 428))))


def test_upscale_truncates_both_sides():
    # 21 x 25 = 525 px < 1024: f = sqrt(1024 / 525) = sqrt(1.950476...) = 1.396594...
    # width 21 f = 29.328 -> 29; height 25 f = 34.915 -> int 34 (round would give 35). Both sides stay >= 28,
    # so the later raise of a short side to 28 does not hide the rounding.
    image = _image(21, 25)
    out = preresize_image(image, image_max_pixels=262_144, image_min_pixels=1024)
    assert out.size == (29, 34)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((29, 34))))


def test_sizes_between_the_limits_are_untouched():
    image = _image(40, 30)  # 1200 px: inside [1024, 262144]
    out = preresize_image(image, image_max_pixels=262_144, image_min_pixels=1024)
    assert out.size == (40, 30) and np.array_equal(np.asarray(out), np.asarray(image))
