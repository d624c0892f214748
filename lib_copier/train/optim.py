"""Optimisers and learning-rate schedules by name; the optional ones only when their package is installed."""

from __future__ import annotations

import importlib
import math

import torch

from lib_copier.errors import CopierError
from lib_copier.train.config import OPTIONAL_OPTIMIZERS

# Optimisers whose update of each element depends on that element alone, so that the tensors they update may be
# concatenated (`train.master`) without changing a bit; AdamW8bit quantises its state in blocks that span elements, and
# keeps small tensors' state in 32 bits.
ELEMENTWISE = ("adamw", "lion")


def make_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        # On a GPU one fused update for all tensors (fewer launches). Not on the CPU: 10 % faster there, but in a
        # live A1111 test its SD2-v LoRAs drew all-NaN grids where torch's default optimizer's drew fine.
        on_gpu = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True if on_gpu else None)
    package, attribute, _ = OPTIONAL_OPTIMIZERS[name]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:  # present (the settings' check found it) but broken, e.g. built for another CUDA
        raise CopierError(f"optimizer {name}: its package {package} does not import ({exc})") from exc
    if package == "bitsandbytes":
        module = module.optim
    return getattr(module, attribute)(groups, weight_decay=weight_decay)


def lr_factor(step: int, total: int, scheduler: str, warmup: int) -> float:
    """The multiplier of the base learning rate at `step` (0-based): linear warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if scheduler == "linear":
        return 1 - progress
    return 1.0
