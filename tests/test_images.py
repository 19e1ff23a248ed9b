"""Fitting images into the box: aspect kept, never upscaled, orientation ignored."""

from __future__ import annotations

import pytest
from PIL import Image

from worker.images import fit_image, fit_size, smaller_box


@pytest.mark.parametrize(
    ("size", "box", "expected"),
    [
        ((2560, 1440), (1280, 720), (1280, 720)),
        ((1920, 1080), (1280, 720), (1280, 720)),
        ((595, 842), (1280, 720), (595, 842)),  # A4 at 72 dpi, portrait: not shrunk
        ((1190, 1684), (1280, 720), (720, 1018)),  # A4 at 144 dpi: fitted into 720x1280
        ((640, 480), (1280, 720), (640, 480)),  # never upscaled
        ((4000, 100), (1280, 720), (1280, 32)),
        ((100, 4000), (720, 1280), (32, 1280)),
        ((1, 1), (1280, 720), (1, 1)),
    ],
)
def test_fit_size(size, box, expected):
    assert fit_size(size, box) == expected


def test_fit_image_keeps_small_images_untouched():
    image = Image.new("RGB", (300, 200))
    assert fit_image(image, (1280, 720)) is image
    assert fit_image(Image.new("RGB", (3000, 2000)), (1280, 720)).size == (1080, 720)


def test_smaller_box_halves_with_a_floor():
    assert smaller_box((1280, 720)) == (640, 360)
    assert smaller_box((300, 300)) == (224, 224)
