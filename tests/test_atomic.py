"""Where the outputs go (`lib_copier.atomic`): what cannot be written is one sentence before any work, and a write
either lands whole or leaves nothing."""

import os
import stat
import tempfile

import pytest

from lib_copier.atomic import atomic_write, check_folder, check_target
from lib_copier.errors import CopierError


def test_a_target_that_is_a_folder_exists_or_sits_under_a_file_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CopierError, match="folder is a folder; name a file to write"):
        check_target(tmp_path / "folder", overwrite=True)
    with pytest.raises(CopierError, match="file.txt already exists; choose another name"):
        check_target(tmp_path / "file.txt")
    with pytest.raises(CopierError, match=r"cannot write in .*file.txt/sub: .*file.txt is a file, not a folder"):
        check_target(tmp_path / "file.txt" / "sub" / "out.png")
    assert check_target(tmp_path / "new" / "deeper" / "out.png") == tmp_path / "new" / "deeper" / "out.png"
    assert not (tmp_path / "new").exists()  # checking makes nothing


def test_a_folder_that_cannot_be_written_is_refused_even_for_root(tmp_path, monkeypatch):
    """chmod does not stop root; a read-only mount does. The check makes a file there, as the write would."""

    def read_only(dir):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(CopierError, match=r"cannot write in .*a/b: Read-only file system in .*"):
        check_folder(tmp_path / "a" / "b")
    with pytest.raises(CopierError, match="Read-only file system"):
        atomic_write(tmp_path / "x.txt", lambda tmp: tmp.write_text("x"))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing(tmp_path):
    def half(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.txt", half)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_a_written_file_is_readable_as_the_umask_allows_like_any_other_file(tmp_path):
    """safetensors 0.8 writes its files with mode 0600: a WebUI run as another user could not read the LoRAs."""
    import torch
    from safetensors.torch import save_file

    previous = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
