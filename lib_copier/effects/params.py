"""Typed effect parameters: one description serves the CLI, the WebUI controls and validation."""

from __future__ import annotations

from dataclasses import dataclass

from lib_copier.errors import CopierError, shown
from lib_copier.fields import finite_number


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "int", "float" or "bool"
    default: float | int | bool
    min: float | None = None
    max: float | None = None
    step: float | None = None
    help: str = ""

    def parse(self, text: str) -> float | int | bool:
        """A value from the command line (`thickness=3`)."""
        try:
            if self.kind == "bool":
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return text.lower() in ("1", "true", "yes", "on")
            return int(text) if self.kind == "int" else float(text)
        except ValueError:
            what = {"bool": "true or false", "int": "a whole number", "float": "a number"}[self.kind]
            raise CopierError(f"parameter {self.name} takes {what}, not {shown(text)}") from None

    def check(self, effect: str, value: object) -> float | int | bool:
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise CopierError(f"{effect}: {self.name} must be true or false, not {shown(value)}")
            return value
        if not finite_number(value):
            raise CopierError(f"{effect}: {self.name} must be a number, not {shown(value)}")
        if self.kind == "int" and value != int(value):
            raise CopierError(f"{effect}: {self.name} must be a whole number, not {value}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise CopierError(f"{effect}: {self.name}={value} is outside {self.min}..{self.max}")
        return int(value) if self.kind == "int" else float(value)


def validate(effect: str, params: tuple[Param, ...], values: dict[str, object]) -> dict[str, object]:
    """Every parameter's value (defaults filled in); unknown names and out-of-range values are errors."""
    known = {p.name: p for p in params}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CopierError(f"{effect} has no parameter {unknown[0]}; it takes {', '.join(known) or 'none'}")
    return {p.name: p.check(effect, values.get(p.name, p.default)) for p in params}
