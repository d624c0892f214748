"""`python -m lib_copier lora …`: each action end to end on tiny files, and one-line errors with exit code 2."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_copier.cli import main
from lib_copier.lora.files import read_lora, write_lora
from lib_copier.lora.metadata import NetworkInfo, build_metadata
from lib_copier.lora.naming import by_key, lora_targets
from lib_copier.lora.network import LoRANetwork
from lib_copier.lora.ops import apply_to_state_dict
from lib_copier.models.checkpoint import TensorSource, save_checkpoint
from lib_copier.models.sd_model import build_model
from tests.conftest import randomize_


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-cli")
    model = randomize_(build_model("tiny", seed=0), seed=1)
    base = save_checkpoint(model, root / "base.safetensors")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    targets = lora_targets(shapes, "sd1")
    paths = []
    for seed in (0, 1):
        network = LoRANetwork.create(targets, rank=4, alpha=4.0, seed=seed)
        for module in network.modules_by_key.values():
            torch.nn.init.normal_(module.lora_up.weight, std=0.1)
        metadata = build_metadata(NetworkInfo("sd1", 4, 4.0, f"l{seed}"))
        paths.append(write_lora(root / f"l{seed}.safetensors", network.to_weights(), metadata, "fp32"))
    return root, base, paths, by_key(targets)


def test_kohya_names_for_the_inputs_give_the_same_files(files, tmp_path):
    """`--models` (merge, svd-merge), `--model` (resize), `--model_org`/`--model_tuned` (extract), as in kohya's
    scripts, so that a kohya command line can be reused; each gives the file the command gives by position."""
    _, base, (a, b), _ = files
    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", str(a), "--model", str(base), "--out", str(merged)]) == 0
    commands = {
        "merge": (["merge", str(a), str(b)], ["merge", "--models", str(a), str(b)]),
        "resize": (["resize", str(a), "--new-rank", "2"], ["resize", "--model", str(a), "--new_rank", "2"]),
        "extract": (
            ["extract", str(base), str(merged), "--dim", "2"],
            ["extract", "--model_org", str(base), "--model_tuned", str(merged), "--dim", "2"],
        ),
    }
    for name, (ours, kohya) in commands.items():
        written = [tmp_path / f"{name}-{i}.safetensors" for i in range(2)]
        assert main(["lora", *ours, "--out", str(written[0])]) == 0
        assert main(["lora", *kohya, "--save_to", str(written[1])]) == 0
        first, second = (read_lora(path).modules for path in written)
        assert all(torch.equal(first[k].delta(), second[k].delta()) for k in first), name


def test_kohyas_save_precision_wins_over_its_precision_and_its_device_is_taken(files, tmp_path):
    """In kohya's merge scripts --precision is the precision the merge computes in and --save_precision the file's:
    `--save_precision fp16 --precision float` wrote fp32 here, and `--device cuda` was refused."""
    from safetensors import safe_open

    _, _, (a, b), _ = files
    for tool, extra in (("svd-merge", ["--new_rank", "2"]), ("merge", []), ("resize", ["--new_rank", "2"])):
        out = tmp_path / f"{tool}.safetensors"
        inputs = ["--models", str(a), str(b)] if tool != "resize" else ["--model", str(a)]
        argv = [
            "lora",
            tool,
            *inputs,
            *extra,
            "--save_to",
            str(out),
            "--save_precision",
            "fp16",
            "--precision",
            "float",
        ]
        assert main([*argv, "--device", "cuda"]) == 0, tool
        with safe_open(str(out), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("_down.weight")} == {"F16"}, tool


def test_info(files, capsys):
    _, _, (a, _), _ = files
    assert main(["lora", "info", str(a)]) == 0
    out = capsys.readouterr().out
    assert "family    sd1" in out and "ranks     4" in out and "matches the tensors" in out


def test_merge_svd_merge_resize(files, tmp_path):
    _, _, (a, b), _ = files
    assert (
        main(["lora", "merge", str(a), str(b), "--ratios", "1", "-0.5", "--out", str(tmp_path / "m.safetensors")]) == 0
    )
    merged = read_lora(tmp_path / "m.safetensors")
    la, lb = read_lora(a), read_lora(b)
    key = next(iter(merged.modules))
    expected = la.modules[key].delta() - 0.5 * lb.modules[key].delta()
    assert torch.allclose(merged.modules[key].delta(), expected, atol=1e-2 * float(expected.abs().max()))
    assert merged.metadata["ss_base_model_version"] == "sd_v1" and merged.ranks == {8}
    out = tmp_path / "s.safetensors"
    assert main(["lora", "svd-merge", str(a), str(b), "--ratios", "1", "-1", "--new_rank", "2", "--out", str(out)]) == 0
    assert read_lora(out).ranks == {2}
    out = tmp_path / "r.safetensors"
    assert main(["lora", "resize", str(a), "--new-rank", "2", "--out", str(out)]) == 0
    resized = read_lora(out)
    assert resized.ranks == {2} and resized.metadata["ss_network_dim"] == "2"
    assert resized.metadata["ss_training_comment"].startswith("dimension is resized from 4 to 2")


def test_merge_into_checkpoint_and_extract_back(files, tmp_path):
    _, base, (a, _), table = files
    tuned = tmp_path / "tuned.safetensors"
    assert main(["lora", "merge", str(a), "--model", str(base), "--precision", "fp32", "--out", str(tuned)]) == 0
    source = TensorSource(base)
    state = {k: source.get(k) for k in source.keys}
    apply_to_state_dict(state, [(read_lora(a).modules, 1.0)], table)
    result = TensorSource(tuned)
    assert all(torch.equal(result.get(k), state[k]) for k in state)
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", str(base), str(tuned), "--dim", "4", "--precision", "fp32", "--out", str(out)]) == 0
    extracted, original = read_lora(out), read_lora(a)
    for key, module in original.modules.items():
        assert torch.allclose(extracted.modules[key].delta(), module.delta(), atol=1e-4), key


def test_extract_compares_only_the_layers_a_lora_covers(files, tmp_path, capsys):
    """Official SD1.5 carries EMA weights and the noise schedule, which a fine-tune saved by another tool lacks: such
    a pair was refused as having "different layers or shapes"."""
    _, base, (a, _), table = files
    source = TensorSource(base)
    state = {k: source.get(k) for k in source.keys}
    apply_to_state_dict(state, [(read_lora(a).modules, 1.0)], table)
    tuned = tmp_path / "tuned.safetensors"
    save_file(state, tuned)
    original = tmp_path / "official.safetensors"
    extra = {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.linspace(1, 0, 1000)}
    save_file({k: source.get(k) for k in source.keys} | extra, original)
    out = tmp_path / "x.safetensors"
    assert (
        main(["lora", "extract", str(original), str(tuned), "--dim", "4", "--precision", "fp32", "--out", str(out)])
        == 0
    )
    for key, module in read_lora(a).modules.items():
        assert torch.allclose(read_lora(out).modules[key].delta(), module.delta(), atol=1e-4), key
    # Without a conv rank the ResNet layers are left out, as kohya's default does, and the log says so.
    assert re.search(r"\n\d+ ResNet and sampler layers left out, as kohya does", "\n" + capsys.readouterr().out)
    same = tmp_path / "copy.safetensors"
    save_file({k: source.get(k) for k in source.keys}, same)
    target = next(iter(table.values())).param_name
    other = tmp_path / "other.safetensors"
    save_file({k: v[:, :-1].contiguous() if k == target else v for k, v in state.items()}, other)
    for tuned, message in [
        (same, "the same weights in every layer a LoRA covers: nothing to extract"),
        (other, f"differ in a layer a LoRA covers: {target} is"),
    ]:
        assert (
            main(["lora", "extract", str(original), str(tuned), "--dim", "4", "--out", str(tmp_path / "o.safetensors")])
            == 2
        )
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_checkpoint_merged_in_half_precision_keeps_its_noise_schedule_in_fp32(files, tmp_path):
    """The WebUIs sample with the file's `alphas_cumprod`: rounded to fp16 it would shift every sampler's sigmas."""
    _, base, (a, _), _ = files
    source = TensorSource(base)
    schedule = {"alphas_cumprod": torch.linspace(0.9991, 0.0047, 1000), "model_ema.decay": torch.tensor(0.9999)}
    official = tmp_path / "official.safetensors"
    save_file({k: source.get(k) for k in source.keys} | schedule, official)
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", str(a), "--model", str(official), "--precision", "fp16", "--out", str(out)]) == 0
    merged = TensorSource(out)
    assert all(torch.equal(merged.get(k), v) for k, v in schedule.items())
    assert {merged.get(k).dtype for k in source.keys if source.get(k).is_floating_point()} == {torch.float16}


def test_a_half_precision_checkpoint_merged_in_fp32_keeps_the_delta_at_fp32_precision(files, tmp_path):
    """kohya merges in fp32; rounding each changed weight to the checkpoint's fp16 first would put an error of about
    3e-3 of the delta into every one of them."""
    _, base, (a, _), table = files
    half = TensorSource(base)
    half_base = tmp_path / "half.safetensors"
    save_file({k: half.get(k).half() if half.get(k).is_floating_point() else half.get(k) for k in half.keys}, half_base)
    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", str(a), "--model", str(half_base), "--precision", "fp32", "--out", str(merged)]) == 0
    result, source = TensorSource(merged), TensorSource(half_base)
    for key, module in read_lora(a).modules.items():
        target = table[key]
        weight, old = (tensors.get(target.param_name)[target.rows] for tensors in (result, source))  # rows None: all
        assert weight.dtype == torch.float32
        expected = old.float() + module.delta().reshape(old.shape)
        assert torch.allclose(weight, expected, rtol=0, atol=1e-6), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "missing.safetensors"], "does not exist"),
        (["info", "{base}"], "is a model checkpoint, not a LoRA"),
        (["resize", "--new-rank", "2", "--out", "{tmp}/o.safetensors"], "give LORA (or --model, as kohya names it)"),
        (["merge", "{a}", "--models", "{b}", "--out", "{tmp}/o.safetensors"], "LORA is given twice"),
        (
            ["resize", "{a}", "--new-rank", "0", "--out", "{tmp}/o.safetensors"],
            "--new-rank/--new_rank: 0 is not at least 1",
        ),
        (["resize", "{a}", "--new-rank", "2", "--out", "{b}"], "already exists"),
        (["merge", "{a}", "{sd2}", "--out", "{tmp}/o.safetensors"], "different model families"),
        (["merge", "{a}", "{b}", "--ratios", "1", "--out", "{tmp}/o.safetensors"], "one ratio per LoRA"),
        (
            ["merge", "{a}", "{a}", "--ratios", "1", "-1", "--out", "{tmp}/o.safetensors"],
            "l0.safetensors x 1, l0.safetensors x -1 cancel out in every layer: the merge would change nothing",
        ),
        (["svd-merge", "{a}", "--ratios", "0", "--new-rank", "2", "--out", "{tmp}/o.safetensors"], "cancel out"),
        (["svd-merge", "{a}", "{wide}", "--new-rank", "2", "--out", "{tmp}/o.safetensors"], "different shapes"),
        # numbers are refused while the arguments are parsed, by the option's name; NaN and infinities included
        (["merge", "{a}", "--ratios", "nan", "--out", "{tmp}/o.safetensors"], "--ratios: 'nan' is not a finite"),
        (["merge", "{a}", "--ratios", "inf", "--out", "{tmp}/o.safetensors"], "--ratios: 'inf' is not a finite"),
        (["resize", "{a}", "--new-rank", "9" * 400, "--out", "{tmp}/o.safetensors"], "(400 characters) is too large"),
        (
            ["svd-merge", "{a}", "--new-rank", "2", "--new-conv-rank", "-1", "--out", "{tmp}/o.safetensors"],
            "--new-conv-rank/--new_conv_rank: -1 is not at least 1",
        ),
        (
            ["svd-merge", "{a}", "--new-rank", "2", "--clamp-quantile", "2", "--out", "{tmp}/o.safetensors"],
            "2 is not above 0 and at most 1",
        ),
        (
            [
                "resize",
                "{a}",
                "--new-rank",
                "2",
                "--dynamic-method",
                "sv_ratio",
                "--dynamic-param",
                "0.5",
                "--out",
                "{tmp}/o.safetensors",
            ],
            "sv_ratio's parameter is the largest singular value over the smallest kept",
        ),
        (
            ["resize", "{a}", "--new-rank", "2", "--dynamic-param", "0.5", "--out", "{tmp}/o.safetensors"],
            "needs both a method and its parameter",
        ),
        (["resize", "{nan}", "--new-rank", "2", "--out", "{tmp}/o.safetensors"], "2 module(s) hold NaN or infinite"),
        (["svd-merge", "{a}", "{nan}", "--new-rank", "2", "--out", "{tmp}/o.safetensors"], "is damaged"),
        (["info", "{tmp}"], "is a folder, not a file"),
        (["merge", "{a}", "--out", "{tmp}", "--overwrite"], "is a folder; name a file to write"),
        (["merge", "{a}", "--out", "{a}/o.safetensors"], "is a file, not a folder"),
        (["extract", "{base}", "{base}", "--dim", "4", "--out", "{tmp}/o.safetensors"], "are the same file"),
        (["extract", "{base}", "{a}", "--dim", "4", "--out", "{tmp}/o.safetensors"], "l0.safetensors is a LoRA, not a"),
        (
            ["merge", "{a}", "--model", "{b}", "--out", "{tmp}/o.safetensors"],
            "l1.safetensors is a LoRA, not a checkpoint",
        ),
        (["extract", "{base}", "{a}", "--out", "{tmp}/o.safetensors"], "arguments are required: --dim (python"),
        (
            ["extract", "{base}", "{a}", "--dim", "4", "--out", "{base}", "--overwrite"],
            "is one of the checkpoints, which",
        ),
        (
            ["extract", "{base}", "{base}", "--dim", "4", "--device", "foo", "--out", "{tmp}/o.safetensors"],
            "unknown device 'foo'",
        ),
    ],
)
def test_errors_are_one_line_and_exit_2(files, tmp_path, capsys, args, message):
    root, base, (a, b), _ = files
    sd2 = write_lora(tmp_path / "sd2.safetensors", read_lora(a).modules, {"ss_base_model_version": "sd_v2"}, "fp32")
    wide = {
        k: type(m)(torch.ones(2, m.down.shape[1] + 1), torch.ones(m.up.shape[0], 2), 2.0)
        for k, m in read_lora(a).modules.items()
    }
    wide = write_lora(tmp_path / "wide.safetensors", wide, {"ss_base_model_version": "sd_v1"})
    nan = dict(read_lora(a).modules)
    for key in list(nan)[:2]:  # two modules whose up factor went NaN in a broken training
        nan[key] = type(nan[key])(nan[key].down, torch.full_like(nan[key].up, float("nan")), nan[key].alpha)
    nan = write_lora(tmp_path / "nan.safetensors", nan, {"ss_base_model_version": "sd_v1"})
    names = {"base": base, "a": a, "b": b, "sd2": sd2, "wide": wide, "nan": nan, "tmp": tmp_path}
    assert main(["lora", *[arg.format(**names) for arg in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    err = err.rpartition("\r")[2]  # after a progress bar that was cleared (extract's)
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o.safetensors").exists()


def test_merged_files_say_the_ranks_they_hold_and_keep_fp32_by_default(files, tmp_path):
    root, base, _, _ = files
    targets = lora_targets(TensorSource(base).shapes(), "sd1", conv=True)
    paths = []
    for seed, (rank, conv) in enumerate([(4, 2), (8, 2)]):
        network = LoRANetwork.create(targets, rank=rank, alpha=rank / 2, conv_rank=conv, conv_alpha=1.0, seed=seed)
        for module in network.modules_by_key.values():
            torch.nn.init.normal_(module.lora_up.weight, std=0.1)
        metadata = build_metadata(NetworkInfo("sd1", rank, rank / 2, f"c{seed}", conv_rank=conv, conv_alpha=1.0))
        paths.append(write_lora(tmp_path / f"c{seed}.safetensors", network.to_weights(), metadata, "fp32"))
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", *map(str, paths), "--out", str(out)]) == 0
    merged = read_lora(out)
    assert {m.down.dtype for m in merged.modules.values()} == {torch.float32}
    assert (merged.metadata["ss_network_dim"], merged.metadata["ss_network_alpha"]) == ("12", "12.0")
    assert json.loads(merged.metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    out = tmp_path / "svd.safetensors"
    assert (
        main(["lora", "svd-merge", *map(str, paths), "--new-rank", "6", "--new-conv-rank", "3", "--out", str(out)]) == 0
    )
    merged = read_lora(out)
    assert merged.metadata["ss_network_dim"] == "6"
    assert json.loads(merged.metadata["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3.0"}
    out = tmp_path / "dynamic.safetensors"
    args = ["--dynamic-method", "sv_ratio", "--dynamic-param", "2"]
    assert main(["lora", "resize", str(paths[1]), "--new-rank", "8", *args, "--out", str(out)]) == 0
    resized = read_lora(out)
    assert len(resized.ranks) > 1 and resized.metadata["ss_network_dim"] == "Dynamic"


@pytest.mark.parametrize("args_text", ["{not json", "null", "[1, 2]"])
def test_resize_takes_a_lora_whose_network_args_another_tool_wrote_as_something_else(files, tmp_path, args_text):
    """`ss_network_args` that is not a JSON object (broken, null, a list) is left out of the resized file; resize
    crashed on it after its work, and wrote nothing."""
    _, _, paths, _ = files
    odd = tmp_path / "odd.safetensors"
    with safe_open(str(paths[0]), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(odd), {**f.metadata(), "ss_network_args": args_text})
    out = tmp_path / "resized.safetensors"
    assert main(["lora", "resize", str(odd), "--new-rank", "2", "--out", str(out)]) == 0
    resized = read_lora(out)
    assert resized.metadata["ss_network_args"] == "{}" and resized.ranks == {2}
