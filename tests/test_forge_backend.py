"""The Forge backend, run through a Forge-shaped stand-in (tests/forge_like.py) over our own SD1, SD2-v and SDXL.

The reference is the standalone backend over an identical model (same seed, OpenCLIP towers in the Hugging Face
layout Forge holds them in): both must read, predict and train alike, and Forge's weights must come back
bit-identical and as inference tensors after every kind of run, with Forge's LoRA state reset.
"""

import types

import pytest
import torch

from lib_copier.backends.forge import ForgeBackend
from lib_copier.backends.standalone import StandaloneBackend
from lib_copier.effects.chain import Chain
from lib_copier.errors import CopierError
from lib_copier.lora.naming import forge_to_ldm, lora_targets
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img
from lib_copier.models.sampling import zero_terminal_snr
from lib_copier.models.sd_model import build_model
from lib_copier.recipes.job import Job, run_job
from lib_copier.recipes.processed import Effect
from lib_copier.train.config import make_config
from lib_copier.train.trainer import Callbacks, Cancelled, image_tensor, train_lora
from tests.conftest import TINY_SD2V, TINY_SDXL, assert_reads_like, randomize_
from tests.forge_like import ForgeHost, hf_layout

CONFIGS = {"sd1": TINY, "sd2-v": TINY_SD2V, "sdxl": TINY_SDXL}


def model(config):
    return hf_layout(randomize_(build_model(config)))


DESIGNS = ["forge", "neo", "classic", "reforge"]


def pair(config=TINY, lora_dir=None, design="forge"):
    return StandaloneBackend(model(config)), ForgeHost(model(config), lora_dir, design)


def snapshot(host):
    return {name: (p.detach().clone(), p.is_inference()) for name, p in host.backend().weights()}


def assert_as_loaded(host, before):
    """Bit-identical, each weight an inference tensor again where it was one (all of them in Forge and Neo, none in
    Forge Classic and reForge), and no LoRA left in Forge's bookkeeping."""
    after = dict(host.backend().weights())
    assert after.keys() == before.keys()
    assert [n for n, (p, _) in before.items() if not torch.equal(p, after[n])] == []
    assert [n for n, (_, inference) in before.items() if after[n].is_inference() != inference] == []
    assert all(inference for _, inference in before.values()) == (host.sd_model.design in ("forge", "neo"))
    sd = host.sd_model
    assert sd.current_lora_hash == "[]" and not sd.forge_objects_after_applying_lora.unet.lora_patches


@pytest.mark.parametrize("name", CONFIGS)
def test_forge_names_give_the_ldm_targets(name):
    ldm = build_model(CONFIGS[name])
    family = ldm.config.family
    host = ForgeHost(hf_layout(build_model(CONFIGS[name])))
    objects = host.sd_model.forge_objects_original
    forge = {
        forge_to_ldm(n, family): tuple(p.shape)
        for module in (objects.unet.model, objects.clip.cond_stage_model)
        for n, p in module.named_parameters()
    }
    expected = {(t.key, t.shape) for t in lora_targets({n: p.shape for n, p in ldm.named_parameters()}, family, True)}
    assert {(t.key, t.shape) for t in lora_targets(forge, family, conv=True)} == expected
    assert forge_to_ldm("clip_g.transformer.text_model.final_layer_norm.weight", "sdxl") == (
        "conditioner.embedders.1.transformer.text_model.final_layer_norm.weight"
    )
    assert forge_to_ldm("clip_g.transformer.x", "sd1") is None


# Neo has no SD2; Forge has VAE scaling factors, Neo shows none, Classic scales by the UNet's latent format (and
# flags SD2 models as SD1).
@pytest.mark.parametrize(
    "name, design",
    [("sd1", "neo"), ("sd2-v", "forge"), ("sd2-v", "classic"), ("sd2-v", "reforge"), ("sdxl", "classic")],
)
def test_the_forge_model_reads_like_the_standalone_one(name, design):
    ours, host = pair(CONFIGS[name], design=design)
    forge = host.backend()
    assert_reads_like(forge, ours)
    image = image_tensor(ours.generate(Txt2Img("a cat", seed=0, steps=2)))
    # The posterior's mean, not a sample of it (Forge's VAE.encode samples).
    assert torch.allclose(forge.encode_images(image), ours.encode_images(image), atol=1e-6)
    with torch.no_grad():
        cond_forge, cond_ours = forge.encode_prompts(["a cat"], 64, 64), ours.encode_prompts(["a cat"], 64, 64)
    assert not cond_forge.context.is_inference()
    assert torch.allclose(cond_forge.context, cond_ours.context, atol=1e-6)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():  # the UNet's own eps / v, not KModel's sigma-space x0
        assert torch.allclose(forge.predict(x, t, cond_forge), ours.predict(x, t, cond_ours), atol=1e-5)


@pytest.mark.parametrize("preset", ["quick", "fast"])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_training_on_forge_gives_the_standalone_lora_and_leaves_forge_as_loaded(name, design, preset):
    ours, host = pair(CONFIGS[name], design=design)
    image = ours.generate(Txt2Img("a cat", seed=0, steps=2))
    config = make_config(preset, steps=3 if preset == "quick" else 2, train_text_encoder=name == "sdxl")
    captions = "a cat" if preset == "quick" else ["a cat", "a dog"]  # Fast: four timesteps and prompts per step
    before = snapshot(host)
    expected = train_lora(ours, image, captions, config).network.to_weights()
    with host.prepared():
        forge = host.backend()
        got = train_lora(forge, image, captions, config).network.to_weights()
    assert got.keys() == expected.keys()
    if name == "sdxl":  # both text encoders learned, through Forge's own conditioning code
        assert {k[:8] for k, w in got.items() if k.startswith("lora_te") and w.up.abs().sum() > 0} == {
            "lora_te1",
            "lora_te2",
        }
    for key in expected:
        assert torch.allclose(got[key].up, expected[key].up, atol=1e-5), key
    assert_as_loaded(host, before)
    assert {"KModel", "BaseModel"} & set(host.loads)  # the UNet was put on its device before the loop
    assert not forge.unet().training


@pytest.mark.parametrize("design", DESIGNS)
def test_a_job_whose_grids_forge_draws_with_its_lora_loader_leaves_forge_as_loaded(tmp_path, design):
    ours, host = pair(lora_dir=tmp_path, design=design)
    image = ours.generate(Txt2Img("a cat", seed=0, steps=2))
    before = snapshot(host)
    plain = host.txt2img(Txt2Img("a dog", seed=1, steps=2))
    with host.prepared():
        job = Job([image], [Effect("gray", Chain.parse(["grayscale"]))], "cat", tmp_path, overrides={"steps": 2})
        results = run_job(host.backend(), job)
        assert {r.kind for r in results} == {"copier", "processed"}
        # Forge bakes the LoRA into new Parameter objects, as its own LoRA extension does for a grid cell.
        with_lora = host.txt2img(Txt2Img("a dog <lora:cat-gray:1.5>", seed=1, steps=2))
    assert with_lora.tobytes() != plain.tobytes()
    assert_as_loaded(host, before)
    assert host.txt2img(Txt2Img("a dog", seed=1, steps=2)).tobytes() == plain.tobytes()

    steps = []
    callbacks = Callbacks(progress=lambda p: steps.append(p.step), cancelled=lambda: len(steps) >= 2)
    with pytest.raises(Cancelled), host.prepared():
        run_job(host.backend(), Job([image], [Effect("g", Chain.parse(["grayscale"]))], "cut", tmp_path), callbacks)
    assert_as_loaded(host, before)


def test_low_bit_storage_and_other_model_families_get_one_sentence():
    _, host = pair()
    host.sd_model.forge_objects_original.unet.model.storage_dtype = "nf4"
    with pytest.raises(CopierError, match=r"in low bits \(nf4\).*'Diffusion in Low Bits' to Automatic"):
        ForgeBackend(host)
    _, host = pair(design="classic")  # --clip-in-fp8-e4m3fn: Classic marks nothing but the dtype
    clip_l = host.sd_model.forge_objects_original.clip.cond_stage_model.clip_l
    clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.weight.data = torch.zeros(1, dtype=torch.float8_e4m3fn)
    with pytest.raises(CopierError, match=r"in low bits \(torch.float8_e4m3fn\).*Store UNet Weights in fp8"):
        host.backend()
    _, host = pair()
    unet = host.sd_model.forge_objects_original.unet.model.diffusion_model
    unet.input_blocks[0][0] = torch.nn.Conv2d(9, unet.input_blocks[0][0].out_channels, 3, padding=1)
    with pytest.raises(CopierError, match="takes 9 input channels, not 4: it is an inpainting model"):
        ForgeBackend(host)
    _, host = pair(TINY_SDXL)
    delattr(host.sd_model.forge_objects_original.clip.cond_stage_model, "clip_l")  # the refiner: OpenCLIP-G only
    with pytest.raises(CopierError, match="the loaded model is the SDXL refiner"):
        ForgeBackend(host)
    _, host = pair()
    host.sd_model.is_sd1 = False  # Flux, SD3: none of Forge's SD flags set
    with pytest.raises(CopierError, match="SD1, SD2 and SDXL"):
        ForgeBackend(host)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_forge_classic_trains_a_ztsnr_v_checkpoint_on_the_schedule_it_samples_with(prediction):
    """A checkpoint's `ztsnr` key (NoobAI's v-prediction SDXL): Classic rescales a v model's schedule to zero
    terminal SNR and samples it so; an eps model's it leaves as it is."""
    _, host = pair(TINY_SD2V if prediction == "v" else TINY, design="classic")
    plain = host.backend().alphas_cumprod()
    host.sd_model.ztsnr = True
    schedule = host.backend().alphas_cumprod()
    if prediction == "eps":
        assert torch.equal(schedule, plain)
        return
    assert schedule[-1].item() == pytest.approx(4.8973451890853435e-08)  # almost no signal left at t = 999
    assert schedule[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert bool((schedule.diff() < 0).all()) and bool((schedule[1:] < plain[1:]).all())  # less signal at every step


@pytest.mark.parametrize("design", ["forge", "neo"])
def test_forge_trains_a_ztsnr_checkpoint_on_the_schedule_it_samples_with(design):
    """Forge and Neo read a checkpoint's `ztsnr` key (NoobAI's v-prediction SDXL) into the model's config, and
    rescale the sigmas of each generation to zero terminal SNR; the predictor keeps the plain schedule."""
    ours, host = pair(TINY_SD2V, design=design)
    assert torch.equal(host.backend().alphas_cumprod(), ours.alphas_cumprod().float())
    host.sd_model.model_config = types.SimpleNamespace(ztsnr=True)  # what Forge's loader made of the key
    schedule = host.backend().alphas_cumprod()
    assert torch.allclose(schedule, zero_terminal_snr(ours.alphas_cumprod().float()), rtol=1e-6)
    assert schedule[-1].item() == pytest.approx(4.8973451890853435e-08)


@pytest.mark.parametrize("design", ["forge", "neo", "classic", "reforge"])
def test_the_zero_terminal_snr_setting_trains_on_the_schedule_the_webui_samples_with(design):
    """Settings → "Noise schedule for sampling": Zero Terminal SNR, for models trained on one (what A1111 users of
    NoobAI's v-prediction SDXL set): every WebUI then samples on the rescaled schedule, and so must training."""
    ours, host = pair(TINY_SD2V, design=design)
    plain = ours.alphas_cumprod().float()
    host.noise_schedule = "Zero Terminal SNR"
    assert torch.allclose(host.backend().alphas_cumprod(), zero_terminal_snr(plain), rtol=1e-5)
    host.noise_schedule = "Default"
    assert torch.allclose(host.backend().alphas_cumprod(), plain, rtol=1e-6)


def test_reforge_reads_the_prediction_and_a_ztsnr_schedule_where_its_sampler_does():
    """reForge reads a checkpoint's `v_pred` and `ztsnr` keys into the UNet's `model_sampling` only: A1111's model
    object still says eps, and its `alphas_cumprod` is the plain schedule."""
    ours, host = pair(TINY_SD2V, design="reforge")
    host.sd_model.parameterization = "eps"
    sampling = host.sd_model.forge_objects_original.unet.model.model_sampling
    backend = host.backend()
    assert backend.prediction == "v"
    sampling.zsnr = True  # what reForge made of the checkpoint's ztsnr key: the last sigma huge, not infinite
    sampling.sigmas = ((1 - zero_terminal_snr(ours.alphas_cumprod())) / zero_terminal_snr(ours.alphas_cumprod())).sqrt()
    assert backend.alphas_cumprod()[-1].item() == pytest.approx(4.8973451890853435e-08, rel=1e-3)
    assert torch.allclose(backend.alphas_cumprod(), zero_terminal_snr(ours.alphas_cumprod()), rtol=1e-5)


def test_reforge_refuses_what_it_loads_but_copier_lora_cannot_train():
    _, host = pair(design="reforge")
    kmodel = host.sd_model.forge_objects_original.unet.model
    edm = type("ModelSampling", (torch.nn.Module, type("EDM", (), {})), {})  # Playground 2.5, EDM v-prediction
    sampling, kmodel.model_sampling = kmodel.model_sampling, edm()
    with pytest.raises(CopierError, match=r"does not sample as SD does \(EDM\)"):
        host.backend()
    kmodel.model_sampling = sampling
    latents, kmodel.latent_format = kmodel.latent_format, type("SDXL_flux2", (), {})()
    with pytest.raises(CopierError, match=r"latents are not SD's or SDXL's \(SDXL_flux2\)"):
        host.backend()
    kmodel.latent_format = latents
    compiled = torch.nn.Module()
    compiled._orig_mod = kmodel.diffusion_model  # what --torch-compile leaves in the model
    kmodel.diffusion_model = compiled
    with pytest.raises(CopierError, match="compiled by --torch-compile"):
        host.backend()


def test_reforge_loads_the_unet_again_when_its_memory_manager_moved_part_of_it_away():
    _, host = pair(design="reforge")
    backend = host.backend()
    unet = host.sd_model.forge_objects_original.unet
    cond = backend.encode_prompts(["a cat"], 64, 64)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        backend.predict(x, t, cond)
        assert host.loads == []
        unet.loaded_size = lambda: unet.model_size() // 2  # freeing memory for the CLIP unloaded part of it
        backend.predict(x, t, cond)
    assert host.loads == ["BaseModel"]
