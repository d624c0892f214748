"""LoRA math on tensors, in float32: apply to a checkpoint, merge (exact or SVD), resize, extract.

The numbers follow kohya's `merge_lora.py`, `svd_merge_lora.py`, `resize_lora.py` and
`extract_lora_from_models.py`; where we differ it is said next to the code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch

from lib_copier.errors import CopierError
from lib_copier.lora.naming import Target
from lib_copier.lora.weights import LoRAWeights, factored_svd, from_svd, low_rank

Progress = Callable[[int, int], None]  # (modules done, modules in all), after each module
MIN_SINGULAR_VALUE = 1e-6  # kohya's MIN_SV: below this a module is treated as zero and kept at rank 1
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def _counted(items: Iterable, progress: Progress | None) -> Iterator:
    """The items, reporting each one done (and 0 of n before the first, so a UI can show the total at once)."""
    items = list(items)
    report = progress or (lambda done, total: None)
    report(0, len(items))
    for i, item in enumerate(items):
        yield item
        report(i + 1, len(items))


def _check_fits(key: str, delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if delta.numel() != torch.Size(shape).numel():
        raise CopierError(f"LoRA module {key} has shape {tuple(delta.shape)}, the model's layer {tuple(shape)}")
    return delta.reshape(shape)


def apply_to_state_dict(
    state: MutableMapping[str, torch.Tensor],
    loras: list[tuple[Mapping[str, LoRAWeights], float]],
    table: Mapping[str, Target],
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """W += ratio * alpha/rank * up @ down for every module of every (LoRA, ratio); returns the modules applied.

    Each weight is updated in float32 and rounded once, to `dtype` (default: its own), so several LoRAs do not
    round several times, and an fp16 checkpoint saved in fp32 keeps the LoRA's delta at fp32 precision. One weight
    is worked on at a time: the float32 copies never add up to a second model.
    """
    unknown = [key for modules, _ in loras for key in modules if key not in table]
    if unknown:
        raise CopierError(f"LoRA module {unknown[0]} matches no layer of the checkpoint (model families differ?)")
    by_weight: dict[str, list[tuple[str, LoRAWeights, float]]] = {}
    for modules, ratio in loras:
        for key, module in modules.items():
            by_weight.setdefault(table[key].param_name, []).append((key, module, ratio))
    count = sum(len(parts) for parts in by_weight.values())
    done = 0
    report = progress or (lambda done, total: None)
    report(0, count)
    for name, parts in by_weight.items():
        weight = state[name].float().clone()
        for key, module, ratio in parts:
            target = table[key]
            weight[target.rows] += ratio * _check_fits(key, module.delta(), target.shape)
            done += 1
            report(done, count)
        state[name] = weight.to(dtype or state[name].dtype)
    return count


def cancels(loras: list[tuple[Mapping[str, LoRAWeights], float]], tolerance: float = 1e-6) -> bool:
    """Whether the weighted sum changes no layer: in every module it is below `tolerance` of its parts' norms (the
    same LoRA at +1 and -1, or every ratio 0)."""
    for key, merged in merge_exact(loras).items():
        parts = sum(abs(ratio) * modules[key].norm() for modules, ratio in loras if key in modules)
        if merged.norm() > tolerance * parts:
            return False
    return True


def merge_exact(loras: list[tuple[Mapping[str, LoRAWeights], float]]) -> dict[str, LoRAWeights]:
    """One LoRA whose delta is exactly sum(ratio * delta): the ranks are concatenated, alpha = the new rank."""
    grouped: dict[str, list[tuple[LoRAWeights, float]]] = {}
    for modules, ratio in loras:
        for key, module in modules.items():
            grouped.setdefault(key, []).append((module, ratio))
    merged = {}
    for key, parts in grouped.items():
        shapes = {_as_matrix(p.shape) for p, _ in parts}
        if len(shapes) > 1:
            raise CopierError(f"LoRA module {key} has different shapes in the inputs: {sorted(shapes)}")
        shape = max((p.shape for p, _ in parts), key=len)  # a 1x1 conv may come as a matrix (LyCORIS) or 4-D
        conv = (1, 1) if len(shape) == 4 else ()
        down = torch.cat([p.down.float().reshape(p.rank, *shape[1:]) for p, _ in parts])
        up = torch.cat([(p.up.float() * (ratio * p.scale)).reshape(shape[0], p.rank, *conv) for p, ratio in parts], 1)
        merged[key] = LoRAWeights(down, up, float(down.shape[0]))
    return merged


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if shape[2:] == (1, 1) else shape


def merge_svd(
    loras: list[tuple[Mapping[str, LoRAWeights], float]],
    rank: int,
    conv_rank: int | None = None,
    clamp_quantile: float = 1.0,
    progress: Progress | None = None,
) -> dict[str, LoRAWeights]:
    """sum(ratio * delta) per module, then its best rank-`rank` factorisation (kxk convs: `conv_rank`).

    Computed in factored form, never as a dense matrix: the sum is one LoRA whose ranks are the inputs' side by side
    (`merge_exact`), and `factored_svd` gives its exact singular values and vectors from a core the size of the
    summed rank. The spectrum is exact, so whether the rank truncates anything, and hence whether kohya's clamp
    applies, is decided on it, not on float32 noise of a large dense SVD.
    """
    _check_rank(rank, conv_rank)
    merged = {}
    for key, module in _counted(merge_exact(loras).items(), progress):  # alpha = rank: the factors are the delta
        u, s, vh = factored_svd(module.up, module.down)
        keep = max(1, min(_rank_for(module.shape, rank, conv_rank), len(s)))  # past the summed rank: zeros
        merged[key] = from_svd(u, s, vh, keep, module.shape, clamp_quantile)
    return merged


def _check_rank(rank: int, conv_rank: int | None) -> None:
    if rank <= 0 or (conv_rank is not None and conv_rank <= 0):
        raise CopierError(f"the new rank must be positive, got {rank if rank <= 0 else conv_rank}")


def _rank_for(shape: tuple[int, ...], rank: int, conv_rank: int | None) -> int:
    is_kxk = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
    return conv_rank if is_kxk and conv_rank is not None else rank


def check_dynamic(method: str | None, value: float | None) -> None:
    """A CopierError unless a dynamic resize method and its parameter come together, the parameter in its range:
    sv_ratio's is the largest singular value over the smallest kept (1 or more), sv_fro's and sv_cumulative's the
    share to keep (above 0, at most 1)."""
    if (method is None) != (value is None):
        raise CopierError("a dynamic resize needs both a method and its parameter")
    if method is None:
        return
    if method not in DYNAMIC_METHODS:
        raise CopierError(f"unknown dynamic resize method {method!r}; expected one of {', '.join(DYNAMIC_METHODS)}")
    if method == "sv_ratio" and not value >= 1:
        raise CopierError(
            f"sv_ratio's parameter is the largest singular value over the smallest kept: 1 or more, not {value}"
        )
    if method != "sv_ratio" and not 0 < value <= 1:
        raise CopierError(f"{method}'s parameter is the share to keep: above 0 and at most 1, not {value}")


def dynamic_rank(s: torch.Tensor, method: str, value: float) -> int:
    """The rank kohya's `resize_lora.py` picks for singular values `s` (descending).

    kohya's rule, followed exactly: an index (sv_ratio: how many values exceed max/value; sv_cumulative: the
    first position where the cumulative sum reaches `value`, plus one; sv_fro: the same over squared values and
    `value`**2), clamped to [1, len(s) - 1], and then one more — so the rank kept is one past the threshold.
    """
    if method == "sv_ratio":
        index = int((s > s[0] / value).sum())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(value))) + 1
    elif method == "sv_fro":
        squares = s.pow(2)
        index = int(torch.searchsorted(torch.cumsum(squares, 0) / squares.sum(), torch.tensor(value**2))) + 1
    else:
        raise CopierError(f"unknown dynamic resize method {method!r}; expected one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(index, len(s) - 1)) + 1


@dataclass
class ResizedModule:
    key: str
    old_rank: int
    new_rank: int
    fro_retained: float  # fraction of the Frobenius norm of the delta that the new rank keeps


def resize(
    modules: Mapping[str, LoRAWeights],
    rank: int,
    conv_rank: int | None = None,
    dynamic: str | None = None,
    dynamic_value: float | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, LoRAWeights], list[ResizedModule]]:
    """Each module down to `rank` (a maximum when `dynamic` is set), keeping alpha/rank as kohya does.

    The SVD is of the module's own (rank x rank) core (`factored_svd`), so a rank never grows past the module's old
    rank (kohya's full-length spectrum can add a zero direction).
    """
    _check_rank(rank, conv_rank)
    check_dynamic(dynamic, dynamic_value)
    resized, report = {}, []
    for key, module in _counted(modules.items(), progress):
        u, s, vh = factored_svd(module.up, module.down)  # alpha/rank is kept apart, as kohya does
        limit = _rank_for(module.shape, rank, conv_rank)
        if s[0] <= MIN_SINGULAR_VALUE:
            new_rank = 1
        elif dynamic is not None:
            new_rank = min(dynamic_rank(s, dynamic, dynamic_value), limit)
        else:
            new_rank = limit
        new_rank = min(new_rank, module.rank, len(s))  # past a side of the layer, the rest is zeros
        up = u[:, :new_rank] * s[:new_rank]
        down = vh[:new_rank]
        kept = float(s[:new_rank].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()) if s[0] > 0 else 1.0
        if module.down.dim() == 4:
            up = up.reshape(module.up.shape[0], new_rank, 1, 1)
            down = down.reshape(new_rank, *module.down.shape[1:])
        resized[key] = LoRAWeights(down.contiguous(), up.contiguous(), module.scale * new_rank)
        report.append(ResizedModule(key, module.rank, new_rank, kept))
    return resized, report


def extract(
    original: Callable[[str], torch.Tensor],
    tuned: Callable[[str], torch.Tensor],
    targets: Iterable[Target],
    rank: int,
    conv_rank: int | None = None,
    clamp_quantile: float = 1.0,
    min_diff: float = 0.01,
    progress: Progress | None = None,
    randomized: bool = True,
) -> tuple[dict[str, LoRAWeights], bool, dict[str, float]]:
    """A LoRA approximating `tuned - original` (weights read by parameter name, one module at a time). Text encoders
    whose largest absolute difference is at most `min_diff` are left out, as kohya does. Returns (modules, text
    included, the fraction of each module's difference the LoRA keeps: 1 is exact).

    `randomized` takes the large modules' leading singular vectors from a randomized SVD (`truncated_svd`): its
    directions come within a small fraction of the optimum's error at a small fraction of a full SVD's cost."""
    _check_rank(rank, conv_rank)
    targets = [t for t in targets if not t.conv or conv_rank is not None]

    def difference(target: Target) -> torch.Tensor:
        name = target.param_name
        weights = {"tuned": tuned(name)[target.rows].float(), "original": original(name)[target.rows].float()}
        for which, weight in weights.items():
            if not weight.isfinite().all():
                raise CopierError(f"the {which} checkpoint's {name} holds NaN or infinite values: it is damaged")
        return weights["tuned"] - weights["original"]

    # First pass over the text encoders only: deciding to drop them needs every difference, SVDs do not.
    text_targets = [t for t in targets if t.key.startswith("lora_te")]
    text = any(float(difference(t).abs().max()) > min_diff for t in text_targets)
    chosen = [t for t in targets if text or not t.key.startswith("lora_te")]
    modules, kept, changed = {}, {}, False
    for target in _counted(chosen, progress):
        target_rank = _rank_for(target.shape, rank, conv_rank)
        delta = difference(target)
        changed = changed or bool(delta.any())
        modules[target.key], kept[target.key] = low_rank(delta, target_rank, clamp_quantile, randomized)
    if not changed:
        raise CopierError("the two checkpoints have the same weights in every layer a LoRA covers: nothing to extract")
    return modules, text, kept
