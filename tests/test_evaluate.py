"""The evaluation's arithmetic, charts and command hold together on a tiny run (the metrics themselves:
test_evaluate_core_metrics.py)."""

import json

import numpy as np
import pytest

from lib_copier.errors import CopierError
from lib_copier.evaluate.charts import Series, line_chart
from lib_copier.evaluate.measure import _summary


def test_summary_normalises_transfer_by_the_effects_own_change():
    # weights (-1, 0, 1), one prompt, two seeds; the effect itself lowers the metric by 10 on both seeds.
    metric = np.array([[[60.0, 62.0]], [[50.0, 50.0]], [[45.0, 44.0]]])
    raw = {
        "metric": metric,
        "distance": np.array([[[20.0, 20.0]], [[10.0, 10.0]], [[5.0, 5.0]]]),
        "leak_layout": np.array([[[0.1, 0.1]], [[0.2, 0.2]], [[0.5, 0.3]]]),
        "leak_psnr": np.array([[[9.0, 9.0]], [[10.0, 10.0]], [[13.0, 12.0]]]),
        "control_psnr": np.array([[[9.5, 9.5]], [[10.0, 10.0]], [[11.0, 11.0]]]),
        "control_layout": np.zeros((3, 1, 2)),
        "kept_layout": np.array([[[0.8, 0.8]], [[1.0, 1.0]], [[0.9, 0.9]]]),
        "kept_psnr": np.zeros((3, 1, 2)),
    }
    reference = {
        "metric_base": np.array([[50.0, 50.0]]),
        "metric_effect": np.array([[40.0, 40.0]]),
        "distance": np.array([[10.0, 10.0]]),
    }
    summary = _summary(raw, reference, zero=1)
    assert summary["transfer"]["mean"] == pytest.approx([-1.1, 0.0, 0.55])
    assert summary["transfer"]["sd"][2] == pytest.approx(np.std([0.5, 0.6], ddof=1), abs=1e-4)
    assert summary["closeness"]["mean"] == pytest.approx([-1.0, 0.0, 0.5])
    assert summary["leak_layout"]["mean"] == pytest.approx([-0.1, 0.0, 0.2])
    assert summary["leak"]["mean"] == pytest.approx([-0.5, 0.0, 1.5])  # toward the originals beyond the controls


def test_line_chart_draws_each_series_in_its_colour():
    chart = line_chart("t", [-1, 0, 1], [Series("a", [0.0, 0.5, None], [0.1, 0.0, None], (255, 0, 0))])
    colours = {c for _, c in chart.getcolors(100000)}
    assert (255, 0, 0) in colours and chart.size == (250, 170)


def test_evaluate_command_writes_a_report_on_a_tiny_run(tmp_path, capsys):
    from lib_copier.cli import main

    out = tmp_path / "eval"
    argv = ["evaluate", "--out", str(out), "--effect", "grayscale", "--originals", "2", "--prompts", "1"]
    argv += [
        "--seeds",
        "2",
        "--steps",
        "3",
        "--sample-steps",
        "2",
        "--prompt-pool",
        "2",
        "--workers",
        "1",
        "--threads",
        "1",
        "--pair-set",
        "steps=3",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    grayscale = results["effects"]["grayscale"]
    assert set(grayscale["variants"]) == {"single", "merged"}
    assert set(grayscale["variants"]["merged"]) == {"naive", "copier", "extraction", "slider", "addift"}
    assert set(results["timing"]["train_s_by_method"]) == {"naive", "copier", "extraction", "slider", "addift"}
    assert results["settings"]["pair_train_configs"]["slider"]["steps"] == 3
    summary = grayscale["variants"]["merged"]["copier"]["summary"]
    assert len(summary["transfer"]["mean"]) == 6 and summary["kept_layout"]["mean"][2] == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "## Result" in report and "images/grayscale-grid.png" in report
    assert "**Winner per effect**" in report and "grayscale: **" in report
    for name in ("originals", "grayscale-grid", "grayscale-charts"):
        assert (out / "images" / f"{name}.png").is_file()
    assert main(argv) == 2  # an existing report is not overwritten
    assert "already exists" in capsys.readouterr().err


def test_monotone_allows_a_flat_start_but_not_a_step_back_or_no_change():
    from lib_copier.evaluate.report import _monotone

    assert _monotone([-0.1, -0.05, 0.0, 0.1, 0.2, 0.3])
    assert _monotone([0.01, 0.0, 0.0, 0.1, 0.2, 0.3])  # nothing to undo at negative weights: fine
    assert not _monotone([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert not _monotone([-0.1, 0.0, 0.0, 0.3, 0.1, 0.4])
    assert not _monotone([-0.1, None, 0.0, 0.1, 0.2, 0.3])


def test_a_bad_effect_or_count_is_one_sentence_before_anything_runs(tmp_path, capsys):
    from lib_copier.cli import main

    assert main(["evaluate", "--out", str(tmp_path), "--effect", "grayscale+sepiaa"]) == 2
    assert "sepiaa" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "--seeds: 0 is not at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_bad_model_output_image_or_worker_count_is_one_sentence_before_any_worker_starts(
    tmp_path, monkeypatch, capsys
):
    """Said in this process: a worker that cannot load the model broke the pool with a traceback, and --out was
    only tried once the report was done."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from lib_copier.cli import main
    from lib_copier.evaluate import workers

    monkeypatch.setattr(workers, "Workers", lambda *a, **k: pytest.fail("a worker started"))
    gray, lora, file = tmp_path / "gray.png", tmp_path / "lora.safetensors", tmp_path / "file"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(gray)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    file.write_text("")
    out = tmp_path / "eval"
    cases = [
        (["--model", str(tmp_path / "missing.safetensors")], "missing.safetensors does not exist"),
        (["--model", str(gray)], "gray.png has an unknown extension"),
        (["--model", str(lora)], "lora.safetensors is a LoRA, not a checkpoint"),
        (["--out", str(file)], f"cannot write in {file}: {file} is a file, not a folder"),
        (["--out", str(file / "eval")], "is a file, not a folder"),
        (["--image", str(gray), "--effect", "grayscale"], "grayscale leaves the original unchanged"),
        (["--workers", "0"], "--workers: 0 is not from 1 to 64"),
        (["--workers", "-3"], "--workers: -3 is not from 1 to 64"),
        (["--workers", "65"], "--workers: 65 is not from 1 to 64"),
        (["--originals", "9"], "--originals is 9, but the built-in model's evaluation has 8; ask for at most 8"),
        (["--processed-set", "warmup_steps=1000"], "warmup_steps (1000) must be at most steps (250)"),
        (["--processed-set", "rnak=4"], "--processed-set 'rnak=4': expected KEY=VALUE with KEY one of rank,"),
        (["--set", "lr=0"], "setting lr is 0"),
        (["--notes", str(tmp_path / "notes.md")], f"--notes {tmp_path / 'notes.md'} does not exist"),
    ]
    for args, message in cases:
        assert main(["evaluate", "--quick", "--out", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (args, err)
    assert not out.exists()
    # A picture an earlier report left: said now, not after the whole evaluation when the report is written.
    (out / "images").mkdir(parents=True)
    (out / "images" / "grayscale-charts.png").write_bytes(b"an earlier report's")
    assert main(["evaluate", "--quick", "--out", str(out), "--effect", "grayscale"]) == 2
    assert f"{out / 'images' / 'grayscale-charts.png'} already exists" in capsys.readouterr().err


def test_another_models_evaluation_takes_as_many_originals_and_prompts_as_it_has():
    """Its defaults (8 originals, 4 prompts) were cut to the 4 and 3 it has while the report said 8 and 4."""
    import argparse

    from lib_copier.cli import build_parser
    from lib_copier.evaluate.cli import settings_from

    args = build_parser().parse_args(["evaluate", "--model", "sd15.safetensors"])
    settings = settings_from(args)
    assert (settings.originals, settings.prompts) == (4, 3)
    with pytest.raises(CopierError, match="--prompts is 4, but another model's evaluation has 3; ask for at most 3"):
        settings_from(argparse.Namespace(**{**vars(args), "prompts": 4}))


def test_a_worker_that_cannot_load_the_model_gives_its_sentence_to_its_tasks(monkeypatch):
    """A refusal that escapes a pool's initializer breaks the pool: the parent saw BrokenProcessPool, not why."""
    from lib_copier.errors import CopierError
    from lib_copier.evaluate import workers
    from lib_copier.models import loading

    def refuse(*args):
        raise CopierError("checkpoint x.safetensors is truncated")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(workers.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(workers, "_failure", None)
    workers._init_worker(workers.ModelSpec(), 1)
    with pytest.raises(CopierError, match="x.safetensors is truncated"):
        workers.backend()
