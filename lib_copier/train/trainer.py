"""Train one LoRA on one image, over any Backend: the whole training step is `_step`, on one screen.

Frozen LoRAs (the copier A when training a processed B) are fused into the weights for the run and the weights
are restored bit-exactly afterwards, like every hook and mode the run touched, whether it ends, fails or is
cancelled. Fusing is what the WebUI itself does with a LoRA at weight 1, so B learns against exactly the model
users will run it on, and it costs nothing per step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from lib_copier.backends import Backend
from lib_copier.errors import CopierError
from lib_copier.lora.naming import by_key, is_text_encoder_key
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.generate import Txt2Img
from lib_copier.train.config import TrainConfig, validate
from lib_copier.train.optim import lr_factor, make_optimizer


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    elapsed: float

    @property
    def eta(self) -> float:
        return self.elapsed / max(1, self.step) * (self.total - self.step)


@dataclass
class Callbacks:
    progress: Callable[[Progress], None] | None = None
    cancelled: Callable[[], bool] | None = None
    preview: Callable[[int, Image.Image], None] | None = None
    preview_request: Txt2Img | None = None  # what to draw every `preview_every` steps
    counted: Callable[[int, int], None] | None = None  # work between trainings (SVD merges): modules done, in all


@dataclass
class TrainResult:
    network: LoRANetwork
    steps: int  # steps actually taken
    seconds: float
    losses: list[float] = field(default_factory=list)


class Cancelled(CopierError):
    """The run was interrupted between steps; `result` holds what it had trained."""

    def __init__(self, result: TrainResult):
        super().__init__(f"training was interrupted at step {result.steps}")
        self.result = result


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image → a 1x3xHxW tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def _new_network(backend: Backend, config: TrainConfig) -> LoRANetwork:
    targets = backend.lora_targets(conv=config.conv_rank > 0)
    targets = [t for t in targets if config.train_text_encoder or not is_text_encoder_key(t.key)]
    conv_alpha = config.conv_alpha or float(config.conv_rank)
    network = LoRANetwork.create(
        targets, config.rank, config.alpha, config.conv_rank or None, conv_alpha, seed=config.seed
    )
    return network.to(backend.device, torch.float32)


def _autocast(backend: Backend, config: TrainConfig):
    if backend.device.type != "cuda" or config.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def train_lora(
    backend: Backend,
    image: Image.Image,
    caption: str | Sequence[str],
    config: TrainConfig,
    frozen: list[tuple[LoRANetwork, float]] = (),
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """A LoRA that makes `backend` (+ `frozen` LoRAs) draw `image` for `caption`.

    With several captions each sample of each step takes one at random: the LoRA learns to draw `image` whatever
    the prompt, which is what a copier must do on a model whose prompts pull hard.

    Raises `Cancelled` (carrying the partial result) when `callbacks.cancelled()` turns true, and CopierError
    when the loss stops being finite."""
    validate(config)
    callbacks = callbacks or Callbacks()
    layers, table = backend.lora_layers(), by_key(backend.lora_targets(conv=True))
    grad_flags = [(p, p.requires_grad) for _, p in backend.weights() if isinstance(p, torch.nn.Parameter)]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [p.requires_grad_(flag) for p, flag in grad_flags])
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for network, weight in frozen:
            stack.enter_context(network.fused(layers, table, weight))
        pixels = image_tensor(image)
        height, width = pixels.shape[-2:]
        views = torch.cat([pixels, pixels.flip(-1)]) if config.flip else pixels
        latents = backend.encode_images(views)
        captions = [caption] if isinstance(caption, str) else list(caption)
        with torch.no_grad():
            cached = None if config.train_text_encoder else backend.encode_prompts(captions, height, width)
        network = _new_network(backend, config)
        stack.enter_context(network.applied(layers, table))
        stack.enter_context(backend.training_mode(config.train_text_encoder, config.gradient_checkpointing))
        return _loop(backend, network, latents, captions, cached, config, callbacks, (height, width))


def _loop(backend, network, latents, captions, cached, config: TrainConfig, callbacks: Callbacks, size) -> TrainResult:
    groups = [{"params": [], "lr": config.lr}, {"params": [], "lr": config.text_lr}]
    for key, module in network.modules_by_key.items():
        groups[is_text_encoder_key(key)]["params"] += list(module.parameters())
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = make_optimizer(config.optimizer, groups, config.weight_decay)
    scaler = (
        torch.amp.GradScaler("cuda") if backend.device.type == "cuda" and config.mixed_precision == "fp16" else None
    )
    alphas = backend.alphas_cumprod().to(backend.device)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    params = [p for g in groups for p in g["params"]]
    result = TrainResult(network, 0, 0.0)
    start = time.perf_counter()
    for step in range(config.steps):
        if callbacks.cancelled and callbacks.cancelled():
            result.seconds = time.perf_counter() - start
            raise Cancelled(result)
        factor = lr_factor(step, config.steps, config.scheduler, config.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        loss = _step(backend, latents, captions, cached, config, generator, alphas, size)
        if not torch.isfinite(loss):
            raise CopierError(
                f"the training loss became {loss.item()} at step {step + 1}; lower the learning rate "
                "or use another mixed precision"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        result.steps, result.seconds = step + 1, time.perf_counter() - start
        result.losses.append(loss.item())
        if callbacks.progress:
            lr = groups[0]["base_lr"] * factor
            callbacks.progress(Progress(step + 1, config.steps, result.losses[-1], lr, result.seconds))
        if callbacks.preview and config.preview_every and (step + 1) % config.preview_every == 0:
            request = callbacks.preview_request or Txt2Img(captions[0], seed=config.seed)
            callbacks.preview(step + 1, backend.generate(request))
    return result


def _step(backend, latents, captions, cached, config: TrainConfig, generator, alphas, size) -> torch.Tensor:
    """One batch: the noised latent, the model's prediction, the (Min-SNR weighted) MSE to its target."""
    b = config.batch_size
    x0 = latents[torch.randint(len(latents), (b,), generator=generator)]
    pick = torch.randint(len(captions), (b,), generator=generator) if len(captions) > 1 else torch.zeros(b, dtype=int)
    t = torch.randint(config.timestep_min, config.timestep_max, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn(*x0.shape[:2], 1, 1, generator=generator)
    t, noise = t.to(backend.device), noise.to(backend.device)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if backend.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    with _autocast(backend, config):
        if cached is not None:
            cond = cached[pick]
        else:
            cond = backend.encode_prompts([captions[i] for i in pick.tolist()], *size)
        cond = cond.to(backend.device, backend.dtype)
        out = backend.predict(noisy.to(backend.dtype), t, cond)
    error = (out.float() - target).pow(2).mean(dim=(1, 2, 3))
    if config.min_snr_gamma:
        snr = (a / (1 - a)).flatten()
        weight = snr.clamp(max=config.min_snr_gamma) / (snr if backend.prediction == "eps" else snr + 1)
        error = error * weight
    return error.mean()
