"""The whole Stable Diffusion model, laid out like LDM/SGM so `state_dict()` keys equal checkpoint keys.

SD1/SD2: `model.diffusion_model`, `first_stage_model`, `cond_stage_model`.
SDXL:    `model.diffusion_model`, `first_stage_model`, `conditioner.embedders.{0,1}`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lib_copier.models.configs import FAMILIES, ModelConfig, TextEncoderSpec
from lib_copier.models.sampling import Schedule, scaled_linear_alphas_cumprod
from lib_copier.models.text_encoders import CLIPEmbedder, OpenCLIPEmbedder
from lib_copier.models.unet import UNetModel, timestep_embedding
from lib_copier.models.vae import AutoencoderKL


@dataclass
class Conditioning:
    """What the UNet is conditioned on: cross-attention context and, for SDXL, the vector `y`."""

    context: torch.Tensor
    vector: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> Conditioning:
        vector = None if self.vector is None else self.vector.to(device=device, dtype=dtype)
        return Conditioning(self.context.to(device=device, dtype=dtype), vector)

    def __getitem__(self, index: slice) -> Conditioning:
        return Conditioning(self.context[index], None if self.vector is None else self.vector[index])

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        vectors = [c.vector for c in items]
        vector = None if vectors[0] is None else torch.cat(vectors)
        return Conditioning(torch.cat([c.context for c in items]), vector)


class DiffusionWrapper(nn.Module):
    """LDM's wrapper level: it exists only so the UNet's keys start with `model.diffusion_model.`."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class Conditioner(nn.Module):
    """SGM's GeneralConditioner, reduced to the text embedders that carry weights."""

    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


def _embedder(spec: TextEncoderSpec) -> nn.Module:
    if spec.kind == "clip":
        return CLIPEmbedder(spec.clip, layer=spec.layer, final_norm=spec.final_norm)
    if spec.kind == "openclip":
        return OpenCLIPEmbedder(spec.openclip, layer=spec.layer, final_norm=bool(spec.final_norm))
    raise ValueError(f"unknown text encoder kind {spec.kind!r}")


def size_embedding(batch: int, height: int, width: int, device=None) -> torch.Tensor:
    """SDXL's size/crop conditioning: original size, crop (0, 0) and target size, each pair embedded at 256."""
    values = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return timestep_embedding(values, 256).reshape(1, -1).expand(batch, -1)


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        embedders = [_embedder(spec) for spec in config.text_encoders]
        if len(embedders) == 1:
            self.cond_stage_model = embedders[0]
        else:
            self.conditioner = Conditioner(embedders)
        # A plain attribute, not a buffer: it is not part of the weights and must survive meta-device loading.
        self.schedule = Schedule(scaled_linear_alphas_cumprod(**config.schedule))

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_embedders(self) -> list[nn.Module]:
        return [self.cond_stage_model] if hasattr(self, "cond_stage_model") else list(self.conditioner.embedders)

    def unread_parameters(self) -> list[str]:
        """Names (or prefixes) of the text encoders' parameters no output reads (`OpenCLIPEmbedder.unread`), which
        a checkpoint may lack."""
        pooled = self.config.unet.adm_in_channels is not None  # SDXL's UNet reads the pooled text embedding
        paths = {id(module): name for name, module in self.named_modules()}
        return [
            f"{paths[id(embedder)]}.{name}"
            for embedder in self.text_embedders
            if isinstance(embedder, OpenCLIPEmbedder)
            for name in embedder.unread(pooled)
        ]

    @property
    def latent_channels(self) -> int:
        return self.config.unet.in_channels

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.vae.ch_mult) - 1)

    def encode_prompts(self, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
        contexts, pooled = [], None
        for embedder in self.text_embedders:
            context, pooled_here = embedder.encode(prompts)
            contexts.append(context)
            pooled = pooled_here if pooled_here is not None else pooled
        context = torch.cat(contexts, dim=-1)
        if self.config.unet.adm_in_channels is None:
            return Conditioning(context)
        height = height or self.config.resolution
        width = width or self.config.resolution
        vector = torch.cat([pooled, size_embedding(len(prompts), height, width, pooled.device).to(pooled.dtype)], dim=1)
        return Conditioning(context, vector)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents; a generator samples the posterior, none takes its mean."""
        posterior = self.vae.encode(images)
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        return latents * self.config.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.config.scale_factor)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output (eps or v, per `config.prediction`) for noisy latents at timestep t."""
        return self.unet(x, t, cond.context, cond.vector)


def build_model(
    config: ModelConfig | str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
) -> StableDiffusion:
    """A model with random weights from `seed` (reproducible on CPU), or uninitialised on the meta device."""
    if isinstance(config, str):
        if config not in FAMILIES:
            raise ValueError(f"unknown model family {config!r}; choose one of {', '.join(FAMILIES)}")
        config = FAMILIES[config]
    if str(device) == "meta":
        with torch.device("meta"):
            return StableDiffusion(config)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = StableDiffusion(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
