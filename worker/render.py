"""Render long text into page images the way Glyph (zai-org/Glyph) was trained to read them.

This follows Glyph's ``scripts/word2png_function.py`` with the settings of its ``config/config_en.json``:
text -> XML-escaped reportlab ``Paragraph`` markup -> PDF pages (reportlab platypus) -> raster -> crop.
Glyph rasterizes with poppler (pdf2image); here pypdfium2 does it, as it installs from a wheel.
Characters the main font lacks (CJK with DejaVu Sans) are set in the shipped Droid Sans Fallback.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pypdfium2
from PIL import Image, ImageChops
from reportlab.lib.colors import HexColor
from reportlab.lib.enums import TA_CENTER, TA_JUSTIFY, TA_LEFT, TA_RIGHT
from reportlab.lib.styles import ParagraphStyle
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import LayoutError, Paragraph, SimpleDocTemplate

from glyphq.producer.errors import InvalidRenderConfig

__all__ = ["InvalidRenderConfig", "RenderConfig", "png_bytes", "render_pages"]

log = logging.getLogger(__name__)

FONTS_DIR = Path(__file__).resolve().parent / "fonts"
DEFAULT_FONT = FONTS_DIR / "DejaVuSans.ttf"
FALLBACK_FONT = FONTS_DIR / "DroidSansFallbackFull.ttf"

_ALIGNMENTS = {"LEFT": TA_LEFT, "CENTER": TA_CENTER, "RIGHT": TA_RIGHT, "JUSTIFY": TA_JUSTIFY}
_COLOR = re.compile(r"#[0-9A-Fa-f]{6}")
# Glyph switches the whole text to reportlab's break-anywhere wrapping when it finds CJK ideographs
# (U+4E00-U+9FFF); kana, extension A and compatibility ideographs are added here.
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_DROPPED = str.maketrans("", "", "\u00ad\u200b")  # soft hyphen, zero-width space
_LINES_PER_PARAGRAPH = 30  # Glyph's grouping; it decides where orphan control may move a line
_CROP_TOLERANCE = 5  # grey levels, as Glyph
_MAX_DPI = 600
_FRAME_PADDING = 6  # points; reportlab's Frame default, inside the margins (Glyph keeps it too)
_POSITIVE = ("dpi", "font_size", "line_height", "horizontal_scale")
_NON_NEGATIVE = (
    "margin_x margin_y left_indent right_indent space_before space_after border_width border_padding"
)

# reportlab's font registry and PDFium are process-wide and not thread-safe.
_FONT_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()
_PDFIUM_LOCK = threading.Lock()
_FONTS: dict[str, TTFont] = {}


@dataclass(frozen=True)
class RenderConfig:
    """Rendering settings: the keys of Glyph's ``config_en.json`` in snake_case, with its values.

    Lengths (page size, margins, indents, font size, line height, spacing, borders) are in points
    (1/72 inch), so they scale with ``dpi``. Values are checked and normalized on construction.
    """

    page_size: str = "595,842"
    dpi: float = 72
    margin_x: float = 10
    margin_y: float = 10
    font_path: str = str(DEFAULT_FONT)
    font_size: float = 9
    line_height: float = 10
    font_color: str = "#000000"
    page_bg_color: str = "#FFFFFF"
    para_bg_color: str = "#FFFFFF"
    alignment: str = "LEFT"
    horizontal_scale: float = 1.0
    first_line_indent: float = 0
    left_indent: float = 0
    right_indent: float = 0
    space_before: float = 0
    space_after: float = 0
    border_width: float = 0
    border_padding: float = 0
    auto_crop_width: bool = True
    auto_crop_last_page: bool = True
    newline_markup: str = "<br/>"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RenderConfig:
        """A config from a mapping with Glyph's hyphenated keys (``"margin-x"``); absent keys: defaults."""
        if not isinstance(data, Mapping):
            raise InvalidRenderConfig(f"render config must be a JSON object, got {type(data).__name__}")
        known = {_key(f.name): f.name for f in fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InvalidRenderConfig(f"unknown render config key {key!r}{hint}")
            kwargs[known[key]] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, source: str | Path | Mapping[str, Any]) -> RenderConfig:
        """A config from a JSON file path (or an already parsed mapping).

        A relative ``font-path`` in a file is taken relative to that file's folder, as Glyph's
        configs ship their font next to them.
        """
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = Path(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidRenderConfig(f"cannot read render config {str(path)!r}: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("font-path"), str):
            font = Path(data["font-path"])
            if not font.is_absolute():
                data["font-path"] = str(path.parent / font)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The config with Glyph's hyphenated keys; ``from_dict(to_dict())`` gives it back."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @property
    def page_size_pt(self) -> tuple[float, float]:
        """Page width and height in points."""
        width, height = self.page_size.split(",")
        return float(width), float(height)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalized values are written once, here
        set_(self, "page_size", _page_size(self.page_size))
        for name in _POSITIVE:
            set_(self, name, _number(name, getattr(self, name), positive=True))
        for name in _NON_NEGATIVE.split():
            set_(self, name, _number(name, getattr(self, name), positive=False))
        # A negative first-line indent is a hanging indent, which reportlab supports.
        set_(self, "first_line_indent", _number("first_line_indent", self.first_line_indent, positive=None))
        if self.dpi > _MAX_DPI:
            raise InvalidRenderConfig(f"dpi must be at most {_MAX_DPI}, got {self.dpi!r}")
        for name in ("font_color", "page_bg_color", "para_bg_color"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _COLOR.fullmatch(value):
                raise InvalidRenderConfig(f"{_key(name)} must be a colour like '#1A2B3C', got {value!r}")
            set_(self, name, value.upper())
        for name in ("auto_crop_width", "auto_crop_last_page"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRenderConfig(f"{_key(name)} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.alignment, str) or self.alignment.upper() not in _ALIGNMENTS:
            raise InvalidRenderConfig(f"alignment must be one of {list(_ALIGNMENTS)}, got {self.alignment!r}")
        set_(self, "alignment", self.alignment.upper())
        if not isinstance(self.font_path, (str, Path)) or not Path(self.font_path).is_file():
            raise InvalidRenderConfig(f"font-path must name a TrueType font file, got {self.font_path!r}")
        set_(self, "font_path", str(self.font_path))
        self._check_layout()

    def _check_layout(self) -> None:
        width, height = (side - 2 * _FRAME_PADDING for side in self.page_size_pt)
        if width - 2 * self.margin_x - self.left_indent - self.right_indent < 4 * self.font_size:
            raise InvalidRenderConfig("page-size, margin-x and indents leave no room for a line of text")
        # reportlab will not split a paragraph where fewer than two lines fit.
        if height - 2 * self.margin_y < 2 * self.line_height:
            raise InvalidRenderConfig("page-size and margin-y leave no room for two lines (line-height)")
        if not isinstance(self.newline_markup, str):
            raise InvalidRenderConfig(f"newline-markup must be a string, got {self.newline_markup!r}")
        try:
            Paragraph(f"a{self.newline_markup}b", ParagraphStyle("check"))
        except ValueError as exc:
            raise InvalidRenderConfig(f"newline-markup is not valid paragraph markup: {exc}") from exc


def render_pages(text: str, config: RenderConfig | None = None) -> list[Image.Image]:
    """Render ``text`` into RGB page images, in reading order.

    Newlines are hard line breaks; runs of spaces are kept; soft hyphens and zero-width spaces are
    dropped; ``<`` and ``&`` print as themselves. Each page is cropped to its last ink column plus
    ``margin-x`` when ``auto-crop-width`` is set, and the last page to its last ink row plus
    ``margin-y`` when ``auto-crop-last-page`` is set.

    Raises ``ValueError`` for empty text, and ``InvalidRenderConfig`` when the font cannot be used
    or the text cannot be laid out on the configured page.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty or only whitespace: nothing to render")
    cfg = config if config is not None else RenderConfig()
    started = time.perf_counter()
    main_font = _font(cfg.font_path)
    paragraphs = _paragraph_markup(text, cfg, main_font)
    pdf = _build_pdf(paragraphs, cfg, main_font.fontName, cjk=bool(_CJK.search(text)))
    pages = _rasterize(pdf, cfg)
    pages = [_finish(page, cfg, last=i == len(pages) - 1) for i, page in enumerate(pages)]
    elapsed = time.perf_counter() - started
    log.debug("rendered %d chars into %d pages in %.3fs", len(text), len(pages), elapsed)
    return pages


def png_bytes(img: Image.Image) -> bytes:
    """``img`` as PNG bytes with fixed encoder settings and no metadata, so equal pixels give equal bytes."""
    clean = Image.frombytes("RGB", img.size, img.convert("RGB").tobytes())
    out = io.BytesIO()
    clean.save(out, format="PNG", compress_level=6, optimize=False)
    return out.getvalue()


def _key(name: str) -> str:
    return name.replace("_", "-")


def _number(name: str, value: Any, positive: bool | None) -> float:
    """``value`` checked: ``positive`` True means > 0, False means >= 0, None means any sign."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRenderConfig(f"{_key(name)} must be a number, got {value!r}")
    if positive and value <= 0:
        raise InvalidRenderConfig(f"{_key(name)} must be greater than 0, got {value!r}")
    if positive is False and value < 0:
        raise InvalidRenderConfig(f"{_key(name)} must not be negative, got {value!r}")
    return value


def _page_size(value: Any) -> str:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        width, height = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise InvalidRenderConfig(f"page-size must be 'width,height' in points, got {value!r}") from None
    if not (0 < width <= 14400 and 0 < height <= 14400):
        raise InvalidRenderConfig(f"page-size must be two positive sizes in points, got {value!r}")
    return f"{width:g},{height:g}"


def _font(path: str) -> TTFont:
    """The reportlab font for ``path``, registered once per process under a name unique to the path."""
    resolved = str(Path(path).resolve())
    with _FONT_LOCK:
        font = _FONTS.get(resolved)
        if font is None:
            name = f"glyphq-{Path(resolved).stem}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"
            try:
                font = TTFont(name, resolved)
            except Exception as exc:  # reportlab raises TTFError, struct.error, ... for unusable files
                raise InvalidRenderConfig(f"font-path {path!r} is not a usable TrueType font: {exc}") from exc
            pdfmetrics.registerFont(font)
            _FONTS[resolved] = font
        return font


def _paragraph_markup(text: str, cfg: RenderConfig, main_font: TTFont) -> list[str]:
    """Glyph's text processing: escaped lines joined by ``newline-markup``, 30 lines per paragraph."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_DROPPED)
    markup = re.sub(r" {2,}", lambda m: "&nbsp;" * len(m.group()), escape(text))
    markup = _with_fallback_font(markup, main_font)
    lines = markup.split("\n")
    step = _LINES_PER_PARAGRAPH
    return [cfg.newline_markup.join(lines[i : i + step]) for i in range(0, len(lines), step)]


def _with_fallback_font(markup: str, main_font: TTFont) -> str:
    """Wrap runs of characters the main font lacks, but the fallback has, in a ``<font>`` tag."""
    main_cmap = main_font.face.charToGlyph
    missing = {c for c in set(markup) if ord(c) not in main_cmap and not c.isspace()}
    if not missing:
        return markup
    fallback = _font(str(FALLBACK_FONT))
    covered = sorted(c for c in missing if ord(c) in fallback.face.charToGlyph)
    if not covered:
        return markup
    runs = re.compile("[" + "".join(re.escape(c) for c in covered) + "]+")
    return runs.sub(lambda m: f'<font name="{fallback.fontName}">{m.group()}</font>', markup)


def _build_pdf(paragraphs: list[str], cfg: RenderConfig, font_name: str, *, cjk: bool) -> bytes:
    page_size = cfg.page_size_pt
    bg = HexColor(cfg.page_bg_color)
    style = ParagraphStyle(
        name="glyphq",
        fontName=font_name,
        fontSize=cfg.font_size,
        leading=cfg.line_height,
        textColor=HexColor(cfg.font_color),
        backColor=HexColor(cfg.para_bg_color),
        borderColor=HexColor("#FFFFFF"),  # Glyph's para-border-color default; not in config_en.json
        borderWidth=cfg.border_width,
        borderPadding=cfg.border_padding,
        firstLineIndent=cfg.first_line_indent,
        wordWrap="CJK" if cjk else None,
        leftIndent=cfg.left_indent,
        rightIndent=cfg.right_indent,
        alignment=_ALIGNMENTS[cfg.alignment],
        spaceBefore=cfg.space_before,
        spaceAfter=cfg.space_after,
    )

    def paint_background(canvas: Any, _doc: Any) -> None:
        canvas.saveState()
        canvas.setFillColor(bg)
        canvas.rect(0, 0, page_size[0], page_size[1], stroke=0, fill=1)
        canvas.restoreState()

    out = io.BytesIO()
    with _BUILD_LOCK:
        doc = SimpleDocTemplate(
            out,
            pagesize=page_size,
            leftMargin=cfg.margin_x,
            rightMargin=cfg.margin_x,
            topMargin=cfg.margin_y,
            bottomMargin=cfg.margin_y,
            invariant=1,  # no timestamps or random ids in the PDF
        )
        story = [Paragraph(p, style) for p in paragraphs]
        try:
            doc.build(story, onFirstPage=paint_background, onLaterPages=paint_background)
        except LayoutError as exc:  # e.g. space-before or border-padding taller than the page
            raise InvalidRenderConfig(f"the text does not fit the page layout: {exc}") from exc
    return out.getvalue()


def _rasterize(pdf_bytes: bytes, cfg: RenderConfig) -> list[Image.Image]:
    """Each PDF page as an RGB image; its size is ceil(points * dpi / 72), as poppler's pdftoppm."""
    bg = cfg.page_bg_color
    fill = (int(bg[1:3], 16), int(bg[3:5], 16), int(bg[5:7], 16), 255)
    scale = cfg.dpi / 72
    pages = []
    with _PDFIUM_LOCK:
        pdf = pypdfium2.PdfDocument(pdf_bytes)
        try:
            for index in range(len(pdf)):
                page = pdf[index]
                bitmap = page.render(scale=scale, fill_color=fill, rev_byteorder=True, draw_annots=False)
                pages.append(bitmap.to_pil())  # RGB bitmaps are copied, so closing them is safe
                bitmap.close()
                page.close()
        finally:
            pdf.close()
    return pages


def _finish(img: Image.Image, cfg: RenderConfig, last: bool) -> Image.Image:
    """Glyph's post-processing: horizontal scale, then crop width and (last page) height to the ink."""
    if cfg.horizontal_scale != 1.0:
        width = max(1, int(img.width * cfg.horizontal_scale))
        img = img.resize((width, img.height), Image.Resampling.BICUBIC)
    crop_height = cfg.auto_crop_last_page and last
    if not (cfg.auto_crop_width or crop_height):
        return img
    ink = _ink_box(img)
    if ink is None:
        return img
    right, lower = img.width, img.height
    if cfg.auto_crop_width:
        right = min(img.width, ink[2] + round(cfg.margin_x * cfg.dpi / 72))
    if crop_height:
        # Glyph pads from the last ink row's index (not one past it), so the row count is one less.
        lower = min(img.height, ink[3] - 1 + round(cfg.margin_y * cfg.dpi / 72))
    return img.crop((0, 0, right, lower))


def _ink_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of pixels whose grey differs by more than the tolerance from the top-left corner."""
    gray = img.convert("L")
    background = Image.new("L", gray.size, gray.getpixel((0, 0)))  # type: ignore[arg-type]
    mask = ImageChops.difference(gray, background).point(lambda v: 255 if v > _CROP_TOLERANCE else 0)
    return mask.getbbox()
