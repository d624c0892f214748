"""Checkpoints in the LDM layout: round trip, family detection, clear refusals."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from lib_copier.errors import CopierError
from lib_copier.models.checkpoint import TensorSource, load_checkpoint, save_checkpoint
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img, generate
from lib_copier.models.sd_model import build_model
from tests.conftest import TINY_SD2V, TINY_SDXL, randomize_


@pytest.fixture(scope="module")
def tiny():
    return randomize_(build_model(TINY, seed=0), seed=7, std=0.1)


def test_round_trip_keeps_weights_family_and_images(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == tiny.config and loaded.config.family == "sd1"
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    before = generate(tiny, Txt2Img("a red circle", seed=3, steps=4))
    after = generate(loaded, Txt2Img("a red circle", seed=3, steps=4))
    assert before.tobytes() == after.tobytes()


def test_half_precision_file_loads_in_its_own_dtype(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert next(loaded.unet.parameters()).dtype == torch.float16
    assert next(load_checkpoint(path, dtype=torch.float32).unet.parameters()).dtype == torch.float32


def test_existing_file_is_not_overwritten(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "a.safetensors")
    with pytest.raises(CopierError, match="already exists"):
        save_checkpoint(tiny, path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary file left behind


def _write(path, keys, metadata=None):
    save_file({k: torch.zeros(1) for k in keys}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "marker, family",
    [
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "sd1"),
        ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "sd2"),
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "sdxl"),
    ],
)
def test_family_is_read_from_the_keys_and_missing_weights_are_named(tmp_path, marker, family):
    parts = ["model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight", marker]
    path = _write(tmp_path / "partial.safetensors", parts)
    with pytest.raises(CopierError, match=rf"looks like {family} but lacks \d+ weights, e\.g\. "):
        load_checkpoint(path)


def test_unknown_layouts_are_refused_with_a_reason(tmp_path):
    for name, keys, message in [
        ("lora", ["lora_unet_x.lora_down.weight"], "lora.safetensors is a LoRA, not a checkpoint"),
        ("peft", ["unet.x.lora_A.weight"], "peft.safetensors is a LoRA, not a checkpoint"),
        ("vae", ["encoder.conv_in.weight", "decoder.conv_out.weight"], "vae.safetensors is a VAE alone"),
        ("layout", ["unet.conv_in.weight"], "not a Stable Diffusion checkpoint in the LDM layout"),
        (
            "refiner",
            ["model.diffusion_model.out.2.weight", "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"],
            "it is the SDXL refiner",
        ),
    ]:
        with pytest.raises(CopierError, match=message):
            load_checkpoint(_write(tmp_path / f"{name}.safetensors", keys))
    diffusers = tmp_path / "diffusers"
    (diffusers / "unet").mkdir(parents=True)
    (diffusers / "model_index.json").write_text("{}")
    with pytest.raises(CopierError, match="is a diffusers folder; Copier LoRA reads single-file checkpoints"):
        load_checkpoint(diffusers)
    with pytest.raises(CopierError, match="no text encoder we know"):
        load_checkpoint(_write(tmp_path / "unet.safetensors", ["model.diffusion_model.out.2.weight"]))
    with pytest.raises(CopierError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CopierError, match="not a readable .safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint at all")
    with pytest.raises(CopierError, match="junk.ckpt is neither a torch checkpoint nor a .safetensors file"):
        load_checkpoint(tmp_path / "junk.ckpt")


def test_inpainting_and_unclip_checkpoints_are_refused_before_they_load(tmp_path):
    model = build_model(TINY, seed=0)
    first = model.unet.input_blocks[0][0]
    model.unet.input_blocks[0][0] = torch.nn.Conv2d(9, first.out_channels, 3, padding=1)
    path = save_checkpoint(model, tmp_path / "inpainting.safetensors")
    with pytest.raises(CopierError, match="inpainting.safetensors takes 9 input channels, not 4: it is an inpainting"):
        load_checkpoint(path)
    model = build_model(TINY, seed=0)
    model.unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    path = save_checkpoint(model, tmp_path / "unclip.safetensors")
    with pytest.raises(CopierError, match="unclip.safetensors takes an image embedding beside the prompt"):
        load_checkpoint(path)


def test_pickles_with_code_are_refused_and_plain_tensors_load(tiny, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CopierError, match="pickle that holds more than plain tensors"):
        load_checkpoint(evil)
    plain = tmp_path / "plain.ckpt"
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    torch.save({"state_dict": state}, plain)
    source = TensorSource(plain)
    assert source.keys == set(state)
    assert all(torch.equal(source.get(k), v) for k, v in state.items())


def test_prediction_type_is_read_from_modelspec_metadata():
    from lib_copier.models.checkpoint import _stored_prediction

    assert _stored_prediction({"modelspec.prediction_type": "v"}) == "v"
    assert _stored_prediction({"modelspec.prediction_type": "epsilon"}) == "eps"
    assert _stored_prediction({}) is None


def test_explicit_prediction_overrides_the_file(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    assert load_checkpoint(path).config.prediction == "eps"
    assert load_checkpoint(path, prediction="v").config.prediction == "v"


def test_checkpoints_as_older_tools_saved_them_load_as_a1111_loads_them(tiny, tmp_path):
    """An SD1 text encoder without `text_model.` in its names (transformers before 4.x), the legacy torch format, an
    upper-case extension: A1111 loads each, and they were refused."""
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    old = {k.replace("transformer.text_model.", "transformer.", 1): v for k, v in state.items()}
    metadata = {"copier.model_config": tiny.config.to_json()}
    save_file(old, str(tmp_path / "old.SafeTensors"), metadata=metadata)
    torch.save({"state_dict": state}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    for path in (tmp_path / "old.SafeTensors", tmp_path / "legacy.ckpt"):
        source = TensorSource(path)
        assert source.keys == set(state) and all(torch.equal(source.get(k), v) for k, v in state.items())
    loaded = load_checkpoint(tmp_path / "old.SafeTensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), state.values(), strict=True))


@pytest.mark.parametrize("config", [TINY_SD2V, TINY_SDXL], ids=["sd2", "sdxl"])
def test_a_file_without_the_weights_no_output_reads_loads_and_draws_the_same(tmp_path, config):
    """diffusers' SD2 text encoder has 23 layers: a file converted from it lacks the last layer, the projection and
    `logit_scale`, which SD2 never reads (it takes the penultimate layer, and no pooled output); A1111 loads it."""
    model = randomize_(build_model(config, seed=0), seed=3, std=0.1)
    path = save_checkpoint(model, tmp_path / "full.safetensors")
    unread = tuple(model.unread_parameters())
    last = config.text_encoders[-1].openclip.layers - 1
    sd2 = ("logit_scale", "text_projection", f"transformer.resblocks.{last}.")
    expected = (
        [f"cond_stage_model.model.{n}" for n in sd2]
        if config is TINY_SD2V
        else ["conditioner.embedders.1.model.logit_scale"]
    )
    assert list(unread) == expected
    source = TensorSource(path)
    partial = tmp_path / "partial.safetensors"
    kept = {k: source.get(k) for k in source.keys if not k.startswith(unread)}
    assert len(kept) < len(source.keys)
    save_file(kept, str(partial), metadata=source.metadata)
    loaded = load_checkpoint(partial)
    prompts = ["a red circle", "a house"]
    a, b = model.encode_prompts(prompts), loaded.encode_prompts(prompts)
    assert torch.equal(a.context, b.context) and (a.vector is None or torch.equal(a.vector, b.vector))
    needed = next(k for k in kept if k.startswith("first_stage_model."))
    save_file({k: v for k, v in kept.items() if k != needed}, str(partial), metadata=source.metadata)
    with pytest.raises(CopierError, match=rf"lacks 1 weights, e\.g\. {needed}"):
        load_checkpoint(partial)
    save_file({k: v for k, v in kept.items() if not k.startswith("first_stage_model.")}, str(partial))
    with pytest.raises(CopierError, match=r"holds no VAE \(no first_stage_model\.… weights\)"):
        load_checkpoint(partial)


def test_the_sd2_prediction_is_read_from_a_yaml_beside_the_file(tmp_path):
    from lib_copier.models.checkpoint import _yaml_prediction

    path = tmp_path / "sd2.safetensors"
    assert _yaml_prediction(path) is None
    (tmp_path / "sd2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    assert _yaml_prediction(path) == "v"
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert _yaml_prediction(path) == "eps"
