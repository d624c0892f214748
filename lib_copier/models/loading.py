"""Which model runs when the user names none, and the device/dtype choices every command shares."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lib_copier.errors import CopierError
from lib_copier.models.builtin.config import WEIGHTS
from lib_copier.models.checkpoint import TensorSource, detect_config, load_checkpoint
from lib_copier.models.configs import ModelConfig
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
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if device.type == "cpu" and dtype == torch.float16 and not cpu_computes_fp16():
        raise CopierError(f"this torch ({torch.__version__}) cannot compute fp16 on a CPU; use --dtype bf16 or fp32")
    return dtype


def cpu_computes_fp16() -> bool:
    """Whether this torch has the CPU fp16 kernels a model needs (LayerNorm's came in torch 2.2)."""
    try:
        torch.nn.functional.layer_norm(torch.zeros(1, 2, dtype=torch.float16), (2,))
    except RuntimeError:
        return False
    return True


def _weights(path: str | os.PathLike | None) -> str | os.PathLike:
    """The file of the checkpoint at `path`, or of the built-in model when `path` is None."""
    if path is None and not WEIGHTS.exists():
        raise CopierError(
            f"the built-in model's weights are missing ({WEIGHTS}); reinstall, or rebuild them with "
            "python -m lib_copier.models.builtin.train"
        )
    return WEIGHTS if path is None else path


def read_config(path: str | os.PathLike | None = None) -> ModelConfig:
    """The config of the checkpoint at `path` (None: the built-in model) from its header, without its weights:
    what loading it would refuse for its file or its keys is said here, at once."""
    return detect_config(TensorSource(Path(_weights(path))))


def load_model(
    path: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto", prediction: str | None = None
) -> StableDiffusion:
    """The checkpoint at `path`, or the built-in model when `path` is None."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    return load_checkpoint(_weights(path), dtype=dt, device=dev, prediction=prediction)
