"""The report's pictures: strength grids per effect (methods in rows), the originals with their processed images,
and per effect the charts of each measure against the weight."""

from __future__ import annotations

from PIL import Image, ImageDraw

from lib_copier.evaluate.charts import COLOURS, Series, font, legend, line_chart, stack
from lib_copier.evaluate.train import METHODS

LABEL_WIDTH = 112
HEADER = 16
# What the charts show, in order: (summary key, title, reference lines).
CHARTED = (
    ("transfer", "effect transfer", (0.0, 1.0)),
    ("leak", "content leakage (dB)", (0.0,)),
    ("kept_layout", "structure kept (layout to G0)", (1.0,)),
)


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], columns: list[str], side: int) -> Image.Image:
    """Images in rows under column labels, each row named on its left; images scaled to `side` pixels."""
    count = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (LABEL_WIDTH + count * side, HEADER + len(rows) * side), "white")
    draw, small = ImageDraw.Draw(grid), font(11)
    for col, text in enumerate(columns):
        draw.text((LABEL_WIDTH + col * side + side // 2, HEADER // 2), text, fill="black", font=small, anchor="mm")
    for row, (label, images) in enumerate(rows):
        top = HEADER + row * side
        draw.text((4, top + side // 2), label, fill="black", font=small, anchor="lm")
        for col, image in enumerate(images):
            thumb = image if image.width == side else image.resize((side, side), Image.Resampling.LANCZOS)
            grid.paste(thumb, (LABEL_WIDTH + col * side, top))
    return grid


def strength_figure(grids: dict, variants: list[str], label: str, targets, weights, side: int) -> Image.Image:
    """One effect: for each method and variant its strength-grid rows (weights in columns), then the effect itself
    applied to the weight-0 image: the target a perfect effect LoRA would reach at +1."""
    rows = []
    for method in METHODS:
        for variant in variants:
            for i, images in enumerate(grids[(variant, label, method)]):
                rows.append((f"{method}, {variant}" if i == 0 else "", [*images, targets[i]]))
    columns = [f"{w:+g}" if w else "0" for w in weights] + ["effect"]
    return labelled_grid(rows, columns, side)


def originals_figure(originals: list[Image.Image], processed: dict[str, list[Image.Image]], side: int) -> Image.Image:
    rows = [("original", originals)] + [(label, images) for label, images in processed.items()]
    return labelled_grid(rows, [f"O{i + 1}" for i in range(len(originals))], side)


def effect_charts(effect: dict, weights: list[float]) -> Image.Image:
    """Rows: variants; columns: the measures in CHARTED (transfer only for effects with their own metric)."""
    rows = []
    for variant, methods in effect["variants"].items():
        panels = []
        for key, title, guides in CHARTED:
            if key not in methods[METHODS[0]]["summary"]:  # no metric of its own: the generic closeness instead
                key, title = "closeness", "closeness to effect(G0)"
            series = [
                Series(m, methods[m]["summary"][key]["mean"], methods[m]["summary"][key]["sd"], COLOURS[m])
                for m in METHODS
            ]
            panels.append(line_chart(f"{variant}: {title}", weights, series, guides))
        rows.append(stack(panels, horizontal=True))
    key = legend([(m, COLOURS[m]) for m in METHODS] + [("x: LoRA weight; bars: ± sd over seeds", (255, 255, 255))])
    return stack([key, *rows], horizontal=False)
