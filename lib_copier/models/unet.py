"""The LDM/SGM UNet (SD1, SD2, SDXL) with the parameter names of the code A1111 runs.

Names matter more than anything else here: LoRA keys, checkpoint keys and the WebUI's own modules all use
`input_blocks.N.M.…`, `middle_block.…`, `output_blocks.N.M.…`, `out.…`, so one LoRA code path serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    """The knobs of LDM's `UNetModel`, in its vocabulary (`attention_resolutions` are downsampling rates)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # per level
    transformer_depth_middle: int = 1
    num_heads: int = 8  # used when num_head_channels <= 0 (SD1)
    num_head_channels: int = -1  # fixed head width (SD2, SDXL: 64)
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2/SDXL project with Linear, SD1 with 1x1 conv
    adm_in_channels: int | None = None  # SDXL's vector conditioning (pooled text + size/crop embeddings)
    norm_groups: int = 32

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head width) at a given width, as LDM derives them."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosines first (LDM's order; the weights depend on it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype: fp16 statistics overflow on large activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The affine parameters too: a half-precision model's fp16 weights beside fp32 input fail outside autocast.
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest upsampling in fp32: bf16 interpolate is unsupported on some builds.
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").type(x.dtype))


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, _ = q.shape
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool, groups: int
    ):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)
        self.use_linear = linear

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return y + x


class TimestepEmbedSequential(nn.Sequential):
    """A block whose layers take what they need: ResBlocks the time embedding, transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        c = config
        groups = c.norm_groups
        levels = len(c.channel_mult)
        if len(c.transformer_depth) != levels:
            raise ValueError(f"transformer_depth needs one entry per level ({levels}), got {c.transformer_depth}")
        time_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        if c.adm_in_channels is not None:
            # SGM's "sequential" label embedding: the extra Sequential level is part of the checkpoint keys.
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
            )

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer, groups)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))]
        )
        skip_channels = [c.model_channels]
        ch, ds = c.model_channels, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_dim, mult * c.model_channels, groups)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim, ch, groups),
            transformer(ch, c.transformer_depth_middle),
            ResBlock(ch, time_dim, ch, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_dim, c.model_channels * mult, groups)]
                ch = c.model_channels * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1)
        )

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (y is None) != (self.config.adm_in_channels is None):
            raise ValueError("the vector conditioning y must be given exactly when the model has adm_in_channels")
        t_emb = timestep_embedding(timesteps, self.config.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
