"""The files A1111 runs from the extension's root (preload.py, install.py), and what the extension sets up in the
WebUI before its tab is built."""

import argparse
import re
import runpy
import sys
import types
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_preload_adds_the_lora_dir_option():
    parser = argparse.ArgumentParser()
    runpy.run_path(str(ROOT / "preload.py"))["preload"](parser)
    assert parser.parse_args([]).copier_lora_dir is None
    assert parser.parse_args(["--copier-lora-dir", "/x"]).copier_lora_dir == "/x"


def test_install_installs_only_what_is_missing_and_never_torch_or_gradio(monkeypatch):
    calls = []
    launch = types.SimpleNamespace(
        is_installed=lambda module: module != "open_clip", run_pip=lambda args, desc: calls.append(args)
    )
    monkeypatch.setitem(sys.modules, "launch", launch)
    needed = runpy.run_path(str(ROOT / "install.py"))["NEEDED"]
    assert calls == ["install open-clip-torch"]
    assert not {"torch", "torchvision", "gradio"} & set(needed.values())
    # each one is used (accelerate was installed for nothing), and they are the package's own run-time dependencies
    sources = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "lib_copier").rglob("*.py"))
    assert [m for m in needed if not re.search(rf"^\s*(import|from) {m}\b", sources, re.MULTILINE)] == []
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert {re.split("[<>=]", d)[0] for d in declared} == {"torch", *needed.values()}


def test_the_webuis_temp_folder_for_shown_images_is_made(monkeypatch, tmp_path):
    """Forge Neo names `tmp/` as its temp folder without making it; each image gradio shows is written there."""
    from lib_copier.webui.extension import make_temp_dir

    modules = types.ModuleType("modules")
    modules.shared = types.SimpleNamespace(opts=types.SimpleNamespace(temp_dir=str(tmp_path / "webui" / "tmp")))
    monkeypatch.setitem(sys.modules, "modules", modules)
    make_temp_dir()
    assert (tmp_path / "webui" / "tmp").is_dir()
    modules.shared.opts.temp_dir = ""  # A1111's default: gradio's own cache folder, which gradio makes
    make_temp_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["webui"]


def test_a_checkpoint_written_after_the_webui_listed_its_own_is_found_by_name(monkeypatch, tmp_path):
    """A merge into a checkpoint from Utilities writes a file the WebUI has not listed: extracting from it by name,
    or picking it after "Refresh lists", must find it without the WebUI's own full refresh."""
    from lib_copier.errors import CopierError
    from lib_copier.webui.extension import checkpoint_file, checkpoint_titles

    listed, aliases = {}, {}

    class CheckpointInfo:  # what the WebUIs' CheckpointInfo does with a file: a title, its names, registering it
        def __init__(self, filename):
            self.filename, name = filename, Path(filename).relative_to(tmp_path).as_posix()
            self.title = f"{name} [0123456789]"
            self.ids = [self.title, name, Path(filename).stem, "0123456789"]

        def register(self):
            listed[self.title] = self
            aliases.update(dict.fromkeys(self.ids, self))

    sd_models = types.ModuleType("modules.sd_models")
    sd_models.model_path, sd_models.checkpoints_list, sd_models.CheckpointInfo = str(tmp_path), listed, CheckpointInfo
    sd_models.checkpoint_aliases = aliases
    sd_models.checkpoint_tiles = lambda: sorted(listed)
    modules = types.ModuleType("modules")
    modules.sd_models, modules.shared = sd_models, types.SimpleNamespace(cmd_opts=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.sd_models", sd_models)
    (tmp_path / "base.safetensors").write_bytes(b"")
    CheckpointInfo(str(tmp_path / "base.safetensors")).register()  # what the WebUI listed at its start
    (tmp_path / "sub").mkdir()
    for name in ("sub/merged.safetensors", "merged.vae.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert checkpoint_file("sub/merged.safetensors") == tmp_path / "sub" / "merged.safetensors"
    (tmp_path / "copied.safetensors").write_bytes(b"")
    titles = ["base.safetensors [0123456789]", "copied.safetensors [0123456789]", "sub/merged.safetensors [0123456789]"]
    assert checkpoint_titles() == titles
    with pytest.raises(CopierError, match="there is no checkpoint named 'absent'"):
        checkpoint_file("absent")
    # The dropdown's title, with a hash since recomputed, and the file's stem name it; a part of a name does not
    assert checkpoint_file("base.safetensors [0123456789]") == checkpoint_file("base") == tmp_path / "base.safetensors"
    assert checkpoint_file("copied.safetensors [fedcba9876]") == tmp_path / "copied.safetensors"
    for part in ("bas", "sub/merged", "safetensors"):
        with pytest.raises(CopierError, match=f"there is no checkpoint named '{part}'"):
            checkpoint_file(part)


def test_generate_here_is_a_webui_job_of_its_own_so_an_earlier_interrupt_is_not_read_again(monkeypatch):
    """It ran outside the WebUI's job state: after any Interrupt (the tab's, an API job's), every later Generate here
    said "interrupted before the image was drawn" and drew nothing, until some txt2img of the WebUI's cleared it."""
    from lib_copier.webui import extension, host

    class State:  # A1111's: begin() starts a job and clears the interrupt flags, end() ends it
        interrupted, job = True, ""

        def begin(self, job):
            self.interrupted, self.job = False, job

        def end(self):
            self.job = ""

    state, seen = State(), []
    modules = types.ModuleType("modules")
    modules.shared = types.SimpleNamespace(state=state)
    monkeypatch.setitem(sys.modules, "modules", modules)

    class Host:
        def txt2img(self, request):
            seen.append((state.interrupted, state.job))
            return "an image"

    monkeypatch.setattr(host, "current_host", lambda: Host())
    assert extension.generate_alone("a request") == "an image"
    assert seen == [(False, "copier_lora_generate")] and state.job == ""


@pytest.mark.parametrize(("flags", "routes"), [({}, False), ({"api": True}, True), ({"nowebui": True}, True)])
def test_the_http_routes_come_with_the_webuis_own_api_only(monkeypatch, flags, routes):
    """Without --api, a WebUI shared behind gradio's login had them open: gradio's login does not cover them."""
    import threading

    from fastapi import FastAPI

    from lib_copier.webui import extension

    modules = types.ModuleType("modules")
    modules.shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(**{"api": False, "nowebui": False, **flags}))
    modules.call_queue = types.SimpleNamespace(queue_lock=threading.Lock())
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setattr(extension, "_runner", None)
    app = FastAPI()
    extension.on_app_started(None, app)
    assert any(route.path.startswith("/copier-lora/") for route in app.routes) == routes
