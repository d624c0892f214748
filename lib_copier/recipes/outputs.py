"""Where results go: `<name>.safetensors` (kohya format, full metadata), `<name>.json` (the WebUI's extra-networks
sidecar) and `<name>.png` (the strength grid), all or nothing, never over an existing file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lib_copier.atomic import all_or_nothing, atomic_write
from lib_copier.errors import CopierError, shown
from lib_copier.lora.files import write_lora
from lib_copier.lora.metadata import NetworkInfo, build_metadata
from lib_copier.lora.weights import LoRAWeights
from lib_copier.names import WINDOWS_DEVICES

SUFFIXES = (".safetensors", ".json", ".png")
MAX_NAME = 120  # characters of a file stem
SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # the sidecar's "sd version" values in A1111
_ALLOWED = re.compile(r"[^\W_][\w ._+\-()\[\]]*")  # letters and digits of any script: "キャラ", "café"


def check_name(name: str, what: str = "the output name") -> str:
    """A file stem that stays inside its folder, or a CopierError saying what is wrong with it."""
    if not isinstance(name, str) or not name.strip():
        raise CopierError(f"{what} is empty")
    if "/" in name or "\\" in name or ".." in name:
        raise CopierError(f"{what} {shown(name)} must not contain path separators or '..'")
    if name != name.rstrip():  # "ink " wrote "ink .safetensors", which <lora:ink:1> does not find
        raise CopierError(f"{what} {shown(name)} ends in a space; a file name here may not")
    if name.lower().endswith(".safetensors"):
        raise CopierError(f"{what} {shown(name)} ends in .safetensors, which is added to it: give {shown(name[:-12])}")
    rule = "it may use letters, digits, spaces and . _ + - ( ) [ ] and must start with a letter or digit"
    if len(name) > MAX_NAME:
        raise CopierError(f"{what} {shown(name)} is too long; it may be at most {MAX_NAME} characters")
    if not _ALLOWED.fullmatch(name):
        bad = next((c for c in name if not _ALLOWED.fullmatch("a" + c)), None)
        problem = f"has {bad!r}, which a file name here may not use" if bad else "does not start with a letter or digit"
        raise CopierError(f"{what} {shown(name)} {problem}: {rule}")
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        raise CopierError(f"{what} {shown(name)} is a name Windows keeps for a device; choose another")
    return name


def free_name(folders: Path | list[Path], name: str, taken: set[str] = frozenset()) -> str:
    """`name`, or `name-2`, `name-3` … : the first for which none of the result files exists yet in any folder (a
    name near the longest allowed is shortened to make room for its number)."""
    check_name(name)
    folders = [folders] if isinstance(folders, Path) else folders
    candidate, n = name, 1
    while candidate in taken or any((f / f"{candidate}{s}").exists() for f in folders for s in SUFFIXES):
        n += 1
        candidate = name[: MAX_NAME - len(f"-{n}")].rstrip(" ") + f"-{n}"
    return candidate


@dataclass
class Written:
    name: str
    lora: Path
    sidecar: Path
    grid: Path | None


def write_result(
    folder: Path,
    name: str,
    modules: dict[str, LoRAWeights],
    info: NetworkInfo,
    sidecar: dict,
    grid: Image.Image | None,
    precision: str = "fp16",
) -> Written:
    """Write the three files; if any fails, the ones already written are removed again."""
    check_name(name)
    folder = Path(folder)
    paths = [folder / f"{name}{s}" for s in SUFFIXES]
    clash = [p for p in paths if p.exists()]
    if clash:
        raise CopierError(f"{clash[0]} already exists; choose another name")
    with all_or_nothing() as written:
        written.append(write_lora(paths[0], modules, build_metadata(info), precision))
        text = json.dumps(sidecar, indent=2, sort_keys=True)
        written.append(atomic_write(paths[1], lambda tmp: tmp.write_text(text, encoding="utf-8")))
        if grid is not None:
            written.append(atomic_write(paths[2], lambda tmp: grid.save(tmp, format="PNG")))
    return Written(name, paths[0], paths[1], paths[2] if grid is not None else None)


def sidecar(family: str, description: str, preferred_weight: float = 1.0, activation: str = "") -> dict:
    """The A1111 extra-networks user metadata file that sits beside a LoRA."""
    return {
        "description": description,
        "sd version": SD_VERSION.get(family, "Unknown"),
        "activation text": activation,
        "preferred weight": preferred_weight,
        "negative text": "",
        "notes": "Made with Copier LoRA.",
    }
