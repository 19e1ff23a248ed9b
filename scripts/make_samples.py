"""Draw the sample images that ``make demo`` submits: ``python scripts/make_samples.py samples``."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = Path(__file__).resolve().parents[1] / "worker" / "fonts" / "DejaVuSans.ttf"


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), size)


def invoice() -> Image.Image:
    image = Image.new("RGB", (1240, 1754), "white")  # A4 at 150 dpi
    draw = ImageDraw.Draw(image)
    draw.text((80, 80), "INVOICE  #2026-1125", font=font(48), fill="black")
    draw.text((80, 170), "Glyph Stationery Ltd.  ·  12 Harbour Road  ·  Leith", font=font(24), fill="#444")
    draw.text((80, 260), "Bill to: Acme Research, 4 Long Lane, Oxford", font=font(26), fill="black")
    draw.text((80, 300), "Date: 25 November 2026        Due: 25 December 2026", font=font(26), fill="black")
    rows = [("Paper, A4, 80 g (box)", 12, 21.50), ("Toner cartridge", 2, 89.00), ("Binding service", 1, 45.00)]
    y = 420
    draw.line((80, y - 20, 1160, y - 20), fill="black", width=2)
    for name, qty, price in rows:
        draw.text((80, y), name, font=font(26), fill="black")
        draw.text((760, y), str(qty), font=font(26), fill="black")
        draw.text((960, y), f"€{qty * price:,.2f}", font=font(26), fill="black")
        y += 60
    subtotal = sum(q * p for _, q, p in rows)
    draw.line((80, y, 1160, y), fill="black", width=2)
    draw.text((760, y + 30), "Subtotal", font=font(26), fill="black")
    draw.text((960, y + 30), f"€{subtotal:,.2f}", font=font(26), fill="black")
    draw.text((760, y + 80), "VAT 20%", font=font(26), fill="black")
    draw.text((960, y + 80), f"€{subtotal * 0.2:,.2f}", font=font(26), fill="black")
    draw.text((760, y + 140), "TOTAL", font=font(32), fill="black")
    draw.text((960, y + 140), f"€{subtotal * 1.2:,.2f}", font=font(32), fill="black")
    return image


def chart() -> Image.Image:
    image = Image.new("RGB", (1280, 720), "white")
    draw = ImageDraw.Draw(image)
    draw.text((60, 30), "Jobs answered per night", font=font(36), fill="black")
    values = [("Mon", 8200), ("Tue", 9100), ("Wed", 12400), ("Thu", 7600), ("Fri", 10300)]
    for i, (day, value) in enumerate(values):
        x = 120 + i * 220
        height = value / 13000 * 520
        draw.rectangle((x, 660 - height, x + 140, 660), fill=(40 + i * 40, 90, 200 - i * 30))
        draw.text((x + 40, 670), day, font=font(24), fill="black")
        draw.text((x + 20, 620 - height), f"{value:,}", font=font(24), fill="black")
    return image


def receipt() -> Image.Image:
    image = Image.new("RGB", (600, 900), (250, 248, 240))
    draw = ImageDraw.Draw(image)
    lines = ["CAFÉ LUMEN", "", "2 x Flat white      7.00", "1 x Croissant       3.20", "1 x Orange juice    4.10",
             "", "TOTAL              14.30", "Card  ****4821", "", "Thank you!"]
    for i, line in enumerate(lines):
        draw.text((60, 60 + i * 70), line, font=font(30), fill="black")
    return image


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, draw in (("invoice", invoice), ("chart", chart), ("receipt", receipt)):
        draw().save(folder / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "samples")
