"""The benchmarks refuse bad options in one sentence before any model is built or loaded (what they measure:
test_trainer.py's train benchmark)."""

import pytest

from lib_copier.cli import main


def _refusals(capsys, command: list[str], cases: list[tuple[list[str], str]]) -> None:
    for args, message in cases:
        assert main([*command, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (args, err)


def test_the_train_benchmark_refuses_bad_options_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from lib_copier.train import bench

    monkeypatch.setattr(bench, "_model", lambda args: pytest.fail("the model was loaded"))
    file = tmp_path / "file"
    file.write_text("")
    missing = tmp_path / "missing.safetensors"
    _refusals(
        capsys,
        ["bench", "train", "--stages", "copier", "--steps", "2"],
        [
            (["--resolution", "100"], "--resolution 100 is not a multiple of 32, as this model's image sides must be"),
            (["--family", "sd1", "--resolution", "480"], "--resolution 480 is not a multiple of 64"),
            (["--model", str(missing)], f"checkpoint {missing} does not exist"),
            (["--model", str(missing), "--family", "sd1"], "argument --family: not allowed with argument --model"),
            (["--profile", str(tmp_path)], f"{tmp_path} is a folder"),
            (["--profile", str(file / "profile.txt")], f"{file} is a file, not a folder"),
            (["--json", str(file / "bench.json")], f"{file} is a file, not a folder"),
            (["--json", str(file)], f"{file} already exists; choose another name, or --overwrite"),
            (["--profile", str(file)], f"{file} already exists; choose another name, or --overwrite"),
        ],
    )
    assert list(tmp_path.iterdir()) == [file]


def test_the_lora_benchmark_refuses_a_workdir_it_cannot_write_in_before_the_work(tmp_path, monkeypatch, capsys):
    from lib_copier.models import sd_model

    monkeypatch.setattr(sd_model, "build_model", lambda *a, **k: pytest.fail("the work started"))
    file = tmp_path / "file"
    file.write_text("")
    _refusals(
        capsys,
        ["bench", "lora"],
        [
            (["--workdir", str(file)], f"cannot write in {file}: {file} is a file, not a folder"),
            (["--workdir", str(file / "work")], f"{file} is a file, not a folder"),
        ],
    )
