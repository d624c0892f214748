import dataclasses

import torch

from lib_copier.models.clip_text import CLIPTextConfig
from lib_copier.models.configs import SD2_V, SDXL, TINY, TextEncoderSpec
from lib_copier.models.openclip_text import OpenCLIPTextConfig


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter small random values, zero-initialised output layers included.

    A freshly initialised LDM UNet predicts exactly zero (its output convolutions start at zero), so a test
    model built that way would ignore prompts and LoRAs; see DESIGN.md.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


SMALL_OPENCLIP = OpenCLIPTextConfig(width=32, layers=2, heads=2, output_dim=16)
TINY_SD2V = dataclasses.replace(
    SD2_V,
    unet=dataclasses.replace(TINY.unet, num_head_channels=8, context_dim=32, use_linear_in_transformer=True),
    vae=TINY.vae,
    text_encoders=(TextEncoderSpec("openclip", openclip=SMALL_OPENCLIP, layer="penultimate", final_norm=True),),
    resolution=64,
)
TINY_SDXL = dataclasses.replace(
    SDXL,
    unet=dataclasses.replace(
        TINY.unet,
        num_head_channels=8,
        context_dim=64,
        use_linear_in_transformer=True,
        transformer_depth=(1, 2),
        transformer_depth_middle=2,
        adm_in_channels=16 + 6 * 256,
    ),
    vae=TINY.vae,
    text_encoders=(
        TextEncoderSpec("clip", clip=CLIPTextConfig(width=32, layers=2, heads=2), layer="penultimate"),
        TextEncoderSpec("openclip", openclip=SMALL_OPENCLIP, layer="penultimate", final_norm=False),
    ),
    resolution=64,
)


def assert_reads_like(backend, reference) -> None:
    """A host backend sees what the standalone backend over the same model sees: the model's kind, where it
    computes, its LoRA targets and its noise schedule."""
    assert (backend.family, backend.prediction, backend.device, backend.dtype) == (
        reference.family,
        reference.prediction,
        reference.device,
        reference.dtype,
    )
    assert [t.key for t in backend.lora_targets(conv=True)] == [t.key for t in reference.lora_targets(conv=True)]
    assert torch.equal(backend.alphas_cumprod(), reference.alphas_cumprod())
