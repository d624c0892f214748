"""Atomic file writes shared by every layer: a temporary file beside the target, then one rename.

A reader (the WebUI's LoRA list, another process) never sees a half-written file, and an interrupted write
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lib_copier.errors import CopierError


def check_target(path: str | os.PathLike, overwrite: bool = False, advice: str = "choose another name") -> Path:
    """`path` as a file that can be written, or a CopierError saying why not, before any work is done: it is a
    folder, it exists (unless `overwrite`), or its folder cannot be made or written in (`check_folder`)."""
    path = Path(path)
    if path.is_dir():
        raise CopierError(f"{path} is a folder; name a file to write")
    if path.exists() and not overwrite:
        raise CopierError(f"{path} already exists; {advice}")
    check_folder(path.parent)
    return path


def check_folder(folder: str | os.PathLike) -> Path:
    """`folder` as one that exists or can be made, and be written in; or a CopierError saying why not."""
    folder = existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest folder that exists: the missing ones are made in it
    if not existing.is_dir():
        raise CopierError(f"cannot write in {folder}: {existing} is a file, not a folder")
    try:  # a file made and gone at once: the one test that root, read-only mounts and ACLs all answer truly
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        where = "" if existing == folder else f" in {existing}"
        raise CopierError(f"cannot write in {folder}: {exc.strerror or exc}{where}") from None
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(tmp_path)`, then move the result to `path`. An existing `path` is an error unless `overwrite`."""
    path = check_target(path, overwrite, "choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if os.name == "posix":  # safetensors 0.8 writes its files readable by their owner only, whatever the umask
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def all_or_nothing() -> Iterator[list[Path]]:
    """A list for the files a block writes (None entries are skipped): if the block fails or is interrupted, they are
    removed again, so that several files are written all or none."""
    written: list[Path | None] = []
    try:
        yield written
    except BaseException:
        for path in written:
            if path is not None:
                path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it is process-wide: another
    thread could make a file meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
