"""Pixels as a person sees them: 8-bit sRGB, upright, transparency on white.

Every Pillow mode is either turned into an RGB image here or refused with ``InvalidJob``:

- the EXIF orientation (phones, some scanners) is applied, so the top-left pixel is where a viewer shows it;
- transparency (RGBA, LA, PA, premultiplied alpha, a transparent palette index or colour key) is
  composited onto white, as a viewer draws a page;
- 16-bit samples (I;16 PNG and TIFF scans) are scaled to 8 bits instead of clipped to white, and
  32-bit integer (I) and float (F) images are scaled from the range their values use;
- CIELab is converted to sRGB through Little CMS (Pillow's own conversion garbles it).

An embedded ICC profile (a phone's Display P3, a print shop's CMYK profile) is not applied: pixels are
read as Pillow reads them, which is how vision models' training images were read. Applying one costs
about 0.4 s for a 12-megapixel photo.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from PIL import ExifTags, Image, ImageMath, ImageOps

from glyphq.producer.errors import InvalidJob

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without Little CMS: CIELab is refused
    ImageCms = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Every mode in Pillow 12 and 13 (``PIL.Image.MODES``); ``to_rgb`` converts each of them. Older
#: Pillow's BGR;15, BGR;16 and BGR;24 are refused.
SUPPORTED_MODES = frozenset({
    "1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA",
    "I", "F", "I;16", "I;16L", "I;16B", "I;16N",
})
#: Ranges an I or F image's values are read in: the smallest that holds them all (else min..max).
_INTEGER_RANGES = (255.0, 65535.0)
_FLOAT_RANGES = (1.0, 255.0)
_SIXTEEN_BIT_TOP = 65535.0


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, the way an image viewer shows it (see the module docstring).

    Returns ``image`` itself when it already is plain, upright RGB. Raises ``InvalidJob`` for a
    mode it cannot convert.
    """
    if image.mode not in SUPPORTED_MODES:
        raise InvalidJob("image", f"mode {image.mode} is not supported; supported modes: "
                                  f"{', '.join(sorted(SUPPORTED_MODES))}")
    image = upright(image)
    image = _eight_bit(image)
    image = _on_white(image)
    return _srgb(image)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of ``image``; 1 (as stored) when there is none or it is unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block: a viewer shows the image as stored
        log.debug("unreadable EXIF data; the image is used as stored", exc_info=True)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation; ``image`` itself when it has none."""
    if orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _eight_bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float images to L (with alpha for a 16-bit colour key)."""
    if image.mode.startswith("I;16"):
        grey = _scaled(image.convert("F"), 255.0 / _SIXTEEN_BIT_TOP, 0.0)
        key = image.info.get("transparency")
        if isinstance(key, int):  # a 16-bit PNG's tRNS colour key
            opaque = ImageMath.lambda_eval(lambda a: (a["image"] != key) * 255, image=image.convert("I"))
            return Image.merge("LA", (grey, opaque.convert("L")))
        return grey
    if image.mode in ("I", "F"):
        values = image.convert("F")
        extrema = values.getextrema()  # one band: (low, high)
        low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]
        ranges = _INTEGER_RANGES if image.mode == "I" else _FLOAT_RANGES
        top = next((top for top in ranges if low >= 0 and high <= top), None)
        if top is not None:
            return _scaled(values, 255.0 / top, 0.0)
        scale = 255.0 / (high - low) if high > low else 0.0
        return _scaled(values, scale, -low * scale)
    return image


def _scaled(values: Image.Image, scale: float, offset: float) -> Image.Image:
    """An F image mapped linearly to L, rounded and clipped to 0-255."""
    return values.point(lambda v: v * scale + offset + 0.5).convert("L")


def _on_white(image: Image.Image) -> Image.Image:
    """Composite any transparency onto white; images without any come back unchanged."""
    if image.mode == "La":  # Pillow converts premultiplied grey only by way of premultiplied RGB
        grey, alpha = image.split()
        image = Image.merge("RGBa", (grey, grey, grey, alpha))
    if not image.has_transparency_data:  # an alpha band, a palette with alpha, or a transparent colour
        return image
    rgba = image.convert("RGBA")
    if rgba.getchannel("A").getextrema()[0] == 255:  # fully opaque: nothing to composite
        return rgba.convert("RGB")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _srgb(image: Image.Image) -> Image.Image:
    """RGB: CIELab through Little CMS, everything else by Pillow's conversion."""
    if image.mode == "LAB":
        if ImageCms is None:
            raise InvalidJob("image", "mode LAB needs Pillow with Little CMS to be converted to RGB")
        converted = ImageCms.applyTransform(image, _lab_to_srgb())
        assert converted is not None  # None only when converting in place
        return converted
    return image if image.mode == "RGB" else image.convert("RGB")


@functools.cache
def _lab_to_srgb() -> Any:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
