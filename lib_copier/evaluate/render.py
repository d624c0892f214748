"""Batched text-to-image with LoRAs applied, on a StandaloneBackend's model: the evaluation draws thousands of small
images, and one UNet call for a dozen of them is two to three times faster on a CPU than one call each."""

from __future__ import annotations

from PIL import Image

from lib_copier.backends.standalone import StandaloneBackend
from lib_copier.lora.network import LoRANetwork, all_applied
from lib_copier.models.generate import Txt2Img, generate_batch

BATCH = 12


def render(
    backend: StandaloneBackend,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    loras: list[tuple[LoRANetwork, float]] = (),
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, with `loras` applied at their weights."""
    requests = [Txt2Img(prompt, seed=seed, steps=steps) for prompt, seed in zip(prompts, seeds, strict=True)]
    table = {t.key: t for t in backend.lora_targets(conv=True)}
    with all_applied(loras, backend.lora_layers(), table):
        return [
            image
            for start in range(0, len(requests), BATCH)
            for image in generate_batch(backend.model, requests[start : start + BATCH])
        ]
