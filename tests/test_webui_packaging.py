"""The files A1111 runs from the extension's root (preload.py, install.py), and what the extension sets up in the
WebUI before its tab is built."""

import argparse
import runpy
import sys
import types
from pathlib import Path

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
