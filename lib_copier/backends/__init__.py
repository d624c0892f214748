"""What the trainer and the recipes need from a model, whoever owns it.

`standalone.StandaloneBackend` wraps our own `lib_copier.models` stack; the WebUI backend wraps the host's loaded
model. Both hand out the host's modules in place: nothing here copies weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from PIL import Image
from torch import nn

from lib_copier.lora.naming import Target
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.generate import Txt2Img
from lib_copier.models.sd_model import Conditioning

StepProgress = Callable[[int, int], None]


class Backend(Protocol):
    family: str  # "sd1", "sd2" or "sdxl"
    prediction: str  # "eps" or "v"
    resolution: int  # the native image side
    device: torch.device
    dtype: torch.dtype  # the base weights' dtype

    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule, 1000 values, float32 on the CPU."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images in [-1, 1] (BCHW) → scaled latents (the posterior's mean), float32 on `device`."""

    def encode_prompts(self, prompts: list[str], height: int, width: int) -> Conditioning:
        """Prompts → what the UNet is conditioned on (SDXL: context + pooled/size vector); differentiable when the
        text encoders are being trained."""

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output (eps or v) for noisy latents `x` at timesteps `t`."""

    def lora_layers(self) -> Mapping[str, nn.Module]:
        """Every module by its LDM path (`model.diffusion_model.…`, `cond_stage_model.…`): where LoRA attaches."""

    def lora_targets(self, conv: bool = False) -> list[Target]:
        """The layers a LoRA for this model may have, with kohya keys."""

    def unet(self) -> nn.Module:
        """The denoiser, for train/eval mode and gradient checkpointing."""

    def text_encoders(self) -> list[nn.Module]:
        """The text encoders, for train/eval mode."""

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every base weight by name: what must be bit-identical after a run."""

    def training_mode(self, text_encoders: bool, gradient_checkpointing: bool) -> AbstractContextManager[None]:
        """Inside the block the UNet (and the text encoders when they train) are in training mode, with gradient
        checkpointing if asked; in UNet-only training the VAE and text encoders may leave the device. Modes,
        devices and flags are as before after it."""

    def generate(
        self,
        request: Txt2Img,
        loras: list[tuple[LoRANetwork, float]] = (),
        progress: StepProgress | None = None,
    ) -> Image.Image:
        """Text to image with LoRAs attached at the given weights, and no trace of them afterwards."""
