"""Ctrl-C in the command line: the first stops the training between two steps, so that `save_on_cancel` keeps what
was trained, as the README says; a second one stops at once."""

import os
import signal

import pytest
from PIL import Image

from lib_copier.cli import main
from lib_copier.lora.files import read_lora
from lib_copier.recipes import cli as recipes_cli
from lib_copier.recipes import job as job_module
from lib_copier.recipes.grid import strength_grid


def test_the_first_ctrl_c_asks_the_run_to_stop_and_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with recipes_cli._first_ctrl_c_stops_between_steps() as asked:
        assert not asked()
        os.kill(os.getpid(), signal.SIGINT)
        assert asked()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("keep", [True, False])
def test_ctrl_c_during_training_keeps_what_was_trained_only_with_save_on_cancel(tmp_path, monkeypatch, capsys, keep):
    image = Image.new("RGB", (64, 64), "red")
    image.paste((0, 0, 255), (16, 16, 48, 48))
    image.save(tmp_path / "a.png")
    callbacks = recipes_cli._bar_callbacks

    def pressing_ctrl_c_at_step_3(holder):
        made = callbacks(holder)
        progress = made.progress

        def at_step(p):
            progress(p)
            if p.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

        made.progress = at_step
        return made

    monkeypatch.setattr(recipes_cli, "_bar_callbacks", pressing_ctrl_c_at_step_3)
    out, said = _interrupted_copier(tmp_path, capsys, keep, "--steps", "50", "--grid-steps", "0")
    if keep:
        assert said == f"training was interrupted at step 3; what it trained is in {out}"
        assert read_lora(out / "a-copier.safetensors").modules  # the copier, interrupted at step 3
        assert sorted(p.name for p in out.iterdir()) == ["a-copier.json", "a-copier.safetensors"]
    else:
        assert said == "training was interrupted at step 3; nothing was written"
        assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("keep", [True, False])
def test_ctrl_c_while_the_grids_are_drawn_stops_them(tmp_path, monkeypatch, capsys, keep):
    # Every LoRA is finished by then: save_on_cancel keeps them all, without grids; without it nothing is written.
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    drawn = []

    def grid_pressing_ctrl_c_after_its_first_image(render, prompts, side, **kwargs):
        progress = kwargs.pop("progress")

        def after_each(done, total):
            drawn.append(done)
            if done == 1:
                os.kill(os.getpid(), signal.SIGINT)
            progress(done, total)

        return strength_grid(render, prompts, side, progress=after_each, **kwargs)

    monkeypatch.setattr(job_module, "strength_grid", grid_pressing_ctrl_c_after_its_first_image)
    out, said = _interrupted_copier(tmp_path, capsys, keep, "--steps", "2", "--grid-steps", "1")
    assert drawn == [1]  # the next image was not drawn
    if keep:
        assert said == f"interrupted while drawing the strength grids; what it trained is in {out}"
        names = ["a-copier.json", "a-copier.safetensors", "a-grayscale.json", "a-grayscale.safetensors"]
        assert sorted(p.name for p in out.iterdir()) == names
    else:
        assert said == "interrupted while drawing the strength grids; nothing was written"
        assert not out.exists() or not any(out.iterdir())


def _interrupted_copier(tmp_path, capsys, keep: bool, *options: str):
    """`copier` on tmp_path/a.png, which a Ctrl-C stops (exit code 130): its output folder and last sentence."""
    out = tmp_path / "out"
    args = ["copier", "--image", str(tmp_path / "a.png"), "--effect", "grayscale", "--method", "copier", *options]
    args += ["--out", str(out), *(["--set", "save_on_cancel=true"] if keep else [])]
    assert main(args) == 130
    return out, capsys.readouterr().err.strip().splitlines()[-1]


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`python -m lib_copier lora info x | head` printed "error: Broken pipe" once head had its lines."""
    import subprocess
    import sys

    script = "import sys; from lib_copier.cli import main; sys.exit(main(['effects', 'list']))"
    run = subprocess.run(
        f'{sys.executable} -c "{script}" | head -1', shell=True, capture_output=True, text=True, timeout=120
    )
    assert run.stdout.count("\n") == 1 and run.stderr == ""
