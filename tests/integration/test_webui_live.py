"""Against a real A1111 1.10 on CPU, skipped unless COPIER_WEBUI_DIR points at one with a checkpoint.

`python tests/integration/prepare_webui.py --webui DIR` adds a random SD1.5-layout checkpoint and the offline
tokenizer files to an A1111 checkout. The test links this repo into DIR/extensions, starts the WebUI on CPU with
the API, trains through /copier-lora/v1 at 64 px, and checks what a user would: the LoRA is listed, it changes
txt2img, the model draws exactly as before the run, and interrupt stops a job and keeps nothing.
"""

import base64
import json
import sys
import time

import pytest

from tests.integration.conftest import call


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


def test_train_through_the_api_and_use_the_lora(webui):
    before = txt2img("a red apple")
    body = {"generate": {"prompt": "a red apple", "seed": 1, "steps": 4, "width": 64, "height": 64},
            "name": f"live-{int(time.time())}", "effects": ["grayscale"], "size": 64, "prompt_pool": 4,
            "overrides": {"steps": 4, "rank": 4, "alpha": 4.0}, "grid_prompts": ["a red apple"],
            "grid_steps": 4}  # fmt: skip
    state = wait(call("/copier-lora/v1/train", body)["id"])
    assert state["status"] == "done", state["error"]
    names = {lora["name"] for lora in call("/sdapi/v1/loras")}
    copier = state["results"][0]["name"]
    assert {r["name"] for r in state["results"]} <= names
    assert txt2img(f"a red apple <lora:{copier}:1>") != before
    assert txt2img("a red apple") == before  # the model's weights are as they were: the same image, bit for bit
    print(json.dumps(state, indent=1), file=sys.stderr)


def test_interrupt_keeps_nothing(webui):
    name = f"cut-{int(time.time())}"
    image = base64.b64encode(base64.b64decode(txt2img("a blue cube"))).decode()
    body = {"image": image, "name": name, "size": 64, "prompt_pool": 0, "overrides": {"steps": 2000}}
    job = call("/copier-lora/v1/train", body)["id"]
    time.sleep(20)
    call(f"/copier-lora/v1/jobs/{job}/interrupt", {})
    assert wait(job)["status"] == "interrupted"
    call("/sdapi/v1/refresh-loras", {})
    assert not any(lora["name"].startswith(name) for lora in call("/sdapi/v1/loras"))
