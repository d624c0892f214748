"""Whole-model configs: SD1, SD2 (eps / v), SDXL, and the tiny SD1-layout model used when no checkpoint is given.

A `ModelConfig` is plain data (dataclasses of ints and tuples) so it can travel as JSON inside a checkpoint's
metadata: that is how a non-standard model (tiny, built-in) is rebuilt from its file alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from lib_copier.models.clip_text import CLIPTextConfig
from lib_copier.models.openclip_text import OpenCLIPTextConfig
from lib_copier.models.unet import UNetConfig
from lib_copier.models.vae import VAEConfig


@dataclass(frozen=True)
class TextEncoderSpec:
    """One prompt encoder: its architecture and which of its layers conditions the UNet."""

    kind: str  # "clip" (Hugging Face layout) or "openclip"
    clip: CLIPTextConfig | None = None
    openclip: OpenCLIPTextConfig | None = None
    layer: str = "last"  # "last" or "penultimate"
    final_norm: bool | None = None  # final layer norm after `layer`; None: only after "last" (see text_encoders)


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "sd1", "sd2" or "sdxl": decides LoRA naming and the checkpoint layout
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderSpec, ...]
    prediction: str = "eps"  # "eps" or "v"
    scale_factor: float = 0.18215
    resolution: int = 512
    schedule: dict = field(default_factory=lambda: {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012})

    @property
    def base_model_version(self) -> str:
        """kohya's `ss_base_model_version` vocabulary."""
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        if self.family == "sd2":
            return "sd_v2_v" if self.prediction == "v" else "sd_v2"
        return "sd_v1"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)

        def build(kind, value):
            if value is None:
                return None
            fields = {f.name: f.type for f in dataclasses.fields(kind)}
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items() if k in fields})

        encoders = tuple(
            TextEncoderSpec(
                kind=e["kind"],
                layer=e["layer"],
                final_norm=e.get("final_norm"),
                clip=build(CLIPTextConfig, e.get("clip")),
                openclip=build(OpenCLIPTextConfig, e.get("openclip")),
            )
            for e in raw["text_encoders"]
        )
        return cls(
            family=raw["family"],
            unet=build(UNetConfig, raw["unet"]),
            vae=build(VAEConfig, raw["vae"]),
            text_encoders=encoders,
            prediction=raw["prediction"],
            scale_factor=raw["scale_factor"],
            resolution=raw["resolution"],
            schedule=raw["schedule"],
        )


CLIP_L = CLIPTextConfig()  # ViT-L/14 text tower (SD1, SDXL's first encoder)
OPENCLIP_H = OpenCLIPTextConfig(width=1024, layers=24, heads=16, output_dim=1024)  # SD2
OPENCLIP_BIGG = OpenCLIPTextConfig(width=1280, layers=32, heads=20, output_dim=1280)  # SDXL's second encoder

SD1 = ModelConfig(
    family="sd1",
    unet=UNetConfig(),
    vae=VAEConfig(),
    text_encoders=(TextEncoderSpec("clip", clip=CLIP_L, layer="last"),),
)

SD2 = ModelConfig(
    family="sd2",
    unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    vae=VAEConfig(),
    text_encoders=(TextEncoderSpec("openclip", openclip=OPENCLIP_H, layer="penultimate", final_norm=True),),
)

SD2_V = dataclasses.replace(SD2, prediction="v", resolution=768)

SDXL = ModelConfig(
    family="sdxl",
    unet=UNetConfig(
        channel_mult=(1, 2, 4),
        attention_resolutions=(4, 2),
        transformer_depth=(1, 2, 10),
        transformer_depth_middle=10,
        num_head_channels=64,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
    ),
    vae=VAEConfig(),
    text_encoders=(
        TextEncoderSpec("clip", clip=CLIP_L, layer="penultimate"),
        TextEncoderSpec("openclip", openclip=OPENCLIP_BIGG, layer="penultimate", final_norm=False),
    ),
    scale_factor=0.13025,
    resolution=1024,
)

# A few MB, SD1 layout and SD1 names: what runs when no checkpoint is given (random weights from a fixed seed).
TINY = ModelConfig(
    family="sd1",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        transformer_depth=(1, 1),
        num_heads=4,
        context_dim=32,
        norm_groups=8,
    ),
    vae=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
    text_encoders=(TextEncoderSpec("clip", clip=CLIPTextConfig(width=32, layers=2, heads=2), layer="last"),),
    resolution=64,
)

FAMILIES = {"sd1": SD1, "sd2": SD2, "sd2v": SD2_V, "sdxl": SDXL, "tiny": TINY}
