"""The recipes and their files, on the tiny random model: names, metadata, all-or-nothing writes, cancel, CLI."""

import json
import re

import pytest
import torch
from PIL import Image, ImageDraw

from lib_copier.backends.standalone import StandaloneBackend
from lib_copier.cli import main
from lib_copier.effects.chain import Chain
from lib_copier.errors import CopierError, Interrupted
from lib_copier.lora.files import read_lora
from lib_copier.lora.metadata import NetworkInfo
from lib_copier.lora.weights import LoRAWeights
from lib_copier.models.checkpoint import save_checkpoint
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img
from lib_copier.models.sd_model import build_model
from lib_copier.names import slug
from lib_copier.recipes.estimate import estimate, recipe_steps
from lib_copier.recipes.grid import column_label
from lib_copier.recipes.job import PAIR_DEFAULTS, Job, method_config, run_job
from lib_copier.recipes.methods import extraction, merge_processed
from lib_copier.recipes.outputs import check_name, free_name, sidecar, write_result
from lib_copier.recipes.processed import Effect
from lib_copier.recipes.sizes import fit_image
from lib_copier.train.config import make_config
from lib_copier.train.trainer import Callbacks, Cancelled
from tests.conftest import randomize_


@pytest.fixture(scope="module")
def backend():
    return StandaloneBackend(randomize_(build_model(TINY), seed=3))


@pytest.fixture(scope="module")
def original(backend):
    return backend.generate(Txt2Img("a red circle", seed=1, steps=4))


def job(tmp_path, original, **kwargs) -> Job:
    settings = dict(
        originals=[original],
        effects=[Effect("grayscale", chain=Chain.parse(["grayscale"]))],
        name="cat",
        out_dir=tmp_path,
        overrides={"steps": 3, "rank": 4, "alpha": 4.0},
        grid_prompts=["a blue square"],
        grid_steps=2,
        base_model="tiny",
    )
    return Job(**{**settings, **kwargs})


@pytest.mark.parametrize(
    "name",
    ["", " ", "../evil", "a/b", "a\\b", "-dash", "x" * 121, "semi;colon", "NUL", "con.v2", "Com1", "lpt9 .x", "aux",
     "COM¹", "lpt³.txt", "ink ",
     "_x", "a:b", "a<b>", "q?", "a*", 'a"b', "a|b", "tab\tname", "ink.safetensors", "ink.SafeTensors"],
)  # fmt: skip
def test_bad_output_names_are_refused_in_one_sentence(name):
    with pytest.raises(CopierError, match="output name"):
        check_name(name)


def test_names_near_windows_device_names_and_in_any_script_are_fine():
    for name in ("console", "null", "com10", "Con-copier", "aux (2)", "nul_effect.v2", "キャラ", "café 猫", "Ölbild-2"):
        assert check_name(name) == name


@pytest.mark.parametrize(
    ("prompt", "name"),
    [
        ("(masterpiece:1.2), 1girl, <lora:style_v2:0.8>, solo", "masterpiece-1girl-solo"),
        ("[cat:dog:0.5] in (snow:1.3)", "cat-dog-in-snow"),
        ("Café crème, ünïcode", "cafe-creme-unicode"),
        ("猫の絵", "image"),
        ("CON", "con-image"),
        ("a cat " * 20, "a-cat-a-cat-a-cat-a-cat-a-cat-a"),
        ("a blue lighthouse at dusk by the harbour", "a-blue-lighthouse-at-dusk-by-the"),  # whole words
        ("pneumonoultramicroscopicsilicovolcanoconiosis", "pneumonoultramicroscopicsilicovo"),
    ],
)
def test_a_name_made_from_a_prompt_keeps_its_words_and_is_a_valid_output_name(prompt, name):
    """The API and the tab name a run after its prompt when no name is given: without the prompt's LoRA tags and
    weights, and never a name the output check would refuse."""
    assert slug(prompt, 32) == name
    assert check_name(name) == name


def test_names_never_collide_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"keep")
    assert free_name(tmp_path, "cat") == "cat-2"
    assert free_name(tmp_path, "cat", taken={"cat-2"}) == "cat-3"
    module = {"lora_unet_x": LoRAWeights(torch.ones(2, 4), torch.ones(4, 2), 2.0)}
    info = NetworkInfo(family="sd1", rank=2, alpha=2.0, title="cat")
    with pytest.raises(CopierError, match="cat.png already exists"):
        write_result(tmp_path, "cat", module, info, sidecar("sd1", "d"), Image.new("RGB", (8, 8)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]
    assert (tmp_path / "cat.png").read_bytes() == b"keep"


def test_a_name_of_the_longest_length_taken_makes_room_for_its_number(tmp_path):
    """It passed the check before training, then `name-2` was refused as too long once everything was trained."""
    long = "a" * 117 + " bc"
    (tmp_path / f"{long}.json").write_bytes(b"keep")
    assert free_name(tmp_path, long) == "a" * 117 + "-2"
    assert free_name(tmp_path, long, {"a" * 117 + "-2"}) == "a" * 117 + "-3"


def test_extraction_moves_toward_the_processed_image():
    gen = torch.Generator().manual_seed(0)

    def lora():
        return {"lora_unet_x": LoRAWeights(torch.randn(4, 16, generator=gen), torch.randn(16, 4, generator=gen), 4.0)}

    a, a_prime = lora(), lora()
    merged = extraction(a, a_prime, rank=8)["lora_unet_x"].delta()
    toward = a_prime["lora_unet_x"].delta() - a["lora_unet_x"].delta()
    cosine = torch.nn.functional.cosine_similarity(merged.flatten(), toward.flatten(), dim=0)
    assert cosine > 0.95


def test_the_recipes_svd_merges_are_the_best_approximation_of_their_rank():
    """Eckart–Young: the error of a rank-r merge is the norm of the singular values it drops, and no more (kohya's
    quantile clamp would add to it)."""
    gen = torch.Generator().manual_seed(1)

    def lora():
        return {"lora_unet_x": LoRAWeights(torch.randn(8, 96, generator=gen), torch.randn(64, 8, generator=gen), 8.0)}

    a, b = lora(), lora()
    for merged, exact in [
        (extraction(a, b, rank=4), b["lora_unet_x"].delta() - a["lora_unet_x"].delta()),
        (merge_processed([a, b], rank=4), (a["lora_unet_x"].delta() + b["lora_unet_x"].delta()) / 2),
    ]:
        dropped = torch.linalg.svdvals(exact.double())[4:].norm()
        error = (merged["lora_unet_x"].delta() - exact).double().norm()
        assert error == pytest.approx(float(dropped), rel=1e-4)


def test_both_methods_write_loadable_loras_with_metadata_sidecar_and_grid(backend, original, tmp_path):
    before = {k: v.clone() for k, v in backend.weights()}
    stages, counts = [], []
    callbacks = Callbacks(counted=lambda done, total: counts.append((stages[-1], done, total)))
    results = run_job(backend, job(tmp_path, original, method="both"), callbacks, stage=stages.append)
    assert [(r.kind, r.effect) for r in results] == [
        ("copier", ""),
        ("processed", "grayscale"),
        ("extraction", "grayscale"),
    ]
    assert [r.written.name for r in results] == ["cat-copier", "cat-grayscale", "cat-grayscale-extraction"]
    assert stages == [
        "copier",
        "processed: grayscale",
        "extraction: grayscale",
        "merging and resizing",
        "strength grids",
    ]
    modules = len(read_lora(results[0].written.lora).modules)
    extraction_counts = [c[1:] for c in counts if c[0] == "extraction: grayscale"]
    assert extraction_counts[0] == (0, modules) and extraction_counts[-1] == (modules, modules)
    # The grids count their images, all three LoRAs' as one run of 3 x 5 weights x 1 prompt, on the stage's bar.
    assert [c[1:] for c in counts if c[0] == "strength grids"] == [(n, 15) for n in range(1, 16)]
    for result in results:
        lora = read_lora(result.written.lora)
        assert lora.family == "sd1" and lora.metadata["ss_copier_recipe"] == result.kind
        assert lora.metadata["ss_sd_model_name"] == "tiny" and lora.metadata["ss_max_train_steps"] == "3"
        assert json.loads(lora.metadata["ss_copier_train_config"])["rank"] == 4
        card = json.loads(result.written.sidecar.read_text())
        assert card["sd version"] == "SD1" and card["preferred weight"] == 1.0
        grid = Image.open(result.written.grid)
        assert grid.size == (5 * 64, 18 + 64)  # five weights, one prompt
    extracted = read_lora(results[2].written.lora)
    assert extracted.ranks == {8}  # A′ − A of two rank-4 LoRAs, SVD to the extraction rank 8
    assert (
        json.loads(read_lora(results[1].written.lora).metadata["ss_copier_effects"])["steps"][0]["effect"]
        == "grayscale"
    )
    assert all(torch.equal(before[k], v) for k, v in backend.weights())


@pytest.mark.parametrize("method", ["slider", "addift"])
def test_a_pair_method_writes_one_lora_per_effect_over_all_originals_and_no_copier(backend, original, tmp_path, method):
    before = {k: v.clone() for k, v in backend.weights()}
    second = backend.generate(Txt2Img("a blue square", seed=2, steps=4))
    stages = []
    results = run_job(
        backend, job(tmp_path, original, method=method, originals=[original, second]), stage=stages.append
    )
    assert [(r.kind, r.effect, r.written.name) for r in results] == [(method, "grayscale", f"cat-grayscale-{method}")]
    assert stages == [
        f"{method}: grayscale (original 1/2)",
        f"{method}: grayscale (original 2/2)",
        "merging and resizing",
        "strength grids",
    ]
    lora = read_lora(results[0].written.lora)
    assert lora.metadata["ss_copier_recipe"] == method and lora.metadata["ss_copier_method"] == method
    assert lora.ranks == {4} and lora.metadata["ss_max_train_steps"] == "6"  # two pairs of 3 steps, merged at rank 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"cat-grayscale-{method}{ext}" for ext in (".json", ".png", ".safetensors")
    ]
    assert all(torch.equal(before[k], v) for k, v in backend.weights())


def test_a_loras_metadata_records_the_size_it_trained_at(backend, original, tmp_path):
    """A wide original's file said (96, 96): the longer side, squared, where kohya records (width, height)."""
    wide = original.resize((96, 64))
    (result,) = run_job(backend, job(tmp_path, wide, method="copier", effects=[], overrides={"steps": 1, "rank": 2}))
    metadata = read_lora(result.written.lora).metadata
    assert (metadata["ss_resolution"], metadata["modelspec.resolution"]) == ("(96, 64)", "96x64")


def test_the_pair_methods_train_at_their_own_defaults_under_the_overrides():
    slider = method_config("slider", "quick", {"steps": 7})
    assert (slider.rank, slider.lr, slider.steps) == (PAIR_DEFAULTS["slider"]["rank"], PAIR_DEFAULTS["slider"]["lr"], 7)
    assert method_config("copier", "quick", {}) == make_config("quick")
    assert method_config("addift", "thorough", {}) == method_config("addift", "quick", {})  # no 500-step warm-up
    assert method_config("slider", "fast", {}) == method_config("slider", "quick", {})  # one timestep per step
    # A pair run trains one LoRA per original and effect, each step costing more than a plain one.
    assert recipe_steps("addift", 2, "quick", {"steps": 10}, originals=3) == 60
    assert recipe_steps("both", 2, "quick", {"steps": 10}) == 50
    assert estimate(100, "cpu", 64, method="slider").endswith("roughly 8 min.")
    assert estimate(100, "cpu", 64).endswith("roughly 4 min.")


def test_a_cancelled_job_writes_nothing_unless_asked(backend, original, tmp_path):
    steps = []
    cancel = Callbacks(progress=lambda p: steps.append(p.step), cancelled=lambda: len(steps) >= 5)
    with pytest.raises(Cancelled):
        run_job(backend, job(tmp_path, original), cancel)
    assert list(tmp_path.iterdir()) == []
    steps.clear()
    keep = job(tmp_path, original, overrides={"steps": 3, "rank": 4, "save_on_cancel": True})
    with pytest.raises(Cancelled):
        run_job(backend, keep, cancel)
    names = sorted(p.name for p in tmp_path.iterdir())
    # The finished copier and the interrupted processed LoRA (2 of its 3 steps), without grids.
    assert names == ["cat-copier.json", "cat-copier.safetensors", "cat-grayscale.json", "cat-grayscale.safetensors"]
    kept = read_lora(tmp_path / "cat-grayscale.safetensors").metadata
    assert kept["ss_max_train_steps"] == "2"
    assert json.loads(kept["ss_copier_effects"])["steps"][0]["effect"] == "grayscale"  # as a finished one records it
    steps.clear()
    both = job(tmp_path / "both", original, method="both", overrides={"steps": 3, "rank": 4, "save_on_cancel": True})
    cancel_late = Callbacks(progress=lambda p: steps.append(p.step), cancelled=lambda: len(steps) >= 7)
    with pytest.raises(Cancelled):
        run_job(backend, both, cancel_late)
    # Copier and processed LoRA finished; the extraction's A′ was interrupted after 1 step and is kept as it is.
    assert sorted(p.stem for p in (tmp_path / "both").glob("*.safetensors")) == [
        "cat-copier",
        "cat-grayscale",
        "cat-grayscale-processed-copier",
    ]


def test_jobs_are_checked_before_any_training(backend, original, tmp_path):
    with pytest.raises(CopierError, match="multiples of 32"):
        run_job(backend, job(tmp_path, original, originals=[original.resize((50, 64))]))
    # At 16 times its side the small model's attention would need tens of GB: a sentence, not the kernel's OOM kill.
    big = backend.resolution * 16
    with pytest.raises(CopierError, match=f"at most {backend.resolution * 8}"):
        run_job(backend, job(tmp_path, original, originals=[original.resize((big, big))]))
    with pytest.raises(CopierError, match="the extraction method needs at least one effect"):
        run_job(backend, job(tmp_path, original, method="extraction", effects=[]))
    with pytest.raises(CopierError, match="unknown trainer setting"):
        run_job(backend, job(tmp_path, original, overrides={"stpes": 3}))
    assert fit_image(Image.new("RGB", (300, 200)), 128, 128).size == (160, 96)
    assert list(tmp_path.iterdir()) == []


def test_an_effect_that_changes_no_original_is_refused_before_any_training(backend, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr("lib_copier.recipes.job.train_copier", lambda *a, **k: trained.append(a))
    flat = Image.new("RGB", (64, 64), (200, 30, 30))  # no edges to outline, nothing to grey
    outline = Effect("outline", chain=Chain.parse(["outline"]))
    with pytest.raises(CopierError, match="^outline leaves the original unchanged, so its LoRA would have nothing to"):
        run_job(backend, job(tmp_path, flat, effects=[Effect("grayscale", chain=Chain.parse(["grayscale"])), outline]))
    with pytest.raises(CopierError, match="^outline leaves all 2 originals unchanged"):
        run_job(backend, job(tmp_path, flat, originals=[flat, flat.copy()], effects=[outline]))
    with pytest.raises(CopierError, match="^the processed image 'mine' is the same as the original, so"):
        run_job(backend, job(tmp_path, flat, effects=[Effect("mine", image=flat.copy())]))
    assert trained == [] and list(tmp_path.iterdir()) == []
    # One original it changes is enough: the other pair teaches the LoRA to leave such an image alone.
    disc = flat.copy()
    ImageDraw.Draw(disc).ellipse((16, 16, 48, 48), fill="white")
    processed = outline.process_all([flat, disc])
    assert processed[0].tobytes() == flat.tobytes() and processed[1].tobytes() != disc.tobytes()


def test_copier_command_and_its_errors(backend, tmp_path, capsys):
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(backend.model, model)
    out = tmp_path / "loras"
    common = ["--model", str(model), "--out", str(out), "--steps", "2", "--grid-prompt", "a dog"]
    pair = ["copier", "--generate", "a red circle", "--effect", "posterize:levels=3+grayscale", *common]
    args = [*pair, "--method", "copier"]
    assert main([*args, "--set", "rank=2", "--set", "alpha=2"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "a-red-circle-copier.safetensors",
        "a-red-circle-posterize-grayscale.safetensors",
    ]
    assert "posterize-grayscale" in capsys.readouterr().out
    assert main([*args, "--name", "../up"]) == 2
    assert main([*args, "--set", "rank=zero"]) == 2
    assert main(["copier", "--image", str(tmp_path / "missing.png"), *common]) == 2
    assert main([*args, "--size", "5"]) == 2
    err = capsys.readouterr().err
    assert "must not contain path separators" in err and "'zero' is not a valid int" in err
    assert "--size is 5; it must be between 64 and 2048" in err
    assert len(list(out.iterdir())) == 6  # nothing more was written
    assert main([*args, "--size", "96", "--name", "wide"]) == 0
    assert read_lora(out / "wide-copier.safetensors").metadata["ss_resolution"] == "(96, 96)"
    # The grids are drawn at the training size: at a 512-px model's own side they took hours on a CPU.
    assert Image.open(out / "wide-copier.png").size == (5 * 96, 18 + 96)
    assert main([*pair, "--name", "pair", "--grid-steps", "0"]) == 0  # the default method, without grids
    assert sorted(p.name for p in out.glob("pair*")) == [
        "pair-posterize-grayscale-addift.json",
        "pair-posterize-grayscale-addift.safetensors",
    ]
    empty = ["copier", "--generate", "", "--effect", "posterize:levels=3", *common, "--name", "empty", "--seed", "-1"]
    assert main(empty) == 0  # the empty prompt (it was a traceback), with a seed drawn and said
    assert re.search(r"the original: '', seed \d+", capsys.readouterr().out)


def test_the_copier_command_refuses_its_output_names_before_loading_the_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("lib_copier.recipes.cli._load", lambda args: pytest.fail("the model was loaded"))
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(image)
    common = ["copier", "--image", str(image), "--effect", "grayscale", "--out", str(tmp_path / "out")]
    assert main([*common, "--name", "a:b"]) == 2
    assert main([*common, "--name", "x" * 110]) == 2  # fine alone, too long with "-grayscale-addift"
    err = capsys.readouterr().err
    assert "--name 'a:b' has ':'" in err and "(127 characters) is too long" in err
    assert not (tmp_path / "out").exists()


def test_demo_writes_everything_into_its_folder(backend, tmp_path, capsys, monkeypatch):
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(backend.model, model)
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(model), "--out", str(out), "--steps", "1"]) == 0
    # The random model draws the star without edges: the outline LoRA would learn nothing, so the demo leaves it out.
    assert "outline is left out: it leaves the original this model drew unchanged" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    kinds = sorted(r["kind"] for r in summary["results"])
    assert kinds == ["addift"] * 2 + ["copier"] + ["extraction"] * 2 + ["processed"] * 2
    assert all((out / name).exists() for name in ("original.png", "processed-grayscale.png", "demo-copier.png"))
    assert main(["demo", "--model", str(model), "--out", str(out), "--steps", "1"]) == 2
    # Ctrl-C during its second job (addift): the first job's files went too, or the next demo was refused.
    from lib_copier.recipes import cli

    run_one, jobs = cli.run_job_with_progress, []

    def interrupted_second(backend, job):
        jobs.append(job.method)
        if len(jobs) == 2:
            raise Interrupted("training was interrupted at step 1")
        return run_one(backend, job)

    monkeypatch.setattr(cli, "run_job_with_progress", interrupted_second)
    again = tmp_path / "again"
    assert main(["demo", "--model", str(model), "--out", str(again), "--steps", "1"]) == 130
    assert jobs == ["both", "addift"] and not list(again.iterdir())
    file = tmp_path / "file"
    file.write_text("")
    assert main(["demo", "--out", str(file / "demo")]) == 2
    assert f"cannot write in {file / 'demo'}: {file} is a file, not a folder" in capsys.readouterr().err


def test_grid_labels_fit_their_columns():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert column_label(0.5, 256, draw) == "weight +0.5"
    assert column_label(0.5, 64, draw) == "+0.5"  # "weight +0.5" would run into the next column's label
    assert draw.textlength(column_label(-1.0, 64, draw)) <= 64 - 16


def test_the_copier_command_says_when_a_training_starts_over_with_checkpointing_once_a_job(
    backend, tmp_path, monkeypatch, capsys
):
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(backend.model, model)
    real = StandaloneBackend.predict

    failed = []

    def predict(self, x, t, cond):
        if torch.is_grad_enabled() and not self.model.unet.gradient_checkpointing:
            failed.append(t)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB")
        return real(self, x, t, cond)

    monkeypatch.setattr(StandaloneBackend, "predict", predict)
    args = ["copier", "--generate", "a red circle", "--effect", "grayscale", "--method", "copier", "--steps", "2"]
    assert main([*args, "--model", str(model), "--out", str(tmp_path / "out"), "--grid-prompt", "a dog"]) == 0
    said = "the GPU ran out of memory training at 64x64 px with 1 timestep per step; starting over with gradient"
    out = capsys.readouterr().out
    assert f"copier: {said}" in out and "processed: grayscale: the GPU" not in out and len(failed) == 1
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) == 2
    for file in files:  # each file's metadata records the settings its run trained with, not the ones asked
        assert json.loads(read_lora(file).metadata["ss_copier_train_config"])["gradient_checkpointing"] is True


def test_copier_cli_refuses_bad_settings_and_outputs_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from lib_copier.recipes import cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    image = tmp_path / "o.png"
    Image.new("RGB", (64, 64), "red").save(image)
    cropped, scaled, same = tmp_path / "cropped.png", tmp_path / "scaled.png", tmp_path / "same.png"
    Image.new("RGB", (64, 48), "gray").save(cropped)
    Image.new("RGB", (128, 128), "gray").save(scaled)
    Image.new("RGB", (64, 64), "red").save(same)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (4000, 40), "red").save(thin)
    common = ["copier", "--image", str(image), "--effect", "grayscale", "--steps", "2"]
    cases = [
        (["--out", str(image)], f"cannot write in {image}: {image} is a file, not a folder"),
        (["--processed-image", str(cropped)], "'cropped' is 64x48 but the original is 64x64; an edit must keep"),
        (["--processed-image", str(scaled), "--image", str(image)], "'scaled' is an edit of one original, but there"),
        (["--effect", "outline"], "outline leaves the original unchanged, so its LoRA would have nothing to learn"),
        (["--processed-image", str(same)], "the processed image 'same' is the same as the original, so its LoRA"),
        (["--lr", "nan"], "setting lr must be a number, not nan"),
        (["--set", "alpha=nan"], "setting alpha must be a number, not nan"),
        (["--prompt-pool", "-1"], "--prompt-pool: -1 is not from 0 to 1024"),
        (["--image", str(thin)], "the original is 4000x40, too long and thin: it would train at"),
        (
            ["--size", "2048"],
            "more than 8 times the side of this 128-px model; ask for a training size of at most 1024",
        ),
    ]
    for args, message in cases:
        assert main([*common, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (args, err)
    # A method that needs an effect, given none: said before the model loads and draws the original.
    assert main(["copier", "--generate", "a red circle", "--method", "both", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: the both method needs at least one effect or processed image"
    assert main(["copier", "--generate", "a red circle", "--effect", "grayscale", "--size", "1100"]) == 2
    assert "ask for a training size of at most 1024" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cropped.png", "o.png", "same.png", "scaled.png", "thin.png"]


def test_an_unforeseen_os_error_is_one_line(tmp_path, monkeypatch, capsys):
    """What no check foresees (a disk that fills while writing): one line, not a traceback."""
    from lib_copier.lora import cli

    def full(args):
        raise OSError(28, "No space left on device", str(tmp_path / "x.safetensors"))

    monkeypatch.setattr(cli, "run_info", full)
    assert main(["lora", "info", "x"]) == 2
    assert capsys.readouterr().err.strip() == f"error: No space left on device: {tmp_path / 'x.safetensors'}"


def test_images_fit_the_models_multiple_at_any_training_size():
    """A 512-px model needs sides in multiples of 64 even when it trains at 96 or 64 px: a 64x128 image at size 64
    came out 32x96, and the job failed after it had started."""
    from lib_copier.recipes.sizes import fit_image

    tall = Image.new("RGB", (64, 128))
    for image, size in ((tall, 64), (tall, 128), (Image.new("RGB", (96, 96)), 96), (Image.new("RGB", (1, 60)), 512)):
        width, height = fit_image(image, size, 512).size
        assert width % 64 == 0 and height % 64 == 0 and width > 0, (image.size, size, width, height)
    assert fit_image(tall, 128, 128).size == (96, 192)  # the built-in 128-px model's multiple is 32


@pytest.mark.parametrize(("size", "trained"), [((4096, 1), "32768x64"), ((8, 4096), "64x11584"), ((1, 40), "64x384")])
def test_a_long_thin_original_is_refused_before_its_short_side_rounds_up_to_gigabytes(size, trained):
    """A 4096x1 image at 512 trained at 32768x64, eight times the pixels asked for, and the WebUI was killed for
    memory at step 0: an original whose fitted size has more than twice the training size's pixels is refused."""
    from lib_copier.recipes.sizes import fit_image

    side = 64 if size == (1, 40) else 512  # 1x40 at 64 would be 6 times 64x64: a larger training size takes it
    with pytest.raises(CopierError, match=rf"is {size[0]}x{size[1]}, too long and thin: it would train at {trained}"):
        fit_image(Image.new("RGB", size), side, 512)


def test_a_true_or_false_setting_takes_only_true_or_false_words():
    """Anything but "1", "true" or "yes" was false: a typo quietly turned the setting off."""
    from lib_copier.recipes.cli import parse_overrides

    words = ["flip=on", "save_on_cancel=False", "train_text_encoder=1", "gradient_checkpointing= no"]
    expected = {"flip": True, "save_on_cancel": False, "train_text_encoder": True, "gradient_checkpointing": False}
    assert parse_overrides(words) == expected
    with pytest.raises(CopierError, match="gradient_checkpointing takes true or false, not 'ture'"):
        parse_overrides(["gradient_checkpointing=ture"])


def test_the_same_effect_twice_gets_a_numbered_label_that_reads_as_one():
    """An edit named "edited128" given twice became "edited1282"."""
    from lib_copier.recipes.processed import make_effects

    image = Image.new("RGB", (8, 8))
    chains = [["grayscale"], ["grayscale:amount=0.5"]]
    effects = make_effects(chains, [("edited128", image), ("edited128", Image.new("RGB", (8, 8), "red"))])
    assert [e.label for e in effects] == ["grayscale", "grayscale-2", "edited128", "edited128-2"]
    # the same effect with the same parameters would train the same LoRA twice (grayscale's amount is 1 by default)
    with pytest.raises(CopierError, match="the effect grayscale:amount=1 is given twice, with the same parameters"):
        make_effects([["grayscale"], ["grayscale:amount=1"]])
