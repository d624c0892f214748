"""The tab builds with gradio, its inputs become a training request, and gallery images are read on gradio 3 and 4."""

import base64
import dataclasses
import json
import os

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from lib_copier.errors import CopierError, Interrupted
from lib_copier.lora.files import read_lora, write_lora
from lib_copier.lora.metadata import NetworkInfo, build_metadata
from lib_copier.lora.naming import lora_targets
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.configs import TINY
from lib_copier.models.sd_model import build_model
from lib_copier.recipes.estimate import describe_run, estimate, recipe_steps
from lib_copier.recipes.job import method_config
from lib_copier.recipes.kinds import DEFAULT_METHOD
from lib_copier.recipes.request import check_request
from lib_copier.train.config import field_info
from lib_copier.webui.gallery import selected_image
from lib_copier.webui.gallery import take as gallery_take
from lib_copier.webui.lora_tools import check_tool, run_checked
from lib_copier.webui.tab import (
    IMAGE_HEIGHT,
    LABELS,
    SETTING_GROUPS,
    Hooks,
    build_tab,
    effect_descriptions,
)
from lib_copier.webui.tab_form import build_request, effect_specs
from lib_copier.webui.tab_results import txt2img_prompt
from lib_copier.webui.utilities_tab import FIELDS, TOOLS, build_utilities, result_text, tool_body
from tests.conftest import randomize_

INFO = "a red fox in snow\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, Seed: 42, Size: 64x64"


def test_the_tab_builds():
    hooks = Hooks(run=lambda request, state: [], generate=lambda request: None, run_tool=lambda tool, body: {})
    tab = build_tab(hooks)
    assert isinstance(tab, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in tab.blocks.values()}
    assert {"copier_lora_train", "copier_lora_interrupt", "copier_lora_send_txt2img", "copier_lora_image",
            "copier_lora_generate", "copier_lora_utilities_run"} <= ids  # fmt: skip
    # Every trainer setting is in one of the Advanced groups, once; save_on_cancel is "Keep what is finished".
    grouped = [key for keys in SETTING_GROUPS.values() for key in keys]
    assert sorted(grouped) == sorted(set(field_info()) - {"save_on_cancel"})
    assert {f"copier_lora_{key}" for key in grouped} <= ids
    # Advanced starts at what the default method and preset train with, so an untouched form overrides nothing.
    shown = {b.elem_id: getattr(b, "value", None) for b in tab.blocks.values() if getattr(b, "elem_id", None)}
    default = method_config(DEFAULT_METHOD, "quick", {})
    assert all(shown[f"copier_lora_{key}"] == getattr(default, key) for key in grouped)
    assert shown["copier_lora_rank"] == 4 and DEFAULT_METHOD == "addift"
    # The image boxes keep their height whatever the upload's shape (a tall portrait pushed the form screens down).
    images = [b for b in tab.blocks.values() if isinstance(b, gr.Image)]
    assert len(images) == 2 and all(b.height == IMAGE_HEIGHT for b in images)
    # Train and Utilities are two tabs of one bar: a component made between them had split them into two bars.
    tabs = [b for b in tab.blocks.values() if type(b).__name__ in ("Tab", "TabItem")]
    assert [t.label for t in tabs] == ["Train", "Utilities"] and tabs[0].parent is tabs[1].parent


def test_the_effects_are_ticked_by_label_and_described():
    assert LABELS["high_contrast"] != "high_contrast"  # a label in words, not the registry's name
    text = effect_descriptions([LABELS["grayscale"], LABELS["outline"]])
    assert text.count("\n- ") == 1 and LABELS["outline"] in text


def test_inputs_become_a_request_named_after_the_image():
    image = Image.new("RGB", (64, 64), "red")
    image.info["parameters"] = INFO
    values = {"outline.thickness": 3, "outline.darkness": 0.5}
    assert effect_specs(["Outline"], values)[0][0].startswith("outline:thickness=3")  # ticked by its label
    request = build_request(image, "", ["Grayscale"], {}, None, "both", "quick", {"rank": 8}, False, "a\n\nb")
    assert request.name == "a-red-fox-in-snow"  # the results add the effect: a-red-fox-in-snow-grayscale
    assert request.caption == "a red fox in snow" and request.grid_prompts == ["a", "b"]
    assert request.overrides == {"rank": 8} and [e.label for e in request.effects] == ["grayscale"]
    with pytest.raises(CopierError, match="no original"):
        build_request(None, "", [], {}, None, "copier", "quick", {}, False, "")
    # Advanced shows a pair method's own defaults; only what the user changed there is an override.
    shown = dataclasses.asdict(method_config("addift", "quick", {}))
    request = build_request(image, "", ["Grayscale"], {}, None, "addift", "quick", {**shown, "rank": 8}, False, "")
    assert request.method == "addift" and request.overrides == {"rank": 8}


def test_transparent_and_16_bit_uploads_train_as_the_api_takes_them(tmp_path):
    """Gradio is told to keep the file's mode (its default "RGB" turns transparency black and 16 bits white), and the
    tab makes RGB as the API and the command line do: transparency over white, 16 bits scaled."""
    hooks = Hooks(run=lambda request, state: [], generate=lambda request: None, run_tool=lambda tool, body: {})
    images = [b for b in build_tab(hooks).blocks.values() if isinstance(b, gr.Image) and b.interactive is not False]
    assert images and all(b.image_mode is None for b in images)
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    clear.paste((200, 0, 0, 255), (16, 16, 48, 48))
    upload = tmp_path / "clear.png"
    clear.save(upload)
    if gr.__version__.startswith("3"):  # gradio 3 gets the file as a data URL, gradio 4 as a path
        given = "data:image/png;base64," + base64.b64encode(upload.read_bytes()).decode()
    else:
        from gradio.data_classes import FileData

        given = FileData(path=str(upload), orig_name=upload.name)
    assert images[0].preprocess(given).getpixel((0, 0)) == (0, 0, 0, 0)  # the alpha reaches the tab
    grey16 = Image.fromarray(np.full((64, 64), 32768, np.uint16))
    request = build_request(clear, "x", [], {}, grey16, "copier", "quick", {}, False, "")
    assert request.image.mode == "RGB" and request.image.getpixel((0, 0)) == (255, 255, 255)
    assert request.image.getpixel((32, 32)) == (200, 0, 0)
    (edit,) = request.effects
    assert edit.process(request.image).getpixel((0, 0)) == (128, 128, 128)
    # An edit is compared with its original pixel by pixel: a scaled one is fine, a cropped one is refused.
    check_request(build_request(clear, "x", [], {}, grey16.resize((128, 128)), "copier", "quick", {}, False, ""))
    with pytest.raises(CopierError, match="^your processed image 'edited' is 64x60 but the original is 64x64; an"):
        check_request(build_request(clear, "x", [], {}, grey16.crop((0, 0, 64, 60)), "copier", "quick", {}, False, ""))


def test_send_to_txt2img_sends_the_prompt_with_the_lora_and_nothing_else():
    results = [{"name": "fox-copier"}, {"name": "fox-grayscale"}]
    assert txt2img_prompt("a cat, (best:1.2)\nline 2", results, "fox-grayscale") == (
        "a cat, (best:1.2)\nline 2 <lora:fox-grayscale:1>"
    )
    assert txt2img_prompt("a cat", results, None) == "a cat <lora:fox-copier:1>"  # none picked: the first


@pytest.mark.parametrize("shape", ["gradio3", "gradio4-tuple", "gradio4-dict"])
def test_the_selected_gallery_image_comes_with_its_infotext(tmp_path, shape):
    paths = []
    for i, colour in enumerate(("red", "blue")):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), colour).save(paths[-1])
    gallery = {
        "gradio3": [{"name": p + "?1795429040.34", "is_file": True} for p in paths],
        "gradio4-tuple": [(p, None) for p in paths],
        "gradio4-dict": [{"image": {"path": p}, "caption": None} for p in paths],
    }[shape]
    info = json.dumps({"infotexts": ["first", INFO]})
    image = selected_image(gallery, info, 1)
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.info["parameters"] == INFO
    assert selected_image(gallery, info, -1).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(CopierError, match="empty"):
        selected_image([], info, 0)


def test_the_from_buttons_take_the_image_selected_in_their_own_gallery_or_the_first_after_the_grid(tmp_path):
    """From the Copier LoRA tab the WebUI's selected_gallery_index() sees no gallery: "From txt2img" took the
    batch's grid, with the first image's seed; and an empty gallery showed only gradio's red "Error"."""
    paths = []
    for i, colour in enumerate(("gray", "red", "blue")):  # a batch of two: the grid, then each image
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), colour).save(paths[-1])
    texts = [INFO.replace("Seed: 42", f"Seed: {seed}") for seed in (1, 1, 2)]
    info = json.dumps({"infotexts": texts, "index_of_first_image": 1})
    image, text = gallery_take(paths, info, json.dumps({"txt2img": 2, "img2img": -1}), "txt2img")
    assert image.getpixel((0, 0)) == (0, 0, 255) and "seed 2," in text
    image, text = gallery_take(paths, info, json.dumps({"txt2img": 2, "img2img": -1}), "img2img")  # none selected
    assert image.getpixel((0, 0)) == (255, 0, 0) and "seed 1," in text
    image, _ = gallery_take(paths, info, json.dumps({"txt2img": 0}), "txt2img")  # the grid, selected after generating
    assert image.getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(gr.Error, match="the gallery is empty; generate an image first"):
        gallery_take([], "", json.dumps({"txt2img": -1, "img2img": -1}), "img2img")
    # Its file deleted since, or outside the WebUI's folders (the WebUI's reader asserts), or not read: one sentence,
    # not gradio's bare red "Error"
    os.remove(paths[1])
    with pytest.raises(gr.Error, match=r"the gallery's image could not be read \(No such file or directory: .*1\.png"):
        gallery_take(paths, info, json.dumps({"txt2img": 1}), "txt2img")

    def outside(item):
        raise AssertionError("trying to open image file outside of allowed directories")

    for load in (outside, lambda item: None):
        with pytest.raises(gr.Error, match=r"the gallery's image could not be read .*; generate it again"):
            gallery_take(paths, info, json.dumps({"txt2img": 2}), "txt2img", load=load)


def test_the_utilities_form_becomes_the_api_body(tmp_path):
    assert tool_body("merge", ["a", "b"], "", None, None, "1, -0.5", 8, 0, True, "none", 0.9, "fp32", "ab") == {
        "out": "ab", "precision": "fp32", "loras": ["a", "b"], "ratios": [1.0, -0.5]}  # fmt: skip
    assert tool_body("resize", ["a"], "", None, None, "", 4, 0, True, "sv_fro", 0.9, "fp32", " small ") == {
        "out": "small", "precision": "fp32", "lora": "a", "rank": 4, "dynamic_method": "sv_fro",
        "dynamic_param": 0.9}  # fmt: skip
    assert tool_body("extract", [], "", "base", "tuned", "", 16, 8, True, "none", 0, "fp32", "x")["conv_rank"] == 8
    # Unticking kohya's clamp asks for the best approximation of the rank (clamp quantile 1); ticked, kohya's 0.99.
    exact = tool_body("svd-merge", ["a"], "", None, None, "", 8, 0, False, "none", 0, "fp32", "x")
    assert exact == {"out": "x", "precision": "fp32", "loras": ["a"], "rank": 8, "clamp_quantile": 1.0}
    assert "clamp_quantile" not in tool_body(
        "resize", ["a"], "", None, None, "", 4, 0, False, "none", 0.9, "fp32", "small"
    )
    with pytest.raises(CopierError, match="ratios"):
        tool_body("svd-merge", ["a"], "", None, None, "one", 8, 0, True, "none", 0, "fp32", "x")
    # An emptied parameter box (None) is left out, and the tool's check names what is missing.
    emptied = tool_body("resize", ["a"], "", None, None, "", 4, None, True, "sv_fro", None, "fp32", "small")
    assert emptied == {"out": "small", "precision": "fp32", "lora": "a", "rank": 4, "dynamic_method": "sv_fro"}
    (tmp_path / "a.safetensors").touch()  # the check finds the file, then the parameter missing
    with pytest.raises(CopierError, match="a dynamic resize needs both a method and its parameter"):
        check_tool("resize", emptied, [tmp_path])
    # What the form lacks is said in its own words, not the API's ('the extract request needs "original"').
    for form, message in [
        (("resize", [], "", None, None, "", 4), "pick a LoRA$"),
        (("merge", None, "", None, None, "", 4), "pick a LoRA or more"),
        (("extract", [], "", "base", None, "", 4), "pick the Original and the Tuned checkpoint"),
        (("svd-merge", ["a"], "", None, None, "", None), "give a Rank"),
        # A decimal comma: "0,5 0,5" read as four ratios for two LoRAs.
        (("merge", ["a", "b"], "", None, None, "0,5 0,5", 8), "2 LoRA.s. but 4 ratios in '0,5 0,5': a comma sep"),
    ]:
        with pytest.raises(CopierError, match=message):
            tool_body(*form, 0, True, "none", 0.9, "fp32", "x")


def test_the_utilities_form_shows_what_the_chosen_tool_reads_and_says_what_it_does():
    listed = [["a"]]
    with gr.Blocks() as blocks, gr.Tab("Utilities") as tab:
        build_utilities(tab, lambda tool, body: {"log": f"wrote {body['out']}"}, lambda: listed[-1], lambda: ["model"])
    fns = {getattr(f.fn, "__name__", None): f for f in _fns(blocks)}
    # The lists are read again when the tab is opened (a LoRA trained since the page loaded was missing), or refreshed
    assert _triggers(blocks, "listed") == {(tab._id, "select"), (_labelled(blocks, "Refresh lists")._id, "click")}
    choose = fns["choose"]
    shown_at_start = {c.label for c in choose.outputs[1:] if c.visible}
    conv = {
        "svd-merge": "Conv rank of 3x3 convs (0: the Rank)",
        "extract": "Conv rank (0: no ResNet layers, as kohya's default)",
    }
    for tool in TOOLS:
        text, *updates = choose.fn(tool, "none")
        shown = {c.label for c, update in zip(choose.outputs[1:], updates, strict=True) if update["visible"]}
        assert text.startswith(f"**{tool}**: ") and "Output name" not in " ".join(shown)
        if tool == "merge":
            assert shown == shown_at_start == {"LoRAs (resize: the first)", "Ratios, one per LoRA (negative subtracts)",
                                               "Merge into this checkpoint (optional)"}  # fmt: skip
        if tool == "resize":
            assert shown == {"LoRAs (resize: the first)", "Rank", conv["svd-merge"], "Dynamic resize"}
            with_method = choose.fn(tool, "sv_fro")[1:]
            assert with_method[FIELDS.index("dynamic_param")]["visible"]
        clamp = "kohya's clamp (off: the best approximation of the rank)"
        if tool == "extract":
            assert shown == {"Original checkpoint", "Tuned checkpoint", "Rank", clamp, conv["svd-merge"]}
        # The conv rank's 0 says what it does for the tool: the Rank, or (extract) no ResNet layers, as in kohya.
        assert updates[FIELDS.index("conv_rank")]["label"] == conv.get(tool, conv["svd-merge"])
        assert (clamp in shown) == (tool in ("svd-merge", "extract"))
    # A dynamic method offers a parameter valid for it (sv_ratio's is at least 1; 0.9 was refused).
    method_chosen = fns["method_chosen"].fn
    assert method_chosen("resize", "sv_ratio") == gr.update(visible=True, value=4.0)
    assert method_chosen("resize", "sv_fro")["value"] == 0.9 and not method_chosen("resize", "none")["visible"]
    # Run says at once that it is working, then what it wrote, with the new file in the lists.
    run = fns["run"].fn
    values = ["merge", ["a"], "", None, None, "", 8, 0, True, "none", 0.9, "fp32", "b"]
    first = next(run(*values))
    listed.append(["a", "b"])
    *_, last = run(*values)
    assert first[0].startswith("Working… (after the generation or training") and last[0] == "wrote b"
    assert last[1]["choices"] == ["a", "b"] and last[2]["choices"] == ["", "model"]


def test_the_utilities_result_says_once_what_the_tool_wrote_or_why_not(tmp_path):
    targets = lora_targets({k: tuple(v.shape) for k, v in build_model(TINY).state_dict().items()}, "sd1")
    network = randomize_(LoRANetwork.create(targets, rank=4, alpha=4.0, seed=0))  # ups not zero: a real delta
    write_lora(tmp_path / "a.safetensors", network.to_weights(), build_metadata(NetworkInfo("sd1", 4, 4.0, "a")))

    def run(tool, body):
        return run_checked(check_tool(tool, body, [tmp_path]))

    text = result_text(run, "resize", ["a"], "", None, None, "", 2, 0, True, "none", 0.9, "fp32", "small")
    assert text.count("wrote") == 1 and f"{tmp_path / 'small.safetensors'} ({len(targets)} modules)" in text
    assert (tmp_path / "small.safetensors").is_file()
    refused = result_text(run, "resize", ["a"], "", None, None, "", 2, 0, True, "none", 0.9, "fp32", "small")
    assert refused.startswith("error: ") and "small.safetensors" in refused and refused.count("\n") == 0
    # The clamp unticked: the merge of a and −0.5 b at rank 2 is the best rank-2 approximation of their sum.
    network_b = randomize_(LoRANetwork.create(targets, rank=4, alpha=4.0, seed=1), seed=1)
    write_lora(tmp_path / "b.safetensors", network_b.to_weights(), build_metadata(NetworkInfo("sd1", 4, 4.0, "b")))
    for clamp, name in [(True, "kohya"), (False, "exact")]:
        result_text(run, "svd-merge", ["a", "b"], "", None, None, "1 -0.5", 2, 0, clamp, "none", 0, "fp32", name)
    # The save precision reaches the file: fp16 halves it.
    result_text(run, "svd-merge", ["a", "b"], "", None, None, "1 -0.5", 2, 0, False, "none", 0, "fp16", "half")
    half = read_lora(tmp_path / "half.safetensors")
    assert {t.dtype for m in half.modules.values() for t in (m.up, m.down)} == {torch.float16}
    a, b = network.to_weights(), network_b.to_weights()
    kohya, exact = (read_lora(tmp_path / f"{name}.safetensors").modules for name in ("kohya", "exact"))
    for key in a:
        target = (a[key].delta() - 0.5 * b[key].delta()).double().flatten(1)
        best = float(torch.linalg.svdvals(target)[2:].norm())
        assert float((exact[key].delta().double().flatten(1) - target).norm()) == pytest.approx(best, rel=1e-4)
        assert float((kohya[key].delta().double().flatten(1) - target).norm()) > best * 1.0001


def test_tools_run_side_by_side_each_keep_their_own_log_and_leave_the_console_alone(tmp_path, capsys):
    """The tab's tools and the API's run in different WebUI threads at once. Each said its lines through the
    process's redirected stdout: a run took the other's lines, and the WebUI's console could stay redirected."""
    import threading

    targets = lora_targets({k: tuple(v.shape) for k, v in build_model(TINY).state_dict().items()}, "sd1")
    network = randomize_(LoRANetwork.create(targets, rank=4, alpha=4.0, seed=0))
    write_lora(tmp_path / "a.safetensors", network.to_weights(), build_metadata(NetworkInfo("sd1", 4, 4.0, "a")))
    logs = {}

    def resize(i):
        logs[i] = run_checked(check_tool("resize", {"lora": "a", "rank": 2, "out": f"s{i}"}, [tmp_path]))["log"]

    threads = [threading.Thread(target=resize, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    print("the WebUI says something meanwhile")
    for thread in threads:
        thread.join()
    for i, log in logs.items():
        assert log.count("wrote") == 1 and f"s{i}.safetensors" in log and "meanwhile" not in log
    print("and afterwards")
    out = capsys.readouterr().out
    assert "meanwhile" in out and "afterwards" in out and "wrote" not in out


def test_the_estimate_counts_the_recipe_and_warns_a_cpu_user_before_hours_of_training():
    assert recipe_steps("copier", 2, "quick", {}) == 500 * 3
    assert recipe_steps("both", 1, "thorough", {}) == 3000 + 4000 + 3000
    assert recipe_steps("extraction", 1, "thorough", {"steps": 600}) == 1200
    assert recipe_steps("copier", 1, "quick", {}, originals=3) == 3 * 1000
    slow = estimate(1000, "cpu", 512)
    assert "hours" in slow and "training size of 128" in slow
    assert "training size" not in estimate(40, "cpu", 64) and "min" in estimate(500, "cpu", 64)
    assert "hours" not in estimate(1000, "cuda", 512) and "1000 training steps" in estimate(1000, "cuda", 512)
    # Fast: a quarter of Quick's steps, each of four timesteps, which a CPU computes in about four times as long.
    assert recipe_steps("both", 1, "fast", {}) == 3 * 125
    fast = describe_run("both", "fast", {}, 1, 1, "cpu", 512, False, 512)
    assert fast == describe_run("both", "quick", {}, 1, 1, "cpu", 512, False, 512).replace("1500", "375")
    assert fast.startswith("375 training steps in all") and "roughly 9.6 hours" in fast
    halved = describe_run("copier", "quick", {"batch_size": 2}, 1, 1, "cpu", 64, False, 512)
    assert halved.endswith("roughly 80 min.") and estimate(1000, "cpu", 64).endswith("roughly 40 min.")


def test_the_estimate_says_what_size_the_original_trains_at_and_how_to_keep_a_small_one_small():
    run = ("copier", "quick", {"steps": 10}, 1, 1, "cpu")
    # A 64 px image (e.g. drawn small to save time) trains at the model's 512 unless told: said, with the way out.
    small = describe_run(*run, 0, False, 512, (64, 64))
    assert small.startswith("The 64x64 original trains at 512x512, scaled up 8.0x; a training size of 64 keeps")
    assert "at 512 px" in small
    assert describe_run(*run, 64, False, 512, (64, 64)) == describe_run(*run, 64, False, 512)  # nothing to say
    assert describe_run(*run, 0, False, 512, (100, 60)).startswith("The 100x60 original trains at 640x384, scaled up")
    assert "a training size of 64 keeps" in describe_run(*run, 0, False, 512, (100, 60))
    # A large one is brought down to about the model's pixel count, keeping its aspect; SDXL's is 1024.
    assert describe_run(*run, 0, False, 512, (1024, 1536)).startswith("The 1024x1536 original trains at 448x640. 20 ")
    assert describe_run(*run, 0, True, 1024, (1024, 1024)) == describe_run(*run, 0, True, 1024)
    assert describe_run(*run, 0, False, 768, (768, 768)) == describe_run(*run, 0, False, 768)  # SD2 768-v
    assert "at 768 px" in describe_run(*run, 0, False, 768)


def test_more_originals_come_from_the_file_box(tmp_path):
    image = Image.new("RGB", (64, 64), "red")
    paths = []
    for colour in ("blue", "green"):
        Image.new("RGB", (64, 48), colour).save(tmp_path / f"{colour}.png")
        paths.append(str(tmp_path / f"{colour}.png"))  # gradio 4 gives paths; gradio 3 objects with .name
    request = build_request(image, "", ["Grayscale"], {}, None, "copier", "quick", {}, False, "", more=paths)
    assert [im.size for im in request.more_images] == [(64, 48), (64, 48)]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CopierError, match="original broken.png is not an image"):
        build_request(image, "", [], {}, None, "copier", "quick", {}, False, "", more=[str(tmp_path / "broken.png")])


def _fns(tab) -> list:
    """The Blocks' event functions: a dict on gradio 4, a list on gradio 3.41 (A1111's)."""
    return list(tab.fns.values()) if isinstance(tab.fns, dict) else list(tab.fns)


def _triggers(blocks, name) -> set[tuple[int, str]]:
    """(component id, event) of each event that runs the function `name`, on gradio 4 and on gradio 3.41."""
    found = set()
    for i, f in enumerate(_fns(blocks)):
        if getattr(f.fn, "__name__", None) == name:
            if hasattr(f, "targets"):
                found |= {tuple(target) for target in f.targets}
            else:
                found |= {(target, blocks.dependencies[i]["trigger"]) for target in blocks.dependencies[i]["targets"]}
    return found


def _labelled(blocks, label):
    return next(
        b for b in blocks.blocks.values() if getattr(b, "label", None) == label or getattr(b, "value", None) == label
    )


def _tab_function(tab, name):
    """The tab's event function `name`, and the components it reads."""
    fn = next(f for f in _fns(tab) if getattr(f.fn, "__name__", None) == name)
    return fn.fn, fn.inputs


def _estimator(tab):
    """The tab's estimate as (method, preset, effects, size, more, image, edit), Advanced's boxes at what the method
    and preset set them to unless given by name."""
    fn, inputs = _tab_function(tab, "estimate_text")
    assert inputs[7].elem_id == "copier_lora_grid_steps"
    keys = [c.elem_id.removeprefix("copier_lora_") for c in inputs[8:]]

    def estimate_text(meth, pre, *form, grid_steps=20, **settings):
        config = method_config(meth, pre, {})
        return fn(meth, pre, *form, grid_steps, *[settings.get(key, getattr(config, key)) for key in keys])

    return estimate_text


def test_emptied_number_boxes_keep_their_defaults_and_generate_says_what_is_missing():
    """A number box the user cleared reads None: Train uses the preset's value there, as an untouched box does, and
    Generate says which value is missing, instead of a TypeError's "Error"."""
    asked = []
    tab = build_tab(Hooks(run=lambda request, state: asked.append(request) or [], generate=lambda request: None))
    start, inputs = _tab_function(tab, "train_unless_running")
    emptied = {"copier_lora_size", "copier_lora_grid_steps", "copier_lora_steps", "copier_lora_rank"}
    values = [None if c.elem_id in emptied else "" if c.value is None and isinstance(c, gr.Textbox) else c.value
              for c in inputs]  # fmt: skip
    values[0] = "task(1)"  # the task id the page's JS gives a run
    values[[c.elem_id for c in inputs].index("copier_lora_image")] = Image.new("RGB", (64, 64), "red")
    *_, status = start(*values)
    assert status == "<ul></ul>", status  # trained (the stand-in made no files), no error
    (request,) = asked
    assert request.size is None and request.grid_steps == 20 and request.overrides == {}
    values[[c.elem_id for c in inputs].index("copier_lora_size")] = -64  # said with the box's label, before training
    assert "&quot;Training size&quot; is -64; it must be between 64 and 2048" in start(*values)[-1] and len(asked) == 1
    image = Image.new("RGB", (64, 64))
    with pytest.raises(CopierError, match='"grid_steps" is 0'):  # a value typed, unlike an empty box, is checked
        check_request(build_request(image, "x", [], {}, None, "copier", "quick", {}, False, "", grid_steps=0))
    # Whole numbers stay whole: the int settings' boxes round as the user types.
    assert all(c.precision == 0 for c in inputs if c.elem_id in emptied)

    generate = _tab_function(tab, "generate_here")[0]
    [(kept, said)] = generate("a red apple", "", None, None, 7.0, 64)  # refused at once, nothing drawn
    assert kept == gr.update() and "&quot;Steps&quot; is required" in said  # the box's label, under the button
    [(_, said)] = generate("a red apple", "", 3, 20, 7.0, None)
    assert "&quot;Width and height&quot; is required" in said  # not 512
    [(_, said)] = generate("a red apple", "", 3, 20, 7.0, 32)
    assert "&quot;Width and height&quot; is 32; it must be between 64" in said
    # The infotext records the size the WebUI drew (sides rounded to a multiple of 8), not the one asked for; the
    # drawing says at once that it may wait for the WebUI's current work (gradio's counter alone said nothing).
    drawn = build_tab(Hooks(run=lambda request, state: [], generate=lambda request: Image.new("RGB", (96, 96))))
    (kept, waits), (img, said) = _tab_function(drawn, "generate_here")[0]("fox", "", 3, 2, 7.0, 100)
    assert kept == gr.update() and "Drawing… (after the generation or training the WebUI is busy with" in waits
    assert "Size: 96x96" in img.info["parameters"] and said == ""

    def interrupted(request):  # the WebUI's Interrupt before the sampler's first step: no image
        raise Interrupted("interrupted before the image was drawn")

    stopped = build_tab(Hooks(run=lambda request, state: [], generate=interrupted))
    *_, (kept, said) = _tab_function(stopped, "generate_here")[0]("fox", "", 3, 2, 7.0, 64)
    assert kept == gr.update() and said == "<p class='copier-lora-error'>interrupted before the image was drawn</p>"

    # The estimate says what Train would refuse while the user types it (Thorough warms up for 500 steps).
    tab = build_tab(Hooks(run=lambda request, state: [], model_kind=lambda: ("cpu", False, 512)))
    estimate_text = _estimator(tab)
    assert estimate_text("copier", "thorough", ["Grayscale"], 64, [], None, None, steps=3000).startswith(
        "7000 training"
    )
    small = estimate_text("copier", "thorough", ["Grayscale"], None, [], Image.new("RGB", (64, 64)), None, steps=3000)
    assert small.startswith("The 64x64 original trains at 512x512, scaled up 8.0x")
    grids = estimate_text("copier", "quick", ["Grayscale"], None, [], None, None, grid_steps=0)
    assert grids == 'Train would refuse this: "Grid sampling steps" is 0; it must be between 1 and 150.'
    emptied = estimate_text("copier", "quick", ["Grayscale"], None, [], None, None, grid_steps=None)
    assert emptied.startswith("1000 training steps")  # an emptied box: the default, as at Train
    refused = estimate_text("copier", "thorough", ["Grayscale"], None, [], None, None, steps=100)
    assert refused == "Train would refuse this: warmup_steps (500) must be at most steps (100), " + (
        "or the learning rate never reaches its setting."
    )
    # A model Train would refuse (here, a flow-matching one in Forge) is said as soon as the form changes.
    flux = CopierError("the loaded model does not sample as SD does")
    tab = build_tab(Hooks(run=lambda request, state: [], model_kind=lambda: (_ for _ in ()).throw(flux)))
    assert _estimator(tab)("copier", "quick", [], 0, [], None, None, steps=10) == (
        "Train would refuse this: the loaded model does not sample as SD does."
    )
    # Forge before its first generation, while a run holds it: nothing to read yet, and nothing refused.
    tab = build_tab(Hooks(run=lambda request, state: [], model_kind=lambda: None))
    assert _estimator(tab)("copier", "quick", [], 0, [], None, None, steps=10) == (
        "The estimate follows once the WebUI has loaded the checkpoint."
    )


def test_train_pressed_again_while_its_run_goes_says_so_at_once_instead_of_queueing_a_second_run():
    """The page's JS hides Train while its run goes and sends no task id for a gallery button pressed meanwhile: the
    tab then says a run is going, without waiting in the WebUI's queue behind it, and trains nothing."""
    queued, trained = [], []

    def wrap(fn, given_up):  # the WebUI's queue: entering it waits for the run in progress
        return lambda *args: queued.append(args[0]) or fn(*args)

    hooks = Hooks(run=lambda request, state: trained.append(request) or [], wrap=wrap)
    train, inputs = _tab_function(build_tab(hooks), "train_unless_running")
    values = _train_values(inputs, Image.new("RGB", (64, 64), "red"))
    *kept, status = train("", *values[1:])
    assert "still running" in status and all(update == gr.update() for update in kept)
    assert queued == [] and trained == []
    assert train("task(7)", *values[1:])[-1] == "<ul></ul>" and queued == ["task(7)"] and len(trained) == 1
    with gr.Blocks():  # the WebUI's txt2img gallery, its infotext and our button under it
        galleries = {"txt2img": (gr.Gallery(), gr.Textbox(), gr.Button())}
    gallery = build_tab(dataclasses.replace(hooks, galleries=galleries, gallery_trains=lambda: False))
    loaded = _tab_function(gallery, "start_from_gallery")[0]("task(8)", *values[1:])
    assert loaded[-1] == "" and queued == ["task(7)"]  # load only: no sentence, and no wait in the queue
    # Another run (an API job, another page's) goes: the button loads the image and says so, without queueing one
    # more behind it; Train, pressed on purpose, still queues.
    # The page's progress bar polls the task id it sent: it is ended, or the bar waited for it 40 s, Train hidden.
    ended = []
    gallery = build_tab(dataclasses.replace(hooks, galleries=galleries, busy=lambda: True, end_task=ended.append))
    *kept, status = _tab_function(gallery, "start_from_gallery")[0]("task(9)", *values[1:])
    assert "Another Copier LoRA run is going" in status and all(update == gr.update() for update in kept)
    assert queued == ["task(7)"] and ended == ["task(9)"]
    assert _tab_function(gallery, "train_unless_running")[0]("task(10)", *values[1:])[-1] == "<ul></ul>"
    assert queued == ["task(7)", "task(10)"]


def test_a_new_image_renames_the_output_unless_the_user_typed_the_name():
    """The Output name filled from the first image's prompt stayed for every image after it, so their LoRAs were
    named after the first; a name the user typed stays. A prompt too long to train on is named as the tab shows it."""
    on_image, _ = _tab_function(build_tab(Hooks(run=lambda request, state: [])), "on_image")
    fox, cat = (
        _with_info(Image.new("RGB", (64, 64)), f"a {animal} in snow\nSteps: 20, Seed: 1, Size: 64x64")
        for animal in ("fox", "cat")
    )
    _, name, filled = on_image(fox, "", "")
    assert name == filled == "a-fox-in-snow"
    assert on_image(cat, name, filled)[1:] == ("a-cat-in-snow", "a-cat-in-snow")
    assert on_image(cat, "my-style", filled)[1:] == ("my-style", filled)  # typed: kept
    assert on_image(None, name, filled)[1] == "copier"  # cleared: the plain default, not the old image's name
    train, inputs = _tab_function(build_tab(Hooks(run=lambda request, state: [])), "train_unless_running")
    values = _train_values(inputs, _with_info(Image.new("RGB", (64, 64)), "fox " * 3000))
    assert "&quot;Prompt in the image&#x27;s parameters&quot; has 11999 characters" in train("task(1)", *values[1:])[-1]


def _train_values(inputs, image):
    """Train's inputs as an untouched form has them (an empty textbox reads ""), with `image` uploaded."""
    values = ["" if c.value is None and isinstance(c, gr.Textbox) else c.value for c in inputs]
    values[[c.elem_id for c in inputs].index("copier_lora_image")] = image
    return values


def _with_info(image, text):
    image.info["parameters"] = text
    return image


def test_the_estimate_counts_your_own_edit_and_says_what_train_would_refuse_of_the_size_and_image():
    """With an edit uploaded the estimate counted one LoRA too few (0 steps with no effect ticked); a training size
    Train refuses, or an original over 4096 px, got an ordinary estimate (and the previews a red "Error")."""
    tab = build_tab(Hooks(run=lambda request, state: [], model_kind=lambda: ("cpu", False, 512)))
    estimate_text = _estimator(tab)
    edit, image = Image.new("RGB", (64, 64), "blue"), Image.new("RGB", (64, 64))
    assert estimate_text("addift", "quick", [], 64, [], image, None, steps=100) == (
        "Train would refuse this: the addift method needs at least one effect or processed image."
    )
    assert estimate_text("addift", "quick", [], 64, [], image, edit, steps=100).startswith("100 training steps")
    assert estimate_text("addift", "quick", ["Invert"], 64, [], image, edit, steps=100).startswith("200 training steps")
    for side in (-64, 10, 5000):
        text = estimate_text("addift", "quick", ["Invert"], side, [], image, None, steps=100)
        assert text == f"Train would refuse this: the training size is {side}; it must be between 64 and 2048."
    wide = Image.new("RGB", (5000, 100))
    text = estimate_text("addift", "quick", ["Invert"], 0, [], wide, None, steps=100)
    assert text == "Train would refuse this: the original is 5000x100 px; the largest side allowed is 4096 px."
    thin = estimate_text("addift", "quick", ["Invert"], 0, [], Image.new("RGB", (4096, 1)), None, steps=100)
    assert thin.startswith("Train would refuse this: the original is 4096x1, too long and thin")
    preview, _ = _tab_function(tab, "preview")
    assert preview(wide, ["Invert"], *[None] * (len(_tab_function(tab, "preview")[1]) - 2)) == []


def test_the_previews_say_when_an_effect_changes_nothing_in_the_image():
    tab = build_tab(Hooks(run=lambda request, state: [], generate=lambda request: None))
    preview, inputs = _tab_function(tab, "preview")
    values = [c.value for c in inputs[2:]]  # the effects' parameters at their defaults
    chosen = [LABELS["grayscale"], LABELS["outline"]]
    flat = Image.new("RGB", (64, 64), (200, 30, 30))  # no edges to outline
    assert [label for _, label in preview(flat, chosen, *values)] == ["outline: no change", "grayscale"]
    grey = Image.new("RGB", (64, 64), (90, 90, 90))
    grey.paste((250, 250, 250), (16, 16, 48, 48))  # edges, and nothing to grey
    assert [label for _, label in preview(grey, chosen, *values)] == ["outline", "grayscale: no change"]


def test_the_estimate_says_what_train_would_refuse_of_every_setting_and_of_the_more_originals(tmp_path):
    """It checked only the steps, batch size, training size and main original: a rank of -1, an lr of 0, a warmup
    longer than the run, or a "More originals" file Train refuses got an ordinary estimate, and Train then refused."""
    tab = build_tab(Hooks(run=lambda request, state: [], model_kind=lambda: ("cpu", False, 512)))
    estimate_text = _estimator(tab)
    form = ("copier", "quick", ["Invert"], 64, [], Image.new("RGB", (64, 64)), None)
    refused = "Train would refuse this: "
    assert estimate_text(*form, rank=-1) == refused + "setting rank is -1; it must be between 1 and 1024."
    assert estimate_text(*form, lr=0.0) == refused + "setting lr is 0; it must be above 0, or the LoRA learns nothing."
    assert estimate_text(*form, steps=1, warmup_steps=5).startswith(refused + "warmup_steps (5) must be at most steps")
    files = {"thin.png": (2000, 8), "huge.png": (4097, 64), "ok.png": (96, 64)}
    for file, size in files.items():
        Image.new("RGB", size).save(tmp_path / file)
    (tmp_path / "notimage.png").write_bytes(b"not a png")
    more = ("copier", "quick", ["Invert"], 64)

    def with_more(*names):
        return estimate_text(*more, [str(tmp_path / name) for name in names], Image.new("RGB", (64, 64)), None)

    assert with_more("ok.png").startswith("2000 training steps in all")  # a copier and an invert LoRA per original
    assert with_more("ok.png", "notimage.png") == refused + "original notimage.png is not an image PIL can read " + (
        "(PNG, JPEG, WebP ...)."
    )
    assert with_more("huge.png") == refused + "original huge.png is 4097x64 px; the largest side allowed is 4096 px."
    assert with_more("thin.png").startswith(refused + "original thin.png is 2000x8, too long and thin")
    # Train says the same of them, before any training
    runs = []
    tab = build_tab(
        Hooks(run=lambda request, state: runs.append(request) or [], model_kind=lambda: ("cpu", False, 512))
    )
    start, inputs = _tab_function(tab, "train_unless_running")
    values = {c: c.value for c in inputs}
    values[inputs[0]], values[inputs[1]] = "task(1)", Image.new("RGB", (64, 64), "red")  # the task id, the original
    values[next(c for c in inputs if c.elem_id == "copier_lora_more_originals")] = [str(tmp_path / "notimage.png")]
    status = start(*values.values())[-1]
    assert "original notimage.png is not an image PIL can read" in status and not runs


def test_the_estimate_reads_the_form_again_after_each_change_which_gradio_3_drops_while_one_runs():
    tab = build_tab(Hooks(run=lambda request, state: [], model_kind=lambda: ("cpu", False, 512)))
    estimates = [f for f in _fns(tab) if getattr(f.fn, "__name__", None) == "estimate_text"]
    assert len(estimates) == 2 * len(estimates[0].inputs)  # each box's change runs it, and then once more


def test_interrupt_pressed_while_the_tabs_run_waits_in_the_queue_withdraws_that_run_only():
    """The page's JS sends the task id of its run still in the queue (else it presses the WebUI's Interrupt and
    sends none): the WebUI's Interrupt stopped whatever held the WebUI, and the run then started anyway."""
    trained, ended, waits, stopped = [], [], [], []

    def wrap(fn, given_up):  # the WebUI's queue: a call given up stops waiting for its turn (gpu_call)
        waits.append(given_up)
        return fn

    hooks = Hooks(run=lambda request, state: trained.append(request) or [], end_task=ended.append, wrap=wrap)
    tab = build_tab(dataclasses.replace(hooks, stop_host=lambda: stopped.append(1)))
    interrupt, inputs = _tab_function(tab, "interrupt_run")
    assert len(inputs) == 1 and inputs[0] is _tab_function(tab, "train_unless_running")[1][0]  # the task id
    assert interrupt("") == gr.update() and ended == [] and stopped == [1]  # none: what holds the WebUI stops
    (given_up,) = waits
    assert not given_up("task(4)")
    assert "Interrupted while it waited for its turn: nothing was trained" in interrupt("task(4)")
    assert ended == ["task(4)"] and stopped == [1]  # its progress bar ends now, and Train is back; nothing else stops
    assert given_up("task(4)") and not given_up("task(5)")  # its call stops waiting for the WebUI's queue lock
    train, train_inputs = _tab_function(tab, "train_unless_running")
    values = _train_values(train_inputs, Image.new("RGB", (64, 64), "red"))
    *kept, status = train("task(4)", *values[1:])  # its turn comes: it ends there
    assert kept == [gr.update()] * 3 and "nothing was trained" in status and trained == []  # str: the WebUI adds to it
    assert not given_up("task(4)")
    # The runs wait for the WebUI's queue lock; gradio 4 would also hold a second press of Train in its own queue
    # behind a withdrawn run, where the WebUI's progress bar gave up on it after 40 s.
    (call,) = [f for f in _fns(tab) if getattr(f.fn, "__name__", None) == "train_unless_running"]
    assert getattr(call, "concurrency_limit", "gradio 3") in (None, "gradio 3")  # gradio 4's default is one
    assert train("task(5)", *values[1:])[-1] == "<ul></ul>" and len(trained) == 1  # the next run trains
    # Pressed as it ended (the page learns of the end at its next poll): it is not said to be withdrawn
    assert interrupt("task(5)") == gr.update() and ended == ["task(4)"]


def test_a_run_that_fails_where_no_check_foresaw_says_so_in_one_line(capsys):
    """Out of memory, say: Forge's wrapper showed an earlier, unrelated error in its place."""

    def run(request, state):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    train, train_inputs = _tab_function(build_tab(Hooks(run=run)), "train_unless_running")
    *cleared, status = train("task(1)", *_train_values(train_inputs, Image.new("RGB", (64, 64), "red"))[1:])
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in status and cleared[:2] == [[], "[]"]
    assert "Traceback" in capsys.readouterr().err  # on the WebUI's console, for a report


def test_the_loras_an_interrupted_run_kept_can_be_sent_to_txt2img():
    """ "Keep what is finished": the kept LoRAs were named in the sentence only, not offered to Send to txt2img."""
    kept = {"name": "cat-copier", "kind": "copier", "effect": "", "grid": None, "lora": "/x/cat-copier.safetensors"}

    def run(request, state):
        state.results = [kept]  # as train_in_webui describes them
        raise Interrupted("interrupted while drawing the strength grids; kept cat-copier")

    train, train_inputs = _tab_function(build_tab(Hooks(run=run)), "train_unless_running")
    grids, results, pick, status = train("task(1)", *_train_values(train_inputs, Image.new("RGB", (64, 64), "red"))[1:])
    assert grids == [] and json.loads(results) == [kept] and "kept cat-copier" in status
    assert pick == gr.update(choices=["cat-copier"], value="cat-copier")
    assert txt2img_prompt("a dog", json.loads(results), pick["value"]) == "a dog <lora:cat-copier:1>"


def test_interrupt_pressed_as_the_run_gets_its_turn_stops_that_run():
    """The page learns that its run holds the WebUI at its next poll of the progress bar: an Interrupt pressed in
    between sent the task id as for a run still queued, the bar ended and the tab said "nothing was trained", while
    the run went on and wrote its LoRAs."""
    import threading

    turn, ended = threading.Event(), []

    def run(request, state):  # the run has its turn, and trains until it is interrupted
        turn.set()
        assert state.interrupted.wait(10)
        raise Interrupted("training was interrupted at step 3")

    stopped = []
    tab = build_tab(Hooks(run=run, end_task=ended.append, stop_host=lambda: stopped.append(1)))
    interrupt = _tab_function(tab, "interrupt_run")[0]
    train, train_inputs = _tab_function(tab, "train_unless_running")
    values = _train_values(train_inputs, Image.new("RGB", (64, 64), "red"))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(said=train("task(6)", *values[1:])[-1]))
    thread.start()
    assert turn.wait(10)
    assert interrupt("task(6)") == gr.update() and ended == []  # not withdrawn: its bar goes on to the run's end
    assert stopped == [1]  # and the image the WebUI draws for it (a grid's) stops too
    thread.join(10)
    assert "interrupted at step 3" in outcome["said"]


def test_the_training_events_are_unlimited_by_gradio_also_through_a_webuis_wrapped_event_listeners():
    """Forge wraps every event listener in a (*args, **kwargs) function: concurrency_limit, told from the listener's
    signature, was never passed there, and a Train pressed behind a withdrawn run waited in gradio's own queue."""
    from lib_copier.webui.tab import GRADIO_4, _on

    with gr.Blocks() as blocks:
        button = gr.Button()
        event = button.click
        _on(lambda *args, **kwargs: event(*args, **kwargs), lambda: None, [], [], js="copierLoraStart", waits=True)
    (call,) = _fns(blocks)
    if GRADIO_4:
        assert call.concurrency_limit is None and call.js == "copierLoraStart"
