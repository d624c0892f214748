"""Which model runs when the user names none, and the device/dtype choices every command shares."""

from __future__ import annotations

import os

import torch

from lib_copier.errors import CopierError
from lib_copier.models.builtin.config import WEIGHTS
from lib_copier.models.checkpoint import load_checkpoint
from lib_copier.models.sd_model import StableDiffusion


def pick_device(name: str = "auto") -> torch.device:
    """The device named (`auto`: the GPU when there is one), or a CopierError if this machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CopierError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    kind = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    if device.type != "cpu" and not (hasattr(kind, "is_available") and kind.is_available()):
        raise CopierError(f"device {name!r} asked for, but this torch sees no such device; use cpu")
    if device.index is not None and hasattr(kind, "device_count") and device.index >= kind.device_count():
        raise CopierError(f"device {name!r} asked for, but this machine has {kind.device_count()} of them")
    return device


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    if name == "auto":
        # Half precision is slow or unsupported for several ops on CPU.
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_model(
    path: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto", prediction: str | None = None
) -> StableDiffusion:
    """The checkpoint at `path`, or the built-in model when `path` is None."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if path is None:
        if not WEIGHTS.exists():
            raise CopierError(
                f"the built-in model's weights are missing ({WEIGHTS}); reinstall, or rebuild them with "
                "python -m lib_copier.models.builtin.train"
            )
        path = WEIGHTS
    return load_checkpoint(path, dtype=dt, device=dev, prediction=prediction)
