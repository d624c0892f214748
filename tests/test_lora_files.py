"""LoRA files: round trip, kohya's hashes, metadata, the variants read, and the errors."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_copier.errors import CopierError
from lib_copier.lora.files import read_lora, write_lora
from lib_copier.lora.metadata import NetworkInfo, build_metadata
from lib_copier.lora.weights import LoRAWeights


def modules(count=24, rank=16, width=768, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        f"lora_te_text_model_encoder_layers_{i}_mlp_fc1": LoRAWeights(
            torch.randn(rank, width, generator=gen), torch.randn(width, rank, generator=gen) * 0.01, 8.0
        )
        for i in range(count)
    }


def independent_hashes(tensors, metadata, tmp_path):
    """kohya's recipe, spelled out separately: write a file with only the ss_* metadata and hash its bytes."""
    path = tmp_path / "hash-check.safetensors"
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header :]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_round_trip_with_metadata_and_hashes(tmp_path, precision):
    info = NetworkInfo("sd1", 16, 8.0, "my-lora", comment="a test", training={"max_train_steps": 500})
    metadata = build_metadata(info, now=0.0)
    path = write_lora(tmp_path / "my-lora.safetensors", modules(), metadata, precision)
    lora = read_lora(path)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for key, module in modules().items():
        assert torch.equal(lora.modules[key].down, module.down.to(dtype))
        assert lora.modules[key].alpha == 8.0
    assert lora.family == "sd1"
    for key, value in metadata.items():
        assert lora.metadata[key] == value
    assert lora.metadata["ss_base_model_version"] == "sd_v1" and lora.metadata["ss_max_train_steps"] == "500"
    assert lora.metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(lora.metadata["ss_network_args"]) == {}
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].dim() == 0
    assert (lora.metadata["sshs_model_hash"], lora.metadata["sshs_legacy_hash"]) == independent_hashes(
        tensors, lora.metadata, tmp_path
    )


def test_hash_ignores_user_metadata_but_not_tensors(tmp_path):
    base = build_metadata(NetworkInfo("sd1", 16, 8.0, "x"), now=0.0)
    a = read_lora(write_lora(tmp_path / "a.safetensors", modules(), base))
    b = read_lora(write_lora(tmp_path / "b.safetensors", modules(), {**base, "modelspec.description": "changed"}))
    c = read_lora(write_lora(tmp_path / "c.safetensors", modules(seed=1), base))
    assert a.metadata["sshs_model_hash"] == b.metadata["sshs_model_hash"] != c.metadata["sshs_model_hash"]


def test_peft_and_diffusers_named_sdxl_files_are_read_as_kohya(tmp_path):
    t = torch.ones
    tensors = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": t(2, 640),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": t(640, 2),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": t(2, 1280),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": t(1280, 2),
    }
    save_file(tensors, str(tmp_path / "peft.safetensors"))
    lora = read_lora(tmp_path / "peft.safetensors")
    assert lora.family == "sdxl"
    assert set(lora.modules) == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    }
    assert lora.modules["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"].scale == 1.0  # no alpha: alpha = rank
    kohya_diffusers = {
        "lora_unet_up_blocks_0_resnets_2_conv1.lora_down.weight": t(2, 2560, 3, 3),
        "lora_unet_up_blocks_0_resnets_2_conv1.lora_up.weight": t(1280, 2, 1, 1),
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k.lora_down.weight": t(2, 2048),
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k.lora_up.weight": t(1280, 2),
    }
    save_file(kohya_diffusers, str(tmp_path / "kd.safetensors"))
    assert set(read_lora(tmp_path / "kd.safetensors").modules) == {
        "lora_unet_output_blocks_2_0_in_layers_2",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
    }


def test_peft_sd1_files_with_their_one_text_encoder_are_read_as_sd1_not_sdxl(tmp_path):
    """diffusers names SD1's only text encoder `text_encoder.`, as SDXL's first: the UNet's depth-1 transformers, or
    for a text-encoder-only file its metadata, say SD1 (such a file was read as an SDXL LoRA, renamed for SDXL)."""
    t = torch.ones
    text = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": t(2, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": t(768, 2),
    }
    unet = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": t(2, 768),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": t(320, 2),
    }
    save_file({**text, **unet}, str(tmp_path / "sd1.safetensors"))
    save_file(text, str(tmp_path / "te.safetensors"), {"ss_base_model_version": "sd_v1"})
    lora = read_lora(tmp_path / "sd1.safetensors")
    assert lora.family == "sd1" and set(lora.modules) == {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    }
    text_only = read_lora(tmp_path / "te.safetensors")
    assert text_only.family == "sd1" and set(text_only.modules) == {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    }
    save_file(text, str(tmp_path / "sdxl-te.safetensors"))  # nothing else to go by: SDXL's first text encoder
    assert read_lora(tmp_path / "sdxl-te.safetensors").family == "sdxl"


def test_family_from_widths_when_there_is_no_metadata(tmp_path):
    t = torch.ones
    tensors = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": t(4, 1024),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": t(4096, 4),
    }
    save_file(tensors, str(tmp_path / "sd2.safetensors"))
    assert read_lora(tmp_path / "sd2.safetensors").family == "sd2"
    # A UNet-only SD1 LoRA without cross-attention key/value layers: its 1x1-conv transformer projections say SD1.
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{proj}.lora_down.weight": t(4, 320, 1, 1), f"{proj}.lora_up.weight": t(320, 4, 1, 1)},
              str(tmp_path / "sd1.safetensors"))  # fmt: skip
    assert read_lora(tmp_path / "sd1.safetensors").family == "sd1"
    save_file(
        {f"{proj}.lora_down.weight": t(4, 320), f"{proj}.lora_up.weight": t(320, 4)}, str(tmp_path / "x.safetensors")
    )
    assert read_lora(tmp_path / "x.safetensors").family is None  # linear: SD2, or SD1's stored flat


def test_bad_files_get_one_clear_sentence(tmp_path):
    with pytest.raises(CopierError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CopierError, match="not a readable .safetensors"):
        read_lora(tmp_path / "junk.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CopierError, match="model.safetensors is a model checkpoint, not a LoRA$"):
        read_lora(tmp_path / "model.safetensors")
    bundle = {"bundle_emb.mytoken.string_to_param.*": torch.ones(2, 768)}  # kohya's LoRA with an embedding
    bundle |= {f"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_{p}.weight": torch.ones(2, 2) for p in ("down", "up")}
    save_file(bundle, str(tmp_path / "bundle.safetensors"))
    with pytest.raises(CopierError, match=r"bundles textual-inversion embeddings \(mytoken\) with its LoRA; the LoRA"):
        read_lora(tmp_path / "bundle.safetensors")
    path = write_lora(tmp_path / "a.safetensors", modules(count=1), {})
    before = path.read_bytes()
    with pytest.raises(CopierError, match="already exists"):
        write_lora(path, modules(count=1, seed=3), {})
    assert path.read_bytes() == before
    names = ["a.safetensors", "bundle.safetensors", "junk.safetensors", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
