"""The WebUI backend, run through an A1111-shaped stand-in over our own SD1, SD2-v and SDXL models.

The stand-in shares its modules with the model, so the standalone backend over the same model is the reference:
both must train the same LoRA, and the base weights must be bit-identical after every kind of run.
"""

import contextlib

import pytest
import torch

from lib_copier.backends.standalone import StandaloneBackend
from lib_copier.backends.webui import WebUIBackend, checkpoint_name
from lib_copier.effects.chain import Chain
from lib_copier.errors import CopierError
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img
from lib_copier.models.sampling import zero_terminal_snr
from lib_copier.models.sd_model import build_model
from lib_copier.recipes.job import Job, run_job
from lib_copier.recipes.processed import Effect
from lib_copier.train.config import make_config
from lib_copier.train.trainer import Callbacks, Cancelled, image_tensor, train_lora
from tests.a1111_like import A1111Host
from tests.conftest import TINY_SD2V, TINY_SDXL, assert_reads_like, randomize_

CONFIGS = {"sd1": TINY, "sd2-v": TINY_SD2V, "sdxl": TINY_SDXL}


def pair(config=TINY):
    model = randomize_(build_model(config))
    return StandaloneBackend(model), WebUIBackend(A1111Host(model))


def checksum(backend) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in backend.weights()}


def assert_identical(backend, before):
    after = dict(backend.weights())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"base weights changed: {changed[:3]}"


def test_checkpoint_names_drop_the_hijack_level():
    assert (
        checkpoint_name("cond_stage_model.wrapped.transformer.text_model.x")
        == "cond_stage_model.transformer.text_model.x"
    )
    assert checkpoint_name("conditioner.embedders.0.wrapped") == "conditioner.embedders.0"
    assert checkpoint_name("model.diffusion_model.unwrapped.x") == "model.diffusion_model.unwrapped.x"


@pytest.mark.parametrize("name", CONFIGS)
def test_the_host_model_reads_like_the_standalone_one(name):
    ours, host = pair(CONFIGS[name])
    assert_reads_like(host, ours)
    for target in host.lora_targets(conv=True):
        assert host.lora_layers()[target.path] is ours.lora_layers()[target.path]
    image = image_tensor(ours.generate(Txt2Img("a cat", seed=0, steps=2)))
    assert torch.allclose(host.encode_images(image), ours.encode_images(image))
    cond_host, cond_ours = host.encode_prompts(["a cat"], 64, 64), ours.encode_prompts(["a cat"], 64, 64)
    assert torch.equal(cond_host.context, cond_ours.context)
    assert (cond_host.vector is None) == (cond_ours.vector is None)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    assert torch.equal(host.predict(x, t, cond_host), ours.predict(x, t, cond_ours))
    assert dict(host.weights()).keys() == {n for n, _ in ours.model.named_parameters()}


@pytest.mark.parametrize("preset", ["quick", "fast"])
@pytest.mark.parametrize("name", CONFIGS)
def test_training_on_the_host_gives_the_standalone_lora_and_leaves_the_model_bit_identical(name, preset):
    ours, host = pair(CONFIGS[name])
    image = ours.generate(Txt2Img("a cat", seed=0, steps=2))
    config = make_config(preset, steps=3 if preset == "quick" else 2, train_text_encoder=name == "sdxl")
    captions = "a cat" if preset == "quick" else ["a cat", "a dog"]  # Fast: four timesteps and prompts per step
    before = checksum(host)
    expected = train_lora(ours, image, captions, config).network.to_weights()
    got = train_lora(host, image, captions, config).network.to_weights()
    assert got.keys() == expected.keys()
    if name == "sdxl":
        # The text encoders learned too, through the host's conditioning path that runs under no_grad by default.
        assert any(k.startswith("lora_te") and w.up.abs().sum() > 0 for k, w in got.items())
    for key in expected:
        assert torch.allclose(got[key].up, expected[key].up, atol=1e-6), key
    assert_identical(host, before)
    assert not host.unet().training


def test_the_zero_terminal_snr_setting_trains_on_the_schedule_a1111_samples_with():
    """A1111 reads no ztsnr key: its users of zero-terminal-SNR models (NoobAI's v-prediction SDXL) set "Noise
    schedule for sampling" to Zero Terminal SNR, and A1111 rescales `alphas_cumprod` for every generation."""
    ours, backend = pair(TINY_SD2V)
    backend.host.noise_schedule = "Zero Terminal SNR"
    schedule = backend.alphas_cumprod()
    assert torch.allclose(schedule, zero_terminal_snr(ours.alphas_cumprod().float()), rtol=1e-6)
    assert schedule[-1].item() == pytest.approx(4.8973451890853435e-08)


def test_built_in_checkpoint_flags_are_off_while_training_and_restored_after():
    _, host = pair(TINY_SDXL)
    blocks = [m for m in host.unet().modules() if getattr(m, "checkpoint", None) is True]
    assert blocks
    with host.training_mode(text_encoders=True, gradient_checkpointing=False):
        assert not any(b.checkpoint for b in blocks)
        assert all(e.is_trainable for e in host.text_encoders())
    assert all(b.checkpoint for b in blocks)
    assert not any(e.is_trainable for e in host.text_encoders())


def test_gradient_checkpointing_gives_the_same_lora():
    ours, host = pair()
    image = ours.generate(Txt2Img("a cat", seed=0, steps=2))
    plain = train_lora(host, image, "a cat", make_config("quick", steps=2)).network.to_weights()
    checkpointed = train_lora(host, image, "a cat", make_config("quick", steps=2, gradient_checkpointing=True))
    for key, w in checkpointed.network.to_weights().items():
        assert torch.allclose(w.up, plain[key].up, atol=1e-6), key
    assert not any("forward" in vars(b) for b in host.unet().input_blocks)


def test_a_job_on_the_host_previews_through_its_txt2img_and_a_cancelled_one_changes_nothing(tmp_path):
    ours, host = pair()
    image = ours.generate(Txt2Img("a cat", seed=0, steps=2))
    before = checksum(host)
    job = Job([image], [Effect("gray", Chain.parse(["grayscale"]))], "cat", tmp_path, overrides={"steps": 2})
    job.grid_prompts, job.grid_steps = ["a cat"], 2
    results = run_job(host, job)
    assert {r.kind for r in results} == {"copier", "processed"}
    assert host.host.prompts  # the grids were drawn by the host
    assert_identical(host, before)

    steps = []
    callbacks = Callbacks(progress=lambda p: steps.append(p.step), cancelled=lambda: len(steps) >= 3)
    with pytest.raises(Cancelled):
        run_job(host, Job([image], [Effect("gray", Chain.parse(["grayscale"]))], "cut", tmp_path / "cut"), callbacks)
    assert not (tmp_path / "cut").exists() or not any((tmp_path / "cut").iterdir())
    assert_identical(host, before)


@pytest.mark.parametrize(("channels", "kind"), [(9, "an inpainting model"), (8, "an instruct-pix2pix model")])
def test_an_inpainting_or_edit_model_is_refused_before_any_work(channels, kind):
    """The 🧬 button under img2img's gallery while an inpainting checkpoint is loaded: one sentence, not a conv error
    after the image was encoded."""
    model = randomize_(build_model(TINY))
    first = model.model.diffusion_model.input_blocks[0][0]
    model.model.diffusion_model.input_blocks[0][0] = torch.nn.Conv2d(channels, first.out_channels, 3, padding=1)
    with pytest.raises(
        CopierError, match=f"takes {channels} input channels, not 4: it is {kind}; Copier LoRA needs an ordinary"
    ):
        WebUIBackend(A1111Host(model))


def test_an_unclip_model_is_refused_before_any_work():
    model = randomize_(build_model(TINY))
    model.model.diffusion_model.label_emb = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    with pytest.raises(CopierError, match="takes an image embedding beside the prompt: it is an unCLIP model"):
        WebUIBackend(A1111Host(model))


def test_the_sdxl_refiner_is_refused_as_in_forge():
    """The refiner's only text encoder is OpenCLIP-G, at conditioner.embedders.0."""
    model = randomize_(build_model(TINY_SDXL))
    model.conditioner.embedders = torch.nn.ModuleList(list(model.conditioner.embedders)[1:])
    with pytest.raises(CopierError, match="the loaded model is the SDXL refiner"):
        WebUIBackend(A1111Host(model))


def test_fp8_weights_are_refused_with_a_clear_message():
    model = randomize_(build_model(TINY))
    layer = model.model.diffusion_model.out[-1]
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(CopierError, match="fp8"):
        WebUIBackend(A1111Host(model))


def test_a_nan_from_the_vae_is_one_sentence():
    ours, host = pair()
    image = image_tensor(ours.generate(Txt2Img("a cat", seed=0, steps=2)))
    vae = ours.model.first_stage_model
    with contextlib.ExitStack() as stack:
        bias = vae.quant_conv.bias
        saved = bias.detach().clone()
        stack.callback(lambda: bias.data.copy_(saved))
        bias.data.fill_(float("nan"))
        with pytest.raises(CopierError, match="--no-half-vae"):
            host.encode_images(image)


def test_the_lora_list_is_reread_outside_the_exception_of_a_run_that_stopped(monkeypatch):
    # A1111 reports an unreadable LoRA file with the exception being handled: in the run's exception handling, its
    # console showed the stopped run's traceback as if the run had crashed.
    import sys
    import types

    from lib_copier.errors import Interrupted
    from lib_copier.webui.host import refresh_loras

    handled = []
    networks = types.ModuleType("networks")
    networks.list_available_networks = lambda: handled.append(sys.exc_info()[1])
    monkeypatch.setitem(sys.modules, "networks", networks)
    try:
        raise Interrupted("training was interrupted at step 4")
    except Interrupted:
        refresh_loras()
    assert handled == [None]
