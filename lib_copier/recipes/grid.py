"""The strength grid: prompts in rows, LoRA weights in columns, the same seed along each row."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageDraw

from lib_copier.backends import Backend
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.generate import Txt2Img

GRID_WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 1.5)
HEADER = 18  # pixels of label above each column


def strength_grid(
    backend: Backend,
    network: LoRANetwork,
    prompts: list[str],
    weights: tuple[float, ...] = GRID_WEIGHTS,
    seed: int = 0,
    steps: int = 20,
    size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    unchanged: dict | None = None,
) -> Image.Image:
    """Row i draws `prompts[i]` at seed `seed + i` once per weight, so columns differ only by the weight.

    `unchanged` caches the weight-0 images (the model without the LoRA): grids of one job share them."""
    side = size or backend.resolution
    grid = Image.new("RGB", (side * len(weights), HEADER + side * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for col, weight in enumerate(weights):
        draw.text((col * side + 4, 3), f"weight {weight:+g}", fill="black")
    total, done = len(prompts) * len(weights), 0
    for row, prompt in enumerate(prompts):
        for col, weight in enumerate(weights):
            request = Txt2Img(prompt, seed=seed + row, steps=steps, width=side, height=side)
            if weight:
                image = backend.generate(request, [(network, weight)])
            else:
                unchanged = {} if unchanged is None else unchanged
                if request not in unchanged:
                    unchanged[request] = backend.generate(request)
                image = unchanged[request]
            grid.paste(image, (col * side, HEADER + row * side))
            done += 1
            if progress:
                progress(done, total)
    return grid
