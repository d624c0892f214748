"""The OpenCLIP text transformer: SD2's text encoder (ViT-H/14) and SDXL's second one (ViT-bigG/14).

Parameter names are those of `open_clip.model.CLIP` without its `visual` tower, as SD checkpoints store them under
`cond_stage_model.model.` (SD2) or `conditioner.embedders.1.model.` (SDXL). Attention is a real
`torch.nn.MultiheadAttention`, called through its own forward, so its fused `in_proj_weight` and `out_proj` are the
same module type with the same names as in the WebUI's open_clip: LoRA code that handles one handles the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lib_copier.models.clip_text import ACTIVATIONS, TextEncoderOutput, activation, eos_pool


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """Defaults are ViT-H/14's text tower (SD2); SDXL's ViT-bigG/14 is width 1280, 32 layers, 20 heads, output 1280."""

    vocab_size: int = 49408
    width: int = 1024
    layers: int = 24
    heads: int = 16
    max_positions: int = 77
    mlp_ratio: float = 4.0
    output_dim: int = 1024  # width of the pooled output after `text_projection`
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text encoder width {self.width} is not a multiple of its {self.heads} heads")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"text encoder activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


class MLP(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.width, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.width)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = nn.MultiheadAttention(config.width, config.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=causal_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


def causal_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """Additive mask hiding later tokens; built per call, since a buffer would stay on the meta device after an
    `assign=True` load (open_clip keeps it as a non-persistent buffer, so checkpoints never hold it)."""
    return torch.full((length, length), float("-inf"), device=like.device, dtype=like.dtype).triu_(1)


class OpenCLIPTextModel(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.output_dim))
        # Only CLIP's image-text contrastive loss reads it; it is here because checkpoints store it.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_weights()

    def _init_weights(self) -> None:
        # Scales like the trained model's, so a randomly initialised test model behaves like a real one.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.width**-0.5)

    def forward(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        mask = causal_mask(length, x)
        states = [x]
        for block in self.transformer.resblocks:
            x = block(x, mask)
            states.append(x)
        last = self.ln_final(x)
        return TextEncoderOutput(tuple(states), last, eos_pool(last, input_ids) @ self.text_projection)
