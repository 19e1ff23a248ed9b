"""Fitting an image into the model's box."""

from __future__ import annotations

from PIL import Image

Box = tuple[int, int]


def fit_size(size: Box, box: Box) -> Box:
    """The largest size with ``size``'s aspect ratio inside ``box``, never larger than ``size``.

    The box ignores orientation: a portrait image is fitted into the box turned upright, so a
    1280x720 box takes a 595x842 A4 page at full size.
    """
    width, height = size
    long_side, short_side = max(box), min(box)
    bw, bh = (long_side, short_side) if width >= height else (short_side, long_side)
    scale = min(bw / width, bh / height, 1.0)
    return max(1, int(width * scale)), max(1, int(height * scale))


def fit_image(image: Image.Image, box: Box) -> Image.Image:
    """``image`` resized into ``box`` (aspect kept, never upscaled); the same object if it fits."""
    target = fit_size(image.size, box)
    if target == image.size:
        return image
    return image.resize(target, Image.Resampling.LANCZOS)


def smaller_box(box: Box, factor: float = 0.5, floor: int = 224) -> Box:
    """A box ``factor`` times the size (not below ``floor`` pixels a side), for an out-of-memory retry."""
    return tuple(max(floor, int(side * factor)) for side in box)  # type: ignore[return-value]
