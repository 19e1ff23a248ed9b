"""Fitting images into the box: aspect kept (never more extreme), never upscaled but to the processors'
shortest side, orientation ignored; the aspect-ratio limit at intake; a phone's MPO read as its first JPEG."""

from __future__ import annotations

import functools
import io

import image_files as files
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from glyphq.celeryconfig import Settings
from glyphq.producer import InvalidJob, submit
from glyphq.producer.images import check_image_bytes, decode_checked_image
from glyphq.tasks.app import app
from glyphq.worker.images import MIN_SIDE, fit_image, fit_size, processor_min_side, smaller_box

LIMIT = Settings().max_aspect_ratio


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
        ((2000, 333), (1280, 720), (1280, 214)),  # the short side rounds up: 213.1 -> 214, ratio 5.98 < 6.01
        ((800, 12000), (1280, 720), (86, 1280)),  # a long receipt: 15:1 kept (14.9:1)
        ((10000, 50), (1280, 720), (5600, 28)),  # 200:1 would be 1280x6.4: the short side stays 28 instead
        ((50, 10000), (1280, 720), (28, 5600)),
        ((2000, 10), (1280, 720), (5600, 28)),  # thinner than 28 already: made 28, as the processors would
        ((1, 1), (1280, 720), (28, 28)),
    ],
)
def test_fit_size(size, box, expected):
    assert fit_size(size, box) == expected


def _ratio(size: tuple[int, int]) -> float:
    return max(size) / min(size)


@settings(max_examples=400, deadline=None)
@given(width=st.integers(1, 60_000), height=st.integers(1, 60_000),
       box=st.tuples(st.integers(224, 4096), st.integers(224, 4096)))
def test_fit_never_makes_the_ratio_more_extreme_nor_a_side_too_short(width, height, box):
    fitted = fit_size((width, height), box)
    long_side, short_side = max(width, height), min(width, height)
    assert max(fitted) * short_side <= long_side * min(fitted)  # the ratio never grows
    assert (fitted[0] - fitted[1]) * (width - height) >= 0  # landscape stays landscape, portrait portrait
    if short_side >= MIN_SIDE and short_side * max(box) >= MIN_SIDE * long_side:
        assert max(fitted) <= max(box) and min(fitted) <= min(box)  # inside the box, turned as needed
        assert max(fitted) <= long_side and min(fitted) <= short_side  # never upscaled
        assert min(fitted) >= MIN_SIDE
    else:  # so thin that fitting it would leave a side under 28 px: that side is 28
        assert min(fitted) == MIN_SIDE


@functools.cache
def _processors() -> list:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return [Glm4vImageProcessorPil(), Qwen2VLImageProcessorPil(), Idefics3ImageProcessorPil(), CLIPImageProcessorPil()]


@pytest.mark.parametrize("size", [(10000, 50), (50, 10000), (8000, 40), (2000, 10), (5600, 28), (1000, 5),
                                  (800, 12000), (1, 1), (199 * 31, 31)])
def test_real_processors_take_every_fitted_shape_submit_accepts(size):
    """GLM-4V (Glyph) and Qwen2-VL refuse an aspect ratio over 200; the old fit turned 10000x50 into 1280x6
    (213:1). Their PIL processors, built with their defaults (no download), must take the fitted size,
    and Qwen2-VL's patch grid must keep its shape (no stretching of a short side below 28)."""
    assert max(size) <= LIMIT * min(size)
    fitted = fit_size(size, (1280, 720))
    image = Image.new("RGB", fitted, "white")
    for processor in _processors():
        out = processor(images=[image], return_tensors="pt")
        assert out["pixel_values"].shape[0] >= 1, type(processor).__name__
        if "image_grid_thw" in out:  # patches of 14 px: the grid keeps the fitted ratio
            _, rows, cols = out["image_grid_thw"][0].tolist()
            assert abs(cols / rows - fitted[0] / fitted[1]) <= 0.5 * fitted[0] / fitted[1], (fitted, rows, cols)


def test_the_processors_refuse_what_submit_refuses():
    """The limit is theirs: 201:1 is refused by both GLM-4V and Qwen2-VL, 200:1 is not."""
    glm, qwen = _processors()[:2]
    for processor in (glm, qwen):
        processor(images=[Image.new("RGB", (5600, 28))], return_tensors="pt")
        with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200"):
            processor(images=[Image.new("RGB", (5628, 28))], return_tensors="pt")


def test_processor_min_side_follows_a_coarser_patch_grid():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class Processor:
        image_processor = Qwen2VLImageProcessorPil(patch_size=16)  # Qwen3-VL's patches

    assert processor_min_side(Processor()) == 32
    assert processor_min_side(object()) == MIN_SIDE
    assert fit_size((10000, 50), (1280, 720), min_side=32) == (6400, 32)


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", size, 1).save(buffer, format="PNG")
    return buffer.getvalue()


def test_extreme_aspect_ratio_is_refused_with_field_and_limit():
    with pytest.raises(InvalidJob) as info:
        check_image_bytes(_png((10000, 40)), Settings())
    assert str(info.value) == ("image: is 10000x40, an aspect ratio of 250.0:1; the limit is 200:1 "
                               "(GLYPHQ_MAX_ASPECT_RATIO)")
    with pytest.raises(InvalidJob, match="is 40x10000, an aspect ratio of 250.0:1"):
        decode_checked_image(_png((40, 10000)), Settings())  # the worker checks it as well
    assert check_image_bytes(_png((8000, 40)), Settings()).width == 8000  # 200:1 is allowed


def test_aspect_ratio_is_checked_from_the_header_before_decoding():
    """A header claiming 100000x10 pixels with no pixel data after it: refused for its shape, not as damaged."""
    header = _png((100_000, 10))[:45]  # signature, IHDR and the start of IDAT
    with pytest.raises(InvalidJob, match="aspect ratio of 10000.0:1"):
        check_image_bytes(header, Settings())


def test_aspect_ratio_limit_is_a_setting():
    loose = Settings.from_env({"GLYPHQ_MAX_ASPECT_RATIO": "300"})
    assert loose.max_aspect_ratio == 300
    assert check_image_bytes(_png((10000, 40)), loose).height == 40


def test_fit_image_keeps_small_images_untouched():
    image = Image.new("RGB", (300, 200))
    assert fit_image(image, (1280, 720)) is image
    assert fit_image(Image.new("RGB", (3000, 2000)), (1280, 720)).size == (1080, 720)
    assert fit_image(Image.new("RGB", (10000, 50)), (1280, 720)).size == (5600, 28)


def test_smaller_box_halves_with_a_floor():
    assert smaller_box((1280, 720)) == (640, 360)
    assert smaller_box((300, 300)) == (224, 224)


def test_phone_mpo_is_accepted_at_submit_as_a_jpeg(redis_client):
    """A phone's JPEG with a depth map after it opens in Pillow as format MPO, which was refused."""
    data = files.phone_mpo()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    checked = check_image_bytes(data, Settings())
    assert (checked.format, checked.width, checked.height) == ("JPEG", *files.SEEN_SIZE)
    assert submit(data, "What is in the photo?").state == "PENDING"
    app.control.purge()


def test_phone_mpo_is_decoded_as_its_first_frame():
    """What the worker decodes (``decode_checked_image``): the photo, turned upright, not the depth map."""
    image = decode_checked_image(files.phone_mpo(), Settings())
    assert (image.mode, image.size) == ("RGB", files.SEEN_SIZE)
    width, height = files.SEEN_SIZE
    for where, colour in [((2, 2), files.RED), ((width - 3, 2), files.BLUE), ((2, height - 3), files.WHITE)]:
        assert all(abs(got - want) <= 12 for got, want in zip(image.getpixel(where), colour, strict=True)), where


def test_phone_mpo_is_held_to_the_pixel_limit_from_its_header():
    """A first frame claiming 8000x8000 pixels, with the data of 96x64: refused for its size, not as damaged."""
    bomb = files.claim_size(files.phone_mpo(), (8000, 8000))
    for check in (check_image_bytes, decode_checked_image):
        with pytest.raises(InvalidJob) as info:
            check(bomb, Settings())
        assert str(info.value) == ("image: is 8000x8000 = 64000000 pixels; the limit is 40000000 "
                                   "(GLYPHQ_MAX_IMAGE_PIXELS)")


def test_phone_mpo_second_frame_is_never_decoded():
    """Only the first frame is read: a second frame claiming 400 megapixels costs nothing."""
    data = files.claim_size(files.phone_mpo(), (20_000, 20_000), frame=1)
    assert decode_checked_image(data, Settings()).size == files.SEEN_SIZE
