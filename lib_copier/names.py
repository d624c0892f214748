"""File names made from what users type: a prompt becomes a short ASCII stem that every OS can save."""

from __future__ import annotations

import re
import unicodedata

# Names Windows gives to devices, whatever follows a dot: "nul.safetensors" cannot be a file there. The ports go
# from 0 to 9, and ¹ ² ³ (superscripts) count as digits there too.
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789¹²³")}
_TAGS = re.compile(r"<[^<>]*>")  # <lora:name:0.8>, <hypernet:…>: not what the image shows
_WEIGHTS = re.compile(r":\s*[-+]?(\d+\.?\d*|\.\d+)\s*(?=[)\]])")  # (masterpiece:1.2): the weight, not the word


def slug(text: str, limit: int = 40) -> str:
    """`text`'s words in ASCII lower case joined by "-", as many as fit in `limit` characters: a prompt's <…> tags and
    attention weights left out, accents dropped ("Café" → "cafe"); "image" when nothing is left."""
    text = _WEIGHTS.sub(" ", _TAGS.sub(" ", text))
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(name) > limit:  # at the last whole word that fits, unless the first word alone is longer
        cut = name[: limit + 1]
        name = cut[: cut.rindex("-")] if "-" in cut else name[:limit]
    if name.upper() in WINDOWS_DEVICES:
        name += "-image"
    return name or "image"
