"""Text to image with the tiny model: reproducible, prompt- and seed-sensitive, and the CLI writes a PNG."""

import numpy as np
import pytest
from PIL import Image

from lib_copier.cli import main
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img, generate, generate_batch
from lib_copier.models.sd_model import build_model
from tests.conftest import randomize_


@pytest.fixture(scope="module")
def tiny():
    return randomize_(build_model(TINY, seed=0), seed=11, std=0.1)


def test_same_seed_same_image_and_inputs_matter(tiny):
    a = generate(tiny, Txt2Img("a red circle", seed=1, steps=3))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert generate(tiny, Txt2Img("a red circle", seed=1, steps=3)).tobytes() == a.tobytes()
    assert generate(tiny, Txt2Img("a red circle", seed=2, steps=3)).tobytes() != a.tobytes()
    assert generate(tiny, Txt2Img("a blue square", seed=1, steps=3)).tobytes() != a.tobytes()


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_sizes_samplers_and_guidance(tiny, sampler):
    image = generate(tiny, Txt2Img("x", seed=0, steps=2, width=96, height=64, sampler=sampler, cfg=1.0))
    assert image.size == (96, 64)


def test_a_batch_draws_what_each_request_draws_alone(tiny):
    requests = [Txt2Img("a red circle", seed=1, steps=3), Txt2Img("a blue square", negative="red", seed=2, steps=3)]
    batch = generate_batch(tiny, requests)
    for image, request in zip(batch, requests, strict=True):
        alone = np.asarray(generate(tiny, request), dtype=int)
        assert np.abs(np.asarray(image, dtype=int) - alone).max() <= 1  # float rounding of a batched matmul
    with pytest.raises(ValueError, match="must share size, steps"):
        generate_batch(tiny, [requests[0], Txt2Img("x", steps=4)])


def test_a_half_precision_model_draws_what_the_full_precision_model_draws(tiny):
    """WebUIs load their models in fp16; our GroupNorm computes in fp32 there too, outside any autocast."""
    import copy

    import torch

    from lib_copier.evaluate.metrics import psnr

    try:
        torch.nn.functional.layer_norm(torch.zeros(2, dtype=torch.float16), (2,))
    except RuntimeError:
        pytest.skip("this torch (2.1, A1111 1.10's) has no fp16 LayerNorm on the CPU")
    request = Txt2Img("a red circle", seed=1, steps=3)
    half = copy.deepcopy(tiny).to(torch.float16)
    assert psnr(generate(half, request), generate(tiny, request)) > 40


def test_bad_size_is_named(tiny):
    with pytest.raises(ValueError, match="width 100 must be a positive multiple of 16"):
        generate(tiny, Txt2Img("x", width=100, height=64, steps=1))


def test_cli_writes_a_png_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "a red circle", "--steps", "2"]) == 0
    assert main(["generate", "--prompt", "a red circle", "--steps", "2"]) == 0
    written = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert written == ["0-a-red-circle-2.png", "0-a-red-circle.png"]
    assert Image.open(tmp_path / "outputs" / written[0]).size == (128, 128)  # the built-in model's size
    out = tmp_path / "mine.png"
    assert main(["generate", "--prompt", "x", "--steps", "1", "--out", str(out)]) == 0
    assert main(["generate", "--prompt", "x", "--steps", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--steps", "1", "--width", "30"]) == 2


def test_the_default_model_is_the_built_in_one_and_draws_the_prompt():
    from lib_copier.models.builtin.evaluate import read_colours
    from lib_copier.models.loading import load_model

    model = load_model(None, device="cpu", dtype="fp32")
    assert model.config.resolution == 128 and model.config.family == "sd1"
    colours = [
        read_colours(generate(model, Txt2Img("a large yellow star on a purple background", seed=s))) for s in range(4)
    ]
    assert sum(bg == "purple" for bg, _ in colours) >= 3 and sum(obj == "yellow" for _, obj in colours) >= 3
