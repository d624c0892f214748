"""Shared by the live tests: a real A1111 1.10 started on CPU with this repo as an extension.

Skipped unless COPIER_WEBUI_DIR points at an A1111 checkout prepared with `prepare_webui.py` (a checkpoint and the
offline tokenizer files). Small sizes come from a ui-config file, so the browser test trains in about a minute.
"""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

WEBUI = os.environ.get("COPIER_WEBUI_DIR")
PORT = int(os.environ.get("COPIER_WEBUI_PORT", "7861"))
URL = f"http://127.0.0.1:{PORT}"
# What the WebUI's forms start with (A1111's ui-config keys): 64-pixel images, 4 sampling and training steps.
UI_CONFIG = {
    "txt2img/Width/value": 64,
    "txt2img/Height/value": 64,
    "customscript/sampler.py/txt2img/Sampling steps/value": 4,
    "copier_lora/Training size/value": 64,
    "copier_lora/Grid sampling steps/value": 4,
    "copier_lora/Strength grid prompts/value": "a red apple",
    "copier_lora/steps/value": 4,
    "copier_lora/rank/value": 4,
    "copier_lora/alpha/value": 4,
}


def call(path: str, body: dict | None = None, timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    if not WEBUI:
        pytest.skip("COPIER_WEBUI_DIR is not set")
    root = Path(WEBUI)
    ui_config = tmp_path_factory.mktemp("webui") / "ui-config.json"
    ui_config.write_text(json.dumps(UI_CONFIG))
    link = root / "extensions" / "copier-lora"
    if not link.exists():
        link.symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)
    python = os.environ.get("COPIER_WEBUI_PYTHON", str(root / "venv" / "bin" / "python"))
    ckpt = next((root / "models" / "Stable-diffusion").glob("*.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("HF_HOME", str(root / "hf"))
    args = [python, "launch.py", "--use-cpu", "all", "--no-half", "--api", "--skip-install",
            "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model",
            "--do-not-download-clip", "--port", str(PORT), "--ckpt", str(ckpt),
            "--ui-config-file", str(ui_config)]  # fmt: skip
    log = open(root / "copier-lora-test.log", "w")  # noqa: SIM115 (open for the server's lifetime)
    server = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if call("/sdapi/v1/sd-models", timeout=5):
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(3)
        if server.poll() is not None:
            pytest.fail(f"the WebUI exited; see {log.name}")
    yield server
    server.terminate()
    server.wait(60)
