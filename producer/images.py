"""Image intake: turn a path, bytes or PIL image into checked bytes, without decoding bombs."""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from glyphq.celeryconfig import Settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.pixels import to_rgb

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

#: Formats read as another. A phone's MPO is a JPEG followed by more images (depth or gain maps); Pillow
#: reads its first frame, the photo, as a plain JPEG, and nothing here ever seeks to the others.
READ_AS = {"MPO": "JPEG"}


@dataclass(frozen=True)
class CheckedImage:
    """Image bytes that passed every check, with what the checks learned about them.

    ``format`` is the format it is read as (an MPO is a ``JPEG``); ``width`` and ``height`` are the size as a
    person sees it, after the EXIF orientation.
    """

    data: bytes
    format: str
    width: int
    height: int

    @property
    def sha256(self) -> str:
        """Content address of the bytes."""
        return hashlib.sha256(self.data).hexdigest()


def read_image_bytes(image: ImageInput, settings: Settings) -> bytes:
    """Return the encoded bytes of ``image``, refusing anything over ``max_image_bytes``.

    A PIL image is stored as a PNG of what a person sees (``producer.pixels.to_rgb``), so any mode works.
    """
    if isinstance(image, Image.Image):
        data = _png_bytes(image, settings)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise InvalidJob("image", f"no such file: {path}")
        if not path.is_file():
            raise InvalidJob("image", f"not a file: {path} is a {'directory' if path.is_dir() else 'special file'}")
        check_image_size(path.stat().st_size, settings)
        data = path.read_bytes()
    else:
        raise InvalidJob("image", f"must be a path, bytes or a PIL image, got {type(image).__name__}")
    check_image_size(len(data), settings)
    if not data:
        raise InvalidJob("image", "is empty")
    return data


def check_image_size(size: int, settings: Settings) -> None:
    """Refuse an encoded image of ``size`` bytes when it is over ``GLYPHQ_MAX_IMAGE_BYTES``.

    A web backend calls it with an upload's size before reading the upload into memory.
    """
    if size > settings.max_image_bytes:
        raise InvalidJob("image", f"is {size} bytes; the limit is {settings.max_image_bytes} (GLYPHQ_MAX_IMAGE_BYTES)")


def check_image_bytes(data: bytes, settings: Settings) -> CheckedImage:
    """Check format, pixel count and aspect ratio from the header, then decode and convert fully;
    raise ``InvalidJob`` if any fails.

    The size checks come before decoding, so a decompression bomb is refused after reading only
    its header.
    """
    fmt, image = _decode(data, settings)
    return CheckedImage(data=data, format=fmt, width=image.width, height=image.height)


def decode_checked_image(data: bytes, settings: Settings) -> Image.Image:
    """The same checks as ``check_image_bytes``, returning the image (first frame) as a person sees it:
    8-bit RGB, upright, transparency on white (see ``producer.pixels``), decoded once."""
    return _decode(data, settings)[1]


def check_dimensions(width: int, height: int, settings: Settings) -> None:
    """Refuse more than ``max_image_pixels`` pixels, or a side over ``max_aspect_ratio`` times the other."""
    if width * height > settings.max_image_pixels:
        raise InvalidJob("image", f"is {width}x{height} = {width * height} pixels; the limit is "
                                  f"{settings.max_image_pixels} (GLYPHQ_MAX_IMAGE_PIXELS)")
    limit = settings.max_aspect_ratio
    long_side, short_side = max(width, height), min(width, height)
    if long_side > limit * short_side:
        raise InvalidJob("image", f"is {width}x{height}, an aspect ratio of {long_side / max(short_side, 1):.1f}:1; "
                                  f"the limit is {limit}:1 (GLYPHQ_MAX_ASPECT_RATIO)")


def _decode(data: bytes, settings: Settings) -> tuple[str, Image.Image]:
    try:
        with warnings.catch_warnings():
            # check_dimensions refuses by glyphq's own limit before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = (img.format or "").upper()
                fmt = READ_AS.get(fmt, fmt)
                if fmt not in settings.image_formats:
                    allowed = ", ".join(settings.image_formats)
                    raise InvalidJob("image", f"format {fmt or 'unknown'} is not allowed; allowed: {allowed}")
                check_dimensions(*img.size, settings)
                img.load()
                return fmt, to_rgb(img)
    except InvalidJob:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses past twice its own limit, before glyphq's check
        raise InvalidJob("image", _bomb_problem(exc, settings)) from None
    except UnidentifiedImageError:  # its message is the repr of our buffer, which helps nobody
        if _is_text(data):
            raise InvalidJob("image", "cannot be decoded: it is text, not an image; to ask about a text document "
                                      "use glyphq ask-doc (or submit_document)") from None
        allowed = ", ".join(settings.image_formats)
        raise InvalidJob("image", f"cannot be decoded: not an image file of a known format (allowed: {allowed})"
                         ) from None
    except Exception as exc:  # damaged files make Pillow's decoders raise almost anything
        raise InvalidJob("image", f"cannot be decoded: {type(exc).__name__}: {exc}") from None


def _bomb_problem(exc: Image.DecompressionBombError, settings: Settings) -> str:
    """glyphq's pixel-limit message for an image Pillow refused to open, with the pixel count it gives."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(found.group(1)) if found else None
    if pixels is None or pixels > settings.max_image_pixels:
        count = f"{pixels} pixels" if pixels else "too many pixels"
        return f"is {count}; the limit is {settings.max_image_pixels} (GLYPHQ_MAX_IMAGE_PIXELS)"
    # Only when GLYPHQ_MAX_IMAGE_PIXELS is set above what Pillow opens at all.
    return f"is {pixels} pixels, more than Pillow opens: {exc}"


def _is_text(data: bytes) -> bool:
    """True if ``data`` starts like UTF-8 text: no NUL byte and valid UTF-8 (a cut last character allowed)."""
    head = data[:4096]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # only the character cut at 4096 bytes is incomplete
    return True


def _png_bytes(image: Image.Image, settings: Settings) -> bytes:
    """A PNG of ``image`` as a person sees it; PNG holds few of Pillow's modes, RGB it always holds."""
    check_dimensions(*image.size, settings)
    try:
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="PNG")
    except InvalidJob:
        raise
    except Exception as exc:  # an image whose file is gone or damaged fails as it loads
        raise InvalidJob("image", f"cannot be read as a PIL image: {type(exc).__name__}: {exc}") from None
    return buffer.getvalue()


def check_image(image: ImageInput, settings: Settings) -> CheckedImage:
    """Read and check ``image`` (a path, bytes or PIL image)."""
    return check_image_bytes(read_image_bytes(image, settings), settings)
