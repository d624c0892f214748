"""LDM UNet module paths <-> diffusers module paths.

kohya names SD1/SD2 UNet LoRA modules after diffusers' UNet (`down_blocks_0_attentions_0_…`) but SDXL ones after
the LDM layout itself (`input_blocks_4_1_…`). Some trainers write SDXL files with diffusers names; reading those
needs the reverse direction too. Paths here are relative to the UNet (no `model.diffusion_model.` prefix).
"""

from __future__ import annotations

import re

# Inside a ResBlock the layers are renamed; inside a SpatialTransformer the names are the same in both layouts.
_RESNET_LAYERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_LAYERS_BACK = {v: k for k, v in _RESNET_LAYERS.items()}


def _resnet_inner(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def ldm_to_diffusers(path: str, num_res_blocks: int) -> str | None:
    """`input_blocks.1.1.proj_in` -> `down_blocks.0.attentions.0.proj_in`; None for paths diffusers names otherwise."""
    per_level_in, per_level_out = num_res_blocks + 1, num_res_blocks + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", path):
        n, k, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None
        level, j = divmod(n - 1, per_level_in)
        if j == num_res_blocks:  # the downsampler closing a level
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
        if k == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet_inner(rest, _RESNET_LAYERS)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", path):
        k, rest = int(m[1]), m[2]
        if k == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{k // 2}.{_resnet_inner(rest, _RESNET_LAYERS)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", path):
        n, k, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(n, per_level_out)
        if k == 0:
            return f"up_blocks.{level}.resnets.{j}.{_resnet_inner(rest, _RESNET_LAYERS)}"
        if rest == "conv" or rest.startswith("conv."):  # an Upsample has a lone `conv`; a transformer never does
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    return None


def sdxl_diffusers_to_ldm(path: str) -> str | None:
    """The reverse of `ldm_to_diffusers` for SDXL's UNet (two res blocks per level; up levels 0 and 1 attend)."""
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", path):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{3 * (level + 1)}.0.op" + rest[len("conv") :] if rest.startswith("conv") else None
        if kind == "resnets":
            return f"input_blocks.{3 * level + j + 1}.0.{_resnet_inner(rest, _RESNET_LAYERS_BACK)}"
        return f"input_blocks.{3 * level + j + 1}.1.{rest}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_resnet_inner(rest, _RESNET_LAYERS_BACK)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", path):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            return f"output_blocks.{3 * level + 2}.2.{rest}"
        if kind == "resnets":
            return f"output_blocks.{3 * level + j}.0.{_resnet_inner(rest, _RESNET_LAYERS_BACK)}"
        return f"output_blocks.{3 * level + j}.1.{rest}"
    return None
