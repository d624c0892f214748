"""Text to image on a `StableDiffusion`: classifier-free guidance around the samplers, seeds reproducible on CPU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lib_copier.fields import setting
from lib_copier.models.configs import ModelConfig
from lib_copier.models.sampling import SAMPLERS, Progress, sample
from lib_copier.models.sd_model import Conditioning, StableDiffusion
from lib_copier.seeds import fixed_seed


def initial_noise(model: StableDiffusion, seed: int, height: int, width: int, batch: int = 1) -> torch.Tensor:
    """Noise drawn on the CPU so a seed gives the same image on every device."""
    shape = (batch, model.latent_channels, height // model.downscale, width // model.downscale)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] BCHW → 8-bit RGB images."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def check_size(config: ModelConfig, height: int, width: int) -> None:
    # The VAE halves the image once per level after its first, and the UNet the latent: sizes must survive that
    # without rounding.
    multiple = 2 ** (len(config.vae.ch_mult) - 1) * 2 ** (len(config.unet.channel_mult) - 1)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise ValueError(f"{name} {value} must be a positive multiple of {multiple} for this model")


MAX_SIDE = 2048  # a generated image's largest side: SDXL's native 1024 twice over
MAX_STEPS = 150
MAX_PROMPT = 10_000  # characters: far past what a text encoder reads, short of megabytes


@dataclass(frozen=True)
class Txt2Img:
    """One text-to-image request; width/height None mean the model's native resolution."""

    prompt: str = setting(help="what to draw", hi=MAX_PROMPT)
    negative: str = setting("", "what not to draw", hi=MAX_PROMPT)
    seed: int = setting(0, "noise seed; -1: a random one", -1, 2**32 - 1)
    steps: int = setting(20, "sampling steps", 1, MAX_STEPS)
    cfg: float = setting(7.0, "classifier-free guidance scale", 0.0, 30.0)
    width: int | None = setting(None, "image width in pixels (default: the model's native side)", 64, MAX_SIDE)
    height: int | None = setting(None, "image height in pixels (default: the model's native side)", 64, MAX_SIDE)
    sampler: str = setting("euler", "sampler", choices=SAMPLERS)


def _batch_key(request: Txt2Img) -> tuple:
    return request.width, request.height, request.steps, request.cfg, request.sampler


@torch.no_grad()
def generate_latents(
    model: StableDiffusion, requests: Txt2Img | Sequence[Txt2Img], progress: Progress | None = None
) -> torch.Tensor:
    """Latents for one request, or for several in one batch (each the same as drawn alone, up to float rounding);
    a batch must share size, steps, guidance and sampler."""
    requests = [requests] if isinstance(requests, Txt2Img) else list(requests)
    first, n = requests[0], len(requests)
    if any(_batch_key(r) != _batch_key(first) for r in requests):
        raise ValueError("the requests of one batch must share size, steps, cfg and sampler")
    width = first.width or model.config.resolution
    height = first.height or model.config.resolution
    check_size(model.config, height, width)
    cfg = first.cfg
    param = next(model.unet.parameters())
    texts = [r.prompt for r in requests] + [r.negative for r in requests]
    cond = model.encode_prompts(texts, height, width).to(param.device, param.dtype)
    cond, uncond = cond[:n], cond[n:]

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cfg == 1.0:
            return model.predict(x.to(param.dtype), t, cond).float()
        both = model.predict(torch.cat([x, x]).to(param.dtype), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
        c, u = both.float().chunk(2)
        return u + cfg * (c - u)

    noise = torch.cat([initial_noise(model, fixed_seed(r.seed), height, width) for r in requests]).to(param.device)
    return sample(first.sampler, predict, noise, model.schedule, first.steps, model.config.prediction, progress)


@torch.no_grad()
def generate_batch(
    model: StableDiffusion, requests: Sequence[Txt2Img], progress: Progress | None = None
) -> list[Image.Image]:
    """Several images in one batch (on a CPU two to three times faster than one call each)."""
    latents = generate_latents(model, requests, progress)
    param = next(model.vae.parameters())
    return to_pil(model.decode_latents(latents.to(param.device, param.dtype)))


def generate(model: StableDiffusion, request: Txt2Img, progress: Progress | None = None) -> Image.Image:
    return generate_batch(model, [request], progress)[0]
