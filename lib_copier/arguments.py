"""Number types for command-line options: a value out of range (NaN and infinities included) is refused while the
arguments are parsed, with the option's name, before any work starts. Every layer's CLI uses them."""

from __future__ import annotations

import argparse

from lib_copier.errors import shown
from lib_copier.fields import finite_number


def number(kind: type = float, lo: float | None = None, hi: float | None = None, above: bool = False):
    """An argparse `type`: a finite `kind` (int or float) within [lo, hi], or above `lo` when `above`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not finite_number(value):  # NaN or an infinity, or a whole number too large to compute with
            what = "too large" if kind is int else "not a finite number"
            raise argparse.ArgumentTypeError(f"{shown(text)} is {what}")
        if lo is not None and (value <= lo if above else value < lo) or hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"{text} is not {_range(lo, hi, above)}")
        return value

    return parse


def _range(lo, hi, above: bool) -> str:
    if hi is None:
        return f"{'above' if above else 'at least'} {lo:g}"
    if lo is None:
        return f"at most {hi:g}"
    return f"{'above' if above else 'from'} {lo:g} {'and at most' if above else 'to'} {hi:g}"


def positive(kind: type = int):
    """A whole number (or number) of at least 1 (above 0)."""
    return number(kind, 1) if kind is int else number(kind, 0, above=True)


FRACTION = number(float, 0, 1, above=True)  # a quantile or share in (0, 1]
