"""Our VAE against the reference (ldm's Encoder/Decoder, the code A1111 runs)."""

import pytest
import torch

from lib_copier.models.vae import AutoencoderKL, VAEConfig
from tests.conftest import randomize_

ldm_model = pytest.importorskip("ldm.modules.diffusionmodules.model")


def reference(cfg: VAEConfig) -> torch.nn.Module:
    dd = dict(
        double_z=cfg.double_z,
        z_channels=cfg.z_channels,
        resolution=cfg.resolution,
        in_channels=cfg.in_channels,
        out_ch=cfg.out_ch,
        ch=cfg.ch,
        ch_mult=list(cfg.ch_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions),
        dropout=0.0,
    )
    ref = torch.nn.Module()
    ref.encoder = ldm_model.Encoder(**dd)
    ref.decoder = ldm_model.Decoder(**dd)
    ref.quant_conv = torch.nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
    ref.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
    return ref


def test_tiny_vae_matches_reference():
    # Widths are multiples of 32 because ldm hardcodes GroupNorm(32); attention at 32 px covers AttnBlock in both.
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), resolution=64)
    ref = randomize_(reference(cfg), seed=1).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        moments = ref.quant_conv(ref.encoder(x))
        posterior = ours.encode(x)
        torch.testing.assert_close(posterior.mean, moments[:, :4], rtol=0, atol=1e-4)
        torch.testing.assert_close(posterior.logvar, moments[:, 4:].clamp(-30, 20), rtol=0, atol=1e-4)
        z = posterior.mean
        expected = ref.decoder(ref.post_quant_conv(z))
        got = ours.decode(z)
    assert expected.abs().mean() > 1e-2
    assert (got - expected).abs().max().item() < 1e-4
    assert got.shape == (2, 3, 64, 64) and z.shape == (2, 4, 32, 32)


def test_full_size_names_and_shapes_match_reference():
    cfg = VAEConfig()
    with torch.device("meta"):
        ours, ref = AutoencoderKL(cfg), reference(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_linear_stored_attention_loads_as_convolutions():
    cfg = VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)
    source = randomize_(AutoencoderKL(cfg), seed=3)
    state = source.state_dict()
    flat = {
        k: (v[:, :, 0, 0] if ".attn_1." in k and k.endswith("weight") and v.dim() == 4 else v) for k, v in state.items()
    }
    assert any(v.dim() == 2 for k, v in flat.items() if ".attn_1.q." in k)
    target = AutoencoderKL(cfg)
    target.load_state_dict(flat, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), target.state_dict().values(), strict=True))


def test_latents_are_eight_times_smaller_with_four_levels():
    cfg = VAEConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4)
    vae = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 48)).sample(torch.Generator().manual_seed(0))
        assert z.shape == (1, 4, 8, 6)
        assert vae.decode(z).shape == (1, 3, 64, 48)
