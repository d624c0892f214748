"""Prompt encoders at the Stable Diffusion level: prompts in, cross-attention context (and pooled vector) out.

Their attribute names give the checkpoint key prefixes of LDM's and SGM's embedders: `CLIPEmbedder.transformer`
(`cond_stage_model.transformer.text_model.…`, `conditioner.embedders.0.transformer.text_model.…`) and
`OpenCLIPEmbedder.model` (`cond_stage_model.model.…`, `conditioner.embedders.1.model.…`).

Which hidden state conditions the UNet, per reference:
- SD1 (ldm FrozenCLIPEmbedder, layer "last"): the last layer after `final_layer_norm`.
- SD2 (ldm FrozenOpenCLIPEmbedder, layer "penultimate"): the second-to-last layer, then `ln_final`.
- SDXL (sgm FrozenCLIPEmbedder, layer "hidden", layer_idx 11): CLIP-L's second-to-last layer, not normalised.
- SDXL (sgm FrozenOpenCLIPEmbedder2, "penultimate", legacy=False): bigG's second-to-last layer, not normalised,
  and the pooled output `ln_final(last)[EOS] @ text_projection` for the UNet's vector input.
- A1111's "clip skip 2" on SD1: the second-to-last layer, then `final_layer_norm`.

Prompts are cut into 77-token chunks by `PromptTokenizer` (A1111's rules, see tokenizer.py); all chunks go through
the encoder in one batch and are joined along the sequence axis; the pooled vector comes from each prompt's first
chunk, as in A1111.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from lib_copier.models.clip_text import CLIPTextConfig, CLIPTextModel, TextEncoderOutput
from lib_copier.models.openclip_text import OpenCLIPTextConfig, OpenCLIPTextModel
from lib_copier.models.tokenizer import CHUNK_LENGTH, COMMA_BACKTRACK, END_ID, OPENCLIP_PAD_ID, PromptTokenizer

LAYERS = ("last", "penultimate")
MEAN_GUARD = 1e-3  # see `emphasize`


def emphasize(context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's vector by its weight, then restore the chunk's mean.

    Rows are chunks ([N, 77, D] with weights [N, 77]). A1111 takes one mean over every prompt it encodes together;
    it encodes one prompt at a time, so a mean per chunk of each prompt gives the same result and keeps prompts in
    a batch independent. Computed in float32 like A1111, then returned in the context's dtype.

    One guard A1111 lacks: a chunk whose mean is negligible next to its values is not rescaled. Only untrained
    models get there (a final layer norm with zero bias makes every token's mean 0), and there the ratio of two
    rounding errors would be inf or NaN. That trained encoders' means stay above the threshold (0.1% of the mean
    magnitude) is an assumption, not measured on real weights here.
    """
    if bool((weights == 1).all()):
        return context  # exactly what the multiply and rescale would give, without the rounding
    z = context.float()
    weighted = z * weights.to(z.device, torch.float32).unsqueeze(-1)
    original, new = z.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    meaningful = new.abs() > MEAN_GUARD * weighted.abs().mean(dim=(1, 2), keepdim=True)
    restore = torch.where(meaningful, original / torch.where(meaningful, new, 1.0), 1.0)
    return (weighted * restore).to(context.dtype)


class PromptEmbedder(nn.Module, ABC):
    """Chunking, emphasis and joining; a subclass says how one batch of 77-token chunks becomes vectors."""

    tokenizer: PromptTokenizer

    @abstractmethod
    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, 77] token ids → context [N, 77, D] and pooled [N, P] or None."""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context [B, 77·chunks, D] and pooled [B, P] (or None), on the device and in the dtype of the weights."""
        ids, weights = self.tokenizer.batch(list(prompts))
        batch, chunks, _ = ids.shape
        device = next(self.parameters()).device
        context, pooled = self.encode_ids(ids.reshape(-1, CHUNK_LENGTH).to(device))
        context = emphasize(context, weights.reshape(-1, CHUNK_LENGTH))
        context = context.reshape(batch, chunks * CHUNK_LENGTH, -1)
        if pooled is not None:
            pooled = pooled.reshape(batch, chunks, -1)[:, 0]
        return context, pooled


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"text encoder layer {layer!r} is not one of {', '.join(LAYERS)}")


def _pick(output: TextEncoderOutput, layer: str, final_norm: bool, norm: nn.LayerNorm) -> torch.Tensor:
    if layer == "last" and final_norm:
        return output.last_hidden_state
    hidden = output.hidden_states[-1] if layer == "last" else output.penultimate
    return norm(hidden) if final_norm else hidden


class CLIPEmbedder(PromptEmbedder):
    """CLIP-L (Hugging Face layout), padding chunks with END like A1111 does for it.

    `final_norm` None means: normalised for "last" (SD1), not for "penultimate" (SDXL); pass True with
    "penultimate" for A1111's SD1 clip skip 2. No SD family reads CLIP-L's pooled output, so it returns None.
    """

    def __init__(
        self,
        config: CLIPTextConfig,
        layer: str = "last",
        final_norm: bool | None = None,
        emphasis: bool = True,
        comma_backtrack: int = COMMA_BACKTRACK,
    ):
        super().__init__()
        _check_layer(layer)
        self.transformer = CLIPTextModel(config)
        self.layer = layer
        self.final_norm = layer == "last" if final_norm is None else final_norm
        self.tokenizer = PromptTokenizer(END_ID, comma_backtrack, emphasis)

    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        output = self.transformer(ids)
        return _pick(output, self.layer, self.final_norm, self.transformer.text_model.final_layer_norm), None


class OpenCLIPEmbedder(PromptEmbedder):
    """OpenCLIP ViT-H (SD2) or ViT-bigG (SDXL), padding chunks with 0 like open_clip and A1111 do.

    `final_norm` True is ldm's SD2 embedder (`ln_final` after the chosen layer); False is sgm's SDXL embedder
    (the raw hidden state). The pooled output is always returned; only SDXL's UNet reads it.
    """

    def __init__(
        self,
        config: OpenCLIPTextConfig,
        layer: str = "penultimate",
        final_norm: bool = True,
        emphasis: bool = True,
        comma_backtrack: int = COMMA_BACKTRACK,
    ):
        super().__init__()
        _check_layer(layer)
        self.model = OpenCLIPTextModel(config)
        self.layer = layer
        self.final_norm = final_norm
        self.tokenizer = PromptTokenizer(OPENCLIP_PAD_ID, comma_backtrack, emphasis)

    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(ids)
        return _pick(output, self.layer, self.final_norm, self.model.ln_final), output.pooled

    def unread(self, pooled: bool) -> list[str]:
        """Names (or prefixes) of the parameters no output depends on: `logit_scale`, CLIP's training temperature,
        and where the pooled output goes unused, the projection and, at the penultimate layer, the last block.
        Conversions from diffusers leave them out (its SD2 text encoder has one layer less)."""
        names = ["model.logit_scale"]
        if not pooled:
            names.append("model.text_projection")
            if self.layer == "penultimate":
                names.append(f"model.transformer.resblocks.{self.model.config.layers - 1}.")
        return names
