"""A rough time for a run, before it starts: the steps the recipe will take, times a per-step cost.

The cost is only known for CPUs, from our measurements of an SD1.5 UNet forward and backward on two cores (2.4 s at
64 px, 23 s at 512 px, about affine in the pixel count); SDXL's UNet costs about three times as much per pixel. A
step of several timesteps (batch_size) counts as that many steps: it costs about three at 64-128 px with four, so the
estimate errs long at small sizes. On a GPU the progress bar gives the time left after the first steps, so no guess is
made.
"""

from __future__ import annotations

from collections.abc import Sequence

from lib_copier.effects.image_io import check_size
from lib_copier.fields import check_field
from lib_copier.recipes.job import RECIPE_PRESETS, check_effect_count, method_config
from lib_copier.recipes.request import TrainRequest
from lib_copier.recipes.sizes import check_fits, fitted_size, training_side
from lib_copier.train.config import PAIR_LOSSES

CPU_SECONDS_AT = (2.07, 7.98e-5)  # seconds per step = a + b * side², SD1.5 on 2 CPU cores
SDXL_FACTOR = 3.0
SMALL_SIDE = 128
# A pair method's step in plain steps: the slider runs the UNet forward and backward twice, addift adds a forward.
STEP_COST = {"slider": 2.0, "addift": 1.35}


def recipe_steps(method: str, effects: int, preset: str, overrides: dict, originals: int = 1) -> int:
    """Training steps of a run: per original the copier, then per effect its processed LoRA and/or A′; or per
    original and effect one pair LoRA (whose steps cost more: STEP_COST)."""
    config = method_config(method, preset, overrides)
    if method in PAIR_LOSSES:
        return effects * config.steps * originals
    processed = RECIPE_PRESETS[preset]["processed_steps"]
    processed = config.steps if processed is None or "steps" in overrides else processed
    steps = config.steps
    if method in ("copier", "both"):
        steps += effects * processed
    if method in ("extraction", "both"):
        steps += effects * config.steps
    return steps * originals


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} hours"


def estimate(steps: int, device: str, side: int, sdxl: bool = False, method: str = "copier", batch: int = 1) -> str:
    """One or two sentences: the steps, and on a CPU the rough time (with the small size's time when it is long) of
    steps of `batch` timesteps each."""
    text = f"{steps} training step{'' if steps == 1 else 's'} in all."
    if device != "cpu":
        return text + " The progress bar shows the time left once training has started."

    def seconds(at: int) -> float:
        a, b = CPU_SECONDS_AT
        return steps * batch * (a + b * at * at) * (SDXL_FACTOR if sdxl else 1.0) * STEP_COST.get(method, 1.0)

    text += f" On this CPU at {side} px that is roughly {_duration(seconds(side))}"
    if side > SMALL_SIDE and seconds(side) > 1800:
        return text + f"; a training size of {SMALL_SIDE} takes about {_duration(seconds(SMALL_SIDE))}."
    return text + "."


def size_note(size: tuple[int, int], asked: int | None, model_side: int) -> str:
    """What training does to the original's size, when it changes it: the size it trains at, and when that scales it
    up, the Training size that keeps about its own."""
    width, height = size
    w, h = fitted_size(width, height, training_side(asked, model_side), model_side)
    if (w, h) == (width, height):
        return ""
    text = f"The {width}x{height} original trains at {w}x{h}"
    if w * h <= width * height:
        return text + "."
    own = training_side(round((width * height) ** 0.5), model_side)
    return text + f", scaled up {w / width:.1f}x; a training size of {own} keeps about its own size."


def describe_run(
    method: str,
    preset: str,
    overrides: dict,
    effects: int,
    originals: int,
    device: str,
    side: int,
    sdxl: bool,
    model_side: int,
    image_size: tuple[int, int] | None = None,
    more_sizes: Sequence[tuple[str, tuple[int, int]]] = (),
) -> str:
    """`estimate` for a run as a form describes it: `overrides` are the trainer settings the form sets over the
    method and preset; `side` is the form's training size (0: the model's native `model_side`). With the original's
    size, the size it trains at where that differs (`size_note`). What Train would refuse of these, the further
    originals' (name, size) included, is its sentence (CopierError)."""
    if side:
        check_field(TrainRequest, "size", side, lambda _: "the training size")
    if image_size:
        check_size(image_size, "the original")
    check_effect_count(method, effects)
    steps = recipe_steps(method, effects, preset, overrides, originals)  # which checks every setting
    check_fits(more_sizes, side or None, model_side)
    trained = training_side(side or None, model_side)
    batch = overrides.get("batch_size", method_config(method, preset, {}).batch_size)
    text = estimate(steps, device, trained, sdxl, method, batch)
    note = size_note(image_size, side or None, model_side) if image_size else ""
    return f"{note} {text}" if note else text
