"""Prompts the recipes use when the user gives none: strength-grid rows and the training prompt pool.

The built-in model understands only its scene captions, so it gets its own; full-size models get everyday prompts.
"""

from __future__ import annotations

import re

# The WebUIs' extra-network tags (`<lora:name:0.8>`, `<hypernet:name:1>`, `<lyco:…>`): txt2img takes them out of the
# prompt before the text encoder sees it, the same pattern in A1111 and every Forge.
_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")

GRID_PROMPTS = ["a portrait of a woman, detailed", "a mountain landscape at sunset", "a bowl of fruit on a table"]

POOL_PROMPTS = [
    "a photo of a cat",
    "a portrait of an old man",
    "a city street at night",
    "a bowl of fruit on a table",
    "a mountain lake at sunrise",
    "a red sports car",
    "a girl with long hair, anime style",
    "a cozy living room interior",
    "a forest path in autumn",
    "a castle on a hill",
    "a dog running on the beach",
    "a plate of pasta",
    "a spaceship in orbit",
    "a watercolor painting of flowers",
    "a robot standing in the rain",
    "a snowy village",
    "a close-up of an eye",
    "a medieval knight in armor",
    "a tropical island",
    "a bird on a branch",
    "a cup of coffee on a wooden desk",
    "a futuristic skyline",
    "a horse in a meadow",
    "an abstract colorful pattern",
]


def grid_prompts(builtin: bool, count: int = 3) -> list[str]:
    if builtin:
        from lib_copier.models.builtin.evaluate import held_out_captions

        return [caption for caption, _, _ in held_out_captions(count, seed=7)]
    return GRID_PROMPTS[:count]


def prompt_pool(builtin: bool, count: int) -> list[str]:
    if count <= 0:
        return []
    if builtin:
        from lib_copier.models.builtin.scenes import sample_captions

        return sample_captions(count, seed=5)
    return (POOL_PROMPTS * (count // len(POOL_PROMPTS) + 1))[:count]


def without_extra_networks(prompt: str) -> str:
    """The prompt as the WebUI's text encoder sees it in txt2img: without its extra-network tags. A caption taken from
    an image drawn with a LoRA then trains on the text that image was drawn from, not on the tag's letters."""
    return " ".join(_EXTRA_NETWORK.sub(" ", prompt).split())  # CLIP's tokenizer reads any run of spaces as one
