"""The one naming table: which weights of an LDM/SGM model a LoRA targets, and the kohya key of each.

Input is the model's parameter names and shapes (from `named_parameters()` of our model or the WebUI's, or from
a checkpoint file), so the table is the same wherever the weights come from. Rules follow kohya's `networks/lora.py`:
UNet Linear and 1x1 conv layers inside transformer blocks; with `conv=True` also ResBlocks, down- and upsamplers
(3x3 convs get the conv rank); text encoders' attention and MLP projections. OpenCLIP's fused `in_proj_weight`
is three targets (q, k, v rows), named like the Hugging Face CLIP layers kohya converts it to.

Forge keeps the LDM names for the UNet but holds every text encoder in the Hugging Face layout under its own
names (`clip_l`, `clip_g`, `clip_h`); `forge_to_ldm` gives those the LDM root of the same encoder, so this one table
serves Forge too (SDXL's bigG then comes with separate q/k/v weights instead of OpenCLIP's fused one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lib_copier.errors import CopierError
from lib_copier.lora.unet_names import ldm_to_diffusers

UNET = "model.diffusion_model."
FAMILIES = ("sd1", "sd2", "sdxl")
# Forge's text encoders (`JointTextEncoder` entries) → the LDM/SGM root of the same encoder, per family.
_FORGE_ENCODERS = {
    "sd1": {"clip_l": "cond_stage_model."},
    "sd2": {"clip_h": "cond_stage_model."},
    "sdxl": {"clip_l": "conditioner.embedders.0.", "clip_g": "conditioner.embedders.1."},
}

_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])")
_OPENCLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)")
_OPENCLIP_AS_HF = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}
_ENCODER_ROOT = re.compile(r"(cond_stage_model|conditioner\.embedders\.(\d+))\.(transformer|model)\.(.+)")


@dataclass(frozen=True)
class Target:
    key: str  # kohya module key, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    path: str  # LDM module path of the layer that owns the weight
    param: str  # "weight", or "in_proj_weight" for OpenCLIP's fused q/k/v
    part: int | None  # which block of rows of a fused projection (0 q, 1 k, 2 v); None for the whole weight
    shape: tuple[int, ...]  # (out, in) or (out, in, kh, kw) of the part this target covers

    @property
    def param_name(self) -> str:
        return f"{self.path}.{self.param}"

    @property
    def conv(self) -> bool:
        """A kxk convolution (k > 1): it takes the conv rank/alpha, like kohya's `conv_dim`."""
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)

    @property
    def rows(self) -> slice:
        if self.part is None:
            return slice(None)
        return slice(self.part * self.shape[0], (self.part + 1) * self.shape[0])


def model_family(names: Mapping[str, object]) -> str:
    """sd1 / sd2 / sdxl from the text encoder layout of a model's (or checkpoint's) parameter names."""
    if any(name.startswith("conditioner.embedders.") for name in names):
        return "sdxl"
    if any(name.startswith("cond_stage_model.model.transformer.") for name in names):
        return "sd2"
    if any(name.startswith("cond_stage_model.transformer.") for name in names):
        return "sd1"
    raise CopierError("the weights have no text encoder in the LDM layout, so their model family is unknown")


def forge_to_ldm(name: str, family: str) -> str | None:
    """A Forge parameter or module name → the LDM/SGM name the naming table reads; None for what has no LDM name.

    Forge's names are `diffusion_model.…` under its `KModel` and `clip_l.transformer.text_model.…` (`clip_g`, `clip_h`)
    under its `JointTextEncoder`."""
    if name.startswith("diffusion_model."):
        return "model." + name
    encoder, _, rest = name.partition(".")
    root = _FORGE_ENCODERS.get(family, {}).get(encoder)
    return root + rest if root and rest else None


def lora_targets(shapes: Mapping[str, tuple[int, ...]], family: str, conv: bool = False) -> list[Target]:
    """Every LoRA target of a model, given `{parameter name: shape}`, in a stable order."""
    if family not in FAMILIES:
        raise CopierError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    targets = _unet_targets(shapes, family, conv) + _text_targets(shapes, family)
    if not targets:
        raise CopierError("the model has no layers a LoRA can target (no UNet or text encoder in the LDM layout)")
    return targets


def _num_res_blocks(unet: dict[str, tuple[int, ...]]) -> int:
    downsamplers = [int(m[1]) for name in unet if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", name))]
    if downsamplers:
        return min(downsamplers) - 1
    blocks = {int(m[1]) for name in unet if (m := re.match(r"input_blocks\.(\d+)\.", name))}
    return max(blocks, default=1)


def _unet_targets(shapes: dict[str, tuple[int, ...]], family: str, conv: bool) -> list[Target]:
    unet = {name[len(UNET) :]: shape for name, shape in shapes.items() if name.startswith(UNET)}
    transformers = {m[1] for name in unet if (m := re.match(r"(.+?\.\d+)\.transformer_blocks\.", name))}
    resblocks = {m[1] for name in unet if (m := re.match(r"(.+?\.\d+)\.in_layers\.", name))}
    nrb = _num_res_blocks(unet)
    targets = []
    for name, shape in unet.items():
        if not name.endswith(".weight") or len(shape) not in (2, 4):
            continue
        path = name[: -len(".weight")]
        block = re.match(r"(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\.", path)
        if block is None:
            continue
        if block[1] in transformers:
            if len(shape) == 4 and shape[2:] != (1, 1):
                continue
        elif not conv:
            continue
        elif not (
            block[1] in resblocks or path.endswith(".op") or re.fullmatch(r"output_blocks\.\d+\.\d+\.conv", path)
        ):
            continue
        named = path if family == "sdxl" else ldm_to_diffusers(path, nrb)
        targets.append(Target("lora_unet_" + named.replace(".", "_"), UNET + path, "weight", None, shape))
    return targets


def _text_prefix(family: str, embedder: str | None) -> str:
    if embedder is None:
        return "lora_te_"
    if family != "sdxl":
        raise CopierError(f"an {family} model has a single text encoder, not conditioner.embedders")
    return f"lora_te{int(embedder) + 1}_"


def _text_targets(shapes: dict[str, tuple[int, ...]], family: str) -> list[Target]:
    targets = []
    openclip_layers: dict[str, int] = {}
    hf_layers: dict[str, int] = {}
    for name in shapes:
        if (m := _ENCODER_ROOT.fullmatch(name)) and (layer := _OPENCLIP_LAYER.match(m[4])):
            openclip_layers[m[1]] = max(openclip_layers.get(m[1], 0), int(layer[1]) + 1)
        if m and (layer := _HF_LAYER.match(m[4])):
            hf_layers[m[1]] = max(hf_layers.get(m[1], 0), int(layer[1]) + 1)
    for name, shape in shapes.items():
        m = _ENCODER_ROOT.fullmatch(name)
        if m is None:
            continue
        root, inner = name[: -len(m[4])], m[4]
        prefix = _text_prefix(family, m[2])
        if m[3] == "transformer" and (layer := _HF_LAYER.fullmatch(inner.removesuffix(".weight"))):
            if family == "sd2" and int(layer[1]) == hf_layers[m[1]] - 1:
                continue  # SD2's last layer, as in the OpenCLIP layout below
            key = f"{prefix}text_model_encoder_layers_{layer[1]}_{layer[2].replace('.', '_')}"
            targets.append(Target(key, root + inner[: -len(".weight")], "weight", None, shape))
        elif m[3] == "model" and (
            layer := _OPENCLIP_LAYER.fullmatch(inner.removesuffix("_weight").removesuffix(".weight"))
        ):
            index, kind = int(layer[1]), layer[2]
            # SD2 reads the penultimate layer, so its last block never reaches the UNet: kohya builds 23 of 24.
            if family == "sd2" and index == openclip_layers[m[1]] - 1:
                continue
            layer_key = f"{prefix}text_model_encoder_layers_{index}_"
            block = root + f"transformer.resblocks.{index}."
            if kind == "attn.in_proj":
                width = shape[0] // 3
                for part, letter in enumerate("qkv"):
                    key = f"{layer_key}self_attn_{letter}_proj"
                    targets.append(Target(key, block + "attn", "in_proj_weight", part, (width, shape[1])))
            else:
                targets.append(Target(layer_key + _OPENCLIP_AS_HF[kind], block + kind, "weight", None, shape))
    return targets


def is_text_encoder_key(key: str) -> bool:
    """lora_te_… (SD1/SD2) and lora_te1_/lora_te2_… (SDXL) modules; everything else is the UNet."""
    return key.startswith("lora_te")


def by_key(targets: list[Target]) -> dict[str, Target]:
    table = {t.key: t for t in targets}
    if len(table) != len(targets):
        raise CopierError("two layers of the model map to the same LoRA key; the model layout is not LDM")
    return table
