"""Images reach the model as a person sees them: upright, on white, at the right brightness, any mode.

The files come from ``tests/image_files.py``, made the way phones, scanners and screenshot tools make
them; every test checks pixel values, not only that decoding succeeded.
"""

from __future__ import annotations

import io

import image_files as files
import pytest
from PIL import Image

from glyphq.celeryconfig import Settings
from glyphq.producer import InvalidJob
from glyphq.producer.images import check_image, check_image_bytes, decode_checked_image
from glyphq.producer.pixels import SUPPORTED_MODES, to_rgb

SETTINGS = Settings()


def decoded(data: bytes) -> Image.Image:
    image = decode_checked_image(data, SETTINGS)
    assert image.mode == "RGB"
    return image


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_phone_jpeg_is_turned_upright(orientation):
    """A camera stores pixels as the sensor saw them and says how to turn them (EXIF Orientation):
    the red block a person sees top-left must be top-left for the model, whatever the tag says."""
    data = files.phone_jpeg(orientation)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (files.SEEN_SIZE if orientation in (1, 3) else files.SEEN_SIZE[::-1])
    image = decoded(data)
    assert image.size == files.SEEN_SIZE
    assert close(image.getpixel((2, 2)), files.RED)
    assert close(image.getpixel((files.SEEN_SIZE[0] - 3, 2)), files.BLUE)
    assert close(image.getpixel((2, files.SEEN_SIZE[1] - 3)), files.WHITE)


def test_submit_reports_the_size_a_person_sees():
    """``image_size`` in the result comes from this: a portrait-stored photo tagged to be turned is landscape."""
    checked = check_image_bytes(files.phone_jpeg(6), SETTINGS)
    assert (checked.width, checked.height) == files.SEEN_SIZE
    assert checked.format == "JPEG"


def test_phone_jpeg_without_icc_profile_looks_the_same():
    with_profile, without = decoded(files.phone_jpeg(6, icc=True)), decoded(files.phone_jpeg(6, icc=False))
    assert close(with_profile.getpixel((2, 2)), without.getpixel((2, 2)), tolerance=2)


def test_damaged_exif_leaves_the_image_as_stored():
    image = files.seen_picture()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")  # IFD cut short
    with pytest.warns(UserWarning, match="Corrupt EXIF data"):  # Pillow warns; a viewer shows it as stored
        result = decoded(buffer.getvalue())
    assert result.size == files.SEEN_SIZE and close(result.getpixel((2, 2)), files.RED)


def test_sixteen_bit_grey_scan_keeps_its_brightness():
    """16-bit levels 0, 32768 and 65535 come out black, mid grey and white, not black, white, white."""
    image = decoded(files.grey16_png())
    assert [image.getpixel((x, 10)) for x in (5, 48, 90)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_sixteen_bit_big_endian_tiff_is_mid_grey():
    assert decoded(files.grey16_tiff_big_endian(32768)).getpixel((0, 0)) == (128, 128, 128)
    assert decoded(files.grey16_tiff_big_endian(16384)).getpixel((0, 0)) == (64, 64, 64)


def test_48_bit_rgb_png_is_scaled_per_channel():
    assert decoded(files.rgb48_png((65535, 32768, 0))).getpixel((3, 3)) == (255, 128, 0)


def test_group4_fax_tiff_is_black_text_on_white():
    image = decoded(files.fax_tiff())
    assert image.getpixel((20, 20)) == (0, 0, 0)
    assert image.getpixel((80, 50)) == (255, 255, 255)


def test_cmyk_jpeg_is_black_on_white():
    image = decoded(files.cmyk_jpeg())
    assert close(image.getpixel((20, 20)), files.BLACK)
    assert close(image.getpixel((80, 50)), files.WHITE)


def test_lab_tiff_mid_grey_is_srgb_mid_grey():
    """CIELab L* 50 is sRGB 119 (Pillow's own LAB -> RGB conversion would give a saturated colour)."""
    assert close(decoded(files.lab_tiff()).getpixel((0, 0)), (119, 119, 119), tolerance=2)


@pytest.mark.parametrize("make", [files.transparent_text_png, files.palette_png,
                                  lambda: files.palette_png(alpha_table=True), files.grey_alpha_png,
                                  files.transparent_gif], ids=["rgba", "palette-index", "palette-alpha", "la", "gif"])
def test_black_text_on_transparency_is_black_on_white(make):
    """Screenshot tools leave the background transparent with black RGB: it must become white paper."""
    image = decoded(make())
    assert image.getpixel((40, 30)) == (0, 0, 0)  # the text
    assert image.getpixel((2, 2)) == (255, 255, 255)  # the transparent background
    assert image.getpixel((90, 60)) == (255, 255, 255)


def test_half_transparent_black_is_grey_on_white():
    assert close(decoded(files.half_transparent_webp()).getpixel((5, 5)), (127, 127, 127), tolerance=1)


def test_transparent_colour_key_in_16_bit_grey_png_is_white():
    image = Image.new("I;16", (4, 1), 0)
    image.paste(Image.new("I;16", (2, 1), 40000), (2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    result = decoded(buffer.getvalue())
    assert [result.getpixel((x, 0)) for x in (0, 3)] == [(255, 255, 255), (156, 156, 156)]


@pytest.mark.parametrize(("mode", "value", "expected"), [
    ("F", 0.5, 128),  # floats from 0.0 to 1.0
    ("F", 200.0, 200),  # Pillow's own float scale, 0 to 255 (what convert("F") of an L image gives)
    ("I", 200, 200),  # 8-bit values in a 32-bit image
    ("I", 32768, 128),  # 16-bit values in a 32-bit image (older Pillow read 16-bit PNGs this way)
])
def test_wide_integer_and_float_images_are_read_in_the_range_their_values_use(mode, value, expected):
    image = Image.new(mode, (2, 1), 0)
    image.putpixel((1, 0), value)
    assert to_rgb(image).getpixel((1, 0)) == (expected,) * 3
    assert to_rgb(image).getpixel((0, 0)) == (0, 0, 0)


def test_values_outside_every_usual_range_are_stretched():
    image = Image.new("I", (3, 1), -1000)
    image.putpixel((1, 0), 100_000)
    image.putpixel((2, 0), 49_500)
    assert [to_rgb(image).getpixel((x, 0))[0] for x in range(3)] == [0, 255, 128]


def test_every_pillow_mode_is_known():
    assert set(Image.MODES) <= SUPPORTED_MODES


@pytest.mark.parametrize("mode", sorted(SUPPORTED_MODES))
def test_every_mode_converts_to_rgb(mode):
    image = Image.new(mode, (5, 3))
    result = to_rgb(image)
    assert result.mode == "RGB" and result.size == (5, 3)


@pytest.mark.parametrize("mode", sorted(SUPPORTED_MODES))
def test_submit_takes_a_pil_image_of_every_mode(mode):
    """``submit(pil_image)`` stores a PNG; PNG cannot hold CMYK, F, I, LAB, HSV, La, PA, RGBa ... as they are."""
    checked = check_image(Image.new(mode, (6, 4)), SETTINGS)
    assert checked.format == "PNG" and (checked.width, checked.height) == (6, 4)
    assert Image.open(io.BytesIO(checked.data)).mode == "RGB"


def test_pil_image_of_a_cmyk_print_keeps_its_colours():
    image = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 0, 255))
    stored = Image.open(io.BytesIO(check_image(image, SETTINGS).data))
    assert stored.getpixel((0, 0)) == (0, 0, 0) and stored.getpixel((3, 3)) == (255, 255, 255)


def test_pil_image_opened_from_a_phone_jpeg_is_stored_upright():
    opened = Image.open(io.BytesIO(files.phone_jpeg(8)))
    checked = check_image(opened, SETTINGS)
    assert (checked.width, checked.height) == files.SEEN_SIZE
    assert close(decoded(checked.data).getpixel((2, 2)), files.RED)


def test_pil_image_of_a_mode_nothing_converts_is_refused(monkeypatch):
    import glyphq.producer.pixels
    monkeypatch.setattr(producer.pixels, "SUPPORTED_MODES", frozenset({"RGB"}))
    with pytest.raises(InvalidJob, match=r"^image: mode CMYK is not supported; supported modes: RGB$"):
        check_image(Image.new("CMYK", (4, 4)), SETTINGS)


def test_pil_image_whose_pixels_cannot_be_read_is_refused():
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buffer, format="PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()[:200]))  # lazy: the header is whole, the pixels are cut off
    with pytest.raises(InvalidJob, match=r"^image: cannot be read as a PIL image: OSError"):
        check_image(image, SETTINGS)


def test_plain_rgb_is_not_copied():
    image = Image.new("RGB", (4, 4))
    assert to_rgb(image) is image
