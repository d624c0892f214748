"""The naming table gives kohya's module sets on full-size layouts, and every key maps to a layer and back."""

import pytest

from lib_copier.lora.naming import by_key, lora_targets, model_family
from lib_copier.lora.unet_names import ldm_to_diffusers, sdxl_diffusers_to_ldm
from lib_copier.models.sd_model import build_model

COUNTS = {"sd1": (192, 72, 278), "sd2": (192, 138, 278), "sdxl": (722, 264, 788)}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def layout(request):
    model = build_model(request.param, device="meta")
    return request.param, {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_module_sets_match_kohya(layout):
    family, shapes = layout
    assert model_family(shapes) == family
    targets = lora_targets(shapes, family)
    unet = sum(t.key.startswith("lora_unet_") for t in targets)
    assert (unet, len(targets) - unet) == COUNTS[family][:2]
    with_conv = lora_targets(shapes, family, conv=True)
    assert sum(t.key.startswith("lora_unet_") for t in with_conv) == COUNTS[family][2]


def test_every_key_maps_to_one_weight_and_back(layout):
    family, shapes = layout
    targets = lora_targets(shapes, family, conv=True)
    table = by_key(targets)
    back = {(t.param_name, t.part): key for key, t in table.items()}
    assert len(back) == len(table)
    for key, target in table.items():
        assert target.param_name in shapes
        assert back[(target.param_name, target.part)] == key


EXPECTED = {
    "sd1": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_up_blocks_3_attentions_2_proj_out": "output_blocks.11.1.proj_out",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_down_blocks_0_downsamplers_0_conv": "input_blocks.3.0.op",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",
        "lora_unet_up_blocks_1_upsamplers_0_conv": "output_blocks.5.2.conv",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "input_blocks.4.0.skip_connection",
        "lora_unet_mid_block_resnets_1_time_emb_proj": "middle_block.2.emb_layers.1",
        "lora_te_text_model_encoder_layers_11_mlp_fc2": "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2",
    },
    "sd2": {
        "lora_te_text_model_encoder_layers_22_self_attn_v_proj": "cond_stage_model.model.transformer.resblocks.22.attn",
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc",
    },
    "sdxl": {
        "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2": "output_blocks.5.1.transformer_blocks.1.ff.net.2",
        "lora_unet_input_blocks_3_0_op": "input_blocks.3.0.op",
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj": "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.out_proj",
        "lora_te2_text_model_encoder_layers_31_self_attn_k_proj": "conditioner.embedders.1.model.transformer.resblocks.31.attn",
    },
}


def test_known_keys(layout):
    family, shapes = layout
    table = by_key(lora_targets(shapes, family, conv=True))
    for key, path in EXPECTED[family].items():
        expected = path if path.startswith(("cond_stage", "conditioner")) else "model.diffusion_model." + path
        assert table[key].path == expected, key
    if family == "sd2":
        v = table["lora_te_text_model_encoder_layers_22_self_attn_v_proj"]
        assert (v.param, v.part, v.shape, v.rows) == ("in_proj_weight", 2, (1024, 1024), slice(2048, 3072))


def test_sdxl_diffusers_names_round_trip():
    shapes = {name: tuple(p.shape) for name, p in build_model("sdxl", device="meta").named_parameters()}
    for target in lora_targets(shapes, "sdxl", conv=True):
        if target.key.startswith("lora_unet_"):
            path = target.path.removeprefix("model.diffusion_model.")
            assert sdxl_diffusers_to_ldm(ldm_to_diffusers(path, 2)) == path
