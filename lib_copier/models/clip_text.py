"""The CLIP text transformer in the Hugging Face layout: SD1's text encoder and SDXL's first one (ViT-L/14).

Parameter names are those of `transformers.CLIPTextModel` as SD checkpoints store them, under
`cond_stage_model.transformer.` (SD1) or `conditioner.embedders.0.transformer.` (SDXL), so a checkpoint loads with
no renaming and LoRA modules find `text_model.encoder.layers.N.self_attn.q_proj` and friends by the same names
here and in the WebUI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults are OpenAI's ViT-L/14 text tower, the one SD1 and SDXL use."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_positions: int = 77
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text encoder width {self.width} is not a multiple of its {self.heads} heads")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"text encoder activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class TextEncoderOutput:
    """What both text towers return; the SD-level embedders pick from it."""

    hidden_states: tuple[torch.Tensor, ...]  # the input embeddings, then each layer's output, none normalised
    last_hidden_state: torch.Tensor  # the last layer's output after the final layer norm
    pooled: torch.Tensor  # the final-normed state at the end-of-text token (OpenCLIP: then projected)

    @property
    def penultimate(self) -> torch.Tensor:
        """The output of the second-to-last layer: SDXL's and SD2's context, A1111's "clip skip 2"."""
        return self.hidden_states[-2]


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI trained CLIP with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


def eos_pool(states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The state at the end-of-text token: the highest id in every chunk our tokenizer makes (first one wins)."""
    return states[torch.arange(states.shape[0], device=states.device), input_ids.argmax(dim=-1).to(states.device)]


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions are sliced from the weight instead of a `position_ids` buffer: a buffer would stay on the meta
        # device when a checkpoint is loaded with `assign=True`.
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        x = self.embeddings(input_ids)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        last = self.final_layer_norm(x)
        return TextEncoderOutput(tuple(states), last, eos_pool(last, input_ids))


# Top-level names in the layouts without the `text_model.` level: transformers 5's, and old SD1 checkpoints'.
UNWRAPPED = ("embeddings.", "encoder.", "final_layer_norm.")


def _accept_stored_layouts(module, state_dict, prefix, *args) -> None:
    """Real SD1 checkpoints carry the `position_ids` buffer transformers 4 saved; transformers 5 state dicts lack the
    `text_model.` level. Both load here: the buffer is dropped (positions are always 0..76) and the level added."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        if name.endswith("embeddings.position_ids"):
            del state_dict[key]
        elif name.startswith(UNWRAPPED):
            state_dict[prefix + "text_model." + name] = state_dict.pop(key)


class CLIPTextModel(nn.Module):
    """`transformers.CLIPTextModel`'s parameters (under `text_model.`), our own forward."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self._init_weights()
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_accept_stored_layouts)
        else:  # torch before 2.5 (A1111 1.10 ships 2.1) has it under a private name
            self._register_load_state_dict_pre_hook(_accept_stored_layouts, with_module=True)

    def _init_weights(self) -> None:
        # Scales like the trained model's, so a randomly initialised test model behaves like a real one.
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        return self.text_model(input_ids)
