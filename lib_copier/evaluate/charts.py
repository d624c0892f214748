"""Small line charts drawn with PIL (matplotlib is not a run-time dependency): a metric against the LoRA weight,
one line per method with ± spread bars, and strips that put charts or images side by side."""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "naive": (214, 39, 40),
    "copier": (31, 119, 180),
    "extraction": (44, 160, 44),
    "slider": (148, 103, 189),
    "addift": (255, 127, 14),
}
GRAY = (150, 150, 150)


def font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap font of one size
        return ImageFont.load_default()


@dataclass
class Series:
    label: str
    means: list[float | None]
    spreads: list[float | None]
    colour: tuple[int, int, int]


def line_chart(
    title: str,
    xs: list[float],
    series: list[Series],
    guides: tuple[float, ...] = (0.0,),
    size: tuple[int, int] = (250, 170),
) -> Image.Image:
    """`guides` are horizontal reference lines (0, or 1 for 'as much as the effect itself')."""
    width, height = size
    left, right, top, bottom = 40, 8, 20, 22
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    small = font(10)
    draw.text((left, 3), title, fill="black", font=font(11))
    values = [g for g in guides]
    for s in series:
        for m, sd in zip(s.means, s.spreads, strict=True):
            if m is not None:
                values += [m - (sd or 0), m + (sd or 0)]
    lo, hi = _nice_range(min(values), max(values))
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def px(x: float) -> float:
        return x0 + (x - xs[0]) / (xs[-1] - xs[0]) * (x1 - x0)

    def py(y: float) -> float:
        return y0 + (y - lo) / (hi - lo) * (y1 - y0)

    for tick in _ticks(lo, hi):
        draw.line([(x0, py(tick)), (x1, py(tick))], fill=(232, 232, 232))
        draw.text((x0 - 4, py(tick)), f"{tick:g}", fill="black", font=small, anchor="rm")
    for guide in guides:
        draw.line([(x0, py(guide)), (x1, py(guide))], fill=GRAY, width=1)
    for x in xs:
        draw.text((px(x), y0 + 4), f"{x:+g}" if x else "0", fill="black", font=small, anchor="mt")
    draw.rectangle([x0, y1, x1, y0], outline=GRAY)
    for s in series:
        points = [(px(x), py(m)) for x, m in zip(xs, s.means, strict=True) if m is not None]
        for x, m, sd in zip(xs, s.means, s.spreads, strict=True):
            if m is not None and sd:
                draw.line([(px(x), py(m - sd)), (px(x), py(m + sd))], fill=s.colour, width=1)
        if len(points) > 1:
            draw.line(points, fill=s.colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=s.colour)
    return image


def legend(labels: list[tuple[str, tuple[int, int, int]]], height: int = 18) -> Image.Image:
    f = font(11)
    width = sum(30 + int(f.getlength(label)) + 16 for label, _ in labels) + 8
    image = Image.new("RGB", (width, height), "white")
    draw, x = ImageDraw.Draw(image), 8
    for label, colour in labels:
        draw.line([(x, height // 2), (x + 22, height // 2)], fill=colour, width=2)
        draw.text((x + 28, height // 2), label, fill="black", font=f, anchor="lm")
        x += 30 + int(f.getlength(label)) + 16
    return image


def stack(images: list[Image.Image], horizontal: bool, gap: int = 4) -> Image.Image:
    if horizontal:
        size = (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images))
    else:
        size = (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1))
    out, offset = Image.new("RGB", size, "white"), 0
    for image in images:
        out.paste(image, (offset, 0) if horizontal else (0, offset))
        offset += (image.width if horizontal else image.height) + gap
    return out


def _nice_range(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.06
    step = _step(lo - pad, hi + pad)
    return math.floor((lo - pad) / step) * step, math.ceil((hi + pad) / step) * step


def _step(lo: float, hi: float, count: int = 5) -> float:
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _ticks(lo: float, hi: float) -> list[float]:
    step = _step(lo, hi)
    first = math.ceil(lo / step - 1e-9)
    return [round((first + i) * step, 10) for i in range(int((hi - lo) / step + 1e-9) + 1) if (first + i) * step <= hi]
