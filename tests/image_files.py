"""Image files made the way phones, scanners and screenshot tools make them, for the image tests.

Each maker returns the encoded file and is built from a small "as a person sees it" picture, so a
test can compare what glyphq decodes with what a viewer shows. ``SEEN_SIZE`` is that picture's size.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageCms, ImageDraw

SEEN_SIZE = (96, 64)
DEPTH_SIZE = (48, 32)  # the second image of ``phone_mpo``
RED, BLUE, WHITE, BLACK = (220, 30, 30), (30, 30, 220), (255, 255, 255), (0, 0, 0)

#: What to do to the picture so that a viewer, applying the EXIF orientation, shows it upright again.
#: From the EXIF orientation values: 3 is stored upside down; 6 is stored turned a quarter
#: counter-clockwise (a viewer turns it clockwise); 8 the other way round.
_STORED_FOR_ORIENTATION = {
    1: None,
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def seen_picture(size: tuple[int, int] = SEEN_SIZE) -> Image.Image:
    """White, with a red block in the top-left corner and a blue one in the top-right corner.

    Block edges fall on multiples of 8, so a JPEG keeps them sharp whichever way it is stored.
    """
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, 23, 15], fill=RED)
    draw.rectangle([size[0] - 24, 0, size[0] - 1, 15], fill=BLUE)
    return image


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def phone_jpeg(orientation: int = 6, icc: bool = True, size: tuple[int, int] = SEEN_SIZE) -> bytes:
    """A camera JPEG: pixels stored as the sensor saw them, an EXIF Orientation tag, an sRGB ICC profile.

    ``size`` is the size a person sees; the file stores it turned as ``orientation`` says.
    """
    picture = seen_picture(size)
    turn = _STORED_FOR_ORIENTATION[orientation]
    stored = picture if turn is None else picture.transpose(turn)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    exif[0x010F] = "glyphq-test-phone"  # Make
    options: dict[str, object] = {"exif": exif.tobytes(), "quality": 100, "subsampling": 0}
    if icc:
        options["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return _encode(stored, "JPEG", **options)


def phone_mpo(orientation: int = 6) -> bytes:
    """A phone's MPO: the camera JPEG of ``phone_jpeg`` first, then a depth map (grey, ``DEPTH_SIZE``, black).

    Pillow opens it as format "MPO" with two frames.
    """
    stored = Image.open(io.BytesIO(phone_jpeg(orientation)))
    exif = stored.getexif()
    depth = Image.new("L", DEPTH_SIZE, 0)
    return _encode(stored, "MPO", save_all=True, append_images=[depth], exif=exif.tobytes(), quality=100,
                   subsampling=0)


def claim_size(data: bytes, size: tuple[int, int], frame: int = 0) -> bytes:
    """``data`` with the frame header (SOF) of its ``frame``-th JPEG claiming ``size``, the rest unchanged:
    the header of a decompression bomb.

    A frame starts with SOI then a marker (FF D8 FF); inside a JPEG an FF byte of the compressed data is
    followed by 00, so that sequence marks only where a frame starts.
    """
    start = 0
    for _ in range(frame):
        start = data.index(b"\xff\xd8\xff", start + 2)
    at = start + 2  # the first marker after SOI
    while not 0xC0 <= data[at + 1] <= 0xC3:  # SOF0 to SOF3: FF Cn, length, precision, height, width
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return data[:at + 5] + struct.pack(">HH", size[1], size[0]) + data[at + 9:]


def grey16_png(levels: tuple[int, int, int] = (0, 32768, 65535)) -> bytes:
    """A 16-bit greyscale scan as PNG: three vertical bands of the given 16-bit levels, left to right."""
    width, height = SEEN_SIZE
    third = width // 3
    image = Image.new("I;16", SEEN_SIZE, levels[0])
    # Pasting a colour into I;16 misreads values over 32767, so paste images of each level.
    image.paste(Image.new("I;16", (third, height), levels[1]), (third, 0))
    image.paste(Image.new("I;16", (width - 2 * third, height), levels[2]), (2 * third, 0))
    return _encode(image, "PNG")


def grey16_tiff_big_endian(level: int = 32768) -> bytes:
    """A 16-bit big-endian greyscale TIFF (mode I;16B), as some scanners on Macs write them."""
    return _encode(Image.new("I;16B", SEEN_SIZE, level), "TIFF")


def rgb48_png(rgb16: tuple[int, int, int] = (65535, 32768, 0)) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, written by hand: Pillow cannot write one."""
    width, height = SEEN_SIZE
    row = b"\x00" + struct.pack(">HHH", *rgb16) * width  # filter byte 0, then big-endian samples
    raw = zlib.compress(row * height)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16-bit, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def fax_tiff() -> bytes:
    """A 1-bit scan, CCITT Group 4 compressed, 300 dpi: black text (a block) on white paper."""
    image = Image.new("1", SEEN_SIZE, 1)
    ImageDraw.Draw(image).rectangle([10, 10, 40, 30], fill=0)
    return _encode(image, "TIFF", compression="group4", dpi=(300, 300))


def cmyk_jpeg() -> bytes:
    """A print-shop CMYK JPEG (Adobe marker): a black (K) block on white paper."""
    image = Image.new("CMYK", SEEN_SIZE, (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (10, 10, 40, 30))
    return _encode(image, "JPEG", quality=95)


def lab_tiff() -> bytes:
    """A CIELab TIFF of a neutral mid grey (L* 50)."""
    return _encode(Image.new("LAB", SEEN_SIZE, (128, 128, 128)), "TIFF")


def float_tiff(value: float = 0.5) -> bytes:
    """A 32-bit float TIFF (scientific tools; values 0.0 to 1.0)."""
    return _encode(Image.new("F", SEEN_SIZE, value), "TIFF")


def _text_mask() -> Image.Image:
    """Where the "text" of a screenshot is: a black block in the middle."""
    mask = Image.new("L", SEEN_SIZE, 0)
    ImageDraw.Draw(mask).rectangle([20, 20, 60, 40], fill=255)
    return mask


def transparent_text_png() -> bytes:
    """A screenshot tool's RGBA PNG: black text on a fully transparent background (whose RGB is black too)."""
    image = Image.new("RGBA", SEEN_SIZE, (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), mask=_text_mask())
    return _encode(image, "PNG")


def palette_png(alpha_table: bool = False) -> bytes:
    """An optimised screenshot: a palette PNG with black text, the background index transparent.

    ``alpha_table`` writes a tRNS alpha per palette entry (as pngquant does) instead of one index.
    """
    image = Image.new("P", SEEN_SIZE, 0)
    image.putpalette([0, 0, 0, 0, 0, 0])  # index 0: transparent background, index 1: black text
    image.paste(1, mask=_text_mask())
    transparency: int | bytes = b"\x00\xff" if alpha_table else 0
    return _encode(image, "PNG", transparency=transparency)


def grey_alpha_png() -> bytes:
    """A greyscale PNG with alpha (LA): black text on transparency."""
    image = Image.new("LA", SEEN_SIZE, (0, 0))
    image.paste((0, 255), mask=_text_mask())
    return _encode(image, "PNG")


def half_transparent_webp() -> bytes:
    """A lossless WebP, black at half opacity all over: grey on white."""
    return _encode(Image.new("RGBA", SEEN_SIZE, (0, 0, 0, 128)), "WEBP", lossless=True)


def transparent_gif() -> bytes:
    """A GIF with a transparent background index and black text."""
    return palette_png_as("GIF")


def palette_png_as(fmt: str) -> bytes:
    image = Image.open(io.BytesIO(palette_png()))
    return _encode(image, fmt, transparency=0)
