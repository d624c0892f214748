"""The registry of effects: each a pure function (RGB image, validated params) -> RGB image of the same size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from lib_copier.effects.params import Param, validate
from lib_copier.errors import CopierError, shown

EffectFn = Callable[[Image.Image, dict], Image.Image]


@dataclass(frozen=True)
class Effect:
    name: str
    label: str
    description: str
    params: tuple[Param, ...]
    fn: EffectFn

    def apply(self, image: Image.Image, values: dict | None = None) -> Image.Image:
        if image.mode != "RGB":
            raise CopierError(f"{self.name} needs an RGB image; convert it with effects.image_io.to_rgb first")
        out = self.fn(image, validate(self.name, self.params, values or {}))
        return out if out.mode == "RGB" else out.convert("RGB")


EFFECTS: dict[str, Effect] = {}


def effect(name: str, label: str, description: str, *params: Param):
    """Register the decorated function as an effect."""

    def register(fn: EffectFn) -> EffectFn:
        EFFECTS[name] = Effect(name, label, description, params, fn)
        return fn

    return register


def get_effect(name: str) -> Effect:
    _load()
    if name not in EFFECTS:
        raise CopierError(f"unknown effect {shown(name)}; known effects: {', '.join(sorted(EFFECTS))}")
    return EFFECTS[name]


def all_effects() -> list[Effect]:
    _load()
    return list(EFFECTS.values())


def _load() -> None:
    # The effect modules register themselves on import.
    from lib_copier.effects import lines, texture, tone  # noqa: F401
