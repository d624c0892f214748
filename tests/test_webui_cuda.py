"""The in-place WebUI training path on a GPU, with the half-precision weights a WebUI loads there: autocast over fp16
weights and fp32 LoRAs, gradient checkpointing, the text encoder, A1111's --medvram moving the UNet, the text encoder
and the VAE between the CPU and the GPU, and the model bit-identical afterwards.

Skipped without CUDA (CI has none); `tools/gpu/run.sh` runs it on the GPU machine."""

import pytest
import torch

from lib_copier.lora.files import read_lora
from lib_copier.models.configs import TINY
from lib_copier.models.sd_model import build_model
from lib_copier.webui.jobs import JobState
from lib_copier.webui.training import train_in_webui
from tests.a1111_like import A1111Host
from tests.conftest import randomize_
from tests.forge_like import ForgeHost
from tests.test_webui_training import request_for, weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["a1111", "forge", "classic"])
def host(request, tmp_path):
    model = randomize_(build_model(TINY)).to("cuda", torch.float16)
    if request.param == "a1111":
        return A1111Host(model, lora_dir=tmp_path)
    forge = ForgeHost(model, lora_dir=tmp_path, design=request.param)
    objects = forge.sd_model.forge_objects
    for patcher in (objects.unet, objects.clip.patcher, objects.vae.patcher):
        patcher.load_device = torch.device("cuda")  # Forge's memory manager puts its models on the GPU
    return forge


SETTINGS = {"steps": 3, "gradient_checkpointing": True, "train_text_encoder": True}


@pytest.mark.parametrize(
    "method, precision, batch", [("both", "bf16", 1), ("both", "fp16", 4), ("addift", "bf16", 1)]
)  # batch 4: Fast's four timesteps per step, under fp16's loss scaling
def test_half_precision_weights_train_on_the_gpu_and_stay_bit_identical(host, tmp_path, method, precision, batch):
    before = weights(host)
    overrides = {**SETTINGS, "mixed_precision": precision, "batch_size": batch}
    results = train_in_webui(request_for(host, method=method, overrides=overrides), host, tmp_path, JobState("j"))
    kinds = {"both": ["copier", "processed", "extraction"], "addift": ["addift"]}[method]
    assert [r["kind"] for r in results] == kinds
    assert_trained(tmp_path, results)
    after = dict(host.backend().weights())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert next(iter(after.values())).device.type == "cuda"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_under_medvram_the_model_moves_between_cpu_and_gpu_and_a_job_still_trains(tmp_path, precision):
    host = A1111Host(randomize_(build_model(TINY)).to("cuda", torch.float16), lora_dir=tmp_path)
    request = request_for(host, method="both", overrides={**SETTINGS, "mixed_precision": precision, "preview_every": 2})
    before = {n: p.cpu() for n, p in weights(host).items()}
    host.start_medvram()  # the UNet, the text encoder and the VAE to the CPU until a hook brings one in
    results = train_in_webui(request, host, tmp_path, JobState("j"))
    assert [r["kind"] for r in results] == ["copier", "processed", "extraction"] and host.previews > 0
    assert_trained(tmp_path, results)
    after = {n: p.cpu() for n, p in host.backend().weights()}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert host.medvram.units_in() == []  # back on the CPU, as after A1111's txt2img


def assert_trained(folder, results):
    for result in results:
        lora = read_lora(folder / result["lora"])
        ups = [m.up.float() for m in lora.modules.values()]
        assert all(torch.isfinite(up).all() for up in ups) and any(up.abs().max() > 0 for up in ups)
        assert any(key.startswith("lora_te") for key in lora.modules)
