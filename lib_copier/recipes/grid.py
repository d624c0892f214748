"""The strength grid: prompts in rows, LoRA weights in columns, the same seed along each row."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageDraw

from lib_copier.backends import Backend
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.generate import Txt2Img

GRID_WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 1.5)
HEADER = 18  # pixels of label above each column

Render = Callable[[Txt2Img, float], Image.Image]  # one image of a request with the LoRA at a weight


def network_render(backend: Backend, network: LoRANetwork, unchanged: dict | None = None) -> Render:
    """Draw with a LoRA held in memory. `unchanged` caches the weight-0 images (the model without the LoRA), so
    the grids of one job share them."""
    cache = {} if unchanged is None else unchanged

    def render(request: Txt2Img, weight: float) -> Image.Image:
        if weight:
            return backend.generate(request, [(network, weight)])
        if request not in cache:
            cache[request] = backend.generate(request)
        return cache[request]

    return render


def column_label(weight: float, side: int, draw: ImageDraw.ImageDraw) -> str:
    """The column's label, `weight +0.5`, or just `+0.5` where the column is too narrow for the word."""
    text = f"weight {weight:+g}"
    return text if draw.textlength(text) <= side - 16 else f"{weight:+g}"  # a gap to the next label


def strength_grid(
    render: Render,
    prompts: list[str],
    side: int,
    weights: tuple[float, ...] = GRID_WEIGHTS,
    seed: int = 0,
    steps: int = 20,
    progress: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Row i draws `prompts[i]` at seed `seed + i` once per weight, so columns differ only by the weight."""
    grid = Image.new("RGB", (side * len(weights), HEADER + side * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for col, weight in enumerate(weights):
        draw.text((col * side + 4, 3), column_label(weight, side, draw), fill="black")
    total, done = len(prompts) * len(weights), 0
    for row, prompt in enumerate(prompts):
        for col, weight in enumerate(weights):
            request = Txt2Img(prompt, seed=seed + row, steps=steps, width=side, height=side)
            grid.paste(render(request, weight), (col * side, HEADER + row * side))
            done += 1
            if progress:
                progress(done, total)
    return grid
