"""The built-in model's training command: seeded, resumable to the same weights, and its colour metric is sound."""

import random

import pytest
import torch
from safetensors.torch import load_file

from lib_copier.models.builtin import train
from lib_copier.models.builtin.evaluate import read_colours
from lib_copier.models.builtin.scenes import random_scene, render

TINY_PLAN = [
    "--train-images",
    "8",
    "--eval-images",
    "4",
    "--vae-steps",
    "3",
    "--vae-batch",
    "2",
    "--vae-crop",
    "32",
    "--unet-steps",
    "4",
    "--unet-batch",
    "2",
    "--save-every",
    "2",
    "--device",
    "cpu",
    "--threads",
    "2",
]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = tmp_path / "straight.safetensors"
    assert train.main(["--work", str(tmp_path / "a"), "--out", str(straight), *TINY_PLAN]) == 0

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the UNet stage, after its first save at step 2
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    resumed = tmp_path / "resumed.safetensors"
    monkeypatch.setattr(torch.optim.AdamW, "step", crash_once)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--work", str(tmp_path / "b"), "--out", str(resumed), *TINY_PLAN])
    assert not resumed.exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert train.main(["--work", str(tmp_path / "b"), "--out", str(resumed), *TINY_PLAN]) == 0

    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path):
    work = tmp_path / "w"
    assert train.main(["--work", str(work), "--out", str(tmp_path / "x.safetensors"), *TINY_PLAN]) == 0
    with pytest.raises(SystemExit, match="other settings"):
        train.main(["--work", str(work), "--out", str(tmp_path / "y.safetensors"), *TINY_PLAN, "--unet-lr", "0.5"])


def test_colour_reader_agrees_with_the_scene_that_was_drawn():
    rng, hits_bg, hits_obj, n = random.Random(7), 0, 0, 0
    while n < 60:
        scene = random_scene(rng, held_out=True)
        if scene.background == "split":
            continue
        scene = type(scene)(scene.background, scene.bg_colour, scene.bg_colour2, scene.objects[:1])
        bg, obj = read_colours(render(scene, 128, n))
        hits_bg += bg == scene.bg_colour
        hits_obj += obj == scene.main.colour
        n += 1
    # The ceiling the generated images are judged against: near perfect on the pictures themselves.
    assert hits_bg / n >= 0.95 and hits_obj / n >= 0.9
