"""Shared by the live tests: a real A1111 1.10, Forge, Forge Neo, Forge Classic or reForge started on CPU with this
repo as an extension.

Each runs only when its directory is given: COPIER_WEBUI_DIR an A1111 checkout, COPIER_FORGE_DIR a Forge checkout,
COPIER_NEO_DIR a Forge Neo one (sd-webui-forge-classic's `neo` branch), COPIER_CLASSIC_DIR a Forge Classic one,
COPIER_REFORGE_DIR a reForge one, each prepared with `prepare_webui.py`
(random checkpoints and the offline tokenizer files); COPIER_WEBUI_ARGS adds launch arguments, COPIER_WEBUI_PYTHON
names another venv's Python (one with the torch the WebUI ships: 2.1.2 for A1111 1.10, 2.3.1 for Forge). All take
the same tests, one after the other (never two at once: each needs 7 GB and more). Small sizes come from a ui-config
file, so the browser test trains in about a minute.
"""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOTS = {"a1111": "COPIER_WEBUI_DIR", "forge": "COPIER_FORGE_DIR", "neo": "COPIER_NEO_DIR",
         "classic": "COPIER_CLASSIC_DIR", "reforge": "COPIER_REFORGE_DIR"}  # fmt: skip
WEBUIS = {kind: os.environ.get(variable) for kind, variable in ROOTS.items()}
FORGES = ("forge", "neo", "classic", "reforge")  # started alike, their LoRA loaders log what they applied
SD15 = "random-sd15"
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
    # Saved empty, so the prompt boxes start as "" in Forge Neo too: on a first start without these keys its prompt
    # boxes hold None, and its paste (Send to txt2img, its own PNG Info buttons) then skips the prompt.
    "txt2img/Prompt/value": "",
    "txt2img/Negative prompt/value": "",
}


def call(path: str, body: dict | None = None, timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


@dataclass
class LiveWebUI:
    kind: str  # "a1111", "forge", "neo", "classic" or "reforge"
    root: Path
    log: Path
    pid: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def peak_rss_gb(self) -> float:
        """The WebUI's peak resident memory so far (the launcher's child, where the model lives, included)."""
        peaks = []
        for pid in [self.pid, *map(int, Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split())]:
            status = Path(f"/proc/{pid}/status").read_text()
            peaks.append(int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]))
        return round(max(peaks) / 2**20, 1)


def _arguments(kind: str, root: Path, ui_config: Path) -> list[str]:
    python = os.environ.get("COPIER_WEBUI_PYTHON", str(root / "venv" / "bin" / "python"))
    ckpt = root / "models" / "Stable-diffusion" / f"{SD15}.safetensors"
    common = ["--api", "--skip-prepare-environment", "--skip-version-check", "--port", str(PORT), "--ckpt", str(ckpt),
              "--ui-config-file", str(ui_config)]  # fmt: skip
    extra = os.environ.get("COPIER_WEBUI_ARGS", "").split()  # e.g. Forge's --unet-in-bf16 where RAM is short
    common += extra
    if kind == "neo":  # Neo never downloads a model, asks for Python 3.13, and names its CPU mode --cpu
        return [python, "launch.py", "--cpu", "--skip-python-version-check", *common]
    common.append("--no-download-sd-model")
    if kind in FORGES:
        return [python, "launch.py", "--always-cpu", *common]
    # A1111 computes on a CPU in fp32, unless told a precision (--precision half: SDXL in fp16, which fits in 24 GB)
    precision = [] if "--precision" in extra else ["--no-half"]
    return [python, "launch.py", "--use-cpu", "all", *precision, "--skip-install", "--skip-torch-cuda-test",
            "--do-not-download-clip", *common]  # fmt: skip


@pytest.fixture(scope="session", params=list(WEBUIS))
def webui(request, tmp_path_factory):
    if not WEBUIS[request.param]:
        pytest.skip(f"{ROOTS[request.param]} is not set")
    root = Path(WEBUIS[request.param])
    ui_config = tmp_path_factory.mktemp("webui") / "ui-config.json"
    ui_config.write_text(json.dumps(UI_CONFIG))
    link = root / "extensions" / "copier-lora"
    if not link.exists():
        link.symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)
    # COLUMNS: Neo's console (rich) wraps its log lines at 80 columns, splitting the LoRA loader's lines the tests read
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "1000"}
    env.setdefault("HF_HOME", str(root / "hf"))
    log_path = root / "copier-lora-test.log"
    log = open(log_path, "w")  # noqa: SIM115 (open for the server's lifetime)
    server = subprocess.Popen(_arguments(request.param, root, ui_config), cwd=root, env=env, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if call("/sdapi/v1/sd-models", timeout=5):
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(3)
        if server.poll() is not None:
            pytest.fail(f"the WebUI exited; see {log.name}")
    # The WebUI answers before its startup model load has finished; a checkpoint switched now would be replaced by
    # that load (seen in A1111: two loads at once, meta tensors, then NaN conditioning). One image waits it out.
    call("/sdapi/v1/txt2img", {"prompt": "", "steps": 1, "width": 64, "height": 64})
    # Live previews by "Approx NN" download a small model per family on first use (SDXL's is not shipped): offline,
    # every SDXL txt2img would fail. The cheap approximation needs no file.
    call("/sdapi/v1/options", {"show_progress_type": "Approx cheap"})
    yield LiveWebUI(request.param, root, log_path, server.pid)
    server.terminate()
    server.wait(60)
