"""The trainer over the standalone backend: it learns, it is reproducible, and the base model is never changed."""

import contextlib
import json
import math
import warnings

import pytest
import torch

from lib_copier.backends.standalone import StandaloneBackend
from lib_copier.errors import CopierError
from lib_copier.lora.naming import by_key
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img
from lib_copier.models.sd_model import build_model
from lib_copier.train.config import PRESETS, TrainConfig, field_info, make_config
from lib_copier.train.optim import lr_factor, make_optimizer
from lib_copier.train.trainer import Callbacks, Cancelled, image_tensor, train_lora, train_pair
from tests.conftest import TINY_SD2V, TINY_SDXL, randomize_


def backend_for(config=TINY, seed=0) -> StandaloneBackend:
    return StandaloneBackend(randomize_(build_model(config), seed=seed))


def snapshot(backend):
    return {name: tensor.clone() for name, tensor in backend.weights()}


def assert_unchanged(backend, before):
    after = dict(backend.weights())
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"base weights changed: {changed[:3]}"
    assert not any(p.requires_grad for p in backend.model.parameters())
    assert not backend.model.unet.training


@pytest.fixture(scope="module")
def tiny():
    backend = backend_for()
    return backend, backend.generate(Txt2Img("a red circle", seed=1))


def quick(**overrides) -> TrainConfig:
    return make_config("quick", **{"steps": 6, **overrides})


def denoising_error(backend, image, network=None) -> float:
    """The model's mean error on a fixed set of noised copies of `image`: what training should lower."""
    latents = backend.encode_images(image_tensor(image))
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (32,), generator=g)
    noise = torch.randn((32, *latents.shape[1:]), generator=g)
    a = backend.alphas_cumprod()[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    cond = backend.encode_prompts([""] * 32, image.height, image.width)
    table = by_key(backend.lora_targets(conv=True))
    with torch.no_grad(), network.applied(backend.lora_layers(), table) if network else contextlib.nullcontext():
        return (backend.predict(noisy, t, cond) - noise).pow(2).mean().item()


def test_same_seed_same_lora_and_it_fits_the_image(tiny):
    backend, image = tiny
    # The random TINY model learns slowly; the built-in model's copier test measures real fitting.
    a = train_lora(backend, image, "", quick(steps=40, lr=1e-2))
    b = train_lora(backend, image, "", quick(steps=40, lr=1e-2))
    for key, module in a.network.to_weights().items():
        assert torch.equal(module.up, b.network.to_weights()[key].up)
    assert a.losses == b.losses
    assert denoising_error(backend, image, a.network) < 0.99 * denoising_error(backend, image)


def test_seed_minus_one_draws_a_seed_per_run_that_the_result_records_and_that_gives_the_same_lora_again(tiny):
    backend, image = tiny
    a, b = (train_lora(backend, image, "", quick(steps=2, seed=-1)) for _ in range(2))
    assert 0 <= a.config.seed < 2**31 and a.config.seed != b.config.seed
    assert a.losses != b.losses
    again = train_lora(backend, image, "", quick(steps=2, seed=a.config.seed))
    assert again.losses == a.losses
    with pytest.raises(CopierError, match="setting seed is -2; it must be between -1 and"):
        quick(seed=-2)


def test_unet_only_by_default_text_encoder_on_request(tiny):
    backend, image = tiny
    unet_only = train_lora(backend, image, "", quick(steps=1)).network.modules_by_key
    assert unet_only and all(key.startswith("lora_unet_") for key in unet_only)
    both = train_lora(backend, image, "x", quick(steps=1, train_text_encoder=True)).network.modules_by_key
    assert any(key.startswith("lora_te_") for key in both)


def test_base_weights_bit_identical_after_a_normal_run_with_a_fused_lora(tiny):
    backend, image = tiny
    before = snapshot(backend)
    copier = train_lora(backend, image, "", quick(train_text_encoder=True, conv_rank=4, flip=True, batch_size=2))
    train_lora(backend, image, "", quick(), frozen=[(copier.network, 1.0)])
    assert_unchanged(backend, before)


def test_a_cancelled_run_stops_between_steps_and_leaves_the_base_unchanged(tiny):
    backend, image = tiny
    before = snapshot(backend)
    seen = []
    callbacks = Callbacks(progress=lambda p: seen.append(p.step), cancelled=lambda: len(seen) >= 3)
    with pytest.raises(Cancelled) as info:
        train_lora(backend, image, "", quick(steps=50), callbacks=callbacks)
    assert info.value.result.steps == 3 and seen == [1, 2, 3]
    assert_unchanged(backend, before)


def test_a_nan_loss_stops_the_run_with_a_clear_message(tiny, monkeypatch):
    backend, image = tiny
    before = snapshot(backend)
    real = backend.predict
    calls = {"n": 0}

    def poisoned(x, t, cond):
        calls["n"] += 1
        out = real(x, t, cond)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(backend, "predict", poisoned)
    with pytest.raises(CopierError, match="loss became nan at step 3"):
        train_lora(backend, image, "", quick(steps=10))
    monkeypatch.undo()
    assert_unchanged(backend, before)


def _short_of_memory(monkeypatch, backend, when):
    """backend.predict raises torch's out-of-memory error on the calls for which `when(call number)` is true."""
    real = backend.predict
    calls = {"n": 0}

    def predict(x, t, cond):
        calls["n"] += 1
        if when(calls["n"]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB")
        return real(x, t, cond)

    monkeypatch.setattr(backend, "predict", predict)


def test_out_of_gpu_memory_starts_over_with_checkpointing_and_gives_the_same_lora(tiny, monkeypatch):
    backend, image = tiny
    copier = train_lora(backend, image, "", quick(steps=2)).network
    config = quick(steps=3, batch_size=4)
    expected = train_lora(backend, image, "", config, frozen=[(copier, 1.0)]).network.to_weights()
    before = snapshot(backend)
    # Step 2 runs out of memory without checkpointing, never with it.
    _short_of_memory(monkeypatch, backend, lambda n: n == 2 and not backend.model.unet.gradient_checkpointing)
    notices, progress = [], []
    callbacks = Callbacks(notice=notices.append, progress=lambda p: progress.append(p.step))
    result = train_lora(backend, image, "", config, frozen=[(copier, 1.0)], callbacks=callbacks)
    monkeypatch.undo()
    assert notices == [
        "the GPU ran out of memory training at 64x64 px with 4 timesteps per step; "
        "starting over with gradient checkpointing"
    ]
    assert progress == [1, 1, 2, 3] and result.steps == 3
    trained = result.network.to_weights()
    assert all(torch.equal(trained[k].up, w.up) and torch.equal(trained[k].down, w.down) for k, w in expected.items())
    assert_unchanged(backend, before)
    assert not backend.model.unet.gradient_checkpointing


@pytest.mark.parametrize("checkpointing", [False, True])
def test_out_of_gpu_memory_even_with_checkpointing_is_one_sentence_and_changes_nothing(
    tiny, monkeypatch, checkpointing
):
    backend, image = tiny
    copier = train_lora(backend, image, "", quick(steps=2)).network
    before = snapshot(backend)
    _short_of_memory(monkeypatch, backend, lambda n: n >= 2)
    notices = []
    config = quick(steps=3, batch_size=4, gradient_checkpointing=checkpointing)
    with pytest.raises(CopierError) as error:
        train_lora(backend, image, "", config, frozen=[(copier, 1.0)], callbacks=Callbacks(notice=notices.append))
    monkeypatch.undo()
    assert str(error.value) == (
        "the GPU ran out of memory training at 64x64 px with 4 timesteps per step, even with gradient "
        "checkpointing; lower batch_size or the training size"
    )
    assert len(notices) == (0 if checkpointing else 1)
    assert_unchanged(backend, before)  # the fused copier is out of the weights again


def test_an_interrupt_stays_an_interrupt_under_torch_2_1(tiny, monkeypatch):
    """A1111 1.10 ships torch 2.1, which has no torch.OutOfMemoryError (2.5) and no torch.amp.GradScaler (2.3): every
    exception leaving a training passes the out-of-memory clause, which must name a class that torch has."""
    from lib_copier.train import trainer

    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    backend, image = tiny
    with pytest.raises(Cancelled):
        train_lora(backend, image, "", quick(steps=3), callbacks=Callbacks(cancelled=lambda: True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated since 2.4, and disabled without CUDA
        assert isinstance(trainer._grad_scaler(), torch.cuda.amp.GradScaler)


def test_progress_and_previews_are_reported(tiny):
    backend, image = tiny
    progress, previews = [], []
    callbacks = Callbacks(progress=progress.append, preview=lambda step, im: previews.append((step, im.size)))
    train_lora(backend, image, "", quick(steps=4, preview_every=2), callbacks=callbacks)
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert progress[-1].eta == 0 and progress[0].eta > 0 and progress[0].lr == pytest.approx(1e-3)
    assert previews == [(2, (64, 64)), (4, (64, 64))]


def delta_norm(network) -> float:
    """‖Σ up·down‖ over the modules: how much the LoRA changes the model's weights."""
    return sum(float(w.delta().norm() ** 2) for w in network.to_weights().values()) ** 0.5


@pytest.mark.parametrize("loss", ["slider", "addift"])
def test_a_pair_method_learns_only_the_difference(tiny, loss):
    backend, image = tiny
    before = snapshot(backend)
    other = backend.generate(Txt2Img("a blue square", seed=2))
    config = quick(steps=8, lr=1e-2, train_text_encoder=True, flip=True, batch_size=2)
    same = train_pair(backend, image, image, ["", "a cat"], config, loss)
    naive = train_lora(backend, image, ["", "a cat"], config)  # the same image as a plain target: a copier
    different = train_pair(backend, image, other, ["", "a cat"], config, loss)
    # Two equal images have no difference to learn: the LoRA stays at its zero start, where a copier moves.
    assert delta_norm(same.network) < 1e-6 * delta_norm(naive.network)
    assert delta_norm(different.network) > 0.01 * delta_norm(naive.network)
    assert all(math.isfinite(x) for x in different.losses) and len(different.losses) == 8
    assert_unchanged(backend, before)


@pytest.mark.parametrize("loss", ["slider", "addift"])
def test_a_pair_trains_the_same_with_gradient_checkpointing(tiny, loss):
    # Checkpointing recomputes each block's forward pass during the backward one: it must see the weight (+m or -m)
    # that its pass was run at.
    backend, image = tiny
    other = backend.generate(Txt2Img("a blue square", seed=2))
    plain = train_pair(backend, image, other, "", quick(steps=3), loss).network.to_weights()
    saved = train_pair(backend, image, other, "", quick(steps=3, gradient_checkpointing=True), loss).network
    for key, weights in saved.to_weights().items():
        assert torch.allclose(weights.up, plain[key].up, atol=1e-6), key


def test_a_pair_must_be_one_size_and_a_known_loss(tiny):
    backend, image = tiny
    with pytest.raises(CopierError, match="processed image is 32x64 and its original 64x64; a pair must have one"):
        train_pair(backend, image, image.resize((32, 64)), "", quick(), "slider")
    with pytest.raises(CopierError, match="unknown pair loss 'sliders'; choose one of slider, addift"):
        train_pair(backend, image, image, "", quick(), "sliders")


@pytest.mark.parametrize("config", [TINY_SD2V, TINY_SDXL], ids=["sd2-v", "sdxl"])
def test_v_prediction_and_sdxl_models_train(config):
    backend = backend_for(config)
    image = backend.generate(Txt2Img("a cat", seed=0, steps=2))
    before = snapshot(backend)
    result = train_lora(backend, image, "a cat", quick(steps=3, train_text_encoder=True, min_snr_gamma=5.0))
    assert all(math.isfinite(loss) for loss in result.losses)
    pair = train_pair(backend, image, image.transpose(0), "a cat", quick(steps=2, train_text_encoder=True), "addift")
    assert all(math.isfinite(loss) for loss in pair.losses)
    keys = result.network.modules_by_key
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te") for k in keys)
    assert_unchanged(backend, before)


def test_presets_and_validation():
    assert make_config("thorough").rank == 64 and make_config("thorough").warmup_steps == 500
    assert make_config("quick", rank=8).rank == 8
    assert set(PRESETS) == {"quick", "fast", "thorough"}
    fast, quick = make_config("fast"), make_config("quick")
    assert fast.steps * fast.batch_size == quick.steps and (fast.rank, fast.alpha) == (quick.rank, quick.alpha)
    assert field_info()["lr"]["help"]
    with pytest.raises(CopierError, match="setting rank is 0; it must be between 1 and 1024"):
        make_config("quick", rank=0)
    with pytest.raises(CopierError, match="choose one of adamw, adamw8bit, lion"):
        make_config("quick", optimizer="sgd")
    with pytest.raises(CopierError, match="unknown trainer setting 'ranks'"):
        make_config("quick", ranks=4)
    with pytest.raises(CopierError, match="timestep_min"):
        make_config("quick", timestep_min=500, timestep_max=400)
    with pytest.raises(CopierError, match="unknown preset"):
        make_config("fastest")
    # Settings in range that would train a LoRA which learns nothing, or hardly anything.
    with pytest.raises(CopierError, match="setting lr is 0; it must be above 0"):
        make_config("quick", lr=0.0)
    with pytest.raises(CopierError, match=r"warmup_steps \(500\) must be at most steps \(100\)"):
        make_config("thorough", steps=100)
    assert make_config("quick", steps=10, warmup_steps=10).warmup_steps == 10


def test_schedules_and_optional_optimizers():
    assert [lr_factor(s, 10, "constant", 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(0, 10, "cosine", 0) == 1.0 and lr_factor(5, 10, "cosine", 0) == pytest.approx(0.5)
    assert lr_factor(5, 10, "linear", 0) == pytest.approx(0.5)
    param = torch.nn.Parameter(torch.zeros(2))
    assert isinstance(make_optimizer("adamw", [{"params": [param], "lr": 1e-3}], 0.0), torch.optim.AdamW)


def test_an_optimiser_whose_package_is_missing_is_refused_with_the_settings(monkeypatch):
    """Before any job: the API answers 400 and the tab says it at Train, not when the job reaches its optimiser."""
    from lib_copier.train import config

    present = config.importlib.util.find_spec
    monkeypatch.setattr(
        config.importlib.util, "find_spec", lambda name: None if name == "lion_pytorch" else present(name)
    )
    with pytest.raises(CopierError, match=r"optimizer lion needs the lion-pytorch package.*pip install lion-pytorch"):
        make_config("quick", optimizer="lion")
    assert make_config("quick", optimizer="adamw").optimizer == "adamw"


def test_the_train_benchmark_reports_speed_and_memory(tmp_path, capsys):
    from lib_copier.cli import main
    from lib_copier.models.checkpoint import save_checkpoint

    model = tmp_path / "tiny.safetensors"
    save_checkpoint(backend_for().model, model)
    figures, profile = tmp_path / "bench.json", tmp_path / "profile.txt"
    args = ["bench", "train", "--model", str(model), "--steps", "2", "--rank", "4", "--set", "batch_size=2"]
    args += ["--set", "gradient_checkpointing=true"]  # a setting a flag also sets: --set wins
    assert main([*args, "--json", str(figures), "--profile", str(profile)]) == 0
    out = capsys.readouterr().out
    assert out.count(" steps/s in the loop") == 3 and "peak RSS" in out and "fidelity" in out
    stages = json.loads(figures.read_text())["stages"]
    assert list(stages) == ["copier", "processed", "extraction"]
    assert all(s["steps_per_s"] > 0 and s["final_loss"] > 0 for s in stages.values())
    assert all(s["timesteps_per_s"] == 2 * s["steps_per_s"] for s in stages.values())  # batch_size=2
    assert "timesteps/s" in out
    config = json.loads(figures.read_text())["config"]
    assert config["batch_size"] == 2 and config["gradient_checkpointing"] is True
    assert config["mixed_precision"] == "no" and "mixed precision no" in out  # the CPU computes in fp32 (bf16 is set)
    assert "aten::" in profile.read_text()
    fast = ["bench", "train", "--model", str(model), "--preset", "fast", "--steps", "1", "--stages", "copier"]
    assert main([*fast, "--no-fidelity", "--json", str(figures), "--overwrite"]) == 0
    config = json.loads(figures.read_text())["config"]
    assert (config["preset"], config["steps"], config["batch_size"], config["lr"]) == ("fast", 1, 4, 3e-3)
    assert main([*args, "--stages", "processed"]) == 2
    assert "--stages 'processed': copier, then any of processed, extraction" in capsys.readouterr().err


def test_alpha_0_means_alpha_equal_to_rank_as_in_kohya(tiny):
    """Alpha scales the update by alpha / rank: read literally, 0 would train and write a LoRA that does nothing."""
    backend, image = tiny
    zero, rank = (train_lora(backend, image, "", quick(steps=2, rank=4, alpha=a)) for a in (0.0, 4.0))
    assert {w.alpha for w in zero.network.to_weights().values()} == {4.0}
    assert delta_norm(zero.network) > 0
    assert delta_norm(zero.network) == pytest.approx(delta_norm(rank.network), rel=1e-6)


def test_a_cpu_run_records_that_it_trained_in_fp32(tiny):
    """Mixed precision is CUDA's: the file of a CPU run said bf16 (the setting), which it never computed in."""
    backend, image = tiny
    assert quick().mixed_precision == "bf16"
    assert train_lora(backend, image, "", quick(steps=1)).config.mixed_precision == "no"
