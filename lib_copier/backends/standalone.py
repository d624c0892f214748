"""The Backend over our own `lib_copier.models` stack (the CLI, the demo, the tests)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from PIL import Image
from torch import nn

from lib_copier.backends import StepProgress
from lib_copier.lora.naming import Target, lora_targets
from lib_copier.lora.network import LoRANetwork, all_applied
from lib_copier.models.generate import Txt2Img, generate_batch
from lib_copier.models.sd_model import Conditioning, StableDiffusion


class StandaloneBackend:
    def __init__(self, model: StableDiffusion):
        self.model = model
        self.family = model.config.family
        self.prediction = model.config.prediction
        self.resolution = model.config.resolution
        param = next(model.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._layers = dict(model.named_modules())
        self._offloaded: list[nn.Module] = []  # what training_mode moved off the device

    def alphas_cumprod(self) -> torch.Tensor:
        return self.model.schedule.alphas_cumprod

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.vae.parameters())
        return self.model.encode_images(images.to(param.device, param.dtype)).float().to(self.device)

    def encode_prompts(self, prompts: list[str], height: int, width: int) -> Conditioning:
        return self.model.encode_prompts(prompts, height, width)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.model.predict(x, t, cond)

    def lora_layers(self) -> Mapping[str, nn.Module]:
        return self._layers

    def lora_targets(self, conv: bool = False) -> list[Target]:
        shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
        return lora_targets(shapes, self.family, conv=conv)

    def unet(self) -> nn.Module:
        return self.model.unet

    def text_encoders(self) -> list[nn.Module]:
        return self.model.text_embedders

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.model.state_dict().items())

    @contextmanager
    def training_mode(self, text_encoders: bool, gradient_checkpointing: bool) -> Iterator[None]:
        unet, embedders = self.model.unet, self.model.text_embedders
        training = [unet, *(embedders if text_encoders else [])]
        before = [(m, m.training) for m in training]
        checkpointing = unet.gradient_checkpointing
        # Offloading only pays off on an accelerator: on the CPU they would go where they already are.
        offload = [] if text_encoders or self.device.type == "cpu" else [self.model.vae, *embedders]
        try:
            for module in training:
                module.train()
            unet.gradient_checkpointing = gradient_checkpointing
            for module in offload:
                module.to("cpu")
            self._offloaded = offload
            yield
        finally:
            self._offloaded = []
            for module in offload:
                module.to(self.device)
            unet.gradient_checkpointing = checkpointing
            for module, mode in before:
                module.train(mode)

    def generate(
        self,
        request: Txt2Img,
        loras: list[tuple[LoRANetwork, float]] = (),
        progress: StepProgress | None = None,
    ) -> Image.Image:
        return self.generate_batch([request], loras, progress)[0]

    def generate_batch(
        self,
        requests: Sequence[Txt2Img],
        loras: list[tuple[LoRANetwork, float]] = (),
        progress: StepProgress | None = None,
    ) -> list[Image.Image]:
        """Several requests of one size and sampler in one batch (on a CPU two to three times faster)."""
        table = {t.key: t for t in self.lora_targets(conv=True)}
        with ExitStack() as stack:
            # A preview during UNet-only training needs the offloaded VAE and text encoders back for a moment.
            for module in self._offloaded:
                module.to(self.device)
                stack.callback(module.to, "cpu")
            stack.enter_context(all_applied(loras, self._layers, table))
            return generate_batch(self.model, requests, progress)
