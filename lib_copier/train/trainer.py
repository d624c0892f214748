"""Train one LoRA on one image, or on a pair of images, over any Backend: the whole training step is `_step`.

`train_lora` is plain noise-prediction training (a copier, or a processed LoRA against fused copiers).
`train_pair` learns only what turns an original into its processed image, with one of two pair losses:
- "slider" (Concept Sliders' image sliders, Gandikota et al. 2023): the LoRA at +m must denoise the processed image
  and at -m the original, under the same noise and timestep, so that what the two images share cancels;
- "addift" (after TrainTrain's ADDifT mode, hako-mikan/sd-webui-traintrain): the LoRA at +m must predict, on the
  processed image, what the base model itself predicts on the original, and at -m the reverse, one direction per
  step. A pair of two equal images teaches either loss nothing.

Frozen LoRAs (the copier A when training a processed B) are fused into the weights for the run and the weights
are restored bit-exactly afterwards, like every hook and mode the run touched, whether it ends, fails or is
cancelled. Fusing is what the WebUI itself does with a LoRA at weight 1, so B learns against exactly the model
users will run it on, and it costs nothing per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from lib_copier.backends import Backend
from lib_copier.errors import CopierError, Interrupted
from lib_copier.lora.naming import by_key, is_text_encoder_key
from lib_copier.lora.network import LoRAModule, LoRANetwork
from lib_copier.models.generate import Txt2Img
from lib_copier.seeds import fixed_seed
from lib_copier.train.config import PAIR_LOSSES, TrainConfig, validate
from lib_copier.train.master import MasterWeights
from lib_copier.train.optim import ELEMENTWISE, lr_factor, make_optimizer


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
    notice: Callable[[str], None] | None = None  # a sentence for the user: the run starts over with checkpointing


@dataclass
class TrainResult:
    network: LoRANetwork
    steps: int  # steps actually taken
    seconds: float
    losses: list[float] = field(default_factory=list)
    config: TrainConfig | None = None  # what the run trained with: one that ran out of memory turns checkpointing on


class Cancelled(Interrupted):
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
    alpha, conv_alpha = config.alpha or float(config.rank), config.conv_alpha or float(config.conv_rank)  # kohya's 0
    network = LoRANetwork.create(targets, config.rank, alpha, config.conv_rank or None, conv_alpha, seed=config.seed)
    return network.to(backend.device, torch.float32)


def _autocast_dtype(backend: Backend, config: TrainConfig) -> torch.dtype | None:
    """The dtype the UNet computes in under autocast, or None where it computes without (on the CPU)."""
    if backend.device.type != "cuda" or config.mixed_precision == "no":
        return None
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16


def _autocast(backend: Backend, config: TrainConfig):
    dtype = _autocast_dtype(backend, config)
    return contextlib.nullcontext() if dtype is None else torch.autocast(backend.device.type, dtype=dtype)


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
    when the loss stops being finite or the GPU runs out of memory even with gradient checkpointing."""
    return _train(backend, [image], caption, config, frozen, callbacks, "plain")


def train_pair(
    backend: Backend,
    original: Image.Image,
    processed: Image.Image,
    caption: str | Sequence[str],
    config: TrainConfig,
    loss: str,
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """A LoRA that holds what turns `original` into `processed` (same size), with the pair `loss` ("slider" or
    "addift"): at a positive weight it moves toward the processed image, at a negative one toward the original."""
    if loss not in PAIR_LOSSES:
        raise CopierError(f"unknown pair loss {loss!r}; choose one of {', '.join(PAIR_LOSSES)}")
    if original.size != processed.size:
        raise CopierError(
            f"the processed image is {processed.width}x{processed.height} and its original "
            f"{original.width}x{original.height}; a pair must have one size"
        )
    return _train(backend, [processed, original], caption, config, (), callbacks, loss)


def _train(backend, images, caption, config: TrainConfig, frozen, callbacks: Callbacks | None, loss: str):
    """`_train_in_place`; a run that runs out of GPU memory starts over once with gradient checkpointing, which gives
    the same LoRA in less memory, and otherwise ends in one sentence."""
    validate(config)
    config = dataclasses.replace(config, seed=fixed_seed(config.seed))  # the run, its retry and its file share it
    if _autocast_dtype(backend, config) is None:  # what the file records: a CPU trains in fp32 whatever is set
        config = dataclasses.replace(config, mixed_precision="no")
    callbacks = callbacks or Callbacks()
    width, height = images[0].size
    n = config.batch_size
    where = f"training at {width}x{height} px with {n} timestep{'s' * (n != 1)} per step"
    for checkpointing in (True,) if config.gradient_checkpointing else (False, True):
        run = dataclasses.replace(config, gradient_checkpointing=checkpointing)
        try:
            return _train_in_place(backend, images, caption, run, frozen, callbacks, loss)
        except torch.cuda.OutOfMemoryError:  # every device's since torch 2.5; torch.OutOfMemoryError is newer than 2.1
            pass  # handled below, outside this block: the traceback holds the step's tensors until the block ends
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the memory the run held goes back to the WebUI (and to the run's second try)
        if not checkpointing and callbacks.notice:
            callbacks.notice(f"the GPU ran out of memory {where}; starting over with gradient checkpointing")
    raise CopierError(
        f"the GPU ran out of memory {where}, even with gradient checkpointing; lower batch_size or the training size"
    )


def _train_in_place(backend, images, caption, config: TrainConfig, frozen, callbacks: Callbacks, loss: str):
    layers, table = backend.lora_layers(), by_key(backend.lora_targets(conv=True))
    grad_flags = [(p, p.requires_grad) for _, p in backend.weights() if isinstance(p, torch.nn.Parameter)]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [p.requires_grad_(flag) for p, flag in grad_flags])
        for p, _ in grad_flags:
            p.requires_grad_(False)
        # First, so the frozen LoRAs are fused where the model computes (a host may keep it elsewhere between uses).
        stack.enter_context(backend.training_mode(config.train_text_encoder, config.gradient_checkpointing))
        for network, weight in frozen:
            stack.enter_context(network.fused(layers, table, weight))
        pixels = [image_tensor(image) for image in images]
        height, width = pixels[0].shape[-2:]
        # One stack of views per image; a step takes the same view of each (a pair stays aligned).
        latents = [backend.encode_images(torch.cat([p, p.flip(-1)]) if config.flip else p) for p in pixels]
        captions = [caption] if isinstance(caption, str) else list(caption)
        with torch.no_grad():
            cached = None
            if not config.train_text_encoder:
                cached = backend.encode_prompts(captions, height, width).to(backend.device, backend.dtype)
        network = _new_network(backend, config)
        stack.enter_context(network.applied(layers, table))
        return _loop(backend, network, _Batch(latents, captions, cached, (height, width), loss), config, callbacks)


@dataclass
class _Batch:
    """What every step draws from: the latents (one stack per image), the prompts, and the loss shape."""

    latents: list[torch.Tensor]
    captions: list[str]
    cached: object  # the prompts' conditioning, or None while the text encoder trains
    size: tuple[int, int]
    loss: str  # "plain", or one of PAIR_LOSSES


def _loop(backend, network, batch: _Batch, config: TrainConfig, callbacks: Callbacks) -> TrainResult:
    modules: list[list[LoRAModule]] = [[], []]  # the UNet's, the text encoders'
    for key, module in network.modules_by_key.items():
        modules[is_text_encoder_key(key)].append(module)
    parts = [(part, lr) for part, lr in zip(modules, (config.lr, config.text_lr), strict=True) if part]
    params = [p for part, _ in parts for m in part for p in m.parameters()]
    # An elementwise optimizer updates one fp32 master per group, cast to autocast's dtype once a pass (`train.master`).
    dtype = _autocast_dtype(backend, config) or torch.float32
    masters = [MasterWeights(part, dtype) for part, _ in parts] if config.optimizer in ELEMENTWISE else []
    tensors = [[w.master] for w in masters] or [[p for m in part for p in m.parameters()] for part, _ in parts]
    groups = [{"params": t, "lr": lr, "base_lr": lr} for t, (_, lr) in zip(tensors, parts, strict=True)]
    optimizer = make_optimizer(config.optimizer, groups, config.weight_decay)
    scaler = _grad_scaler() if backend.device.type == "cuda" and config.mixed_precision == "fp16" else None
    alphas = backend.alphas_cumprod().to(backend.device)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    result = TrainResult(network, 0, 0.0, config=config)
    start = time.perf_counter()

    def finish(step: int, loss: torch.Tensor, lr: float) -> None:
        """Book a step whose update is applied: read its loss (the only wait for the GPU) and report it."""
        value = loss.item()
        if not math.isfinite(value):
            raise CopierError(
                f"the training loss became {value} at step {step + 1}; lower the learning rate "
                "or use another mixed precision"
            )
        result.steps, result.seconds = step + 1, time.perf_counter() - start
        result.losses.append(value)
        if callbacks.progress:
            callbacks.progress(Progress(step + 1, config.steps, value, lr, result.seconds))

    # On a GPU a step's loss is read once the next step is queued, so that the GPU never waits for the host.
    lag = backend.device.type == "cuda"
    pending = None
    for step in range(config.steps):
        if callbacks.cancelled and callbacks.cancelled():
            if pending:
                finish(*pending)
            result.seconds = time.perf_counter() - start
            raise Cancelled(result)
        factor = lr_factor(step, config.steps, config.scheduler, config.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        optimizer.zero_grad(set_to_none=True)
        loss = _step(backend, network, batch, config, generator, alphas, step, scaler, masters)
        if scaler:
            scaler.unscale_(optimizer)
        for w in masters:
            w.share_gradients()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if pending:
            finish(*pending)
        pending = (step, loss, groups[0]["base_lr"] * factor)
        preview = callbacks.preview and config.preview_every and (step + 1) % config.preview_every == 0
        if preview or not lag:
            finish(*pending)
            pending = None
        if preview:
            request = callbacks.preview_request or Txt2Img(batch.captions[0], seed=config.seed)
            callbacks.preview(step + 1, backend.generate(request))
    if pending:
        finish(*pending)
    return result


def _grad_scaler():
    """fp16's loss scaler; torch before 2.3 (A1111 1.10 ships 2.1) has it only under torch.cuda.amp."""
    scaler = getattr(torch.amp, "GradScaler", None)
    return scaler("cuda") if scaler else torch.cuda.amp.GradScaler()


def _on(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU without making the host wait (a plain copy waits for all queued work)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _step(
    backend, network, batch: _Batch, config: TrainConfig, generator, alphas, step: int, scaler, masters
) -> torch.Tensor:
    """One batch: the noised latents, the model's predictions, the (Min-SNR weighted) MSE to their targets, and its
    gradients; returns the loss, still on the device. Each pass of a pair loss is differentiated while the LoRA is
    at that pass's weight and master slices: gradient checkpointing recomputes the forward pass in the backward one,
    and must see the same."""
    b = config.batch_size
    view = torch.randint(len(batch.latents[0]), (b,), generator=generator)
    n = len(batch.captions)
    pick = torch.randint(n, (b,), generator=generator) if n > 1 else torch.zeros(b, dtype=int)
    t = torch.randint(config.timestep_min, config.timestep_max, (b,), generator=generator)
    noise = torch.randn((b, *batch.latents[0].shape[1:]), generator=generator)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn(*noise.shape[:2], 1, 1, generator=generator)
    device = backend.device
    prompts = [batch.captions[i] for i in pick.tolist()]
    view, pick, t, noise = (_on(device, x) for x in (view, pick, t, noise))
    a = alphas[t].view(-1, 1, 1, 1)

    def predict(x0: torch.Tensor, weight: float) -> torch.Tensor:
        network.set_multiplier(weight)
        for w in masters:
            w.attach()
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(backend, config):
            if batch.cached is not None:
                cond = batch.cached[pick]
            else:
                cond = backend.encode_prompts(prompts, *batch.size)
            return backend.predict(noisy.to(backend.dtype), t, cond.to(backend.device, backend.dtype)).float()

    def target(x0: torch.Tensor) -> torch.Tensor:
        return noise if backend.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0

    def learn(out: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        error = (out - goal).pow(2).mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            snr = (a / (1 - a)).flatten()
            error = error * snr.clamp(max=config.min_snr_gamma) / (snr if backend.prediction == "eps" else snr + 1)
        loss = error.mean()
        (scaler.scale(loss) if scaler else loss).backward()
        return loss.detach()

    x = [stack[view] for stack in batch.latents]  # [the image], or [processed, original] for a pair
    m = config.pair_weight
    try:
        if batch.loss == "plain":
            return learn(predict(x[0], 1.0), target(x[0]))
        if batch.loss == "slider":  # the processed image at +m, the original at -m
            processed, original = x
            return learn(predict(processed, m), target(processed)) + learn(predict(original, -m), target(original))
        # addift: even steps the processed image at +m, odd steps the original at -m
        here, there, sign = (x[0], x[1], 1.0) if step % 2 == 0 else (x[1], x[0], -1.0)
        with torch.no_grad():
            goal = predict(there, 0.0)
        return learn(predict(here, sign * m), goal)
    finally:
        network.set_multiplier(1.0)
        for w in masters:
            w.detach()
