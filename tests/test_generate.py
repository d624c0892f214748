"""Text to image with the tiny model: reproducible, prompt- and seed-sensitive, and the CLI writes a PNG."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from lib_copier.cli import main
from lib_copier.infotext import image_infotext
from lib_copier.models.configs import TINY
from lib_copier.models.generate import Txt2Img, generate, generate_batch
from lib_copier.models.loading import cpu_computes_fp16
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
    assert generate(tiny, Txt2Img("a red circle", seed=-1, steps=3)).tobytes() != a.tobytes()  # -1: a random seed


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

    if not cpu_computes_fp16():
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
    # a seed drawn at random is said (a name given by --out does not hold it), on stderr: stdout is the file alone
    assert main(["generate", "--prompt", "x", "--steps", "1", "--seed", "-1", "--out", str(tmp_path / "r.png")]) == 0
    said = capsys.readouterr()
    assert said.out.strip() == str(tmp_path / "r.png") and re.fullmatch(r"seed \d+", said.err.strip().splitlines()[-1])
    seed = int(said.err.split()[-1])
    assert image_infotext(Image.open(tmp_path / "r.png")).seed == seed  # and the file holds it, as the WebUIs' do
    assert main(["generate", "--prompt", "x", "--steps", "1", "--width", "30"]) == 2
    assert main(["generate", "--prompt", "x", "--steps", "1", "--width", "96", "--height", "100"]) == 2
    err = capsys.readouterr().err
    assert "height 100 must be a positive multiple of 32" in err and "sampling" not in err  # said before sampling
    # fp16 on a CPU works, many times slower: said, not silent; fp32 and bf16 say nothing.
    small = [
        "generate",
        "--prompt",
        "x",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--dtype",
    ]
    if cpu_computes_fp16():
        assert main([*small, "fp16"]) == 0
        assert "fp16 on a CPU is about 20 times slower" in capsys.readouterr().err
    else:  # torch 2.1 (A1111 1.10's) lacks a CPU fp16 LayerNorm: said before loading, not a traceback mid-sampling
        assert main([*small, "fp16"]) == 2
        assert "cannot compute fp16 on a CPU; use --dtype bf16 or fp32" in capsys.readouterr().err
    assert main([*small, "bf16"]) == 0
    assert "slower" not in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_the_image_holds_its_generation_parameters_where_the_webuis_read_them(tmp_path, suffix):
    # A1111's PNG Info (and the Copier tab's upload) read a PNG's `parameters` chunk, or a JPEG's or WebP's EXIF
    # UserComment; a prompt that is not Latin-1, has commas and lines, comes back whole.
    out = tmp_path / f"drawn{suffix}"
    prompt, negative = "a cat, über “quoted”\non two lines 猫", "blurry, lowres"
    args = ["--prompt", prompt, "--negative", negative, "--steps", "2", "--seed", "77", "--cfg", "5.5"]
    assert main(["generate", *args, "--width", "64", "--height", "96", "--sampler", "ddim", "--out", str(out)]) == 0
    info = image_infotext(Image.open(out))
    assert (info.prompt, info.negative) == (prompt, negative)
    assert (info.seed, info.steps, info.cfg, info.size) == (77, 2, 5.5, (64, 96))
    assert (info.params["Sampler"], info.params["Model"]) == ("DDIM", "built-in")
    if suffix != ".png":  # typed as EXIF wants a UserComment (UNDEFINED), which piexif, A1111's reader, requires
        assert b"\x92\x86\x00\x07" in Image.open(out).info["exif"]  # tag 0x9286, type 7, big-endian


def test_the_default_model_is_the_built_in_one_and_draws_the_prompt():
    from lib_copier.models.builtin.evaluate import read_colours
    from lib_copier.models.loading import load_model

    model = load_model(None, device="cpu", dtype="fp32")
    assert model.config.resolution == 128 and model.config.family == "sd1"
    colours = [
        read_colours(generate(model, Txt2Img("a large yellow star on a purple background", seed=s))) for s in range(4)
    ]
    assert sum(bg == "purple" for bg, _ in colours) >= 3 and sum(obj == "yellow" for _, obj in colours) >= 3


def test_cli_refuses_bad_numbers_and_outputs_in_one_line_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from lib_copier.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "folder.png").mkdir()
    cases = [
        (["--cfg", "nan"], "--cfg must be a number, not nan"),
        (["--width", "0"], "--width is 0; it must be between 64 and 2048"),
        (["--width", "100000"], "--width is 100000"),
        (["--seed", "99999999999999999999"], "--seed is 99999999999999999999; it must be between -1 and"),
        (["--out", str(tmp_path / "x.txt")], "must end in an image format's extension"),
        (["--out", str(tmp_path / "folder.png")], "is a folder"),
        (["--steps", "0"], "--steps is 0"),
        # the sides the model takes come from its file's header: said before its weights load (a 2 GB SD1.5: 13 s)
        (["--width", "100"], "width 100 must be a positive multiple of 32 for this model"),
        (["--model", str(tmp_path / "folder.png")], "is a folder"),
    ]
    for args, message in cases:
        assert main(["generate", "--prompt", "x", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err == f"error: {err.removeprefix('error: ')}" and message in err and "\n" not in err, (args, err)


def test_a_device_this_machine_lacks_is_one_sentence():
    from lib_copier.errors import CopierError
    from lib_copier.models.loading import pick_device

    with pytest.raises(CopierError, match="unknown device 'foo'; use cpu, cuda or cuda:N"):
        pick_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(CopierError, match="'cuda' asked for, but this torch sees no such device"):
            pick_device("cuda")
    else:
        with pytest.raises(CopierError, match="this machine has"):
            pick_device(f"cuda:{torch.cuda.device_count()}")
    assert pick_device("cpu") == torch.device("cpu")


def test_a_request_with_nan_or_infinity_is_refused_by_name():
    """Python's JSON reader takes NaN and Infinity, so an HTTP request can carry them."""
    import json

    from lib_copier.errors import CopierError
    from lib_copier.fields import from_json

    for text in ('{"prompt": "x", "cfg": NaN}', '{"prompt": "x", "cfg": -Infinity}'):
        with pytest.raises(CopierError, match='"cfg" must be a number, not (nan|-inf)'):
            from_json(Txt2Img, json.loads(text))


def test_threads_sets_torch_threads_and_draws_the_same_image(tmp_path):
    """On a CPU other work shares, one thread can be many times faster: `--threads` sets it; the image is the same."""
    threads = torch.get_num_threads()
    seen = []
    args = ["generate", "--prompt", "x", "--steps", "1"]
    try:
        assert main([*args, "--out", str(tmp_path / "default.png")]) == 0
        assert main([*args, "--threads", "1", "--out", str(tmp_path / "one.png")]) == 0
        seen.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]
    default, one = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("default", "one"))
    assert np.abs(default - one).max() <= 2  # sums in another order: a rounding apart, no more
    assert main([*args, "--threads", "-1"]) == 2
