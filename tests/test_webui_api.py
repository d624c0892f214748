"""The HTTP API on a FastAPI app, with the training run of the A1111-shaped stand-in behind it."""

import base64
import io
import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_copier.errors import CopierError
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img, generate
from lib_copier.models.sd_model import build_model
from lib_copier.webui.api import PREFIX, add_routes, decode_image, train_request
from lib_copier.webui.jobs import JobRunner
from lib_copier.webui.training import train_in_webui
from tests.a1111_like import A1111Host
from tests.conftest import randomize_


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def api(tmp_path):
    host = A1111Host(randomize_(build_model(TINY)), lora_dir=tmp_path)
    app, runner = FastAPI(), JobRunner(threading.Lock())
    add_routes(app, runner, lambda request, state: train_in_webui(request, host, tmp_path, state), lambda: tmp_path,
               auth="user:secret")  # fmt: skip
    client = TestClient(app)
    client.auth = ("user", "secret")
    return client, runner, host


def body(host, **kw):
    image = generate(host.sd_model.ours[0], Txt2Img("a cat", seed=0, steps=2))
    return {"image": png_base64(image), "name": "cat", "effects": ["grayscale"], "overrides": {"steps": 2},
            "prompt_pool": 2, "size": 64, "grid_prompts": ["a dog"], "grid_steps": 2, **kw}  # fmt: skip


def test_train_poll_and_the_loras_are_in_the_folder(api, tmp_path):
    client, runner, host = api
    job = client.post(f"{PREFIX}/train", json=body(host)).json()["id"]
    runner.wait(job, timeout=300)
    state = client.get(f"{PREFIX}/jobs/{job}").json()
    assert state["status"] == "done", state["error"]
    assert [r["name"] for r in state["results"]] == ["cat-copier", "cat-grayscale"]
    assert (tmp_path / "cat-grayscale.safetensors").is_file()
    merged = client.post(f"{PREFIX}/lora/merge", json={"loras": ["cat-copier", "cat-grayscale"], "out": "both"})
    assert merged.status_code == 200 and (tmp_path / "both.safetensors").is_file()
    resized = client.post(f"{PREFIX}/lora/resize", json={"lora": "both", "rank": 2, "out": "small"})
    assert resized.status_code == 200, resized.text


def test_bad_requests_get_4xx_with_one_sentence(api):
    client, _, host = api
    assert client.post(f"{PREFIX}/train", json=body(host, name="../x")).status_code == 400
    reply = client.post(f"{PREFIX}/train", json=body(host, overrides={"rank": 0}))
    assert reply.status_code == 400 and "rank" in reply.json()["detail"]
    reply = client.post(f"{PREFIX}/train", json=body(host, effects=["nosuch"]))
    assert "unknown effect" in reply.json()["detail"]
    assert client.get(f"{PREFIX}/jobs/nope").status_code == 404
    assert client.post(f"{PREFIX}/lora/resize", json={"lora": "absent", "rank": 2, "out": "x"}).status_code == 400
    assert client.get(f"{PREFIX}/effects", auth=("user", "wrong")).status_code == 401
    assert any(e["name"] == "outline" and e["params"] for e in client.get(f"{PREFIX}/effects").json())


def test_interrupt_stops_a_job_and_keeps_nothing(api, tmp_path):
    client, runner, host = api
    job = client.post(f"{PREFIX}/train", json=body(host, overrides={"steps": 400})).json()["id"]
    client.post(f"{PREFIX}/jobs/{job}/interrupt")
    assert runner.wait(job, timeout=300).status == "interrupted"
    assert not list(tmp_path.glob("*.safetensors"))


def test_images_and_requests_are_checked():
    with pytest.raises(CopierError, match="base64"):
        decode_image("not base64!")
    with pytest.raises(CopierError, match="could not be read"):
        decode_image(base64.b64encode(b"GIF89a broken").decode())
    with pytest.raises(CopierError, match="either"):
        train_request({"name": "x"})
    with pytest.raises(CopierError, match="unknown field"):
        train_request({"image": "", "colour": "red"})
    request = train_request({"generate": {"prompt": "a red cube", "seed": 3}, "method": "both"})
    assert request.generate.seed == 3 and request.name == "a-red-cube"
