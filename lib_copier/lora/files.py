"""Reading and writing LoRA `.safetensors` files in kohya's format.

Reading normalises the variants found in the wild to kohya keys: `lora_A`/`lora_B` instead of
`lora_down`/`lora_up`, PEFT/diffusers files (`unet.…`, `text_encoder.…`), and SDXL files whose UNet keys use
diffusers names. Writing casts to the save precision, adds kohya's hashes and renames into place atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_copier.atomic import atomic_write
from lib_copier.errors import CopierError, check_file
from lib_copier.lora.hashes import sshs_hashes
from lib_copier.lora.metadata import family_from_metadata
from lib_copier.lora.module_types import split_modules
from lib_copier.lora.unet_names import sdxl_diffusers_to_ldm
from lib_copier.lora.weights import LoRAWeights, join_modules

PRECISIONS = {"fp32": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_PEFT_SUFFIXES = {
    ".lora_A.weight": ".lora_down.weight",
    ".lora_B.weight": ".lora_up.weight",
    ".lora.down.weight": ".lora_down.weight",
    ".lora.up.weight": ".lora_up.weight",
}
_PEFT_ROOTS = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
_DIFFUSERS_UNET = re.compile(
    r"lora_unet_(?:(down|up)_blocks_(\d+)|mid_block)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_(.+)"
)
_DEEPER_THAN_ONE = re.compile(r"transformer_blocks_[1-9]")
_LDM_UNET = ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")


@dataclass
class LoRA:
    modules: dict[str, LoRAWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None  # sd1 / sd2 / sdxl, or None when neither keys, shapes nor metadata tell
    types: Counter = field(default_factory=Counter)  # modules per type in the file: LoRA, LoHa, LoKr, ...

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def check_finite(self, path) -> LoRA:
        """The LoRA, or a CopierError if a factor holds NaN or an infinity: merging or resizing it would spread them
        (an SVD of them fails)."""
        broken = [k for k, m in self.modules.items() if not (m.down.isfinite().all() and m.up.isfinite().all())]
        if broken:
            raise CopierError(f"LoRA file {path} is damaged: {len(broken)} module(s) hold NaN or infinite values")
        return self


def _peft_name(name: str) -> str:
    """`unet.down_blocks.0.attentions.0…to_q.lora_A.weight` -> `lora_unet_down_blocks_0_…to_q.lora_down.weight`."""
    for old, new in _PEFT_SUFFIXES.items():
        if name.endswith(old):
            name = name[: -len(old)] + new
            break
    # diffusers' older attention-processor files: `attn1.processor.to_out_lora.down.weight`
    name = name.replace(".processor.", ".").replace("to_out_lora.", "to_out.0_lora.")
    name = name.replace("_lora.down.", ".lora_down.").replace("_lora.up.", ".lora_up.")
    for root, prefix in _PEFT_ROOTS.items():
        if name.startswith(root):
            for tail in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                if name.endswith(tail):
                    return prefix + name[len(root) : -len(tail)].replace(".", "_") + tail
    return name


def _is_sdxl(keys: list[str], metadata: Mapping[str, str]) -> bool:
    # SD1/SD2 transformers have depth 1; SDXL's have 2 or 10, only SDXL has two text encoders, and kohya names SDXL's
    # UNet layers (only) by their LDM paths.
    if any(k.startswith(("lora_te2_", *_LDM_UNET)) or _DEEPER_THAN_ONE.search(k) for k in keys):
        return True
    if not any(k.startswith("lora_te1_") for k in keys):
        return False
    # lora_te1_ without lora_te2_: also diffusers' name of SD1's and SD2's one text encoder (`text_encoder.`), so the
    # UNet's depth-1 transformers, or else the metadata, say which.
    return not any(k.startswith("lora_unet_") for k in keys) and family_from_metadata(dict(metadata)) in (None, "sdxl")


def _sdxl_ldm_key(key: str) -> str:
    m = _DIFFUSERS_UNET.fullmatch(key)
    if m is None:
        return key
    block = f"{m[1]}_blocks.{m[2]}" if m[1] else "mid_block"
    path = sdxl_diffusers_to_ldm(f"{block}.{m[3]}.{m[4]}.{m[5]}")
    if path is None:
        raise CopierError(f"LoRA key {key} names no layer of the SDXL UNet")
    return "lora_unet_" + path.replace(".", "_")


def normalise(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The same tensors under kohya keys (see the module docstring for the variants accepted)."""
    renamed = {_peft_name(name): tensor for name, tensor in tensors.items()}
    modules = sorted({name.split(".", 1)[0] for name in renamed})
    if not _is_sdxl(modules, metadata):
        return {name.replace("lora_te1_", "lora_te_", 1): t for name, t in renamed.items()}
    result = {}
    for name, tensor in renamed.items():
        key, _, tail = name.partition(".")
        result[f"{_sdxl_ldm_key(key)}.{tail}"] = tensor
    return result


def detect_family(modules: Mapping[str, LoRAWeights], metadata: Mapping[str, str]) -> str | None:
    """The model family a LoRA is for, from its keys, then its metadata, then its layer widths."""
    if _is_sdxl(list(modules), metadata):
        return "sdxl"
    if family := family_from_metadata(dict(metadata)):
        return family
    # The text encoder width (768 SD1, 1024 SD2) shows in every text and cross-attention key/value layer.
    for key, module in modules.items():
        width = module.down.shape[1]
        if key.startswith("lora_te_") or key.endswith(("attn2_to_k", "attn2_to_v")):
            if width in (768, 1024):
                return "sd1" if width == 768 else "sd2"
    # SD1 projects into and out of its transformers with 1x1 convs, SD2 (and SDXL) with linear layers.
    if any(key.endswith(("proj_in", "proj_out")) and module.down.dim() == 4 for key, module in modules.items()):
        return "sd1"
    return None


def read_lora(path: str | os.PathLike) -> LoRA:
    path = check_file(Path(path), "LoRA file")
    if path.suffix != ".safetensors":
        raise CopierError(f"{path} is not a .safetensors file; LoRAs are read only from .safetensors")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CopierError(f"{path} is not a readable .safetensors file ({exc})") from exc
    if any(name.startswith(_MODEL_PREFIXES) for name in tensors):
        raise CopierError(f"{path} is a model checkpoint, not a LoRA")
    if bundled := sorted({name.split(".")[1] for name in tensors if name.startswith("bundle_emb.")}):
        raise CopierError(
            f"{path} bundles textual-inversion embeddings ({', '.join(bundled)}) with its LoRA; the LoRA tools would "
            "leave them out of the files they write, so they do not take it"
        )
    try:
        modules, types = split_modules(normalise(tensors, metadata))
    except CopierError as exc:
        raise CopierError(f"{path} is not a LoRA: {exc}") from exc
    if not modules:
        raise CopierError(f"{path} is not a LoRA: it holds no lora_down/lora_up tensors")
    return LoRA(modules, metadata, detect_family(modules, metadata), types)


_CONV_ARGS = ("conv_dim", "conv_alpha")
# Where an LDM/SGM checkpoint keeps its UNet, VAE and text encoders; no LoRA key starts so.
_MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")


def _one(values: set) -> str:
    return str(values.pop()) if len(values) == 1 else "Dynamic"  # kohya's word for ranks that differ by module


def _json_object(text: str | None) -> dict:
    """A JSON object from metadata, or {} where another tool wrote something else there (what it meant is lost)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def network_shape(modules: Mapping[str, LoRAWeights], metadata: Mapping[str, str]) -> dict[str, str]:
    """`ss_network_dim`, `ss_network_alpha` and the `conv_dim`/`conv_alpha` of `ss_network_args` as the modules
    are: a value where every module of the kind (kxk convs, the rest) has it, "Dynamic" where they differ."""
    kxk = {key for key, m in modules.items() if len(m.shape) == 4 and m.shape[2:] != (1, 1)}
    linear = [m for key, m in modules.items() if key not in kxk] or list(modules.values())
    args = {k: v for k, v in _json_object(metadata.get("ss_network_args")).items() if k not in _CONV_ARGS}
    if kxk:
        args["conv_dim"] = _one({modules[key].rank for key in kxk})
        args["conv_alpha"] = _one({float(modules[key].alpha) for key in kxk})
    return {
        "ss_network_dim": _one({m.rank for m in linear}),
        "ss_network_alpha": _one({float(m.alpha) for m in linear}),
        "ss_network_args": json.dumps(args),
    }


def write_lora(
    path: str | os.PathLike,
    modules: Mapping[str, LoRAWeights],
    metadata: Mapping[str, str],
    precision: str = "fp16",
    overwrite: bool = False,
) -> Path:
    """Write a kohya LoRA file with its `sshs_*` hashes; the metadata is written in sorted key order, with the network
    shape as the tensors have it (`network_shape`)."""
    if precision not in PRECISIONS:
        raise CopierError(f"unknown precision {precision!r}; expected fp32, fp16 or bf16")
    tensors = join_modules(modules, PRECISIONS[precision])
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")} | network_shape(modules, metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(tensors, metadata)
    ordered = dict(sorted(metadata.items()))
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=ordered), overwrite)
