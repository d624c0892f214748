"""A1111's `--medvram` (and `--medvram-sdxl`), paused for the modules a job computes with.

Under it (modules/lowvram.py) the UNet, the text encoder(s) and the VAE wait on the CPU. A forward pre-hook named
`send_me_to_gpu` on each of them (or on a part of it) moves that unit to the GPU and the unit that was there,
`lowvram.module_in_gpu`, back to the CPU. That suits generation, which uses one unit at a time. Training uses the
UNet and, with the text encoder, both in every step, and a unit moved out between a step's forward and its backward
leaves autograd holding weights on the wrong device. So while a job trains, the units it uses stay on the GPU and
their hooks are taken off; the others keep moving as before.

Only `lowvram`'s module-level state and its hooks are used, so no module is moved here by any other means.
This module does not import the WebUI: the A1111 host passes its `lowvram` module in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

HOOK_NAME = "send_me_to_gpu"


@contextmanager
def kept_on_device(lowvram: Any, sd_model: nn.Module, modules: list[nn.Module]) -> Iterator[None]:
    """`modules` on the GPU for the whole block, their offloading hooks off; afterwards the hooks back, and what
    the block brought in back on the CPU, where --medvram's next use finds it."""
    if not getattr(sd_model, "lowvram", False):
        yield
        return
    suspended = _hooks_over(sd_model, modules)
    brought: list[nn.Module] = []
    try:
        for owner, _, hook in suspended:
            hook(owner, None)  # brings the unit in, sending out the one tracked before it
            if lowvram.module_in_gpu is not None:
                brought.append(lowvram.module_in_gpu)
            lowvram.module_in_gpu = None  # untracked, so the next unit brought in does not send it out
        yield
    finally:
        lowvram.send_everything_to_cpu()  # what the hooks brought in meanwhile (a preview's VAE)
        for unit in brought:
            lowvram.module_in_gpu = unit
            lowvram.send_everything_to_cpu()
        for owner, key, hook in suspended:
            owner._forward_pre_hooks[key] = hook


def _hooks_over(sd_model: nn.Module, modules: list[nn.Module]) -> list[tuple[nn.Module, int, Any]]:
    """The offloading hooks that move any of `modules` (hooked on it, on a part of it, or on a module holding it),
    taken off their modules."""
    inside = {id(m) for module in modules for m in module.modules()}
    suspended = []
    for owner in sd_model.modules():
        for key, hook in list(owner._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") != HOOK_NAME:
                continue
            if id(owner) in inside or any(any(m is module for m in owner.modules()) for module in modules):
                suspended.append((owner, key, hook))
                del owner._forward_pre_hooks[key]
    return suspended
