"""Against a real A1111 1.10 and a real Forge on CPU, each skipped unless its directory is given (see conftest.py).

`python tests/integration/prepare_webui.py --webui DIR [--family sd1 sd2v sdxl]` adds random SD1.5 (SD2-v, SDXL)
checkpoints and the offline tokenizer files. The tests link this repo into DIR/extensions, start the WebUI on CPU
with the API, train through /copier-lora/v1 at 64 px, and check what a user would: the LoRA is listed, the WebUI's
own loader applies every key of it (text encoders included) and it changes txt2img, the model draws exactly as
before the run, and interrupt or a failure keeps nothing and changes nothing.
"""

import base64
import contextlib
import io
import json
import re
import sys
import time
import urllib.error

import pytest
from PIL import Image

from tests.integration.conftest import FORGES, SD15, call

SDXL = "random-sdxl"
SD2V = "random-sd2v"


def txt2img(prompt: str) -> str:
    body = {"prompt": prompt, "seed": 7, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}
    return call("/sdapi/v1/txt2img", body)["images"][0]


def wait(job: str, timeout: float = 1800) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = call(f"/copier-lora/v1/jobs/{job}")
        if state["status"] in ("done", "failed", "interrupted"):
            return state
        time.sleep(2)
    pytest.fail(f"job {job} did not finish in {timeout} s")


def train_body(name: str, **overrides) -> dict:
    return {"generate": {"prompt": "a red apple", "seed": 1, "steps": 4, "width": 64, "height": 64},
            "name": name, "effects": ["grayscale"], "method": "copier", "size": 64, "prompt_pool": 4,
            "overrides": {"steps": 4, "rank": 4, "alpha": 4.0, **overrides}, "grid_prompts": ["a red apple"],
            "grid_steps": 4}  # fmt: skip


def forge_loaded_keys(webui, name: str) -> dict[str, int]:
    """What Forge's LoRA loader said it applied of `name`: keys per part (UNet, CLIP); fails on any skipped key."""
    loaded = {}
    log = webui.log_text()
    for line in log.splitlines():  # Forge logs the file's path, Neo its name
        if "[LORA]" not in line or not re.search(rf"(^|[ /]){re.escape(name)}\.safetensors ", line):
            continue
        if parts := re.search(r"\(UNet: (\d+), CLIP: (\d+)\)", line):  # reForge: one line, unloaded keys apart
            assert "lora key not loaded" not in log and "NOT LOADED" not in log
            loaded |= {part: int(n) for part, n in zip(("unet", "clip"), parts.groups(), strict=True) if int(n)}
            continue
        assert "skipped 0 keys" in line and "unmatched" not in line and "Mismatch" not in line, line
        part = "clip" if "-CLIP with" in line else "unet"
        loaded[part] = int(line.split(" with ")[1].split(" keys")[0])
    return loaded


def test_train_through_the_api_and_use_the_lora(webui):
    before = txt2img("a red apple")
    started = time.time()
    # The Fast preset: each step four timesteps, each with its own prompt of the pool, through the WebUI's own model.
    body = {**train_body(f"live-{int(time.time())}", train_text_encoder=True), "preset": "fast"}
    state = wait(call("/copier-lora/v1/train", body)["id"])
    assert state["status"] == "done", state["error"]
    names = {lora["name"] for lora in call("/sdapi/v1/loras")}
    copier = state["results"][0]["name"]
    assert {r["name"] for r in state["results"]} <= names
    assert txt2img(f"a red apple <lora:{copier}:1>") != before
    assert txt2img("a red apple") == before  # the model's weights are as they were: the same image, bit for bit
    if webui.kind in FORGES:  # SD1: 192 UNet modules at rank 4 without convs, 72 in CLIP-L
        assert forge_loaded_keys(webui, copier) == {"unet": 192, "clip": 72}
    print(json.dumps({"webui": webui.kind, "seconds": round(time.time() - started), **state}), file=sys.stderr)


def test_a_run_stopped_while_drawing_its_grids_changes_nothing(webui):
    before = txt2img("a red apple")
    name = f"stop-{int(time.time())}"
    # Stopped once the LoRAs are trained, written and being drawn by the WebUI's own loader (Forge bakes them into
    # its weights): the files go, and the model draws as before.
    body = {**train_body(name), "grid_prompts": ["a red apple", "a blue cube", "a house"], "grid_steps": 30}
    job = call("/copier-lora/v1/train", body)["id"]
    deadline = time.time() + 900
    while not call(f"/copier-lora/v1/jobs/{job}")["stage"].startswith("strength grid") and time.time() < deadline:
        time.sleep(0.5)
    call(f"/copier-lora/v1/jobs/{job}/interrupt", {})
    assert wait(job)["status"] in ("interrupted", "failed")
    call("/sdapi/v1/refresh-loras", {})
    assert not any(lora["name"].startswith(name) for lora in call("/sdapi/v1/loras"))
    assert not list((webui.root / "models" / "Lora").rglob(f"{name}*"))
    assert txt2img("a red apple") == before


def test_bad_requests_are_refused_before_any_job(webui):
    flat = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(flat, format="PNG")  # outline finds no edge in it
    flat_outline = {"image": base64.b64encode(flat.getvalue()).decode(), "effects": ["outline"], "name": "x"}
    for body, words in [({**train_body("x"), "grid_steps": -1}, '"grid_steps" is -1'),
                        ({**train_body("x"), "size": "big"}, '"size" must be a whole number'),
                        (flat_outline, "outline leaves the original unchanged")]:  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            call("/copier-lora/v1/train", body)
        assert refused.value.code == 400 and words in json.loads(refused.value.read())["detail"]


def test_interrupt_keeps_nothing(webui):
    name = f"cut-{int(time.time())}"
    before = txt2img("a blue cube")
    body = {
        "image": before,
        "name": name,
        "method": "copier",
        "size": 64,
        "prompt_pool": 0,
        "overrides": {"steps": 2000},
    }
    job = call("/copier-lora/v1/train", body)["id"]
    time.sleep(20)
    call(f"/copier-lora/v1/jobs/{job}/interrupt", {})
    assert wait(job)["status"] == "interrupted"
    call("/sdapi/v1/refresh-loras", {})
    assert not any(lora["name"].startswith(name) for lora in call("/sdapi/v1/loras"))
    assert txt2img("a blue cube") == before


@contextlib.contextmanager
def checkpoint(webui, name: str, family: str):
    """The WebUI on checkpoint `name` for the block (skipped when prepare_webui.py did not write it), then SD1.5."""
    if not (webui.root / "models" / "Stable-diffusion" / f"{name}.safetensors").exists():
        pytest.skip(f"no {name} checkpoint (prepare_webui.py --family {family})")
    call("/sdapi/v1/options", {"sd_model_checkpoint": name})
    try:
        yield
    finally:
        call("/sdapi/v1/options", {"sd_model_checkpoint": SD15})


def test_sdxl_trains_and_changes_nothing(webui):
    with checkpoint(webui, SDXL, "sdxl"):
        before = txt2img("a red apple")
        started = time.time()
        # UNet only, checkpointed: on a 24 GB CPU machine Forge computes SDXL in fp32 from bf16 weights, and the cast
        # weights autograd would keep for the whole step (and for the text encoders) do not fit beside the model.
        body = train_body(f"xl-{int(time.time())}", steps=2, gradient_checkpointing=True)
        state = wait(call("/copier-lora/v1/train", {**body, "effects": [], "grid_steps": 2})["id"])
        assert state["status"] == "done", state["error"]
        copier = state["results"][0]["name"]
        assert txt2img(f"a red apple <lora:{copier}:1>") != before
        assert txt2img("a red apple") == before
        if webui.kind in FORGES:  # SDXL at rank 4 without convs: 722 UNet modules
            assert forge_loaded_keys(webui, copier) == {"unet": 722}
        print(json.dumps({"webui": webui.kind, "seconds": round(time.time() - started), **state}), file=sys.stderr)


def test_sd2v_trains_the_whole_recipe_with_the_text_encoder_and_changes_nothing(webui):
    from lib_copier.lora.files import read_lora

    with checkpoint(webui, SD2V, "sd2v"):
        before = txt2img("a red apple")
        started = time.time()
        body = {**train_body(f"v-{int(time.time())}", steps=3, train_text_encoder=True), "method": "both"}
        state = wait(call("/copier-lora/v1/train", {**body, "grid_steps": 2})["id"])
        assert state["status"] == "done", state["error"]
        assert [r["kind"] for r in state["results"]] == ["copier", "processed", "extraction"]
        for result in state["results"]:
            lora = read_lora(webui.root / "models" / "Lora" / f"{result['name']}.safetensors")
            assert lora.metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
            assert lora.metadata["ss_base_model_version"] == "sd_v2_v" and lora.metadata["ss_v2"] == "True"
        copier = read_lora(webui.root / "models" / "Lora" / f"{state['results'][0]['name']}.safetensors")
        assert any(key.startswith("lora_te_") for key in copier.modules)
        assert txt2img(f"a red apple <lora:{state['results'][0]['name']}:1>") != before
        assert txt2img("a red apple") == before
        seconds = round(time.time() - started)
        print(
            json.dumps({"webui": webui.kind, "seconds": seconds, "peak_rss_gb": webui.peak_rss_gb()}), file=sys.stderr
        )
