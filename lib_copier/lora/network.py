"""Attaching LoRA modules to a model's named layers: as a trainable/frozen side path, or fused into the weights.

Works on any `nn.Module` tree whose module paths follow the naming table (ours or the WebUI's). Linear and conv
layers get a forward hook that adds `multiplier * scale * up(down(x))` to their output. Layers whose weight is read
directly by a parent (OpenCLIP's `nn.MultiheadAttention` reads `in_proj_weight` and `out_proj.weight` without
calling `out_proj`) get a parametrisation `W + delta` instead. Both are removed without a trace. Fusing adds the
delta into the weights and keeps a copy of the originals, so un-fusing restores them bit for bit (never by
subtracting, which would not round-trip in fp16).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lib_copier.errors import CopierError
from lib_copier.lora.naming import Target
from lib_copier.lora.weights import LoRAWeights


class LoRAModule(nn.Module):
    """down/up/alpha for one target, with kohya's initialisation (down Kaiming-uniform, up zero)."""

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise CopierError(f"LoRA rank must be positive, got {rank}")
        out_dim, in_dim = shape[:2]
        if len(shape) == 4:
            self.lora_down = nn.Conv2d(in_dim, rank, tuple(shape[2:]), bias=False)
            self.lora_up = nn.Conv2d(rank, out_dim, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_dim, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_dim, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        # alpha / rank as a Python number: reading the buffer on a GPU would wait for the GPU at every forward.
        self.scale = float(alpha) / rank
        self.multiplier = 1.0
        # A training pass's (down, up): slices of the optimizer's master tensor (`train.master`), or None: the weights.
        self.step_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def _weights(self, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) to compute with: the pass's slices if any, under autocast in its dtype (autocast casts the
        weights to the same values), outside it in the weights' own precision."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if self.step_weights is None:
            return down, up
        if _autocast_on(device_type):
            return self.step_weights
        return self.step_weights[0].to(down.dtype), self.step_weights[1].to(up.dtype)

    def side_path(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scale * up(down(x)), with the layer's own stride and padding for convolutions.

        Under autocast the input is left in the autocast dtype (autocast casts fp32 LoRA weights to it once per
        forward); otherwise it is computed in the LoRA's dtype."""
        down, up = self._weights(x.device.type)
        if not _autocast_on(x.device.type):
            x = x.to(down.dtype)
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
            h = F.conv2d(h, up)
        else:
            h = F.linear(F.linear(x, down), up)
        factor = self.multiplier * self.scale
        return h if factor == 1.0 else h * factor

    def delta(self) -> torch.Tensor:
        """multiplier * scale * up @ down, shaped like the target weight (keeps the autograd graph)."""
        down, up = self._weights(self.lora_down.weight.device.type)
        up = up.flatten(1)
        return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * (self.multiplier * self.scale)

    def to_weights(self) -> LoRAWeights:
        return LoRAWeights(
            self.lora_down.weight.detach().clone(), self.lora_up.weight.detach().clone(), float(self.alpha)
        )

    @classmethod
    def from_weights(cls, weights: LoRAWeights) -> LoRAModule:
        module = cls(weights.shape, weights.rank, weights.alpha)
        with torch.no_grad():
            module.lora_down.weight.copy_(weights.down.reshape(module.lora_down.weight.shape))
            module.lora_up.weight.copy_(weights.up.reshape(module.lora_up.weight.shape))
        return module


class _AddDelta(nn.Module):
    """Parametrisation W -> W + delta of the LoRA modules that cover row blocks of W (q/k/v, or all of it)."""

    def __init__(self, parts: list[tuple[LoRAModule, Target]]):
        super().__init__()
        self.loras = nn.ModuleList([lora for lora, _ in parts])
        self.targets = [target for _, target in parts]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(weight)
        for lora, target in zip(self.loras, self.targets, strict=True):
            delta[target.rows] += _shaped(lora, target).to(weight.dtype)
        return weight + delta


def _shaped(lora: LoRAModule, target: Target) -> torch.Tensor:
    return lora.delta().reshape(target.shape)


class LoRANetwork(nn.Module):
    """A set of LoRA modules keyed by kohya key; `modules_by_key` is an `nn.ModuleDict` so `.parameters()` trains."""

    def __init__(self, modules: Mapping[str, LoRAModule]):
        super().__init__()
        self.modules_by_key = nn.ModuleDict(dict(modules))

    @classmethod
    def create(
        cls,
        targets: Iterable[Target],
        rank: int,
        alpha: float,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        seed: int = 0,
    ) -> LoRANetwork:
        """Fresh modules for `targets`; kxk convolutions take `conv_rank`/`conv_alpha` and are skipped without it."""
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # initialisation must not depend on what ran before
        try:
            modules = {}
            for t in targets:
                if t.conv and conv_rank is None:
                    continue
                r, a = (conv_rank, conv_alpha if conv_alpha is not None else conv_rank) if t.conv else (rank, alpha)
                modules[t.key] = LoRAModule(t.shape, r, a)
        finally:
            torch.random.set_rng_state(generator_state)
        return cls(modules)

    @classmethod
    def from_weights(cls, weights: Mapping[str, LoRAWeights]) -> LoRANetwork:
        return cls({key: LoRAModule.from_weights(w) for key, w in weights.items()})

    def to_weights(self) -> dict[str, LoRAWeights]:
        return {key: module.to_weights() for key, module in self.modules_by_key.items()}

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.modules_by_key.values():
            module.multiplier = float(multiplier)

    def _resolve(self, layers: Mapping[str, nn.Module], table: Mapping[str, Target]):
        """(lora, target, layer, parent) for every module, with one clear error for keys the model lacks."""
        missing = [key for key in self.modules_by_key if key not in table]
        if missing:
            raise CopierError(
                f"{len(missing)} LoRA modules match no layer of this model (first: {missing[0]}); "
                "the LoRA is for another model family or architecture"
            )
        resolved = []
        for key, lora in self.modules_by_key.items():
            target = table[key]
            layer = layers.get(target.path)
            if layer is None:
                raise CopierError(f"the model has no layer {target.path} for LoRA module {key}")
            if math.prod(lora.lora_up.weight.shape[:1]) * math.prod(lora.lora_down.weight.shape[1:]) != math.prod(
                target.shape
            ):
                raise CopierError(f"LoRA module {key} does not fit layer {target.path} of shape {target.shape}")
            parent = layers.get(target.path.rpartition(".")[0])
            resolved.append((lora, target, layer, parent))
        return resolved

    @contextmanager
    def applied(self, layers: Mapping[str, nn.Module], table: Mapping[str, Target], multiplier: float = 1.0):
        """Inside the block the model computes with the LoRA as a side path; afterwards no hook or parametrisation
        is left. `layers` is `dict(model.named_modules())` (or the WebUI's equivalent)."""
        self.set_multiplier(multiplier)
        hooks = []
        weight_parts: dict[tuple[int, str], tuple[nn.Module, list]] = {}
        orders: dict[int, tuple[nn.Module, list[str]]] = {}
        try:
            for lora, target, layer, parent in self._resolve(layers, table):
                if target.param != "weight" or isinstance(parent, nn.MultiheadAttention):
                    weight_parts.setdefault((id(layer), target.param), (layer, []))[1].append((lora, target))
                else:
                    hooks.append(layer.register_forward_hook(_side_path_hook(lora)))
            for (_, param), (layer, parts) in weight_parts.items():
                orders.setdefault(id(layer), (layer, list(layer._parameters)))
                parametrize.register_parametrization(layer, param, _AddDelta(parts), unsafe=True)
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            for (_, param), (layer, _) in weight_parts.items():
                if parametrize.is_parametrized(layer, param):
                    parametrize.remove_parametrizations(layer, param, leave_parametrized=False)
            # Removal re-registers the weight last; the state_dict order must not change.
            for layer, order in orders.values():
                params = dict(layer._parameters)
                layer._parameters.clear()
                layer._parameters.update((name, params[name]) for name in order)

    @contextmanager
    def fused(self, layers: Mapping[str, nn.Module], table: Mapping[str, Target], multiplier: float = 1.0):
        """Inside the block the deltas are added into the weights; afterwards the originals are copied back."""
        self.set_multiplier(multiplier)
        backups: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            with torch.no_grad():
                for lora, target, layer, _ in self._resolve(layers, table):
                    weight = getattr(layer, target.param)
                    if target.param_name not in backups:
                        backups[target.param_name] = (weight, weight.detach().clone())
                    merged = weight.detach().float()
                    merged[target.rows] += _shaped(lora, target).float().to(merged.device)
                    weight.copy_(merged.to(weight.dtype))
            yield self
        finally:
            with torch.no_grad():
                for weight, original in backups.values():
                    weight.copy_(original)


@contextmanager
def all_applied(
    loras: Iterable[tuple[LoRANetwork, float]], layers: Mapping[str, nn.Module], table: Mapping[str, Target]
):
    """Several networks attached at their weights for the block, as `LoRANetwork.applied` attaches one."""
    with ExitStack() as stack:
        for network, weight in loras:
            stack.enter_context(network.applied(layers, table, weight))
        yield


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before 2.4 (A1111 1.10 ships 2.1): only CUDA's autocast can be asked about
        return device_type == "cuda" and torch.is_autocast_enabled()


def _side_path_hook(lora: LoRAModule):
    def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + lora.side_path(layer, args[0]).to(output.dtype)

    return hook
