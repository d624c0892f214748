"""The method's promises, measured on the built-in model (the default model, which really draws).

- Copier: with A, the model draws the original O for other prompts and seeds.
- Processed: with A and B at 1 it draws the processed image P.
- Several originals: the B's of eight originals of different colours, merged, make an effect slider: on the base
  model alone it lowers the chroma of other generations, more at +1.5 than at +0.5. (The B of one original does
  not, on this small model: it learns a colour shift tied to that original's palette.) A slow test (minutes):
  `python -m pytest -m slow`; docs/method-report.md measures the same for every effect.
- Pair methods (slider, addift): they learn only the difference. On a pair of two equal images the LoRA draws the
  base model's images unchanged, where the naive LoRA (a plain LoRA on the same image) does not; on (O, grayscale O)
  the LoRA at +1 greys O's own generation, and the slider at -1 does the opposite.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from lib_copier.backends.standalone import StandaloneBackend
from lib_copier.effects.chain import Chain
from lib_copier.evaluate.metrics import chroma, psnr
from lib_copier.lora.files import read_lora
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.builtin.scenes import sample_captions
from lib_copier.models.generate import Txt2Img
from lib_copier.models.loading import load_model
from lib_copier.recipes.job import Job, method_config, run_job
from lib_copier.recipes.methods import train_copier, train_processed
from lib_copier.recipes.processed import Effect
from lib_copier.train.config import make_config
from lib_copier.train.trainer import train_pair

ORIGINAL = "a large yellow star with shading and a dark outline on a purple background"
PROMPTS = ["a small green circle on a white background", "a blue square with stripes on an orange gradient background"]
SEEDS = (10, 11, 12, 13)
STEPS = 400
POOL = [""] + sample_captions(32, seed=5)  # the CLI's default prompt pool for the built-in model


@pytest.fixture(scope="module")
def model():
    """The built-in model, its original O and the processed image P (grayscale O)."""
    torch.manual_seed(0)
    backend = StandaloneBackend(load_model(None, device="cpu", dtype="fp32"))
    original = backend.generate(Txt2Img(ORIGINAL, seed=1))
    return backend, original, Chain.parse(["grayscale"]).apply(original)


@pytest.fixture(scope="module", params=[("quick", {"steps": STEPS}), ("fast", {})], ids=["quick", "fast"])
def trained(model, request):
    """A and B trained with Quick (at STEPS steps), or with Fast as it is: 125 steps of four timesteps each."""
    backend, original, processed = model
    preset, overrides = request.param
    config = make_config(preset, **overrides)
    copier = train_copier(backend, original, POOL, config).network
    effect = train_processed(backend, copier, processed, POOL, config).network
    return backend, original, processed, copier, effect


def draw(backend, loras) -> list[Image.Image]:
    return [backend.generate(Txt2Img(p, seed=s), loras) for p in PROMPTS for s in SEEDS]


def test_the_copier_draws_the_original_for_other_prompts_and_seeds(trained):
    backend, original, _, copier, _ = trained
    base = [psnr(im, original) for im in draw(backend, [])]
    copied = [psnr(im, original) for im in draw(backend, [(copier, 1.0)])]
    print(f"PSNR to the original: base {np.mean(base):.1f} dB, with the copier {np.mean(copied):.1f} dB")
    assert min(copied) > 12.0
    assert np.mean(copied) > np.mean(base) + 5.0


def test_copier_plus_processed_draws_the_processed_image(trained):
    backend, original, processed, copier, effect = trained
    images = draw(backend, [(copier, 1.0), (effect, 1.0)])
    to_p, to_o = np.mean([psnr(im, processed) for im in images]), np.mean([psnr(im, original) for im in images])
    print(f"A + B: PSNR to P {to_p:.1f} dB, to O {to_o:.1f} dB")
    assert to_p > to_o + 3.0
    assert np.mean([chroma(im) for im in images]) < 0.5 * chroma(original)


SWEEP = [
    ("red", "circle", "blue"),
    ("yellow", "star", "purple"),
    ("green", "square", "orange"),
    ("blue", "triangle", "yellow"),
    ("pink", "ring", "green"),
    ("orange", "cross", "black"),
    ("purple", "circle", "white"),
    ("white", "star", "red"),
]


@pytest.mark.slow
def test_several_originals_make_the_processed_lora_an_effect_slider(tmp_path):
    backend = StandaloneBackend(load_model(None, device="cpu", dtype="fp32"))
    originals = [
        backend.generate(Txt2Img(f"a large {colour} {shape} on a {background} background", seed=1))
        for colour, shape, background in SWEEP
    ]
    job = Job(
        originals=originals,
        effects=[Effect("grayscale", chain=Chain.parse(["grayscale"]))],
        name="sweep",
        out_dir=tmp_path,
        overrides={"steps": STEPS},
        prompt_pool=POOL[1:],
        keep_copier=False,
    )
    (result,) = run_job(backend, job)
    effect = LoRANetwork.from_weights(read_lora(result.written.lora).modules)
    levels = {w: np.mean([chroma(im) for im in draw(backend, [(effect, w)] if w else [])]) for w in (0, 0.5, 1.5)}
    print("chroma by weight of the merged B alone:", {w: round(c, 1) for w, c in levels.items()})
    assert levels[0] > levels[0.5] > levels[1.5]
    assert levels[1.5] < 0.85 * levels[0]


@pytest.mark.parametrize("method", ["slider", "addift"])
def test_a_pair_method_trained_on_two_equal_images_changes_nothing(model, method):
    backend, original, _ = model
    config = method_config(method, "quick", {"steps": 30})
    pair = train_pair(backend, original, original, POOL, config, method).network
    naive = train_copier(backend, original, POOL, config).network  # a plain LoRA on the same image

    def two(loras):  # the first held-out prompt, two seeds
        return [backend.generate(Txt2Img(PROMPTS[0], seed=s), loras) for s in SEEDS[:2]]

    base = two([])
    assert all(np.array_equal(a, b) for a, b in zip(base, two([(pair, 1.0)]), strict=True))
    assert max(psnr(a, b) for a, b in zip(base, two([(naive, 1.0)]), strict=True)) < 35.0


@pytest.mark.parametrize("method", ["slider", "addift"])
def test_a_pair_method_on_original_and_grayscale_greys_its_own_generation(model, method):
    backend, original, processed = model
    lora = train_pair(backend, original, processed, POOL, method_config(method, "quick", {}), method).network
    own = {w: chroma(backend.generate(Txt2Img(ORIGINAL, seed=1), [(lora, w)])) for w in (-1.0, 0.0, 1.0)}
    print(f"{method}: chroma of O's own generation by weight", {w: round(c, 1) for w, c in own.items()})
    assert own[1.0] < 0.8 * own[0.0]
    if method == "slider":  # the slider is trained at -1 too: there it moves away from grey
        assert own[-1.0] > own[0.0]
