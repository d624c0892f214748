"""A1111's generation parameters ("infotext"): read from an image, parsed, and written back for txt2img.

The format, as the WebUI writes it into a PNG's `parameters` text chunk:

    a prompt, possibly on several lines
    Negative prompt: a negative prompt, possibly on several lines
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 1a2b3c4d, Lora hashes: "x: 5e6f"

The last line holds `key: value` pairs; a value with commas is a JSON string in double quotes. This module is plain
Python (no WebUI import), so the tab, the HTTP API and the tests all read infotexts the same way, and `generate` writes
them as the WebUIs do.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin

_KEY = re.compile(r"\s*([A-Za-z][\w \-/]*):\s*")
_NEGATIVE = "Negative prompt:"
_LORA = re.compile(r"\s*<lora:([^:>]+)(?::[^>]*)?>")


@dataclass
class Infotext:
    prompt: str = ""
    negative: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def _int(self, key: str) -> int | None:
        try:
            return int(self.params[key])
        except (KeyError, ValueError):
            return None

    @property
    def seed(self) -> int | None:
        return self._int("Seed")

    @property
    def steps(self) -> int | None:
        return self._int("Steps")

    @property
    def cfg(self) -> float | None:
        try:
            return float(self.params["CFG scale"])
        except (KeyError, ValueError):
            return None

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height)."""
        match = re.fullmatch(r"(\d+)x(\d+)", self.params.get("Size", ""))
        return (int(match[1]), int(match[2])) if match else None


def _params(line: str) -> dict[str, str] | None:
    """The key: value pairs of a parameter line, or None when the line is not one (fewer than three pairs)."""
    params, pos, decoder = {}, 0, json.JSONDecoder()
    while pos < len(line):
        key = _KEY.match(line, pos)
        if not key:
            return None
        pos = key.end()
        if line.startswith('"', pos):
            try:
                value, pos = decoder.raw_decode(line, pos)
            except json.JSONDecodeError:
                return None
            rest = line.find(",", pos)
            pos = len(line) if rest < 0 else rest + 1
        else:
            end = line.find(",", pos)
            end = len(line) if end < 0 else end
            value, pos = line[pos:end].strip(), end + 1
        params[key[1].strip()] = value
    return params if len(params) >= 3 else None


def parse_infotext(text: str) -> Infotext:
    lines = text.strip().split("\n")
    params = _params(lines[-1]) if lines else None
    if params is not None:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt).strip(), "\n".join(negative).strip(), params or {})


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def build_infotext(info: Infotext) -> str:
    lines = [info.prompt]
    if info.negative:
        lines.append(f"{_NEGATIVE} {info.negative}")
    if info.params:
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in info.params.items()))
    return "\n".join(lines)


def image_infotext(image: Image.Image) -> Infotext | None:
    """The generation parameters the WebUI stored in the image, or None: a PNG's `parameters` chunk, or the EXIF
    UserComment of the JPEG and WebP files it writes."""
    text = image.info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        text = _exif_comment(image)
    return parse_infotext(text) if text and text.strip() else None


_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_CHARSETS = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis"}  # EXIF 2.3


def _exif_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment, which starts with its character set (the WebUIs write UNICODE, big-endian UTF-16)."""
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # EXIF that Pillow cannot parse: as if there were none
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or raw[:8] not in _CHARSETS:
        return None
    return raw[8:].decode(_CHARSETS[raw[:8]], errors="replace").rstrip("\0")


def with_lora(prompt: str, name: str, weight: float = 1.0) -> str:
    """`prompt <lora:name:weight>`, replacing a tag for the same LoRA that the prompt already has."""
    kept = _LORA.sub(lambda m: "" if m[1] == name else m[0], prompt).strip()
    tag = f"<lora:{name}:{weight:g}>"
    return f"{kept} {tag}" if kept else tag


def save_options(fmt: str, text: str) -> dict:
    """`Image.save` keyword arguments that store an infotext where the WebUIs write it and read it back: a PNG's
    `parameters` chunk, or the EXIF UserComment of a JPEG or WebP. Other formats carry none."""
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)  # Pillow writes an iTXt chunk when the text is not Latin-1
        return {"pnginfo": info}
    if fmt in ("JPEG", "WEBP"):
        return {"exif": _exif_with_comment(text)}
    return {}


def _exif_with_comment(text: str) -> bytes:
    """EXIF holding only a UserComment, typed UNDEFINED as the standard (and piexif, which A1111 reads it with) wants;
    Pillow's own writer types it BYTE. Big-endian TIFF: the first IFD points to the Exif IFD, which points to the
    comment after it."""
    comment = b"UNICODE\0" + text.encode("utf-16-be")
    entry = ">HHHIII"  # a one-entry IFD: count, tag, type, value count, value or offset, next IFD (none)
    exif_ifd = 8 + struct.calcsize(entry)
    first = struct.pack(entry, 1, _EXIF_IFD, 4, 1, exif_ifd, 0)  # type 4: LONG
    exif = struct.pack(entry, 1, _USER_COMMENT, 7, len(comment), exif_ifd + struct.calcsize(entry), 0)  # 7: UNDEFINED
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + first + exif + comment
