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
from tests.conftest import randomize_


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
    path = _write(tmp_path / "partial.safetensors", ["model.diffusion_model.out.2.weight", marker])
    with pytest.raises(CopierError, match=rf"looks like {family} but lacks \d+ weights, e\.g\. "):
        load_checkpoint(path)


def test_unknown_layouts_are_refused_with_a_reason(tmp_path):
    with pytest.raises(CopierError, match="not a Stable Diffusion checkpoint in the LDM layout"):
        load_checkpoint(_write(tmp_path / "lora.safetensors", ["lora_unet_x.lora_down.weight"]))
    with pytest.raises(CopierError, match="no text encoder we know"):
        load_checkpoint(_write(tmp_path / "unet.safetensors", ["model.diffusion_model.out.2.weight"]))
    with pytest.raises(CopierError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CopierError, match="not a readable .safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")


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
