"""A1111's --medvram: the UNet, the text encoder(s) and the VAE wait off the GPU between uses, moved by hooks. A job
trains under it exactly what it trains without it, and leaves the model, its hooks and its placement as --medvram
keeps them. The stand-in's `Medvram` emulates the moves (on a CPU, "out" is NaN-filled weights)."""

import pytest
import torch

from lib_copier.lora.files import read_lora
from lib_copier.models.configs import TINY
from lib_copier.models.sd_model import build_model
from lib_copier.webui.jobs import JobState
from lib_copier.webui.medvram import HOOK_NAME
from lib_copier.webui.training import train_in_webui
from tests.a1111_like import A1111Host
from tests.conftest import TINY_SD2V, TINY_SDXL, randomize_
from tests.test_webui_training import request_for


def offload_hooks(model: torch.nn.Module) -> list:
    return [h for m in model.modules() for h in m._forward_pre_hooks.values() if h.__name__ == HOOK_NAME]


def units_in_training_steps(host) -> list[tuple[str, ...]]:
    """The units on the device at each UNet forward that builds a graph (a training step, not a drawing)."""
    seen = []

    def record(module, args):
        if torch.is_grad_enabled():
            seen.append(tuple(host.medvram.units_in()))

    host.sd_model.model.diffusion_model.register_forward_pre_hook(record)
    return seen


def loras(folder, results) -> list[dict[str, torch.Tensor]]:
    return [{k: t for k, m in read_lora(folder / r["lora"]).modules.items() for t in (m.down, m.up)} for r in results]


@pytest.mark.parametrize("text_encoder", [True, False], ids=["te", "unet"])
@pytest.mark.parametrize("config", [TINY, TINY_SD2V, TINY_SDXL], ids=["sd1", "sd2v", "sdxl"])
def test_under_medvram_a_job_trains_what_it_trains_without_it_and_leaves_the_model_as_medvram_keeps_it(
    tmp_path, config, text_encoder
):
    plain = A1111Host(randomize_(build_model(config)), lora_dir=tmp_path / "plain")
    settings = {"steps": 3, "train_text_encoder": text_encoder, "preview_every": 2}
    request = request_for(plain, method="both", overrides=settings)
    expected = loras(plain.lora_dir, train_in_webui(request, plain, plain.lora_dir, JobState("a")))

    host = A1111Host(randomize_(build_model(config)), lora_dir=tmp_path / "medvram")
    host.start_medvram()
    hooks = offload_hooks(host.sd_model)
    before = {n: host.medvram.value(p).clone() for n, p in host.backend().weights()}
    in_training_steps = units_in_training_steps(host)
    results = train_in_webui(request, host, host.lora_dir, JobState("b"))

    assert host.previews == plain.previews > 0
    got = loras(host.lora_dir, results)
    assert [sorted(lora) for lora in got] == [sorted(lora) for lora in expected]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, expected, strict=True) for k in a)
    assert any(k.startswith("lora_te") for k in got[0]) == text_encoder
    after = {n: host.medvram.value(p) for n, p in host.backend().weights()}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert offload_hooks(host.sd_model) == hooks
    # Only what a step uses is on the device while it trains; afterwards nothing, as after A1111's txt2img.
    assert set(in_training_steps) == {("unet", "te") if text_encoder else ("unet",)}
    assert host.medvram.units_in() == [] and host.medvram.module_in_gpu is None
