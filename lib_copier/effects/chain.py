"""Chains: several effects in order, each with its own parameters, as JSON that records how a result was made."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from PIL import Image

from lib_copier.effects.registry import get_effect
from lib_copier.errors import CopierError, shown

FORMAT = "copier-effects/1"


def split_specs(text: str) -> list[str]:
    """`posterize:levels=4+outline` -> its specs, one per effect; a `+` before a number is a sign (`stops=+1`)."""
    specs = re.split(r"\+(?!\s*[\d.])", text)
    if len(specs) > 1 and not all(spec.strip() for spec in specs):
        raise CopierError(f"{shown(text)} has a '+' without an effect on each side; chain effects as grayscale+outline")
    return specs


@dataclass(frozen=True)
class Step:
    effect: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Chain:
    steps: tuple[Step, ...]

    def __post_init__(self):
        if not self.steps:
            raise CopierError("an effect chain needs at least one effect")
        for step in self.steps:  # fail on a bad step before any pixel is touched
            get_effect(step.effect)

    def resolved(self) -> Chain:
        """The same chain with every parameter spelled out, defaults included."""
        from lib_copier.effects.params import validate

        return Chain(
            tuple(Step(s.effect, validate(s.effect, get_effect(s.effect).params, s.params)) for s in self.steps)
        )

    def apply(self, image: Image.Image) -> Image.Image:
        for step in self.steps:
            image = get_effect(step.effect).apply(image, step.params)
        return image

    def to_json(self) -> str:
        steps = [{"effect": s.effect, "params": s.params} for s in self.resolved().steps]
        return json.dumps({"format": FORMAT, "steps": steps}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Chain:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise CopierError(f'an effect chain must say "format": "{FORMAT}"')
            return cls(tuple(Step(s["effect"], dict(s.get("params", {}))) for s in data["steps"])).resolved()
        except json.JSONDecodeError as exc:
            raise CopierError(f"the effect chain is not valid JSON ({exc})") from exc
        except (KeyError, TypeError, AttributeError) as exc:  # Python's words ('list' object has no …) say little
            shape = f'{{"format": "{FORMAT}", "steps": [{{"effect": "outline", "params": {{"thickness": 3}}}}, …]}}'
            raise CopierError(f"the effect chain must be JSON shaped as {shape}") from exc

    @classmethod
    def parse(cls, specs: list[str]) -> Chain:
        """From command-line specs such as `outline:thickness=3,darkness=0.8` or `grayscale`; one spec may chain
        several with `+` (`posterize:levels=4+outline`), as `copier --effect` takes them."""
        steps = []
        for spec in [part for item in specs for part in split_specs(item)]:
            name, _, rest = spec.partition(":")
            effect = get_effect(name.strip())
            known = {p.name: p for p in effect.params}
            params = {}
            for item in filter(None, (part.strip() for part in rest.split(","))):
                key, eq, value = item.partition("=")
                key = key.strip()  # "outline : thickness = 3" reads as "outline:thickness=3"
                if not eq:
                    raise CopierError(f"{shown(spec)}: write parameters as name=value, not {shown(item)}")
                if key not in known:
                    raise CopierError(f"{effect.name} has no parameter {key}; it takes {', '.join(known) or 'none'}")
                if key in params:
                    raise CopierError(f"{shown(spec)} gives {key} twice")
                params[key] = known[key].parse(value)
            steps.append(Step(effect.name, params))
        return cls(tuple(steps)).resolved()
