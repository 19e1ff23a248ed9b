"""Fitting an image into the model's box without making its shape harder for the processor."""

from __future__ import annotations

from typing import Any

from PIL import Image

Box = tuple[int, int]

#: The shortest side an image is given. Qwen2-VL's and GLM-4V's (Glyph's) processors cut images into
#: 14-pixel patches merged 2x2, so they round every side to a multiple of 28: a thinner image is
#: stretched out of shape by Qwen2-VL (1280x7 becomes 784x28) and scaled up by GLM-4V. Text in a
#: strip shrunk below 28 pixels is unreadable anyway.
MIN_SIDE = 28


def fit_size(size: Box, box: Box, min_side: int = MIN_SIDE) -> Box:
    """The size ``size`` is given in ``box``: the largest with the same aspect ratio inside it, never
    larger than ``size``, and never a side shorter than ``min_side``.

    The box ignores orientation: a portrait image is fitted into the box turned upright, so a
    1280x720 box takes a 595x842 A4 page at full size. The ratio never becomes more extreme than
    ``size``'s: the short side is rounded up, the long one down. A side under ``min_side`` is made
    ``min_side`` with the long side scaled alike, even past the box or above ``size``: a 10000x50
    strip becomes 5600x28 (a sixth of the pixels of a 1280x720 box), not 1280x6.
    """
    width, height = size
    long_side, short_side = max(size), min(size)
    box_long, box_short = max(box), min(box)
    if long_side <= box_long and short_side <= box_short:
        new_long, new_short = long_side, short_side
    elif box_long * short_side <= box_short * long_side:  # the long side meets the box first
        new_long, new_short = box_long, -(-short_side * box_long // long_side)
    else:
        new_long, new_short = long_side * box_short // short_side, box_short
    if new_short < min_side:
        new_long, new_short = long_side * min_side // short_side, min_side
    return (new_long, new_short) if width >= height else (new_short, new_long)


def fit_image(image: Image.Image, box: Box, min_side: int = MIN_SIDE) -> Image.Image:
    """``image`` resized to ``fit_size``; the same object if it already has that size."""
    target = fit_size(image.size, box, min_side)
    if target == image.size:
        return image
    return image.resize(target, Image.Resampling.LANCZOS)


def processor_min_side(processor: Any) -> int:
    """``MIN_SIDE``, or the processor's patch grid when it is coarser (Qwen3-VL: 16-pixel patches
    merged 2x2, so 32)."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    if isinstance(patch, int) and isinstance(merge, int) and patch > 0 and merge > 0:
        return max(MIN_SIDE, patch * merge)
    return MIN_SIDE


def smaller_box(box: Box, factor: float = 0.5, floor: int = 224) -> Box:
    """A box ``factor`` times the size (not below ``floor`` pixels a side), for an out-of-memory retry."""
    return tuple(max(floor, int(side * factor)) for side in box)  # type: ignore[return-value]
