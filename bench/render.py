"""Benchmark: pages/s of the text-to-page renderer (worker.render) against a pure-Pillow baseline.

Both are timed on the same ~100k-character English text and a ~50k-character Chinese text with
Glyph's config_en.json settings, in one process on the CPU. The Pillow baseline is a minimal greedy
line breaker drawn with ImageDraw: it shows what the reportlab layout costs, not a supported renderer.

Run from the repository root:  python -m bench.render [--repeat 5]
Prints one table and writes bench/results/render.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # also runnable as ``python bench/render.py``
    sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from glyphq.worker import render  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "render.json"

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if can more will about into "
    "than its only other new some could time these two may then first any like now my such make over "
    "our even most after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while last "
    "might us great old year off come since against go came right used take three rendering compression "
    "context window vision language model page image token benchmark throughput deterministic"
)
_HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而"
    "方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好"
    "应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向"
)


def english_text(chars: int = 100_000, seed: int = 0) -> str:
    """Deterministic English-like prose: sentences in paragraphs, one paragraph per line."""
    rng = random.Random(seed)
    vocabulary = _WORDS.split()
    paragraphs, size = [], 0
    while size < chars:
        sentences = []
        for _ in range(rng.randint(2, 8)):
            words = [rng.choice(vocabulary) for _ in range(rng.randint(6, 24))]
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(1, 9999)))
            sentences.append(" ".join(words).capitalize() + rng.choice(".....?!;"))
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        size += len(paragraph) + 1
    return "\n".join(paragraphs)[:chars]


def chinese_text(chars: int = 50_000, seed: int = 0) -> str:
    """Deterministic Chinese-like text (common hanzi, full-width punctuation), one paragraph per line."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < chars:
        sentence = "".join(rng.choice(_HANZI) for _ in range(rng.randint(8, 30))) + rng.choice("，，。；")
        out.append(sentence + ("\n" if rng.random() < 0.08 else ""))
        size += len(out[-1])
    return "".join(out)[:chars]


def pillow_baseline(text: str, cfg: render.RenderConfig) -> list[Image.Image]:
    """Minimal pure-Pillow renderer: greedy wrap by measured width, fixed line pitch, Glyph's cropping."""
    cjk = bool(render._CJK.search(text))
    font_path = str(render.FALLBACK_FONT) if cjk else cfg.font_path
    scale = cfg.dpi / 72
    font = ImageFont.truetype(font_path, size=max(1, round(cfg.font_size * scale)))
    page_w, page_h = (round(v * scale) for v in cfg.page_size_pt)
    pad = 6  # reportlab's frame padding, in points
    left = round((cfg.margin_x + pad) * scale)
    top = round((cfg.margin_y + pad) * scale)
    width = page_w - 2 * left
    pitch = cfg.line_height * scale
    per_page = max(1, int((page_h - 2 * top) // pitch))
    token = re.compile(r"." if cjk else r"\S+\s*|\s+")
    widths: dict[str, tuple[float, float]] = {}  # token -> (advance with its trailing space, ink width)

    lines: list[str] = []
    for raw in text.translate({0xAD: None, 0x200B: None}).split("\n"):
        line, line_w = "", 0.0
        for tok in token.findall(raw):
            if tok not in widths:
                widths[tok] = (font.getlength(tok), font.getlength(tok.rstrip()))
            advance, ink = widths[tok]
            if line and line_w + ink > width:
                lines.append(line)
                line, line_w = "", 0.0
            line += tok
            line_w += advance
        lines.append(line)

    pages = []
    for start in range(0, len(lines), per_page):
        img = Image.new("RGB", (page_w, page_h), cfg.page_bg_color)
        draw = ImageDraw.Draw(img)
        for i, line in enumerate(lines[start : start + per_page]):
            draw.text((left, top + i * pitch), line, font=font, fill=cfg.font_color)
        pages.append(img)
    return [render._finish(p, cfg, last=i == len(pages) - 1) for i, p in enumerate(pages)]


def measure(fn: Callable[[], list[Image.Image]], repeat: int) -> tuple[int, list[float]]:
    """Pages from one warm-up call, then the wall time of ``repeat`` further calls."""
    pages = len(fn())
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return pages, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args(argv)

    cfg = render.RenderConfig()
    texts = {"english": english_text(), "chinese": chinese_text()}
    backends: dict[str, Callable[[str, render.RenderConfig], list[Image.Image]]] = {
        "reportlab+pypdfium2 (worker.render)": render.render_pages,
        "pure Pillow baseline": pillow_baseline,
    }
    rows = []
    for backend, fn in backends.items():
        for name, text in texts.items():
            pages, times = measure(functools.partial(fn, text, cfg), args.repeat)
            median = statistics.median(times)
            rows.append(
                {
                    "backend": backend,
                    "text": name,
                    "chars": len(text),
                    "pages": pages,
                    "median_s": round(median, 4),
                    "pages_per_s": round(pages / median, 2),
                    "chars_per_s": round(len(text) / median),
                    "times_s": [round(t, 4) for t in times],
                }
            )

    header = f"{'backend':<38} {'text':<8} {'chars':>7} {'pages':>5} {'median s':>9} {'pages/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['backend']:<38} {r['text']:<8} {r['chars']:>7} {r['pages']:>5} "
            f"{r['median_s']:>9.3f} {r['pages_per_s']:>8.1f}"
        )

    result = {
        "benchmark": "render",
        "config": cfg.to_dict() | {"font-path": Path(cfg.font_path).name},
        "repeat": args.repeat,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "packages": {p: version(p) for p in ("reportlab", "pypdfium2", "pillow")},
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
