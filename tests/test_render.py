"""worker.render: Glyph-style text-to-page rendering (reportlab layout, pypdfium2 raster, Glyph's crops)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops

from glyphq.worker import render
from glyphq.worker.render import InvalidRenderConfig, RenderConfig, png_bytes, render_pages

NO_CROP: dict[str, Any] = {"auto_crop_width": False, "auto_crop_last_page": False}
PROSE = (
    "Glyph reads long text as page images rendered with a fixed layout, so every setting counts. "
    "Each sentence here is ordinary prose that wraps on spaces between words. "
)


def ink_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of the non-white pixels."""
    diff = ImageChops.difference(img.convert("L"), Image.new("L", img.size, 255))
    return diff.point(lambda v: 255 * (v > 5)).getbbox()


def ink_lines(img: Image.Image) -> int:
    """Number of separate bands of rows that hold ink (text lines, at the default line height)."""
    gray = img.convert("L")
    data, width = gray.tobytes(), gray.width
    rows = [min(data[y * width : (y + 1) * width]) < 250 for y in range(gray.height)]
    return sum(1 for y, ink in enumerate(rows) if ink and (y == 0 or not rows[y - 1]))


def red_pixels(img: Image.Image) -> int:
    data = img.convert("RGB").tobytes()
    pixels = zip(data[0::3], data[1::3], data[2::3], strict=True)
    return sum(1 for r, g, b in pixels if r - g > 100 and r - b > 100)


def same_pngs(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return [png_bytes(p) for p in a] == [png_bytes(p) for p in b]


def test_page_count_grows_with_text_length() -> None:
    short = render_pages(PROSE * 10)
    long = render_pages(PROSE * 200)
    assert len(short) == 1
    assert len(long) >= 3
    assert all(p.mode == "RGB" for p in long)


def test_same_text_and_config_give_identical_pngs() -> None:
    text = PROSE * 80 + "\n中文也一样。"
    first, second = render_pages(text), render_pages(text)
    assert len(first) == len(second) >= 2
    assert same_pngs(first, second)
    assert png_bytes(render_pages(text + "!")[-1]) != png_bytes(first[-1])


def test_png_bytes_carries_no_metadata() -> None:
    img = render_pages("metadata")[0]
    tagged = img.copy()
    tagged.info.update({"dpi": (300, 300), "comment": "x"})
    data = png_bytes(tagged)
    assert data == png_bytes(img)
    assert data.startswith(b"\x89PNG") and b"tEXt" not in data and b"pHYs" not in data


@pytest.mark.parametrize(
    ("page_size", "dpi", "expected"),
    [
        ("595,842", 72, (595, 842)),
        ("595,842", 144, (1190, 1684)),
        ("300,400", 72, (300, 400)),
        ("300,400", 144, (600, 800)),
        # Not a whole number of pixels: rounded up, as poppler's pdftoppm (Glyph's rasterizer) does.
        ("595,842", 96, (math.ceil(595 * 96 / 72), math.ceil(842 * 96 / 72))),
    ],
)
def test_page_pixels_follow_page_size_and_dpi(page_size: str, dpi: int, expected: tuple[int, int]) -> None:
    pages = render_pages(PROSE * 40, RenderConfig(page_size=page_size, dpi=dpi, **NO_CROP))
    assert all(p.size == expected for p in pages)


def test_layout_scales_with_dpi() -> None:
    low = render_pages(PROSE * 40, RenderConfig(**NO_CROP))
    high = render_pages(PROSE * 40, RenderConfig(dpi=144, **NO_CROP))
    assert len(low) == len(high)
    box_low, box_high = ink_box(low[0]), ink_box(high[0])
    assert box_low and box_high
    assert all(abs(h - 2 * lo) <= 3 for lo, h in zip(box_low, box_high, strict=True))
    assert ink_lines(low[0]) == ink_lines(high[0])


def test_cjk_text_wraps_and_renders_with_the_fallback_font() -> None:
    text = "汉字没有空格也要换行，" * 60  # one paragraph, no spaces
    cfg = RenderConfig(**NO_CROP)
    page = render_pages(text, cfg)[0]
    box = ink_box(page)
    assert box is not None
    # About 660 ideographs of 9 pt on a 563 pt wide frame: 11 lines of 10 pt (they touch, so measure height).
    assert 100 <= box[3] - box[1] <= 120
    assert box[2] <= page.width - cfg.margin_x  # wrapped inside the frame, not run off the page
    # Lines break between ideographs and fill the frame, even where spaces split the text into
    # 40-ideograph runs that word wrapping would put one per line (ink ending near x=376).
    spaced = ink_box(render_pages(("汉字换行" * 10 + " ") * 6, cfg)[0])
    assert spaced is not None and spaced[2] > 550
    # Missing glyphs would all be the same box; real glyphs differ from each other.
    assert png_bytes(render_pages("中" * 30)[0]) != png_bytes(render_pages("文" * 30)[0])


def test_last_page_is_cropped_to_its_ink() -> None:
    text = PROSE * 120
    full = render_pages(text, RenderConfig(**NO_CROP))
    cropped = render_pages(text, RenderConfig())
    assert len(full) == len(cropped) >= 2
    assert full[-1].size == (595, 842)
    assert cropped[0].height == 842  # only the last page loses height
    assert cropped[-1].height < 842
    last_ink = ink_box(full[-1])
    assert last_ink is not None
    assert cropped[-1].height == last_ink[3] - 1 + 10  # Glyph: last ink row index + margin-y


def test_width_is_cropped_per_page_to_ink_plus_margin() -> None:
    text = "short line\n" * 90 + PROSE * 3
    full = render_pages(text, RenderConfig(**NO_CROP))
    cropped = render_pages(text, RenderConfig(auto_crop_last_page=False))
    assert len(full) == len(cropped) == 2
    for f, c in zip(full, cropped, strict=True):
        box = ink_box(f)
        assert box is not None
        assert c.size == (box[2] + 10, 842)
    assert cropped[0].width < 100 < cropped[1].width  # each page on its own


def test_json_config_with_hyphenated_keys_loads(tmp_path: Path) -> None:
    shutil.copy(render.DEFAULT_FONT, tmp_path / "Body.ttf")
    glyph_config = {
        "page-size": "612,792", "dpi": 96, "margin-x": 12, "margin-y": 14, "font-path": "Body.ttf",
        "font-size": 10, "line-height": 11, "font-color": "#112233", "page-bg-color": "#fafafa",
        "para-bg-color": "#FAFAFA", "alignment": "justify", "horizontal-scale": 0.9,
        "first-line-indent": 0, "left-indent": 1, "right-indent": 2, "space-before": 0, "space-after": 0,
        "border-width": 0, "border-padding": 0, "auto-crop-width": False, "auto-crop-last-page": True,
        "newline-markup": "<br/>",
    }  # fmt: skip
    path = tmp_path / "config_en.json"
    path.write_text(json.dumps(glyph_config))
    cfg = RenderConfig.from_json(path)
    assert cfg.page_size_pt == (612.0, 792.0)
    assert (cfg.dpi, cfg.margin_x, cfg.margin_y, cfg.line_height) == (96, 12, 14, 11)
    assert cfg.font_path == str(tmp_path / "Body.ttf")  # relative to the JSON file
    assert cfg.page_bg_color == "#FAFAFA" and cfg.alignment == "JUSTIFY"
    assert cfg.horizontal_scale == 0.9 and cfg.auto_crop_width is False
    assert RenderConfig.from_json(cfg.to_dict()) == cfg
    assert RenderConfig.from_dict({}) == RenderConfig()


def test_defaults_are_glyph_config_en() -> None:
    cfg = RenderConfig()
    assert cfg.to_dict() | {"font-path": None} == {
        "page-size": "595,842", "dpi": 72, "margin-x": 10, "margin-y": 10, "font-path": None,
        "font-size": 9, "line-height": 10, "font-color": "#000000", "page-bg-color": "#FFFFFF",
        "para-bg-color": "#FFFFFF", "alignment": "LEFT", "horizontal-scale": 1.0, "first-line-indent": 0,
        "left-indent": 0, "right-indent": 0, "space-before": 0, "space-after": 0, "border-width": 0,
        "border-padding": 0, "auto-crop-width": True, "auto-crop-last-page": True, "newline-markup": "<br/>",
    }  # fmt: skip
    assert Path(cfg.font_path) == render.DEFAULT_FONT and render.DEFAULT_FONT.is_file()


def test_unknown_key_is_refused_by_name() -> None:
    with pytest.raises(InvalidRenderConfig, match=r"unknown render config key 'font-szie'.*'font-size'"):
        RenderConfig.from_dict({"font-size": 9, "font-szie": 9})
    with pytest.raises(InvalidRenderConfig, match="'para-border-color'"):
        RenderConfig.from_dict({"para-border-color": "#FFFFFF"})
    assert issubclass(InvalidRenderConfig, ValueError)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dpi", -72),
        ("dpi", 0),
        ("dpi", "72"),
        ("page-size", "595x842"),
        ("page-size", "595,842,1"),
        ("page-size", "-595,842"),
        ("page-size", "200,45"),  # fewer than two lines fit
        ("font-color", "black"),
        ("page-bg-color", "#FFF"),
        ("para-bg-color", "#GGGGGG"),
        ("alignment", "DIAGONAL"),
        ("auto-crop-width", "yes"),
        ("font-size", 0),
        ("line-height", True),
        ("margin-x", -1),
        ("horizontal-scale", float("nan")),
        ("font-path", "/nonexistent/Verdana.ttf"),
        ("newline-markup", "<br>"),
    ],
)
def test_bad_value_is_refused_naming_the_field(key: str, value: object) -> None:
    with pytest.raises(InvalidRenderConfig, match=key):
        RenderConfig.from_dict({key: value})


def test_unusable_font_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.ttf"
    fake.write_bytes(b"not a font")
    with pytest.raises(InvalidRenderConfig, match="font-path"):
        render_pages("text", RenderConfig(font_path=str(fake)))


def test_unreadable_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(InvalidRenderConfig, match="broken.json"):
        RenderConfig.from_json(path)
    with pytest.raises(InvalidRenderConfig, match="JSON object"):
        RenderConfig.from_dict(["dpi", 72])  # type: ignore[arg-type]


def test_empty_text_is_refused() -> None:
    for text in ("", " \n\t "):
        with pytest.raises(ValueError, match="empty"):
            render_pages(text)


def test_xml_special_characters_render_literally() -> None:
    literal = render_pages("<b>x</b> & <br/> &amp; ]]> <unclosed")[0]
    plain = render_pages("x")[0]
    literal_box, plain_box = ink_box(literal), ink_box(plain)
    assert literal_box and plain_box
    assert literal_box[2] - literal_box[0] > 10 * (plain_box[2] - plain_box[0])  # the tags are printed
    assert ink_lines(literal) == 1  # and "<br/>" in the text is not a line break


def test_newlines_are_hard_line_breaks() -> None:
    assert ink_lines(render_pages("first\nsecond\nthird")[0]) == 3
    assert ink_lines(render_pages("first second third")[0]) == 1
    with_blank = ink_box(render_pages("first\n\nthird", RenderConfig(**NO_CROP))[0])
    without = ink_box(render_pages("first\nthird", RenderConfig(**NO_CROP))[0])
    assert with_blank and without
    assert with_blank[3] - without[3] == 10  # the empty line keeps its line height


def test_newline_markup_is_used_between_lines() -> None:
    cfg = RenderConfig(newline_markup='<font color="#FF0000"> \\n </font>')  # Glyph's visible marker
    marked = render_pages("one\ntwo", cfg)[0]
    assert red_pixels(marked) > 10
    assert ink_lines(marked) == 1  # the marker replaces the line break, as in Glyph
    assert red_pixels(render_pages("one\ntwo")[0]) == 0


def test_soft_hyphen_and_zero_width_space_are_dropped() -> None:
    narrow = RenderConfig(page_size="200,100", **NO_CROP)
    # reportlab would break this word at the soft hyphen and print a hyphen there.
    with_shy = render_pages("xxxx xxxx xxxx " + "x" * 10 + "\u00ad" + "y" * 10, narrow)
    without = render_pages("xxxx xxxx xxxx " + "x" * 10 + "y" * 10, narrow)
    assert same_pngs(with_shy, without)
    assert same_pngs(render_pages("ab\u200bcd\u200b ef", narrow), render_pages("abcd ef", narrow))
    font = render._font(str(render.DEFAULT_FONT))
    assert render._paragraph_markup("a\u00adb\u200bc", RenderConfig(), font) == ["abc"]


def test_runs_of_spaces_are_preserved() -> None:
    single = ink_box(render_pages("a b")[0])
    spaced = ink_box(render_pages("a" + " " * 12 + "b")[0])
    indented = ink_box(render_pages("      a b")[0])
    assert single and spaced and indented
    space = 3  # DejaVu Sans space at 9 pt is about 2.9 px
    assert spaced[2] - single[2] >= 10 * space
    assert indented[0] - single[0] >= 5 * space


def test_alignment_and_horizontal_scale() -> None:
    left = ink_box(render_pages("right", RenderConfig(**NO_CROP))[0])
    right = ink_box(render_pages("right", RenderConfig(alignment="right", **NO_CROP))[0])
    assert left and right and right[0] > 500 > left[0]
    squeezed = render_pages(PROSE, RenderConfig(horizontal_scale=0.5, **NO_CROP))[0]
    assert squeezed.size == (297, 842)
