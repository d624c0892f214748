"""Full-size models on the meta device have exactly the keys and shapes of real checkpoints.

SD1/SD2 are compared with checkpoints assembled from the reference modules (ldm's UNet and VAE, transformers'
CLIPTextModel, open_clip's text tower); SDXL, whose reference (sgm) is not installable here, with a committed
list derived from that code (see the header of tests/data/sdxl_checkpoint_keys.txt.gz).
"""

import gzip
from pathlib import Path

import pytest
import torch

from lib_copier.models.sd_model import build_model

pytest.importorskip("ldm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

from ldm.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

DATA = Path(__file__).parent / "data"


def shapes(prefix: str, module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def reference_checkpoint(family: str) -> dict[str, tuple[int, ...]]:
    ddconfig = dict(
        double_z=True,
        z_channels=4,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_resolutions=[],
        dropout=0.0,
    )
    unet = dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        channel_mult=[1, 2, 4, 4],
        use_spatial_transformer=True,
        transformer_depth=1,
        legacy=False,
    )
    keys = {}
    with torch.device("meta"):
        keys |= shapes("first_stage_model.encoder.", Encoder(**ddconfig))
        keys |= shapes("first_stage_model.decoder.", Decoder(**ddconfig))
        keys |= shapes("first_stage_model.quant_conv.", torch.nn.Conv2d(8, 8, 1))
        keys |= shapes("first_stage_model.post_quant_conv.", torch.nn.Conv2d(4, 4, 1))
        if family == "sd1":
            keys |= shapes("model.diffusion_model.", UNetModel(**unet, num_heads=8, context_dim=768))
            te = transformers.CLIPTextModel(
                transformers.CLIPTextConfig(
                    hidden_size=768,
                    intermediate_size=3072,
                    num_attention_heads=12,
                    num_hidden_layers=12,
                    hidden_act="quick_gelu",
                )
            )
            # transformers 5 dropped CLIPTextModel's `text_model.` level; real checkpoints have it.
            keys |= {
                k.replace("transformer.", "transformer.text_model.", 1) if ".text_model." not in k else k: v
                for k, v in shapes("cond_stage_model.transformer.", te).items()
            }
        else:
            keys |= shapes(
                "model.diffusion_model.",
                UNetModel(**unet, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
            )
            clip = open_clip.model.CLIP(**open_clip.get_model_config("ViT-H-14"))
            keys |= {k: v for k, v in shapes("cond_stage_model.model.", clip).items() if ".visual." not in k}
    return keys


def committed_sdxl() -> dict[str, tuple[int, ...]]:
    with gzip.open(DATA / "sdxl_checkpoint_keys.txt.gz", "rt") as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return {k: () if s == "scalar" else tuple(int(n) for n in s.split("x")) for k, s in rows}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_checkpoint_layout(family):
    ours = shapes("", build_model(family, device="meta"))
    expected = committed_sdxl() if family == "sdxl" else reference_checkpoint(family)
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert ours == expected


def test_sdxl_unet_parameter_count():
    unet = build_model("sdxl", device="meta").unet
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
