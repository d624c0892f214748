"""Typed requests and settings: dataclass fields that carry their help, range and choices, checked in one place.

A field declared with `setting(...)` says what it is; `check` enforces types, ranges and choices with one sentence
naming the field; `from_json` reads a JSON object into the dataclass with JSON's own types checked first (a string
where a list belongs is an error, not a list of letters), converting the fields that say how (`decode`); and
`json_schema` describes the fields for an API's /docs. The trainer's settings, the training request and the txt2img
request are all declared this way, so the tab, the API and the CLI get the same checks and sentences.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache

from lib_copier.errors import CopierError, shown

Name = Callable[[str], str]  # how a sentence names a field: "setting rank", '"size"', "--size"


def setting(
    default=dataclasses.MISSING,
    help: str = "",
    lo=None,
    hi=None,
    choices=None,
    *,
    item_hi: int | None = None,
    factory=dataclasses.MISSING,
    decode: Callable | None = None,
    json_type: type | None = None,
):
    """A dataclass field with its help and limits. `lo`/`hi` bound a number, or a list's or text's length;
    `item_hi` bounds the length of each text in a list.

    `decode` turns the field's JSON value (of `json_type`, checked first) into the field's type, e.g. base64 into an
    image; fields without it take JSON values of their own type."""
    metadata = {
        "help": help,
        "min": lo,
        "max": hi,
        "choices": choices,
        "item_max": item_hi,
        "decode": decode,
        "json_type": json_type,
    }
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def quoted(name: str) -> str:
    return f'"{name}"'


@cache
def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _kind(hint) -> tuple[object, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else object), True  # several types besides None: checked by a decoder
    return hint, False


_WORDS = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    str: "text",
    list: "a list",
    dict: "an object",
}

_ITEMS = {int: "whole numbers", float: "numbers", bool: "true/false values", str: "strings"}


def finite_number(value) -> bool:
    """Whether `value` is a number a setting can take: an int or a float, finite (NaN, the infinities and an int too
    large for a float are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def to_float(value):
    """A number a setting can take as a float; any other value as it is, for `check` to name."""
    return float(value) if finite_number(value) else value


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return finite_number(value)
    return isinstance(value, kind)


def _check_type(label: str, value, hint) -> None:
    kind, optional = _kind(hint)
    if value is None:
        if not optional:
            raise CopierError(f"{label} is required")
        return
    origin = typing.get_origin(kind) or kind
    if origin in _WORDS and not _is(value, origin):
        if origin is float and _is(value, int):  # a whole number too large for a float
            raise CopierError(f"{label} is {shown(value)}, too large a number")
        raise CopierError(f"{label} must be {_WORDS[origin]}, not {shown(value)}")
    if origin is list:
        (item,) = typing.get_args(kind) or (object,)
        if item in _ITEMS and not all(_is(v, item) for v in value):
            raise CopierError(f"{label} must be a list of {_ITEMS[item]}, not {shown(value)}")


def _check_limits(label: str, value, meta: Mapping) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise CopierError(f"{label} is {shown(value)}; choose one of {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("min"), meta.get("max")
    size = len(value) if isinstance(value, list | str) else value
    if (lo is not None and size < lo) or (hi is not None and size > hi):
        what = {list: " items", str: " characters"}.get(type(value), "")
        must = "have" if what else "be"
        raise CopierError(f"{label} {'has' if what else 'is'} {shown(size)}{what}; it must {must} {_range(lo, hi)}")
    longest = meta.get("item_max")
    for i, item in enumerate(value if longest is not None else ()):
        if len(item) > longest:
            raise CopierError(f"{label} item {i + 1} has {len(item)} characters; it must have at most {longest}")


def _range(lo, hi) -> str:
    if lo is None:
        return f"at most {hi}"
    return f"at least {lo}" if hi is None else f"between {lo} and {hi}"


def check(obj, name: Name = quoted):
    """`obj` itself, or a CopierError naming its first field of the wrong type or out of its limits."""
    for f in dataclasses.fields(obj):
        check_field(type(obj), f.name, getattr(obj, f.name), name)
    return obj


def check_field(cls, field: str, value, name: Name = quoted):
    """One value of field `field` of dataclass `cls`: its type (unless a decoder made it), its limits, and a nested
    dataclass's own fields."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == field]
    if f.metadata.get("decode") is None:
        _check_type(name(field), value, _hints(cls)[field])
    _check_limits(name(field), value, f.metadata)
    if dataclasses.is_dataclass(value):
        check(value, lambda inner: name(f"{field}.{inner}"))
    return value


def from_json(cls, body, name: Name = quoted, what: str = "the request"):
    """An instance of dataclass `cls` from a JSON object, checked completely (`check`)."""
    if not isinstance(body, dict):
        json_name = {type(None): "empty", list: "an array", str: "a string", bool: "true or false"}
        raise CopierError(f"{what} must be a JSON object, not {json_name.get(type(body), 'a number')}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise CopierError(
            f"{what} has unknown field(s) {', '.join(map(shown, unknown))}; its fields are {', '.join(fields)}"
        )
    values = {}
    for key, raw in body.items():
        f, hint = fields[key], _hints(cls)[key]
        decode = f.metadata.get("decode")
        kind, optional = _kind(hint)
        if decode is not None:
            _check_type(name(key), raw, f.metadata["json_type"] | None if optional else f.metadata["json_type"])
            values[key] = None if raw is None else decode(raw)
        elif dataclasses.is_dataclass(kind) and raw is not None:
            values[key] = from_json(kind, raw, lambda inner, outer=key: name(f"{outer}.{inner}"), name(key))
        else:
            _check_type(name(key), raw, hint)
            values[key] = to_float(raw) if kind is float else raw
    required = [k for k, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise CopierError(f"{what} needs {name(missing[0])}")
    return check(cls(**values), name)


def json_schema(cls) -> dict:
    """A JSON Schema of dataclass `cls`'s JSON form, with each field's help and limits."""
    names = {int: "integer", float: "number", bool: "boolean", str: "string", list: "array", dict: "object"}
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        kind, _ = _kind(_hints(cls)[f.name])
        meta = f.metadata
        if dataclasses.is_dataclass(kind):
            entry = json_schema(kind)
        else:
            json_kind = meta.get("json_type") or typing.get_origin(kind) or kind
            entry = {"type": names[json_kind]} if json_kind in names else {}
        if meta.get("help"):
            entry["description"] = meta["help"]
        if meta.get("choices"):
            entry["enum"] = list(meta["choices"])
        bounds = {"array": ("minItems", "maxItems"), "string": ("minLength", "maxLength")}
        bounds = bounds.get(entry.get("type"), ("minimum", "maximum"))
        for bound, value in zip(bounds, (meta.get("min"), meta.get("max")), strict=True):
            if value is not None:
                entry[bound] = value
        if meta.get("item_max") is not None:
            entry["items"] = {"type": "string", "maxLength": meta["item_max"]}
        if f.default is not dataclasses.MISSING and isinstance(f.default, int | float | str | bool):
            entry["default"] = f.default
        if f.default is f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        properties[f.name] = entry
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
