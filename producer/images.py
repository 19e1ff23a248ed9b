"""Image intake: turn a path, bytes or PIL image into checked bytes, without decoding bombs."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from celeryconfig import Settings
from producer.errors import InvalidJob

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


@dataclass(frozen=True)
class CheckedImage:
    """Image bytes that passed every check, with what the checks learned about them."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def sha256(self) -> str:
        """Content address of the bytes."""
        return hashlib.sha256(self.data).hexdigest()


def read_image_bytes(image: ImageInput, settings: Settings) -> bytes:
    """Return the encoded bytes of ``image``, refusing anything over ``max_image_bytes``."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InvalidJob("image", f"no such file: {path}")
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
    """Check format and pixel count from the header, then decode fully; raise ``InvalidJob`` if any fails.

    The pixel limit is checked before decoding, so a decompression bomb is refused after reading only
    its header.
    """
    fmt, width, height, _ = _decode(data, settings, rgb=False)
    return CheckedImage(data=data, format=fmt, width=width, height=height)


def decode_checked_image(data: bytes, settings: Settings) -> Image.Image:
    """The same checks as ``check_image_bytes``, returning the image (first frame) as RGB, decoded once."""
    image = _decode(data, settings, rgb=True)[3]
    assert image is not None
    return image


def _decode(data: bytes, settings: Settings, rgb: bool) -> tuple[str, int, int, Image.Image | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = (img.format or "").upper()
                width, height = img.size
                if fmt not in settings.image_formats:
                    allowed = ", ".join(settings.image_formats)
                    raise InvalidJob("image", f"format {fmt or 'unknown'} is not allowed; allowed: {allowed}")
                if width * height > settings.max_image_pixels:
                    raise InvalidJob(
                        "image",
                        f"is {width}x{height} = {width * height} pixels; the limit is "
                        f"{settings.max_image_pixels} (GLYPHQ_MAX_IMAGE_PIXELS)",
                    )
                img.load()
                return fmt, width, height, img.convert("RGB") if rgb else None
    except InvalidJob:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidJob(
            "image",
            f"refused as a decompression bomb; the limit is {settings.max_image_pixels} pixels "
            f"(GLYPHQ_MAX_IMAGE_PIXELS): {exc}",
        ) from None
    except Exception as exc:  # damaged files make Pillow's decoders raise almost anything
        raise InvalidJob("image", f"cannot be decoded: {type(exc).__name__}: {exc}") from None


def check_image(image: ImageInput, settings: Settings) -> CheckedImage:
    """Read and check ``image`` (a path, bytes or PIL image)."""
    return check_image_bytes(read_image_bytes(image, settings), settings)
