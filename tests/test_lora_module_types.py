"""LyCORIS files (LoHa, LoKr, LoCon with a Tucker core) read as exact plain LoRAs, checked against the published
formulas (A1111's `extensions-builtin/Lora`: `network_hada.py`, `network_lokr.py`, `lyco_helpers.py`), written out
here independently of the code under test."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lib_copier.cli import main
from lib_copier.errors import CopierError
from lib_copier.lora.files import read_lora
from lib_copier.lora.module_types import split_modules
from lib_copier.lora.ops import merge_svd

SD1 = {"ss_base_model_version": "sd_v1"}


def _cp(t, wa, wb):  # lyco_helpers.make_weight_cp
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _kron(shape, w1, w2):  # network_lokr.make_kron
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape)  # contiguous: torch 2.1's kron views its input


def _loha(parts, shape):
    rank = parts["hada_w1_b"].shape[0]
    if "hada_t1" in parts:
        d1 = _cp(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
        d2 = _cp(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
    else:
        d1 = (parts["hada_w1_a"] @ parts["hada_w1_b"]).reshape(shape)
        d2 = (parts["hada_w2_a"] @ parts["hada_w2_b"]).reshape(shape)
    return (d1 * d2).reshape(shape) * float(parts["alpha"]) / rank


def _lokr(parts, shape):
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"]
    elif "lokr_t2" in parts:
        w2 = _cp(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    dim = next((parts[n].shape[0] for n in ("lokr_w2_b", "lokr_w1_b") if n in parts), None)
    scale = float(parts["alpha"]) / dim if dim and "alpha" in parts else 1.0
    return _kron(shape, w1, w2) * scale


def _locon_tucker(parts, shape):  # lyco_helpers.rebuild_cp_decomposition
    up, down, mid = parts["lora_up.weight"].flatten(1), parts["lora_down.weight"].flatten(1), parts["lora_mid.weight"]
    delta = torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down)
    return delta.reshape(shape) * float(parts["alpha"]) / down.shape[0]


_GENERATOR = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=_GENERATOR)


# (key, the layer's shape, tensors, dense delta by the published formula)
def _cases():
    out, inp, r = 64, 48, 4
    linear_loha = {"hada_w1_a": _r(out, r), "hada_w1_b": _r(r, inp), "hada_w2_a": _r(out, r), "hada_w2_b": _r(r, inp)}
    conv = (32, 16, 3, 3)
    flat_loha = {"hada_w1_a": _r(32, 3), "hada_w1_b": _r(3, 16 * 9), "hada_w2_a": _r(32, 3), "hada_w2_b": _r(3, 16 * 9)}
    tucker_loha = {
        "hada_w1_a": _r(3, 32), "hada_w1_b": _r(3, 16), "hada_t1": _r(3, 3, 3, 3),
        "hada_w2_a": _r(3, 32), "hada_w2_b": _r(3, 16), "hada_t2": _r(3, 3, 3, 3),
    }  # fmt: skip
    lokr_linear = {"lokr_w1": _r(4, 4), "lokr_w2_a": _r(16, 2), "lokr_w2_b": _r(2, 12)}
    lokr_full_conv = {"lokr_w1": _r(4, 2), "lokr_w2": _r(8, 8, 3, 3)}
    lokr_tucker = {"lokr_w1_a": _r(4, 2), "lokr_w1_b": _r(2, 2), "lokr_t2": _r(2, 2, 3, 3), "lokr_w2_a": _r(2, 8),
                   "lokr_w2_b": _r(2, 8)}  # fmt: skip
    locon = {"lora_up.weight": _r(32, 4, 1, 1), "lora_down.weight": _r(4, 16, 1, 1), "lora_mid.weight": _r(4, 4, 3, 3)}
    cases = [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (out, inp), linear_loha, _loha),
        ("lora_unet_down_blocks_0_resnets_0_conv1", conv, flat_loha, _loha),
        ("lora_unet_down_blocks_0_resnets_0_conv2", conv, tucker_loha, _loha),
        ("lora_unet_mid_block_attentions_0_proj_out", (64, 48), lokr_linear, _lokr),
        ("lora_unet_down_blocks_1_downsamplers_0_conv", conv, lokr_full_conv, _lokr),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", conv, lokr_tucker, _lokr),
        ("lora_unet_up_blocks_1_resnets_0_conv1", conv, locon, _locon_tucker),
    ]
    for _, _, parts, _ in cases:
        parts["alpha"] = torch.tensor(2.0)
    return cases


CASES = _cases()


@pytest.mark.parametrize(("key", "shape", "parts", "formula"), CASES, ids=[c[0][10:] + c[3].__name__ for c in CASES])
def test_each_lycoris_module_reads_as_a_lora_with_the_same_delta(key, shape, parts, formula):
    modules, types = split_modules({f"{key}.{name}": t for name, t in parts.items()})
    module = modules[key]
    expected = formula(parts, shape)
    assert module.shape == shape
    assert module.rank <= min(shape[0], expected[0].numel())
    assert torch.allclose(module.delta(), expected, atol=1e-4 * float(expected.abs().max()))
    assert sum(types.values()) == 1


def _write(path, cases, metadata=SD1):
    tensors = {f"{key}.{name}": t.contiguous() for key, _, parts, _ in cases for name, t in parts.items()}
    save_file(tensors, str(path), metadata=metadata)
    return {key: formula(parts, shape) for key, shape, parts, formula in cases}


@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_a_lycoris_file_round_trips_through_the_tools_as_a_plain_lora(kind, tmp_path, capsys):
    cases = [c for c in CASES if c[3].__name__ == "_" + kind.lower()]
    source = tmp_path / f"{kind}.safetensors"
    lycoris = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": kind.lower(), "conv_dim": "4"}),
    }
    expected = _write(source, cases, SD1 | lycoris)
    assert main(["lora", "info", str(source)]) == 0
    assert f"types     {kind} {len(cases)}" in capsys.readouterr().out
    resized, merged = tmp_path / "resized.safetensors", tmp_path / "merged.safetensors"
    assert main(["lora", "resize", str(source), "--new-rank", "512", "--precision", "fp32", "--out", str(resized)]) == 0
    args = ["lora", "svd-merge", str(source), str(source), "--ratios", "0.25", "0.75", "--new-rank", "512"]
    assert main([*args, "--precision", "fp32", "--out", str(merged)]) == 0
    for path in (resized, merged):
        lora = read_lora(path)
        assert set(lora.types) == {"LoRA"}
        # A plain LoRA says so: a resized LoHa kept "lycoris.kohya" and its algo.
        assert lora.metadata["ss_network_module"] == "networks.lora"
        assert "algo" not in json.loads(lora.metadata["ss_network_args"])
        for key, delta in expected.items():
            assert torch.allclose(lora.modules[key].delta(), delta, atol=1e-4 * float(delta.abs().max())), key


@pytest.mark.parametrize(
    ("parts", "words"),
    [
        ({"lora_down.weight": _r(4, 8), "lora_up.weight": _r(8, 4), "dora_scale": _r(8, 1)}, "is DoRA"),
        ({"diff": _r(8, 8)}, "is a full weight difference"),
        ({"oft_blocks": _r(2, 4, 4)}, "is OFT"),
        ({"hada_w1_a": _r(8, 2), "hada_w1_b": _r(2, 8), "hada_w2_a": _r(8, 2)}, "lacks its hada_w2_b tensor"),
        (
            {"hada_w1_a": _r(8, 2), "hada_w1_b": _r(2, 9), "hada_w2_a": _r(8, 2), "hada_w2_b": _r(2, 8)},
            "is a LoHa whose tensors do not fit each other: hada_w1_a",
        ),
    ],
)
def test_a_module_that_is_not_a_lora_is_named_with_its_type_and_nothing_is_written(parts, words, tmp_path, capsys):
    key = "lora_unet_mid_block_attentions_0_proj_out"
    source = tmp_path / "odd.safetensors"
    save_file({f"{key}.{name}": t for name, t in parts.items()}, str(source), metadata=SD1)
    with pytest.raises(CopierError, match=f"module {key} {words}"):
        read_lora(source)
    out = tmp_path / "out.safetensors"
    assert main(["lora", "resize", str(source), "--new-rank", "4", "--out", str(out)]) == 2
    assert words in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    ("alpha", "words"),
    [
        (torch.tensor(float("nan")), "its alpha is nan; the file is damaged"),
        (torch.tensor([4.0, 4.0]), "its alpha holds 2 values; it must be one number"),
    ],
)
@pytest.mark.parametrize("tool", ["merge", "resize"])
def test_a_damaged_alpha_is_refused_and_nothing_is_written(alpha, words, tool, tmp_path, capsys):
    """A NaN alpha passed the factors' check: the merged LoRA came out NaN, and a checkpoint merged with it drew
    black images."""
    key = "lora_unet_mid_block_attentions_0_proj_out"
    source = tmp_path / "odd.safetensors"
    parts = {"lora_down.weight": _r(4, 8), "lora_up.weight": _r(8, 4), "alpha": alpha}
    save_file({f"{key}.{name}": t for name, t in parts.items()}, str(source), metadata=SD1)
    out = tmp_path / "out.safetensors"
    rank = ["--new-rank", "2"] if tool == "resize" else []
    assert main(["lora", tool, str(source), *rank, "--out", str(out)]) == 2
    assert f"LoRA module {key}: {words}" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("tool", ["merge", "resize"])
def test_a_module_of_rank_0_is_refused_and_nothing_is_written(tool, tmp_path, capsys):
    """merge divided by its rank (ZeroDivisionError) and resize indexed its empty spectrum: tracebacks."""
    key = "lora_unet_mid_block_attentions_0_proj_out"
    source, out = tmp_path / "empty.safetensors", tmp_path / "out.safetensors"
    parts = {"lora_down.weight": torch.zeros(0, 8), "lora_up.weight": torch.zeros(8, 0), "alpha": torch.tensor(1.0)}
    save_file({f"{key}.{name}": t for name, t in parts.items()}, str(source), metadata=SD1)
    rank = ["--new-rank", "2"] if tool == "resize" else []
    assert main(["lora", tool, str(source), *rank, "--out", str(out)]) == 2
    assert f"LoRA module {key}: its rank is 0; the file is damaged" in capsys.readouterr().err and not out.exists()


def test_a_one_by_one_conv_merges_whether_it_comes_as_a_matrix_or_four_dimensional():
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    loha = {"hada_w1_a": _r(32, 2), "hada_w1_b": _r(2, 16), "hada_w2_a": _r(32, 2), "hada_w2_b": _r(2, 16)}
    lora = {"lora_down.weight": _r(4, 16, 1, 1), "lora_up.weight": _r(32, 4, 1, 1)}
    first, _ = split_modules({f"{key}.{n}": t for n, t in loha.items()})
    second, _ = split_modules({f"{key}.{n}": t for n, t in lora.items()})
    merged = merge_svd([(first, 1.0), (second, -1.0)], rank=8)[key]
    expected = first[key].delta().reshape(32, 16, 1, 1) - second[key].delta()
    assert merged.shape == (32, 16, 1, 1)
    assert torch.allclose(merged.delta(), expected, atol=1e-4 * float(expected.abs().max()))
