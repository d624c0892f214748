"""The HTTP API on a FastAPI app, with the training run of the A1111-shaped stand-in behind it."""

import base64
import inspect
import io
import struct
import threading
import typing
import zlib

import pytest
import torch
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

from lib_copier.errors import CopierError
from lib_copier.lora.files import read_lora, write_lora
from lib_copier.lora.metadata import NetworkInfo, build_metadata
from lib_copier.lora.naming import lora_targets
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img, generate
from lib_copier.models.sd_model import build_model
from lib_copier.recipes.request import decode_image, request_from_json
from lib_copier.webui.api import PREFIX, add_routes
from lib_copier.webui.jobs import JobRunner
from lib_copier.webui.lora_tools import lora_names
from lib_copier.webui.training import STAGING, train_in_webui
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
    add_routes(app, runner, lambda request, state: train_in_webui(request, host, tmp_path, state), lambda: [tmp_path],
               auth="user:secret", model_side=lambda: host.backend().resolution)  # fmt: skip
    client = TestClient(app)
    client.auth = ("user", "secret")
    return client, runner, host


def body(host, **kw):
    image = generate(host.sd_model.ours[0], Txt2Img("a cat", seed=0, steps=2))
    return {"image": png_base64(image), "name": "cat", "effects": ["grayscale"], "method": "copier",
            "overrides": {"steps": 2}, "prompt_pool": 2, "size": 64, "grid_prompts": ["a dog"], "grid_steps": 2,
            **kw}  # fmt: skip


def test_a_request_without_a_method_trains_the_default_pair_method():
    request = request_from_json({"generate": {"prompt": "a red cube"}, "effects": ["grayscale"]})
    assert request.method == "addift" and request.name == "a-red-cube"


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


def test_loras_in_subfolders_and_with_any_file_name_are_listed_and_taken_by_the_tools(api, tmp_path):
    """WebUI users keep their LoRAs in subfolders and name them freely; the tools take each as the list names it,
    and a name without its folder where it is the only LoRA of that name."""
    client, _, _ = api
    targets = lora_targets({k: tuple(v.shape) for k, v in build_model(TINY).state_dict().items()}, "sd1")
    deltas = {}
    for seed, name in enumerate(["styles/Ghibli style!", "キャラ/ink", "old/ink"]):
        network = randomize_(LoRANetwork.create(targets, rank=4, alpha=4.0, seed=seed), seed=seed)
        (tmp_path / name).parent.mkdir(exist_ok=True)
        info = build_metadata(NetworkInfo("sd1", 4, 4.0, "x"))
        write_lora(tmp_path / f"{name}.safetensors", network.to_weights(), info)
        deltas[name] = {key: w.delta() for key, w in read_lora(tmp_path / f"{name}.safetensors").modules.items()}
    (tmp_path / STAGING / "run").mkdir(parents=True)
    (tmp_path / STAGING / "run" / "half.safetensors").write_bytes(b"")  # an unfinished run's file is not listed
    assert lora_names([tmp_path]) == ["old/ink", "styles/Ghibli style!", "キャラ/ink"]

    body = {"loras": ["styles/Ghibli style!", "キャラ/ink"], "ratios": [1, -0.5], "out": "mix"}
    assert client.post(f"{PREFIX}/lora/merge", json=body).status_code == 200
    merged = read_lora(tmp_path / "mix.safetensors").modules
    a, b = deltas["styles/Ghibli style!"], deltas["キャラ/ink"]
    assert all(torch.allclose(merged[k].delta(), a[k] - 0.5 * b[k], atol=1e-6) for k in a)
    resized = client.post(f"{PREFIX}/lora/resize", json={"lora": "Ghibli style!", "rank": 2, "out": "small"})
    assert resized.status_code == 200, resized.text
    reply = client.post(f"{PREFIX}/lora/resize", json={"lora": "ink", "rank": 2, "out": "x"})
    assert reply.status_code == 400
    assert reply.json()["detail"] == "2 LoRAs are named 'ink': old/ink, キャラ/ink; give one with its folder"
    reply = client.post(f"{PREFIX}/lora/resize", json={"lora": "old/../../ink", "rank": 2, "out": "x"})
    assert reply.status_code == 400 and "is not a LoRA name" in reply.json()["detail"]
    assert not (tmp_path / "x.safetensors").exists()


def test_a_tool_that_fails_where_no_check_foresaw_answers_one_sentence_not_a_500(api, tmp_path, monkeypatch, capsys):
    """A full disk while a merge writes: a 500 from the API, and the Utilities' Result box stuck at "Working…"."""
    import errno

    from lib_copier.webui import lora_tools

    client, _, _ = api
    targets = lora_targets({k: tuple(v.shape) for k, v in build_model(TINY).state_dict().items()}, "sd1")
    network = randomize_(LoRANetwork.create(targets, rank=4, alpha=4.0, seed=1), seed=1)
    write_lora(tmp_path / "ink.safetensors", network.to_weights(), build_metadata(NetworkInfo("sd1", 4, 4.0, "x")))

    def full_disk(work):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "small.safetensors"))

    monkeypatch.setattr(lora_tools, "in_own_thread", full_disk)
    reply = client.post(f"{PREFIX}/lora/resize", json={"lora": "ink", "rank": 2, "out": "small"})
    assert reply.status_code == 400
    assert reply.json()["detail"] == f"No space left on device: {tmp_path / 'small.safetensors'}"
    assert "Traceback" in capsys.readouterr().err  # on the WebUI's console, for a report


def test_loras_in_every_folder_the_webuis_lora_cards_list_are_taken_and_results_go_to_the_first(monkeypatch, tmp_path):
    """A1111 lists models/LyCORIS beside models/Lora, Forge Neo its --lora-dirs: the Utilities take LoRAs from each,
    as the WebUI's own Lora page names its folders, and write to the LoRA folder."""
    import sys
    import types

    from lib_copier.webui.extension import tool_dirs
    from lib_copier.webui.host import check_lora_dir, lora_dirs
    from lib_copier.webui.lora_tools import check_tool, run_checked

    lora, lyco, mine = tmp_path / "Lora", tmp_path / "LyCORIS", tmp_path / "copier"
    page = types.SimpleNamespace(name="lora", allowed_directories_for_previews=lambda: [str(lora), str(lyco)])
    other = types.SimpleNamespace(name="checkpoints", allowed_directories_for_previews=lambda: [str(tmp_path)])
    modules = types.ModuleType("modules")
    modules.shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(lora_dir=str(lora), copier_lora_dir=None))
    modules.ui_extra_networks = types.SimpleNamespace(extra_pages=[other, page])
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.ui_extra_networks", modules.ui_extra_networks)
    assert lora_dirs() == [lora, lyco]
    modules.shared.cmd_opts.copier_lora_dir = str(mine)  # --copier-lora-dir: written there, read from all three
    assert lora_dirs() == [mine, lora, lyco]
    # A run's LoRAs there: the grids' and txt2img's <lora:…> tags find nothing outside the WebUI's folders
    outside = rf"^--copier-lora-dir {mine} is outside the folders the WebUI loads LoRAs from \({lora}, {lyco}\), so"
    with pytest.raises(CopierError, match=outside):
        check_lora_dir()
    with pytest.raises(CopierError, match=outside):  # nor do the Utilities write there
        tool_dirs()
    modules.shared.cmd_opts.copier_lora_dir = str(lyco / "copier")  # a subfolder of one: the WebUI lists it
    check_lora_dir()
    modules.shared.cmd_opts.copier_lora_dir = str(mine)

    targets = lora_targets({k: tuple(v.shape) for k, v in build_model(TINY).state_dict().items()}, "sd1")
    for seed, path in enumerate(
        [lora / "ink.safetensors", lyco / "old" / "loha.safetensors", lyco / "ink.safetensors"]
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        network = randomize_(LoRANetwork.create(targets, rank=4, alpha=4.0, seed=seed), seed=seed)
        write_lora(path, network.to_weights(), build_metadata(NetworkInfo("sd1", 4, 4.0, "x")))
    assert lora_names(lora_dirs()) == ["ink", "old/loha"]  # the LoRA folder's "ink" before LyCORIS's
    checked = check_tool("merge", {"loras": ["ink", "loha"], "out": "both"}, lora_dirs())
    assert checked.argv[2:4] == [str(lora / "ink.safetensors"), str(lyco / "old" / "loha.safetensors")]
    assert run_checked(checked)["path"] == str(mine / "both.safetensors") and (mine / "both.safetensors").is_file()
    with pytest.raises(CopierError, match=f"there is no LoRA named 'absent' in {mine} or {lora} or {lyco}"):
        check_tool("resize", {"lora": "absent", "rank": 2, "out": "x"}, lora_dirs())
    # `<lora:loha:1>` names no folder: a new "loha" in the LoRA folder would share its tag with old/loha.
    with pytest.raises(CopierError, match=r"the LoRA old/loha\.safetensors is listed already, and <lora:loha:…>"):
        check_tool("resize", {"lora": "ink", "rank": 2, "out": "loha"}, lora_dirs())
    assert not (mine / "loha.safetensors").exists()
    (lora / "styles").mkdir()
    (lora / "styles" / "old.pt").write_bytes(b"")  # listed by the Lora cards, not by the Utilities: named whole
    with pytest.raises(CopierError, match=r"^the LoRA styles/old\.pt is listed already, and <lora:old:…> would load"):
        check_tool("resize", {"lora": "ink", "rank": 2, "out": "old"}, lora_dirs())


def test_every_route_and_dependency_resolves_its_annotations_among_its_module_names(api):
    """FastAPI 0.94 (A1111 1.10's) reads each route's and dependency's annotations only among its module's names:
    one imported inside a function fails when the route is registered, and the WebUI starts without our API."""
    client, _, _ = api

    def calls(dependant):
        yield dependant.call
        for sub in dependant.dependencies:
            yield from calls(sub)

    routes = [r for r in client.app.routes if isinstance(r, APIRoute) and r.path.startswith(PREFIX)]
    assert len(routes) > 5
    for route in routes:
        for call in calls(route.dependant):
            if inspect.isfunction(call):
                typing.get_type_hints(call)  # raises NameError for a name the module lacks


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


def test_base64_is_taken_as_encoders_write_it_wrapped_spaced_url_safe_or_unpadded():
    """`base64` and Python's encodebytes wrap lines (A1111's own API takes that); URL-safe and unpadded base64 are
    common too: all were refused as "not valid base64"."""
    buffer = io.BytesIO()
    Image.new("RGB", (65, 64), (250, 251, 255)).save(buffer, format="PNG")  # bytes that need '-' '_' and padding
    raw = buffer.getvalue()
    plain = base64.b64encode(raw).decode()
    assert "=" in plain and "+" in plain and "/" in plain
    forms = [
        base64.encodebytes(raw).decode(),
        base64.encodebytes(raw).decode().replace("\n", "\r\n"),
        f"  {plain}\n",
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "DATA:image/png;base64," + plain,
    ]
    for text in forms:
        assert decode_image(text).size == (65, 64)
    with pytest.raises(CopierError, match="not valid base64"):
        decode_image(plain[:-5] + "!" + plain[-4:])


def test_images_and_requests_are_checked():
    with pytest.raises(CopierError, match="base64"):
        decode_image("not base64!")
    with pytest.raises(CopierError, match="not an image"):
        decode_image(base64.b64encode(b"GIF89a broken").decode())
    with pytest.raises(CopierError, match="either"):
        request_from_json({"name": "x"})
    with pytest.raises(CopierError, match="unknown field"):
        request_from_json({"image": "", "colour": "red"})
    request = request_from_json(
        {"generate": {"prompt": "a red cube", "seed": 3}, "method": "both", "effects": ["blur"]}
    )
    assert request.generate.seed == 3 and request.name == "a-red-cube"
    # -1 asks for a random seed, as in the WebUI's own txt2img API (the WebUI draws it); the trainer's too.
    request = request_from_json(
        {"generate": {"prompt": "a cube", "seed": -1}, "method": "copier", "overrides": {"seed": -1}}
    )
    assert request.generate.seed == -1 and request.overrides == {"seed": -1}
    with pytest.raises(CopierError, match='"generate.seed" is -2; it must be between -1 and'):
        request_from_json({"generate": {"prompt": "a cube", "seed": -2}})
    # The settings are checked as the method trains with them: Thorough's 500-step warm-up is the copier's, not
    # addift's, which trains at its own settings under any preset.
    short = {"generate": {"prompt": "a cube"}, "effects": ["blur"], "preset": "thorough", "overrides": {"steps": 50}}
    assert request_from_json({**short, "method": "addift"}).overrides == {"steps": 50}
    with pytest.raises(CopierError, match=r"warmup_steps \(500\) must be at most steps \(50\)"):
        request_from_json({**short, "method": "copier"})


def _png(side: int) -> str:
    """A PNG that is only a header saying side x side: all the checks may read before they refuse it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"") + chunk(b"IEND", b"")).decode()


GENERATE = {"generate": {"prompt": "a cat"}, "effects": ["grayscale"]}
FLAT = png_base64(Image.new("RGB", (64, 64), "red"))  # outline finds no edge in it
THIN = {"image": png_base64(Image.new("RGB", (2000, 8), "red"))}
BAD_TRAIN = [
    ({**GENERATE, "name": 123}, '"name" must be text'),
    ({**GENERATE, "overrides": [1, 2]}, '"overrides" must be an object'),
    ({**GENERATE, "overrides": {"save_on_cancel": True}}, 'set "save_on_interrupt" instead'),  # it did nothing
    ({**GENERATE, "prompt_pool": "abc"}, '"prompt_pool" must be a whole number'),
    ({**GENERATE, "size": "abc"}, '"size" must be a whole number'),
    ({**GENERATE, "size": -64}, '"size" is -64; it must be between 64 and 2048'),
    ({**GENERATE, "size": 100000}, '"size" is 100000'),
    ({**GENERATE, "grid_steps": -1}, '"grid_steps" is -1'),
    ({"generate": {"prompt": "a cat", "steps": -3}}, '"generate.steps" is -3'),
    ({"generate": {"prompt": "a cat", "width": 100000}}, '"generate.width" is 100000'),
    ({"generate": {"prompt": "a cat", "colour": 1}}, "\"generate\" has unknown field(s) 'colour'"),
    ({**GENERATE, "method": "extraction", "effects": []}, 'method "extraction" needs at least one effect'),
    ({**GENERATE, "effects": []}, 'method "addift" needs at least one effect'),
    ({**GENERATE, "grid_prompts": "a cat"}, '"grid_prompts" must be a list'),
    ({**GENERATE, "grid_prompts": []}, '"grid_prompts" has 0 items'),
    ({**GENERATE, "effects": "grayscale"}, '"effects" must be a list'),
    ({**GENERATE, "overrides": {"steps": "many"}}, "setting steps must be a whole number"),
    # JSON integers have no size limit; one too large for a float crashed the float conversion (a 500)
    ({**GENERATE, "overrides": {"lr": 10**400}}, "(401 characters), too large a number"),
    ({**GENERATE, "overrides": {"steps": 10**400}}, "setting steps is 1000"),
    ({"generate": {"prompt": "a cat", "cfg": -(10**400)}}, '"generate.cfg" is -1000'),  # (402 characters), too …
    ({**GENERATE, "size": 10**400}, '"size" is 1000'),
    ({**GENERATE, "effects": ["posterize:levels=" + "9" * 400]}, "posterize: levels must be a number, not 999"),
    ({**GENERATE, "method": "magic"}, "\"method\" is 'magic'; choose one of copier, extraction, both, slider, addift"),
    ({**GENERATE, "method": "x" * 5000}, "… (5000 characters); choose one of copier"),
    ({**GENERATE, "name": "x" * 5000}, "is too long; it may be at most 120 characters"),
    ({**GENERATE, "name": "x" * 110}, "(127 characters) is too long; it may be at most 120 characters"),
    ({**GENERATE, "name": "café: 猫"}, "the output name 'café: 猫' has ':', which a file name here may not use"),
    ({**GENERATE, "name": "fox.safetensors"}, "ends in .safetensors, which is added to it: give 'fox'"),
    ({**GENERATE, "name": "Nul"}, "the output name 'Nul' is a name Windows keeps for a device"),
    ({**GENERATE, "effects": ["x" * 5000]}, "… (5000 characters); known effects: bloom"),
    ({**GENERATE, "effects": ["blur:radius=" + "x" * 5000]}, "parameter radius takes a number, not 'xxx"),
    ({**GENERATE, "x" * 5000: 1}, "… (5000 characters); its fields are image"),
    ({**GENERATE, "caption": "x" * 10001}, '"caption" has 10001 characters; it must have at most 10000'),
    (
        {**GENERATE, "grid_prompts": ["a", "x" * 10001]},
        '"grid_prompts" item 2 has 10001 characters; it must have at most',
    ),
    # too long and thin to train at the asked size: refused before a job is queued, as the tab's estimate says
    ({**THIN, "effects": ["grayscale"], "size": 64}, "the original is 2000x8, too long and thin: it would train at"),
    ({**GENERATE, "more_images": [THIN["image"]], "size": 64}, '"more_images"[0] is 2000x8, too long and thin'),
    (  # was a 200, then the original was drawn and the job failed
        {"generate": {"prompt": "a cat", "width": 2048, "height": 64}, "effects": ["grayscale"], "size": 64},
        'the original "generate" asks for is 2048x64, too long and thin',
    ),
    ({"image": _png(15000)}, "refused as a possible decompression bomb"),
    ({"image": _png(6000)}, "6000x6000 px"),
    ({"image": "data:image/png;base64,@@@"}, "not valid base64"),
    ({"image": FLAT, "effects": ["outline"]}, "outline leaves the original unchanged, so its LoRA would have nothing"),
    ({"image": FLAT, "more_images": [FLAT], "effects": ["grayscale", "outline"]}, "outline leaves all 2 originals"),
    ({**GENERATE, "more_images": "abc"}, '"more_images" must be a list'),
    ({**GENERATE, "more_images": [1]}, '"more_images" must be a list of base64 images'),
    ({**GENERATE, "more_images": [_png(6000)]}, '"more_images"[0] is 6000x6000 px'),
    ({**GENERATE, "more_images": ["x"] * 16}, '"more_images" has 16 items; it must have at most 15'),
    ([1, 2], "the request must be a JSON object, not an array"),
    ("text", "the request must be a JSON object, not a string"),
    (3.5, "the request must be a JSON object, not a number"),
]


@pytest.mark.parametrize(("payload", "sentence"), BAD_TRAIN, ids=[s[:30] for _, s in BAD_TRAIN])
def test_every_bad_train_request_is_a_400_sentence_before_any_job(api, payload, sentence):
    client, runner, _ = api
    reply = client.post(f"{PREFIX}/train", json=payload)
    assert reply.status_code == 400, reply.text
    detail = reply.json()["detail"]
    assert sentence in detail and "\n" not in detail and len(detail) < 400
    assert not runner.jobs  # nothing was queued, so nothing reached the training function


@pytest.mark.parametrize(
    ("raw", "sentence"),
    [
        (b'{"generate": {"prompt": "a cat"},}', "the request body is not valid JSON (Expecting property name"),
        (b"\xff\xfe{}", "the request body is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was a 500 (RecursionError)
        (b" ", "must be a JSON object, not empty"),
    ],
)
@pytest.mark.parametrize("route", ["train", "lora/merge"])
def test_a_body_that_is_not_json_is_one_400_sentence(api, route, raw, sentence):
    client, runner, _ = api
    reply = client.post(f"{PREFIX}/{route}", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert sentence in reply.json()["detail"]
    assert not runner.jobs


BAD_TOOLS = [
    ("merge", {"loras": ["base"], "ratios": [1e300], "out": "x"}, '"ratios" item 1 is 1e+300; it must be between'),
    ("resize", {"lora": "absent", "rank": 2, "out": "x"}, "there is no LoRA named 'absent'"),
    ("resize", {"lora": "base", "rank": 0, "out": "x"}, '"rank" is 0; it must be between 1 and 1024'),
    ("resize", {"lora": "base", "rank": "8", "out": "x"}, '"rank" must be a whole number'),
    ("resize", {"lora": "base", "rank": 2, "out": "base"}, "base.safetensors already exists"),
    ("resize", {"lora": "../base", "rank": 2, "out": "x"}, "\"lora\" '../base' is not a LoRA name"),
    (
        "resize",
        {"lora": "base", "rank": 2, "out": "x", "dynamic_method": "sv_fro"},
        "needs both a method and its parameter",
    ),
    (
        "resize",
        {"lora": "base", "rank": 2, "out": "x", "dynamic_method": "sv_ratio", "dynamic_param": 0.5},
        "sv_ratio's parameter is the largest singular value over the smallest kept: 1 or more, not 0.5",
    ),
    (
        "resize",
        {"lora": "base", "rank": 2, "out": "x", "dynamic_method": "sv_fro", "dynamic_param": 0},
        "sv_fro's parameter is the share to keep: above 0 and at most 1, not 0",
    ),
    ("merge", {"loras": "base", "out": "x"}, '"loras" must be a list'),
    ("merge", {"loras": ["base"], "out": "x", "ratios": [1, 2]}, '1 "loras" but 2 "ratios"'),
    ("merge", {"loras": ["base"], "out": "x", "ratios": ["a"]}, '"ratios" must be a list of numbers'),
    ("svd-merge", {"loras": ["base"], "out": "x"}, 'needs "rank"'),
    ("svd-merge", {"loras": ["base"], "out": "x", "rank": 2, "clamp_quantile": 0}, "must be between 0.5 and 1.0"),
    ("extract", {"original": "a", "tuned": "b", "out": "x", "rank": 4}, "checkpoints are not available"),
]


@pytest.mark.parametrize(("tool", "payload", "sentence"), BAD_TOOLS, ids=[s[:30] for _, _, s in BAD_TOOLS])
def test_bad_utility_requests_answer_at_once_even_while_a_job_holds_the_lock(api, tmp_path, tool, payload, sentence):
    client, runner, host = api
    (tmp_path / "base.safetensors").write_bytes(b"")  # an existing name; it is never read
    with runner.lock:  # a training is running: a bad request must not wait for it
        reply = client.post(f"{PREFIX}/lora/{tool}", json=payload)
    assert reply.status_code == 400 and sentence in reply.json()["detail"], reply.text
    assert not (tmp_path / "x.safetensors").exists()


def test_the_docs_describe_each_request_with_its_limits(api):
    client, _, _ = api
    spec = client.get("/openapi.json").json()
    train = spec["paths"][f"{PREFIX}/train"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert train["properties"]["size"]["maximum"] == 2048 and train["properties"]["size"]["description"]
    assert train["properties"]["generate"]["properties"]["steps"]["minimum"] == 1
    resize = spec["paths"][f"{PREFIX}/lora/resize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(resize["required"]) == {"lora", "out", "rank"}


def test_a_small_negative_ratio_reaches_the_tool_as_a_number(api, tmp_path):
    """argparse reads "-1e-05" as an option; the tool gets "-0.00001"."""
    from lib_copier.webui.lora_tools import check_tool

    (tmp_path / "base.safetensors").write_bytes(b"")
    checked = check_tool("merge", {"loras": ["base"], "out": "x", "ratios": [-1e-05]}, [tmp_path])
    assert checked.argv[checked.argv.index("--ratios") + 1] == "-0.00001"


def test_a_password_outside_ascii_is_checked_not_a_server_error(tmp_path):
    app, runner = FastAPI(), JobRunner(threading.Lock())
    add_routes(app, runner, lambda request, state: None, lambda: [tmp_path], auth="user:sécret")
    client = TestClient(app)
    assert client.get(f"{PREFIX}/effects", auth=("user", "wrong")).status_code == 401  # was a 500 (TypeError)


def test_a_data_url_without_a_comma_is_one_sentence(api):
    client, _, host = api
    reply = client.post(f"{PREFIX}/train", json={**body(host), "image": "data:image/png;base64"})
    assert reply.status_code == 400 and '"image" is not an image' in reply.json()["detail"], reply.text


def test_originals_are_fitted_when_the_job_starts_where_the_webui_has_no_model_loaded_yet(tmp_path):
    """Forge loads its checkpoint at the first generation: until then POST /train cannot tell the model's side, and
    the job says what it would have (it loads the model first)."""
    host = A1111Host(randomize_(build_model(TINY)), lora_dir=tmp_path)
    app, runner = FastAPI(), JobRunner(threading.Lock())
    add_routes(app, runner, lambda request, state: train_in_webui(request, host, tmp_path, state), lambda: [tmp_path],
               model_side=lambda: None)  # fmt: skip
    reply = TestClient(app).post("/copier-lora/v1/train", json={**THIN, "effects": ["grayscale"], "size": 64})
    assert reply.status_code == 200
    state = runner.wait(reply.json()["id"], timeout=300)
    assert state.status == "failed" and "the original is 2000x8, too long and thin" in state.error
    assert list(tmp_path.iterdir()) == []
