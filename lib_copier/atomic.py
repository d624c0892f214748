"""Atomic file writes shared by every layer: a temporary file beside the target, then one rename.

A reader (the WebUI's LoRA list, another process) never sees a half-written file, and an interrupted write
leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lib_copier.errors import CopierError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(tmp_path)`, then move the result to `path`. An existing `path` is an error unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CopierError(f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
