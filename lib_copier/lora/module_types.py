"""The module types a LoRA file may hold, each read as exact plain-LoRA factors: kohya's LoRA/LoCon, and LyCORIS's
LoCon with a Tucker core, LoHa and LoKr.

Every LyCORIS delta has a factored form `up @ down`, so it becomes a `LoRAWeights` with the same delta, which every
tool here (merge, SVD merge, resize, merge into a checkpoint) then takes as it is:
- Tucker core (`lora_mid`, `hada_t*`, `lokr_t2`): the core folds into the down factor.
- LoHa, `(a1 @ b1) * (a2 @ b2)`: the Hadamard product of two products is the product of the column-wise and
  row-wise Kronecker products of the factors (rank r1·r2).
- LoKr, `kron(W1, W2)`: `kron(U1 @ V1, U2 @ V2) = kron(U1, U2) @ kron(V1, V2)` (rank k1·k2).
A rank past the matrix's own size is brought down to it exactly (`factored_svd`). The scale is the one A1111's
`extensions-builtin/Lora` applies: a `scale` tensor, else alpha / dim where the format has a dim, else 1.

LyCORIS stores kxk convolutions without a Tucker core flattened, `(rank, in·k·k)`; the kernel then comes from the
layer's name (the kxk layers of SD's UNet are all 3x3).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping

import torch

from lib_copier.errors import CopierError
from lib_copier.lora.weights import LoRAWeights, factored_svd

_KXK_LAYER = re.compile(
    r"lora_unet_.*(_conv1|_conv2|_downsamplers_0_conv|_upsamplers_0_conv|_in_layers_2|_out_layers_3|_op"
    r"|output_blocks_\d+_\d+_conv)"
)
# Parts that mark module types we cannot turn into a LoRA, and what to call them.
_OTHER_TYPES = {
    "diff": "a full weight difference (LyCORIS 'full')",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "w_norm": "a norm-layer module (LyCORIS 'norm')",
    "dora_scale": "DoRA (its delta depends on the base weight)",
}
_LORA_PARTS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}


def module_type(parts: Mapping[str, torch.Tensor]) -> str:
    """The type of a module from its tensor names (the parts after the key): LoRA, LoCon (Tucker), LoHa, LoKr, or
    the words for a type that cannot be read as a LoRA."""
    names = set(parts) - {"alpha", "scale"}
    if names and names <= _LORA_PARTS:
        return "LoCon (Tucker)" if "lora_mid.weight" in names else "LoRA"
    if names and all(n.startswith("hada_") for n in names):
        return "LoHa"
    if names and all(n.startswith("lokr_") for n in names):
        return "LoKr"
    known = [what for part, what in _OTHER_TYPES.items() if part in names]
    return known[0] if known else "unknown (" + ", ".join(sorted(names)) + ")"


def _number(key: str, parts: Mapping[str, torch.Tensor], name: str) -> float:
    """A module's one-number tensor (alpha, scale), or a CopierError saying what is wrong with it."""
    tensor = parts[name]
    if tensor.numel() != 1:
        raise CopierError(f"LoRA module {key}: its {name} holds {tensor.numel()} values; it must be one number")
    value = float(tensor)
    if not math.isfinite(value):
        raise CopierError(f"LoRA module {key}: its {name} is {value}; the file is damaged")
    return value


def _scale(key: str, parts: Mapping[str, torch.Tensor], dim: int | None) -> float:
    if "scale" in parts:
        return _number(key, parts, "scale")
    if "alpha" in parts and dim:
        return _number(key, parts, "alpha") / dim
    return 1.0


def _need(key: str, parts: Mapping[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise CopierError(f"LoRA module {key} lacks its {missing[0].removesuffix('.weight')} tensor")
    return [parts[n].float() for n in names]


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """up, down of LyCORIS's `make_weight_cp(core, wa, wb)`: wa (r, out), wb (r, in), core (r, r, kh, kw)."""
    down = torch.einsum("ijkl,jc->ickl", core.float(), wb.float().flatten(1))
    return wa.float().T.contiguous(), down


def _pair(key: str, parts, a: str, b: str, core: str | None):
    """(up, down) of one low-rank product `a @ b`, or its Tucker form when the core is there."""
    wa, wb = _need(key, parts, a, b)
    if core is not None and core in parts:
        return _tucker(parts[core], wa, wb)
    return wa.flatten(1), wb.flatten(1)


def _full(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense matrix as (up, down) with the identity on its smaller side."""
    matrix = matrix.float().flatten(1)
    rows, cols = matrix.shape
    if rows <= cols:
        return torch.eye(rows), matrix
    return matrix, torch.eye(cols)


def _khatri_rao(up1, down1, up2, down2) -> tuple[torch.Tensor, torch.Tensor]:
    """(up1 @ down1) * (up2 @ down2) = up @ down, with up's columns and down's rows every pairwise product."""
    up = (up1[:, :, None] * up2[:, None, :]).flatten(1)
    down = (down1[:, None, :] * down2[None, :, :]).flatten(0, 1)
    return up, down


def _loha(key: str, parts) -> tuple[torch.Tensor, torch.Tensor, float]:
    up1, down1 = _pair(key, parts, "hada_w1_a", "hada_w1_b", "hada_t1")
    up2, down2 = _pair(key, parts, "hada_w2_a", "hada_w2_b", "hada_t2")
    shape = down1.shape[1:]
    up, down = _khatri_rao(up1, down1.flatten(1), up2, down2.flatten(1))
    return up, down.reshape(down.shape[0], *shape), _scale(key, parts, parts["hada_w1_b"].shape[0])


def _lokr(key: str, parts) -> tuple[torch.Tensor, torch.Tensor, float]:
    if "lokr_w1" in parts:
        up1, down1 = _full(parts["lokr_w1"])
    else:
        up1, down1 = _pair(key, parts, "lokr_w1_a", "lokr_w1_b", None)
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
        up2, down2 = _full(w2)
        kernel = tuple(w2.shape[2:])
    else:
        up2, down2 = _pair(key, parts, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        kernel = tuple(down2.shape[2:])
    up, down = torch.kron(up1, up2), torch.kron(down1, down2.flatten(1))
    dim = next((parts[n].shape[0] for n in ("lokr_w2_b", "lokr_w1_b") if n in parts), None)
    if kernel:
        down = down.reshape(down.shape[0], -1, *kernel)
    return up, down, _scale(key, parts, dim)


def _lora_with_core(key: str, parts) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoCon with a Tucker core: delta = einsum(mid, up, down) as A1111's `rebuild_cp_decomposition`."""
    up, down = _need(key, parts, "lora_up.weight", "lora_down.weight")
    up, down = _tucker(parts["lora_mid.weight"], up.flatten(1).T, down.flatten(1))
    return up, down, _scale(key, parts, down.shape[0])


_CONVERT = {"LoHa": _loha, "LoKr": _lokr, "LoCon (Tucker)": _lora_with_core}


def to_lora(key: str, parts: Mapping[str, torch.Tensor]) -> LoRAWeights:
    """The plain LoRA (alpha = rank) whose delta is exactly this LyCORIS module's."""
    kind = module_type(parts)
    if kind not in _CONVERT:
        raise CopierError(f"LoRA module {key} is {kind}, which cannot be read as a LoRA")
    try:
        up, down, scale = _CONVERT[kind](key, parts)
    except (RuntimeError, ValueError) as exc:  # torch's shape errors: factors that do not fit each other
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in sorted(parts.items()) if t.dim())
        raise CopierError(f"LoRA module {key} is a {kind} whose tensors do not fit each other: {shapes}") from exc
    if down.dim() == 2 and _KXK_LAYER.fullmatch(key) and down.shape[1] % 9 == 0:
        down = down.reshape(down.shape[0], -1, 3, 3)
    columns = down[0].numel()
    if up.shape[1] > min(up.shape[0], columns):  # more directions than the matrix has: keep exactly its own
        u, s, vh = factored_svd(up, down)
        keep = min(up.shape[0], columns)
        up, down = u[:, :keep] * s[:keep], vh[:keep].reshape(keep, *down.shape[1:])
    up = scale * up
    if down.dim() == 4:
        up = up.reshape(*up.shape, 1, 1)
    return LoRAWeights(down.contiguous(), up.contiguous(), float(down.shape[0]))


def split_modules(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, LoRAWeights], Counter]:
    """Group a tensor dict under kohya keys (`<key>.<part>`) into modules; returns them and how many of each type.

    Plain LoRA modules keep their tensors as stored; the others become float32 factors (`to_lora`)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key, _, part = name.partition(".")
        grouped.setdefault(key, {})[part] = tensor
    modules, types = {}, Counter()
    for key, parts in grouped.items():
        kind = module_type(parts)
        types[kind] += 1
        modules[key] = _plain(key, parts) if kind == "LoRA" else to_lora(key, parts)
    return modules, types


def _plain(key: str, parts: Mapping[str, torch.Tensor]) -> LoRAWeights:
    _need(key, parts, "lora_down.weight", "lora_up.weight")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if up.shape[1] != down.shape[0] or down.dim() != up.dim():
        raise CopierError(f"LoRA module {key}: lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}")
    if not down.shape[0]:
        raise CopierError(f"LoRA module {key}: its rank is 0; the file is damaged")
    alpha = _number(key, parts, "alpha") if "alpha" in parts else float(down.shape[0])
    return LoRAWeights(down, up, alpha)
