"""The built-in model's architecture and where its weights live.

SD1 layout and SD1 names at small widths: 128-pixel images, an 8x VAE (16x16 latents), a three-level UNet with
attention at the two coarser levels, and a three-layer CLIP text encoder. Sized so one image with 20 Euler steps
takes about half a second on one CPU core (`python -m lib_copier bench generate`), training fits in 90 minutes on
two CPU cores, and the fp16 weights are about 19 MB.
"""

from __future__ import annotations

from pathlib import Path

from lib_copier.models.clip_text import CLIPTextConfig
from lib_copier.models.configs import ModelConfig, TextEncoderSpec
from lib_copier.models.unet import UNetConfig
from lib_copier.models.vae import VAEConfig

WEIGHTS = Path(__file__).with_name("builtin.safetensors")

BUILTIN = ModelConfig(
    family="sd1",
    unet=UNetConfig(
        model_channels=48,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        transformer_depth=(1, 1, 1),
        num_heads=4,
        context_dim=64,
        norm_groups=16,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=16),
    text_encoders=(TextEncoderSpec("clip", clip=CLIPTextConfig(width=64, layers=3, heads=4), layer="last"),),
    resolution=128,
)
