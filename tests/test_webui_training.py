"""A training run as the WebUI starts it, on the A1111-, Forge- and Forge Neo-shaped stand-ins alike: files in the LoRA
folder, grids drawn by the host through `<lora:name:w>` from those files, progress on the host's bar, and Interrupt /
model change handled."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from lib_copier.errors import CopierError, Interrupted
from lib_copier.lora.files import read_lora
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img, generate
from lib_copier.models.sd_model import build_model
from lib_copier.recipes.grid import HEADER
from lib_copier.recipes.processed import make_effects
from lib_copier.recipes.request import TrainRequest
from lib_copier.webui.jobs import JobState
from lib_copier.webui.tab_results import results_html
from lib_copier.webui.training import STAGING, train_in_webui
from tests.a1111_like import A1111Host
from tests.conftest import randomize_
from tests.forge_like import ForgeHost


@pytest.fixture(params=["a1111", "forge", "neo", "classic", "reforge"])
def host(request, tmp_path):
    model = randomize_(build_model(TINY))
    if request.param == "a1111":
        return A1111Host(model, lora_dir=tmp_path)
    return ForgeHost(model, lora_dir=tmp_path, design=request.param)


def request_for(host, **kw) -> TrainRequest:
    image = generate(host.model, Txt2Img("a cat", seed=0, steps=2))
    defaults = dict(
        image=image,
        name="cat",
        effects=make_effects([["grayscale"]]),
        method="copier",
        overrides={"steps": 3},
        prompt_pool=2,
        size=64,
        grid_prompts=["a dog"],
        grid_steps=2,
    )
    return TrainRequest(**{**defaults, **kw})


def weights(host):
    return {n: p.detach().clone() for n, p in host.backend().weights()}


def test_a_run_writes_loras_whose_grids_the_host_draws_from_the_files(host, tmp_path):
    before = weights(host)
    state = JobState("j")
    leftover = tmp_path / STAGING / "died-mid-run"  # a WebUI killed during an earlier run left this
    leftover.mkdir(parents=True)
    (leftover / "old-copier.safetensors").write_bytes(b"")
    results = train_in_webui(request_for(host), host, tmp_path, state)
    assert [(r["kind"], r["name"]) for r in results] == [("copier", "cat-copier"), ("processed", "cat-grayscale")]
    for r in results:
        for key in ("lora", "sidecar", "grid"):
            assert (tmp_path / r[key]).is_file()
        assert r["prompt"] == f"<lora:{r['name']}:1>"
        assert r["seed"] == 0 == int(read_lora(r["lora"]).metadata["ss_seed"])  # the preset's seed
    assert any("<lora:cat-copier:1.5>" in p for p in host.prompts)
    assert any("<lora:cat-grayscale:-1>" in p for p in host.prompts)
    # The copier at +1.5 draws something else than the model alone: the file was loaded and applied.
    grid = np.asarray(Image.open(results[0]["grid"]))
    assert grid.shape == (HEADER + 64, 5 * 64, 3)
    assert not np.array_equal(grid[HEADER:, 64:128], grid[HEADER:, 256:320])
    assert host.prepared_jobs == 1 and state.stage.startswith("strength grid")
    # the bar's last text while the model is put back (Forge copies each weight: seconds on a CPU, the bar frozen)
    assert host.shown[-1][0] == "putting the WebUI's model back as it was"
    # The grids were drawn from files in their own folder; the LoRA folder got them only when all had succeeded.
    assert host.lora_files and all(f.parts[0] == STAGING for f in host.lora_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{r['name']}{suffix}" for r in results for suffix in (".safetensors", ".json", ".png")
    )
    assert any("step 3/3" in text for text, _, _ in host.shown)
    assert all(torch.equal(before[n], p) for n, p in host.backend().weights())


def test_a_caption_from_a_prompt_with_lora_tags_trains_on_the_text_txt2img_encodes(host, tmp_path, monkeypatch):
    # The 🧬 button's caption is the gallery image's prompt, which names the LoRAs it was drawn with; txt2img takes
    # the tags out before the text encoder, so training must too.
    encoded = []
    conditioning = host.conditioning
    monkeypatch.setattr(host, "conditioning", lambda texts, h, w: encoded.append(texts) or conditioning(texts, h, w))
    caption = "a cat, <lora:old style:0.8> on a mat <hypernet:x:1>"
    request = request_for(host, caption=caption, prompt_pool=0, overrides={"steps": 3, "preview_every": 3})
    results = train_in_webui(request, host, tmp_path, JobState("j"))
    assert encoded and all(prompts == ["a cat, on a mat"] for prompts in encoded)
    assert read_lora(results[0]["lora"]).metadata["ss_copier_caption"] == "a cat, on a mat"
    assert host.prompts[0] == "a cat, on a mat"  # the preview draws what the copier learned, without the old LoRA


def test_a_random_training_seed_is_reported_as_the_one_each_file_records(host, tmp_path):
    results = train_in_webui(request_for(host, overrides={"steps": 2, "seed": -1}), host, tmp_path, JobState("j"))
    seeds = [r["seed"] for r in results]
    assert seeds == [int(read_lora(r["lora"]).metadata["ss_seed"]) for r in results]
    assert all(0 <= s < 2**31 for s in seeds) and seeds[0] != seeds[1]  # drawn per LoRA
    assert f"seed {seeds[1]} — " in results_html(results)


def test_interrupt_from_the_webui_keeps_nothing_unless_asked(host, tmp_path):
    host.interrupt_when = lambda shown: len(shown) > 2
    with pytest.raises(Interrupted, match=r"^training was interrupted at step \d+; nothing was written$"):
        train_in_webui(request_for(host), host, tmp_path / "a", JobState("a"))
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").iterdir())

    state = JobState("b")
    with pytest.raises(Interrupted, match="interrupted at step .*; kept cat-copier$"):  # the sentence names it
        train_in_webui(request_for(host, save_on_interrupt=True), host, tmp_path / "b", state)
    assert (tmp_path / "b" / "cat-copier.safetensors").is_file()
    # and the job's results describe it, as a finished run's (the API's "results" was empty)
    [kept] = state.results
    assert (kept["name"], kept["lora"], kept["grid"]) == (
        "cat-copier",
        str(tmp_path / "b/cat-copier.safetensors"),
        None,
    )
    assert kept["steps"] == int(read_lora(kept["lora"]).metadata["ss_max_train_steps"])
    assert not (tmp_path / "b" / STAGING).exists()
    assert "b/cat-copier.safetensors" in host.listed and not [f for f in host.listed if STAGING in f]  # the WebUI's

    host.interrupt_when = lambda shown: any(text.startswith("strength grid") for text, _, _ in shown)
    with pytest.raises(Interrupted, match="interrupted while drawing the strength grids; nothing was written$"):
        train_in_webui(request_for(host), host, tmp_path / "c", JobState("c"))
    assert host.lora_files and list((tmp_path / "c").iterdir()) == []  # trained and drawn from, then dropped
    host.shown.clear()
    state = JobState("d")
    with pytest.raises(Interrupted, match="strength grids; kept cat-copier, cat-grayscale$"):
        train_in_webui(request_for(host, save_on_interrupt=True), host, tmp_path / "d", state)
    assert [r["name"] for r in state.results] == ["cat-copier", "cat-grayscale"]
    assert [r["grid"] for r in state.results] == [None, None]  # interrupted at the first grid's first image
    assert {p.name for p in (tmp_path / "d").glob("*.safetensors")} == {"cat-copier.safetensors",
                                                                         "cat-grayscale.safetensors"}  # fmt: skip
    assert {"d/cat-copier.safetensors", "d/cat-grayscale.safetensors"} <= set(host.listed)  # LoRA list, refreshed after
    assert not [f for f in host.listed if STAGING in f]  # the kept files moved out of the folder the grids read


def test_an_interrupt_while_the_original_is_generated_stops_before_training(host, tmp_path):
    # The WebUI's sampler stops early on an interrupt and returns a half-drawn image: it is not trained on.
    host.interrupt_when = lambda shown: True
    request = request_for(host, image=None, generate=Txt2Img("a cat", seed=1, steps=2, width=64, height=64))
    with pytest.raises(Interrupted, match="^interrupted while generating the original; nothing was written$"):
        train_in_webui(request, host, tmp_path, JobState("j"))
    assert not list(tmp_path.glob("*.safetensors"))
    # Interrupted before the sampler's first step, the WebUI returns no image at all: the job was "failed" then.
    host.interrupt_when = lambda shown: False
    host.txt2img = lambda request, progress=None: (_ for _ in ()).throw(Interrupted("before the image was drawn"))
    with pytest.raises(Interrupted, match="^interrupted while generating the original; nothing was written$"):
        train_in_webui(request, host, tmp_path, JobState("k"))


def test_a_model_change_mid_run_aborts_with_one_sentence_and_keeps_nothing(host, tmp_path):
    state = JobState("j")
    state.on_progress = lambda p: setattr(host, "replaced", p.step >= 2)
    with pytest.raises(CopierError, match="model was changed during the run, so the run stopped$"):
        train_in_webui(request_for(host), host, tmp_path, state)
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_model_picked_while_the_grids_are_drawn_draws_no_grid_with_it(host, tmp_path):
    """Forge loads a checkpoint picked during the run at the next generation: the grids of LoRAs trained on one
    model were drawn with another, and the run said "done"."""
    drawn = []
    txt2img = host.txt2img
    host.txt2img = lambda request, progress=None: drawn.append(host.replaced) or txt2img(request, progress)

    def pick_another(shown):  # asked between steps and images, as the WebUI's Interrupt button is
        host.replaced = any(text.startswith("strength grid") for text, _, _ in shown)
        return False

    host.interrupt_when = pick_another
    with pytest.raises(CopierError, match="model was changed during the run"):
        train_in_webui(request_for(host), host, tmp_path, JobState("j"))
    assert drawn and not any(drawn) and not list(tmp_path.glob("*.safetensors"))


def test_a_bad_name_is_refused_before_anything_runs(host, tmp_path):
    with pytest.raises(CopierError, match="path separators"):
        train_in_webui(request_for(host, name="../evil"), host, tmp_path, JobState("j"))
    assert host.prepared_jobs == 0


def test_the_extraction_stage_counts_its_modules_on_the_host_bar(host, tmp_path):
    train_in_webui(request_for(host, method="extraction"), host, tmp_path, JobState("j"))
    counted = [(step, total) for text, step, total in host.shown if text.startswith("extraction: grayscale: ")]
    assert counted and counted[-1][0] == counted[-1][1] > 0
    assert any(text.endswith(f"{total}/{total} modules") for text, _, total in host.shown)


def test_several_originals_make_one_processed_lora_over_all_of_them(host, tmp_path):
    second = generate(host.model, Txt2Img("a dog", seed=3, steps=2))
    results = train_in_webui(request_for(host, more_images=[second]), host, tmp_path, JobState("j"))
    processed = read_lora(next(r["lora"] for r in results if r["kind"] == "processed"))
    assert processed.metadata["ss_copier_originals"] == "2"


@pytest.mark.parametrize("method", ["slider", "addift"])
def test_a_pair_method_trains_in_place_with_checkpointing_and_leaves_the_model_bit_identical(host, tmp_path, method):
    before = weights(host)
    overrides = {"steps": 2, "gradient_checkpointing": True, "train_text_encoder": True}
    results = train_in_webui(request_for(host, method=method, overrides=overrides), host, tmp_path, JobState("j"))
    assert [(r["kind"], r["name"]) for r in results] == [(method, f"cat-grayscale-{method}")]
    lora = read_lora(tmp_path / results[0]["lora"])
    assert any(key.startswith("lora_te") for key in lora.modules) and any(
        f"<lora:cat-grayscale-{method}:1>" in p for p in host.prompts
    )
    assert any(f"{method}: grayscale" in text for text, _, _ in host.shown)
    assert all(torch.equal(before[n], p) for n, p in host.backend().weights())


def test_a_run_out_of_gpu_memory_starts_over_with_checkpointing_says_so_and_keeps_it_for_the_job(
    host, tmp_path, monkeypatch, capsys
):
    before = weights(host)
    backend = type(host.backend())
    real_mode, real_predict = backend.training_mode, backend.predict
    checkpointing = []

    @contextlib.contextmanager
    def training_mode(self, text_encoders, gradient_checkpointing):
        checkpointing.append(gradient_checkpointing)
        with real_mode(self, text_encoders, gradient_checkpointing):
            yield

    def predict(self, x, t, cond):
        if torch.is_grad_enabled() and not checkpointing[-1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB")
        return real_predict(self, x, t, cond)

    monkeypatch.setattr(backend, "training_mode", training_mode)
    monkeypatch.setattr(backend, "predict", predict)
    results = train_in_webui(request_for(host), host, tmp_path, JobState("j"))
    # the processed LoRA starts with checkpointing: it does not run out of memory first as the copier did
    assert [r["kind"] for r in results] == ["copier", "processed"] and checkpointing == [False, True, True]
    said = "the GPU ran out of memory training at 64x64 px with 1 timestep per step; starting over with gradient"
    assert capsys.readouterr().err.count(said) == 1
    assert any(text.startswith(f"copier ({said}") for text, _, _ in host.shown)
    assert all(torch.equal(before[n], p) for n, p in host.backend().weights())


def test_a_name_a_lora_has_in_a_subfolder_or_another_listed_folder_is_not_used_again(tmp_path):
    """`<lora:cat-copier:1>` loads whichever file of that name the WebUI listed: one in a subfolder of the LoRA folder
    or in models/LyCORIS would have drawn the new LoRA's grids and taken its Send to txt2img."""
    lora_dir, lycoris = tmp_path / "Lora", tmp_path / "LyCORIS"
    (lora_dir / "styles").mkdir(parents=True)
    lycoris.mkdir()
    (lora_dir / "styles" / "cat-copier.safetensors").write_bytes(b"old")
    (lycoris / "cat-grayscale.safetensors").write_bytes(b"old")
    (lycoris / "cat-grayscale-2.pt").write_bytes(b"old")  # the WebUIs list .pt and .ckpt LoRAs too
    host = A1111Host(randomize_(build_model(TINY)), lora_dir=lora_dir)
    results = train_in_webui(request_for(host), host, lora_dir, JobState("j"), [lora_dir, lycoris])
    assert [r["name"] for r in results] == ["cat-copier-2", "cat-grayscale-3"]
    assert any("<lora:cat-copier-2:1.5>" in p for p in host.prompts)


def test_what_a_dead_webui_left_is_removed_and_a_running_ones_run_is_left_alone(tmp_path):
    """Runs are named by their WebUI's process: a tab run killed with its WebUI (the tab's runs share an id) is not
    published by the next, and a run of another WebUI sharing the LoRA folder is not deleted under it."""
    import os
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, other_webui = int(ended.stdout), os.getppid()  # a process that has ended; one that is running
    staging = tmp_path / STAGING
    for folder in (f"{os.getpid()}-tab", f"{dead_pid}-tab", "older-layout", f"{other_webui}-job7"):
        (staging / folder).mkdir(parents=True)
        (staging / folder / "dog-copier.safetensors").write_bytes(b"half a file")
    host = A1111Host(randomize_(build_model(TINY)), lora_dir=tmp_path)
    results = train_in_webui(request_for(host), host, tmp_path, JobState("tab"))
    assert [r["name"] for r in results] == ["cat-copier", "cat-grayscale"]
    assert not (tmp_path / "dog-copier.safetensors").exists()
    assert [p.name for p in staging.iterdir()] == [f"{other_webui}-job7"]
    assert (staging / f"{other_webui}-job7" / "dog-copier.safetensors").is_file()


def test_after_an_interrupted_run_the_webuis_lora_list_has_none_of_its_files(tmp_path):
    """The list is read again at the end of a run: with the unfinished files still there, the next run's
    `<lora:cat-copier:w>` resolved to the deleted file and its grids were drawn without the LoRA."""
    host = A1111Host(randomize_(build_model(TINY)), lora_dir=tmp_path)
    host.interrupt_when = lambda shown: any(text.startswith("strength grid") for text, _, _ in shown)
    with pytest.raises(Interrupted):
        train_in_webui(request_for(host), host, tmp_path, JobState("j1"))
    assert host.listed == [] and list(tmp_path.iterdir()) == []


def test_a_failure_while_the_grids_are_drawn_says_what_keep_what_is_finished_kept(tmp_path, capsys):
    """Out of memory in a grid's txt2img: the LoRAs were moved into the folder, but the job read "failed" with no
    word of them and empty results."""

    class FailsInGrid(A1111Host):
        def txt2img(self, request, progress=None):
            if "<lora:cat-grayscale" in request.prompt:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().txt2img(request, progress)

    host, state = FailsInGrid(randomize_(build_model(TINY)), lora_dir=tmp_path), JobState("j")
    with pytest.raises(CopierError) as raised:
        train_in_webui(request_for(host, save_on_interrupt=True), host, tmp_path, state)
    assert str(raised.value) == (
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB; kept cat-copier, cat-grayscale"
    )
    assert "Traceback" in capsys.readouterr().err  # an unexpected error still shows where it came from
    assert [r["name"] for r in state.results] == ["cat-copier", "cat-grayscale"]
    assert state.results[0]["grid"] is not None and state.results[1]["grid"] is None
    assert (tmp_path / "cat-grayscale.safetensors").is_file()
