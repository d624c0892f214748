"""Our UNet against Stability's reference code (the `ldm` package A1111 runs)."""

import pytest
import torch

from lib_copier.models.unet import UNetConfig, UNetModel
from tests.conftest import randomize_

ldm_unet = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

TINY_SD1 = dict(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    transformer_depth=(1, 1),
    num_heads=4,
    context_dim=48,
)
TINY_SD2 = dict(TINY_SD1, num_head_channels=16, use_linear_in_transformer=True)


def reference(cfg: UNetConfig):
    kwargs = dict(
        image_size=32,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        model_channels=cfg.model_channels,
        attention_resolutions=list(cfg.attention_resolutions),
        num_res_blocks=cfg.num_res_blocks,
        channel_mult=list(cfg.channel_mult),
        use_spatial_transformer=True,
        transformer_depth=cfg.transformer_depth[0],
        context_dim=cfg.context_dim,
        use_linear_in_transformer=cfg.use_linear_in_transformer,
        legacy=False,
        use_checkpoint=False,
    )
    if cfg.num_head_channels > 0:
        kwargs["num_head_channels"] = cfg.num_head_channels
    else:
        kwargs["num_heads"] = cfg.num_heads
    return ldm_unet.UNetModel(**kwargs)


@pytest.mark.parametrize("tiny", [TINY_SD1, TINY_SD2], ids=["sd1", "sd2"])
def test_tiny_unet_matches_reference(tiny):
    cfg = UNetConfig(**tiny)
    ref = randomize_(reference(cfg), seed=1).eval()
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 900])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=gen)
    with torch.no_grad():
        expected, got = ref(x, t, context=ctx), ours(x, t, ctx)
    assert expected.abs().mean() > 1e-2  # a zero output would make the comparison meaningless
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "cfg, ref_kwargs, params",
    [
        (UNetConfig(), dict(num_heads=8, context_dim=768), 859_520_964),
        (
            UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
            dict(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
            865_910_724,
        ),
    ],
    ids=["sd1", "sd2"],
)
def test_full_size_names_and_shapes_match_reference(cfg, ref_kwargs, params):
    with torch.device("meta"):
        ours = UNetModel(cfg)
        ref = ldm_unet.UNetModel(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=320,
            attention_resolutions=[4, 2, 1],
            num_res_blocks=2,
            channel_mult=[1, 2, 4, 4],
            use_spatial_transformer=True,
            transformer_depth=1,
            legacy=False,
            **ref_kwargs,
        )
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == params


def test_gradient_checkpointing_gives_same_gradients():
    cfg = UNetConfig(**TINY_SD1)
    model = randomize_(UNetModel(cfg), seed=3).train()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ctx = torch.randn(1, 77, cfg.context_dim, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([500])

    def grads(flag):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, ctx).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vector_conditioning_is_required_exactly_when_configured():
    cfg = UNetConfig(**dict(TINY_SD2, adm_in_channels=12))
    model = randomize_(UNetModel(cfg), seed=6).eval()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, cfg.context_dim)
    with pytest.raises(ValueError, match="vector conditioning"):
        model(x, t, ctx)
    with torch.no_grad():
        a = model(x, t, ctx, torch.zeros(1, 12))
        b = model(x, t, ctx, torch.ones(1, 12))
    assert (a - b).abs().max() > 1e-4  # y actually reaches the output
