"""Every trainer setting in one typed, validated dataclass, and the presets from DESIGN.md.

Each field carries its range and help text (`field_info`), so the CLI, the WebUI's Advanced accordion and the HTTP
API are all built from this one place and validated by `validate`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from lib_copier.errors import CopierError, shown
from lib_copier.fields import check, setting, to_float

OPTIMIZERS = ("adamw", "adamw8bit", "lion")
# The optional optimisers: name → (module, class, the package pip installs it from).
OPTIONAL_OPTIMIZERS = {
    "adamw8bit": ("bitsandbytes", "AdamW8bit", "bitsandbytes"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}
SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("no", "bf16", "fp16")
PAIR_LOSSES = ("slider", "addift")  # trainer.train_pair's losses


@dataclass(frozen=True)
class TrainConfig:
    rank: int = setting(16, "LoRA rank (network_dim) of linear layers and 1x1 convolutions", 1, 1024)
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / rank; 0 means equal to rank", 0.0, 1024.0)
    conv_rank: int = setting(0, "rank of 3x3 convolutions; 0 leaves them out", 0, 1024)
    conv_alpha: float = setting(0.0, "alpha of 3x3 convolutions; 0 means equal to conv_rank", 0.0, 1024.0)
    steps: int = setting(500, "optimisation steps", 1, 100_000)
    lr: float = setting(1e-3, "UNet learning rate", 0.0, 1.0)
    train_text_encoder: bool = setting(False, "also train LoRA on the text encoder(s)")
    text_lr: float = setting(5e-5, "text encoder learning rate", 0.0, 1.0)
    optimizer: str = setting("adamw", "adamw (torch), adamw8bit (bitsandbytes), lion", choices=OPTIMIZERS)
    weight_decay: float = setting(0.01, "AdamW/Lion weight decay", 0.0, 1.0)
    scheduler: str = setting("cosine", "learning-rate schedule after warm-up", choices=SCHEDULERS)
    warmup_steps: int = setting(0, "linear warm-up steps", 0, 100_000)
    max_grad_norm: float = setting(1.0, "gradient clipping norm; 0 turns clipping off", 0.0, 1000.0)
    batch_size: int = setting(1, "images per step (the one image repeated)", 1, 64)
    flip: bool = setting(False, "randomly mirror the image left-right")
    timestep_min: int = setting(0, "lowest training timestep", 0, 999)
    timestep_max: int = setting(1000, "highest training timestep, exclusive", 1, 1000)
    min_snr_gamma: float = setting(0.0, "Min-SNR loss weighting gamma; 0 turns it off", 0.0, 100.0)
    noise_offset: float = setting(0.0, "per-channel constant noise added to the training noise", 0.0, 1.0)
    mixed_precision: str = setting("bf16", "autocast dtype on CUDA (the CPU computes in fp32)", choices=PRECISIONS)
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass: less memory, slower (turned on when the GPU runs short)"
    )
    pair_weight: float = setting(
        1.0, "slider and ADDifT: the LoRA's weight while it trains; weight 1 afterwards is 1 / this of it", 0.05, 10.0
    )
    seed: int = setting(
        0,
        "seed of the LoRA initialisation, the noise and the timesteps; -1: a random one, which the file records",
        -1,
        2**31 - 1,
    )
    preview_every: int = setting(0, "sample a preview every N steps; 0 turns previews off", 0, 100_000)
    save_on_cancel: bool = setting(False, "an interrupted run keeps what it has trained so far")


PRESETS: dict[str, dict[str, object]] = {
    # The beginner's note: fast, and enough for the built-in model and SD1.5 at 512 px.
    "quick": dict(rank=16, alpha=16.0, steps=500, lr=1e-3, scheduler="cosine", warmup_steps=0),
    # Quick's rank in a quarter of the steps, each on four timesteps, at three times the rate: on the built-in model the
    # copier is as close to the original as Quick's (closer under other prompts), its extraction a little rougher.
    # Faster where a step's size costs little (a GPU with memory to spare, a small model); about as long as Quick
    # where compute bounds it (a CPU at 512 px).
    "fast": dict(rank=16, alpha=16.0, steps=125, lr=3e-3, batch_size=4, scheduler="cosine", warmup_steps=0),
    # The original write-up; the processed LoRA trains for 4000 steps and is resized to rank 8 by the recipe.
    "thorough": dict(rank=64, alpha=32.0, steps=3000, lr=1e-4, scheduler="cosine", warmup_steps=500),
}


def field_info() -> dict[str, dict]:
    """Name → {type, default, help, min, max, choices}, for building forms and CLI options."""
    info = {}
    for f in dataclasses.fields(TrainConfig):
        info[f.name] = {"type": type(f.default), "default": f.default, **f.metadata}
    return info


def validate(config: TrainConfig) -> TrainConfig:
    """The config itself, or a CopierError naming the first setting out of range."""
    check(config, lambda name: f"setting {name}")
    if config.timestep_min >= config.timestep_max:
        raise CopierError(f"timestep_min ({config.timestep_min}) must be below timestep_max ({config.timestep_max})")
    if config.lr == 0:
        raise CopierError("setting lr is 0; it must be above 0, or the LoRA learns nothing")
    if config.warmup_steps > config.steps:
        raise CopierError(
            f"warmup_steps ({config.warmup_steps}) must be at most steps ({config.steps}), or the learning rate never "
            "reaches its setting"
        )
    if config.optimizer in OPTIONAL_OPTIMIZERS:
        module, _, package = OPTIONAL_OPTIMIZERS[config.optimizer]
        if importlib.util.find_spec(module) is None:
            raise CopierError(
                f"optimizer {config.optimizer} needs the {package} package, which this Python does not have: "
                f"install it (pip install {package}) or choose adamw"
            )
    return config


def make_config(preset: str = "quick", **overrides) -> TrainConfig:
    """A preset with overrides, validated; unknown names are an error, not ignored."""
    if preset not in PRESETS:
        raise CopierError(f"unknown preset {shown(preset)}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise CopierError(f"unknown trainer setting {shown(unknown[0])}")
    values = {**PRESETS[preset], **overrides}
    floats = {n for n, meta in field_info().items() if meta["type"] is float}
    values = {k: to_float(v) if k in floats else v for k, v in values.items()}
    return validate(TrainConfig(**values))
