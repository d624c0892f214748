"""One master tensor per optimizer group (`lib_copier.train.master`): it must give exactly the LoRA that training each
LoRA tensor on its own gives, only with fewer kernels. Under autocast its half copies must be what casting each fp32
tensor gives: CPU autocast (bf16) casts the way CUDA's does, so the comparison runs on the CPU; on a GPU
(`tools/gpu/run.sh`) also under CUDA's fp16 and bf16. Without autocast the master's own fp32 slices are used."""

import importlib.util

import pytest
import torch
from torch.optim import AdamW

from lib_copier.backends.standalone import StandaloneBackend
from lib_copier.lora.naming import by_key
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.generate import Txt2Img
from lib_copier.train import trainer
from lib_copier.train.config import make_config
from lib_copier.train.master import MasterWeights
from lib_copier.train.trainer import train_lora, train_pair
from tests.conftest import TINY_SD2V
from tests.test_trainer import assert_unchanged, backend_for, snapshot

BF16 = torch.bfloat16


def _cpu_autocast_casts_attention() -> bool:
    """torch 2.1's CPU autocast (A1111 1.10's torch) leaves attention out, so OpenCLIP's fp32 mask meets bf16 queries;
    later versions cast it."""
    q = torch.zeros(1, 1, 2, 4)
    with torch.autocast("cpu", dtype=BF16):
        try:
            torch.nn.functional.scaled_dot_product_attention(q.to(BF16), q, q, attn_mask=torch.zeros(2, 2))
        except RuntimeError:
            return False
    return True


CPU_AUTOCAST = pytest.mark.skipif(not _cpu_autocast_casts_attention(), reason="this torch's CPU autocast skips SDPA")


@CPU_AUTOCAST
def test_half_copies_give_autocasts_gradients_bit_for_bit():
    """Linear and 1x1-conv side paths in the UNet and the OpenCLIP attention's parametrisation in SD2's text encoder:
    the same outputs and the same fp32 gradients as autocast casting each LoRA tensor."""
    backend = backend_for(TINY_SD2V)
    targets = backend.lora_targets(conv=True)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    results = []
    for copies in (False, True):
        network = LoRANetwork.create(targets, 4, 4.0, conv_rank=4, seed=0)
        for module in network.modules_by_key.values():  # a trained LoRA, not the zero up of a fresh one
            up = module.lora_up.weight
            up.data = torch.randn(up.shape, generator=torch.Generator().manual_seed(1)) * 0.1
        modules = list(network.modules_by_key.values())
        half = MasterWeights(modules, BF16) if copies else None
        with network.applied(backend.lora_layers(), by_key(targets)), torch.autocast("cpu", dtype=BF16):
            if half:
                half.attach()
            cond = backend.encode_prompts(["a cat", "a dog"], 64, 64)
            out = backend.predict(x, t, cond).float()
            out.pow(2).mean().backward()
        if half:
            half.detach()
            half.share_gradients()
        results.append((out.detach(), {k: (m.lora_down.weight.grad, m.lora_up.weight.grad) for k, m in
                                       network.modules_by_key.items()}))  # fmt: skip
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert any(k.startswith("lora_te") for k in grads_a) and any(m.lora_down.weight.dim() == 4 for m in modules)
    for key, (down, up) in grads_a.items():
        assert torch.equal(down, grads_b[key][0]) and torch.equal(up, grads_b[key][1]), key
        assert grads_b[key][0].dtype == torch.float32


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kind", ["copier", "slider"])
@pytest.mark.parametrize(
    "device, precision",
    [
        ("cpu", "no"),
        pytest.param("cpu", "bf16", marks=CPU_AUTOCAST),
        pytest.param("cuda", "fp16", marks=CUDA),
        pytest.param("cuda", "bf16", marks=CUDA),
    ],
)
def test_training_with_a_master_tensor_gives_the_same_lora_and_leaves_the_model_bit_identical(
    monkeypatch, kind, device, precision
):
    """The whole trainer, with the text encoder, gradient checkpointing, four timesteps a step, and on CUDA fp16's
    loss scaling over a WebUI's fp16 weights; in fp32 on the CPU, the master's own slices."""
    backend = backend_for(TINY_SD2V)
    if device == "cuda":
        backend = StandaloneBackend(backend.model.to("cuda", torch.float16))
    image = backend.generate(Txt2Img("a red circle", seed=1))
    settings = dict(steps=3, train_text_encoder=True, gradient_checkpointing=True, text_lr=1e-3)
    config = make_config("fast", mixed_precision=precision, **settings)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[precision]
    before = snapshot(backend)

    def train():
        if kind == "slider":
            return train_pair(backend, image, image.transpose(0), ["a", "b"], config, "slider").network
        return train_lora(backend, image, ["a", "b"], config).network

    def autocast(m):
        if device == "cpu" and dtype:  # the trainer uses no autocast on the CPU; this test does
            m.setattr(trainer, "_autocast", lambda *_: torch.autocast(device, dtype=dtype))
            m.setattr(trainer, "_autocast_dtype", lambda *_: dtype)

    with monkeypatch.context() as m:  # each LoRA tensor updated on its own (and cast on its own by autocast)
        autocast(m)
        m.setattr(trainer, "ELEMENTWISE", ())
        expected = train().to_weights()
    with monkeypatch.context() as m:  # what the trainer does: one master per group (and half copies of it)
        autocast(m)
        spy = []
        m.setattr(trainer, "MasterWeights", lambda *a: spy.append(MasterWeights(*a)) or spy[-1])
        got = train().to_weights()
    assert len(spy) == 2  # the UNet's and the text encoder's, each with its own learning rate
    assert all(w.dtype == (dtype or torch.float32) for w in spy)
    assert got.keys() == expected.keys()
    for key, w in expected.items():
        assert torch.equal(w.down, got[key].down) and torch.equal(w.up, got[key].up), key
    assert any(w.up.abs().sum() > 0 for w in got.values())
    assert all(m.step_weights is None for h in spy for m in h.modules)
    assert_unchanged(backend, before)


def test_an_optimiser_that_is_not_elementwise_updates_each_lora_tensor_on_its_own(monkeypatch):
    """AdamW8bit quantises its state in blocks: one master tensor would change its blocks, and with them the LoRA."""
    backend = backend_for()
    image = backend.generate(Txt2Img("a red circle", seed=1))
    seen, spy = [], []
    monkeypatch.setattr(trainer, "_autocast_dtype", lambda *_: BF16)
    monkeypatch.setattr(trainer, "MasterWeights", lambda *a: spy.append(MasterWeights(*a)) or spy[-1])
    monkeypatch.setattr(trainer, "make_optimizer", lambda name, groups, wd: seen.append(groups) or AdamW(groups))
    find_spec = importlib.util.find_spec  # the optimisers' packages need not be here: make_optimizer is the spy
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: find_spec(name, *a) or name)
    train_lora(backend, image, "", make_config("quick", steps=1, optimizer="adamw8bit"))
    assert not spy and len(seen[0][0]["params"]) > 2
    train_lora(backend, image, "", make_config("quick", steps=1, optimizer="lion"))
    assert len(spy) == 1 and seen[1][0]["params"] == [spy[0].master]


def test_the_side_path_asks_about_autocast_as_torch_2_1_lets_it(monkeypatch):
    """A1111 1.10 ships torch 2.1, whose is_autocast_enabled takes no device and answers for CUDA."""
    from lib_copier.lora import network

    def before_2_4():
        return False

    monkeypatch.setattr(torch, "is_autocast_enabled", before_2_4)
    module = network.LoRAModule((8, 8), 4, 4.0)
    torch.nn.init.normal_(module.lora_up.weight)
    x = torch.randn(2, 8, dtype=torch.float64)
    out = module.side_path(torch.nn.Linear(8, 8), x)  # not under autocast: computed in the LoRA's fp32
    assert out.dtype == torch.float32 and not network._autocast_on("cpu") and not network._autocast_on("cuda")
