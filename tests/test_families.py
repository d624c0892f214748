"""Every family runs end to end at tiny size: SD2 (OpenCLIP, v-prediction) and SDXL (two encoders, vector y)."""

import pytest
import torch

from lib_copier.models.checkpoint import load_checkpoint, save_checkpoint
from lib_copier.models.generate import Txt2Img, generate
from lib_copier.models.sd_model import build_model
from tests.conftest import TINY_SD2V, TINY_SDXL, randomize_


@pytest.mark.parametrize("config", [TINY_SD2V, TINY_SDXL], ids=["sd2-v", "sdxl"])
def test_family_generates_and_round_trips(config, tmp_path):
    model = randomize_(build_model(config, seed=0), seed=1, std=0.1)
    request = Txt2Img("a red circle", seed=2, steps=3)
    image = generate(model, request)
    assert image.size == (64, 64)
    assert generate(model, Txt2Img("a blue square", seed=2, steps=3)).tobytes() != image.tobytes()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert loaded.config == config
    assert generate(loaded, request).tobytes() == image.tobytes()


def test_sdxl_keys_use_the_conditioner_layout():
    keys = build_model(TINY_SDXL, device="meta").state_dict().keys()
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert "model.diffusion_model.label_emb.0.0.weight" in keys


def test_sdxl_vector_carries_pooled_text_and_size():
    model = randomize_(build_model(TINY_SDXL, seed=0), seed=3, std=0.1)
    with torch.no_grad():
        a = model.encode_prompts(["a red circle"], 64, 64)
        b = model.encode_prompts(["a blue square"], 64, 64)
        c = model.encode_prompts(["a red circle"], 128, 64)
    assert a.context.shape == (1, 77, 64) and a.vector.shape == (1, 16 + 6 * 256)
    assert not torch.equal(a.vector[:, :16], b.vector[:, :16])  # pooled text differs by prompt
    assert torch.equal(a.vector[:, :16], c.vector[:, :16]) and not torch.equal(a.vector, c.vector)  # size differs
