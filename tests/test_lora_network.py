"""Injection: side path and fused give the same model, the model is bit-identical afterwards, gradients flow."""

import pytest
import torch

from lib_copier.lora.files import read_lora, write_lora
from lib_copier.lora.naming import by_key, lora_targets, model_family
from lib_copier.lora.network import LoRANetwork
from lib_copier.lora.ops import apply_to_state_dict
from lib_copier.models.sd_model import build_model
from tests.conftest import TINY_SD2V, TINY_SDXL, randomize_


def setup(config, conv=True, dtype=torch.float32):
    model = randomize_(build_model(config, seed=0), seed=1, std=0.05).to(dtype).eval()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    targets = lora_targets(shapes, model_family(shapes), conv=conv)
    network = LoRANetwork.create(targets, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, seed=0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in network.modules_by_key.values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.05)
    return model, by_key(targets), network


def run(model, dtype=torch.float32):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        cond = model.encode_prompts(["a red circle"])
        return cond.context, model.predict(x, torch.tensor([400]), cond)


@pytest.mark.parametrize("config", ["tiny", TINY_SD2V, TINY_SDXL], ids=["sd1", "sd2", "sdxl"])
def test_side_path_equals_fused_and_leaves_no_trace(config):
    model, table, network = setup(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    base_context, base = run(model)
    layers = dict(model.named_modules())
    with network.applied(layers, table, multiplier=0.8):
        side_context, side = run(model)
    with network.fused(layers, table, multiplier=0.8):
        fused_context, fused = run(model)
    assert (side_context - base_context).abs().max() > 1e-4  # the text encoder LoRA works (OpenCLIP q/k/v too)
    assert (side - base).abs().max() > 1e-4
    assert torch.allclose(side_context, fused_context, atol=1e-5)
    assert torch.allclose(side, fused, atol=1e-5)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not any(m._forward_hooks for m in model.modules())
    assert torch.equal(run(model)[1], base)


def test_fuse_and_unfuse_is_bit_exact_in_fp16():
    model, table, network = setup("tiny", dtype=torch.float16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with network.fused(dict(model.named_modules()), table, multiplier=1.5):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert len(changed) == len({t.param_name for t in table.values() if t.key in network.modules_by_key})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradients_reach_every_module_including_openclip_attention():
    model, table, network = setup(TINY_SD2V)
    model.requires_grad_(False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with network.applied(dict(model.named_modules()), table):
        cond = model.encode_prompts(["a red circle"])
        model.predict(x, torch.tensor([400]), cond).pow(2).mean().backward()
    for key, module in network.modules_by_key.items():
        assert module.lora_up.weight.grad is not None and module.lora_up.weight.grad.abs().sum() > 0, key
    assert all(p.grad is None for p in model.parameters())


def test_a_written_lora_changes_the_model_as_merging_it_does(tmp_path):
    model, table, network = setup("tiny")
    path = write_lora(tmp_path / "tiny.safetensors", network.to_weights(), {}, precision="fp32")
    lora = read_lora(path)
    _, base = run(model)
    with LoRANetwork.from_weights(lora.modules).applied(dict(model.named_modules()), table, multiplier=0.7):
        _, injected = run(model)
    merged = randomize_(build_model("tiny", seed=0), seed=1, std=0.05).eval()
    state = dict(merged.state_dict())
    apply_to_state_dict(state, [(lora.modules, 0.7)], table)
    merged.load_state_dict(state)
    _, from_weights = run(merged)
    assert (injected - base).abs().max() > 1e-3
    assert torch.allclose(injected, from_weights, atol=1e-5)
