"""One evaluation, start to end: originals, the five methods' LoRAs, measurements, report."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from lib_copier.effects.chain import split_specs
from lib_copier.evaluate.measure import WEIGHTS, Plan, measure
from lib_copier.evaluate.report import Layout, write_report
from lib_copier.evaluate.train import METHODS, train_methods
from lib_copier.evaluate.workers import Workers, backend
from lib_copier.models.generate import Txt2Img
from lib_copier.recipes.job import method_config
from lib_copier.recipes.processed import Effect, check_pairs, make_effects
from lib_copier.recipes.prompts import GRID_PROMPTS, grid_prompts, prompt_pool
from lib_copier.train.config import PAIR_LOSSES, TrainConfig, make_config

SEED_EFFECTS = ("outline", "flatten", "high_contrast", "posterize", "jpeg_noise", "grayscale")
# Originals for the built-in model: eight different colours, shapes and backgrounds, so that a LoRA merged over
# them cannot learn one palette.
BUILTIN_ORIGINALS = (
    "a large red circle on a blue background",
    "a large yellow star on a purple background",
    "a large green square on an orange background",
    "a large blue triangle on a yellow background",
    "a large pink ring on a green background",
    "a large orange cross on a black background",
    "a large purple circle on a white background",
    "a large white star on a red background",
)
# Controls: drawn like the originals, never trained on; leakage is what moves toward the originals and not toward these.
BUILTIN_CONTROLS = (
    "a large brown square on a cyan background",
    "a large cyan ring on a pink background",
    "a large gray triangle on a green background",
    "a large black star on a yellow background",
)
OTHER_CONTROLS = ("a white cat on a sofa", "a mountain lake at sunrise")
OTHER_ORIGINALS = (
    "a red house in a green field, blue sky",
    "a portrait of a woman with dark hair",
    "a bowl of oranges on a wooden table",
    "a lighthouse at dusk",
)
EVAL_SEED = 100  # held-out seeds are 100, 101, …; the originals use seed 1, training seed 0


@dataclass
class Settings:
    effects: list[str] = field(default_factory=lambda: list(SEED_EFFECTS))
    originals: int = 8
    prompts: int = 4
    seeds: int = 3
    steps: int = 400
    lr: float = 3e-3
    overrides: dict = field(default_factory=dict)
    processed_overrides: dict = field(default_factory=dict)  # the copier method's B alone, for experiments
    pair_overrides: dict = field(default_factory=dict)  # over the pair methods' own defaults (recipes.job)
    prompt_pool: int = 32
    sample_steps: int = 16
    extraction_rank: int = 8
    grid_rows: int = 1
    thumbnail: int = 64
    weights: tuple[float, ...] = WEIGHTS


QUICK = {"originals": 2, "prompts": 2, "seeds": 2, "steps": 250, "sample_steps": 12}


def configs(settings: Settings) -> tuple[TrainConfig, TrainConfig, dict[str, TrainConfig]]:
    """The trainer settings of the copier methods' LoRAs, of their B alone, and of each pair method; each checked."""
    shared = {"steps": settings.steps, "lr": settings.lr, **settings.overrides}
    config = make_config("quick", **shared)
    processed_config = make_config("quick", **shared, **settings.processed_overrides)
    return config, processed_config, {m: method_config(m, "quick", settings.pair_overrides) for m in PAIR_LOSSES}


def made_effects(settings: Settings) -> list[Effect]:
    return make_effects([split_specs(spec) for spec in settings.effects])


def available(builtin: bool) -> dict[str, int | None]:
    """How many originals and held-out prompts an evaluation has to draw from (None: any number)."""
    return {
        "originals": len(BUILTIN_ORIGINALS if builtin else OTHER_ORIGINALS),
        "prompts": None if builtin else len(GRID_PROMPTS),
    }


def generate_original(caption: str) -> Image.Image:
    return backend().generate(Txt2Img(caption, seed=1))


def evaluate(
    workers: Workers,
    settings: Settings,
    layout: Layout,
    builtin: bool,
    command: str,
    images: list[Image.Image] = (),
    notes: str = "",
    overwrite: bool = False,
    stage: Callable[[str], None] = print,
) -> dict:
    start, load_before = time.perf_counter(), _load()
    config, processed_config, pair_configs = configs(settings)
    effects = made_effects(settings)
    captions = list(BUILTIN_ORIGINALS if builtin else OTHER_ORIGINALS)[: settings.originals]
    if images:
        originals, captions = list(images), [f"image {i + 1}" for i in range(len(images))]
    else:
        stage(f"generating {len(captions)} originals")
        originals = workers.map(generate_original, captions)
        check_pairs(effects, originals)  # another --model may draw them in gray, say: before any training
    control_captions = list(BUILTIN_CONTROLS if builtin else OTHER_CONTROLS)
    stage(f"generating {len(control_captions)} control images")
    controls = workers.map(generate_original, control_captions)
    held_out = grid_prompts(True, settings.prompts) if builtin else GRID_PROMPTS[: settings.prompts]
    stage(f"training {len(METHODS)} kinds of LoRA for {len(effects)} effects on each of {len(originals)} originals")
    trained = train_methods(
        workers,
        originals,
        effects,
        ["", *prompt_pool(builtin, settings.prompt_pool)],
        config,
        processed_config,
        settings.extraction_rank,
        lambda text: stage(f"training: {text}"),
        pair_configs,
    )
    plan = Plan(
        held_out,
        [EVAL_SEED + i for i in range(settings.seeds)],
        settings.weights,
        settings.sample_steps,
        settings.grid_rows,
    )
    measured = measure(workers, originals, controls, effects, trained, plan, lambda text: stage(f"measuring: {text}"))
    results = {
        "settings": {
            **dataclasses.asdict(settings),
            "rank": config.rank,
            "model": "built-in" if builtin else "given",
            "command": command,
            "train_config": dataclasses.asdict(config),
            "processed_train_config": dataclasses.asdict(processed_config),
            "pair_train_configs": {m: dataclasses.asdict(c) for m, c in pair_configs.items()},
        },
        "originals": captions,
        "controls": control_captions,
        "prompts": plan.prompts,
        "seeds": plan.seeds,
        "weights": list(plan.weights),
        **measured.results,
    }
    processed = {e.label: [e.process(o) for o in originals] for e in effects}
    results["timing"] = {
        "trainings": trained.runs,
        # seconds of training per LoRA, by method: the mean over originals and effects
        "train_s_by_method": {m: round(trained.mean_seconds(m), 1) for m in METHODS},
        "train_s": round(trained.seconds, 1),
        "images": measured.images,
        "measure_s": round(measured.seconds, 1),
        "total_s": round(time.perf_counter() - start, 1),  # all but writing the report's files (seconds)
        "machine": _machine(load_before, workers.count),
    }
    stage("writing the report")
    write_report(layout, results, measured, originals, processed, notes, overwrite)
    return results


def _load() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def _machine(load_before, workers: int) -> str:
    load_after = _load()
    load = (
        f"; load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end"
        if load_before and load_after
        else ""
    )
    runs = f"{workers} worker processes" if workers > 1 else f"one process on {torch.get_num_threads()} threads"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {runs}{load}"
