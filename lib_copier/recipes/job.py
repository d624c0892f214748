"""One run of the method, as the CLI, the demo and the WebUI start it: originals and effects in, files out.

Results are written only when the whole job has finished (or, with `save_on_cancel`, when it is interrupted), so an
interrupted or failed job leaves nothing behind by default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lib_copier.atomic import all_or_nothing, check_folder
from lib_copier.backends import Backend
from lib_copier.errors import CopierError, Interrupted
from lib_copier.lora.metadata import NetworkInfo
from lib_copier.lora.network import LoRANetwork
from lib_copier.lora.ops import Progress
from lib_copier.lora.weights import LoRAWeights
from lib_copier.recipes.grid import network_render, strength_grid
from lib_copier.recipes.kinds import COPIER_METHODS, METHODS
from lib_copier.recipes.methods import (
    Weights,
    extraction,
    merge_processed,
    shrink,
    train_copier,
    train_processed,
)
from lib_copier.recipes.outputs import Written, check_name, free_name, sidecar, write_result
from lib_copier.recipes.processed import Effect
from lib_copier.recipes.prompts import without_extra_networks
from lib_copier.recipes.sizes import check_area, side_multiple
from lib_copier.train.config import PAIR_LOSSES, TrainConfig, make_config
from lib_copier.train.trainer import Callbacks, Cancelled, TrainResult, train_pair

# File name endings: `<name>-copier`, `<name>-<effect>`, `<name>-<effect>-extraction`, `<name>-<effect>-slider`,
# `<name>-<effect>-addift`; A′ (the processed image's copier) is only ever written when an extraction run is
# interrupted with save_on_cancel.
SUFFIX = {
    "copier": "copier",
    "processed": "",
    "extraction": "extraction",
    "processed-copier": "processed-copier",
    **{loss: loss for loss in PAIR_LOSSES},
}
# The kinds of effect LoRA each method writes, one of each per effect.
_EFFECT_KINDS = {"copier": ("processed",), "extraction": ("extraction",), "both": ("processed", "extraction")}
# What a preset means for the recipe beyond the trainer: the processed LoRA's steps and its final rank.
RECIPE_PRESETS = {
    "quick": {"processed_steps": None, "resize_rank": None, "extraction_rank": 8},
    "fast": {"processed_steps": None, "resize_rank": None, "extraction_rank": 8},
    "thorough": {"processed_steps": 4000, "resize_rank": 8, "extraction_rank": 8},
}
# The pair methods' own trainer defaults, between the preset and the user's overrides, chosen from measurements on
# the built-in model (docs/method-report.md). The published settings (slider: rank 4, alpha 1, lr 2e-4, 1000 steps;
# ADDifT: rank 4, alpha 1, lr 5e-5-1e-4, 30-100 steps, weight ±0.25) hardly moved the built-in model's images.
# They set everything a preset sets but the scheduler, so every preset trains a pair method alike.
PAIR_DEFAULTS: dict[str, dict[str, object]] = {
    "slider": dict(rank=4, alpha=4.0, steps=200, lr=3e-3, batch_size=1, warmup_steps=0),
    "addift": dict(
        rank=4, alpha=4.0, steps=100, lr=3e-3, batch_size=1, warmup_steps=0, timestep_min=200, timestep_max=1000
    ),
}


@dataclass
class Job:
    originals: list[Image.Image]
    effects: list[Effect]
    name: str
    out_dir: Path
    method: str = "copier"
    preset: str = "quick"
    overrides: dict = field(default_factory=dict)
    caption: str = ""
    # Prompts mixed with the caption while training, one drawn per sample: the copier then draws the original
    # whatever the prompt, and B and A′ learn under the same prompts. Empty: the caption alone, as in the write-ups.
    prompt_pool: list[str] = field(default_factory=list)
    grid_prompts: list[str] = field(default_factory=list)
    grid_seed: int = 0
    grid_steps: int = 20
    grid_side: int | None = None  # the grids' side (a training size); the model's native side if None
    base_model: str = ""
    keep_copier: bool = True  # also write the copier LoRA A itself
    publish_dir: Path | None = None  # where out_dir's files go once the caller is done: their names must be free there
    taken: frozenset[str] = frozenset()  # names in use elsewhere (a WebUI's other LoRA folders): a tag would load those

    @property
    def training_caption(self) -> str:
        """The caption as the text encoder gets it: a WebUI prompt's `<lora:…>` tags are not text (see prompts.py)."""
        return without_extra_networks(self.caption)

    def captions(self) -> list[str]:
        return [self.training_caption, *self.prompt_pool]

    def config(self) -> TrainConfig:
        return method_config(self.method, self.preset, self.overrides)

    def processed_config(self) -> TrainConfig:
        steps = RECIPE_PRESETS[self.preset]["processed_steps"]
        base = self.config()
        if steps is None or "steps" in self.overrides:
            return base
        return dataclasses.replace(base, steps=steps)


def method_config(method: str, preset: str, overrides: dict) -> TrainConfig:
    """The trainer settings of a method's LoRAs: the preset, then the method's own defaults, then the overrides."""
    return make_config(preset, **{**PAIR_DEFAULTS.get(method, {}), **overrides})


@dataclass
class Result:
    kind: str  # "copier", "processed" or "extraction"
    effect: str
    written: Written
    steps: int
    seconds: float
    final_loss: float | None
    seed: int  # the training seed its file records (drawn when the setting was -1)


@dataclass
class _Pending:
    kind: str
    effect: str
    weights: Weights
    steps: int
    seconds: float
    final_loss: float | None
    description: str
    config: TrainConfig  # what its (last) run trained with, recorded in the file's metadata
    chain_json: str = ""


Stage = Callable[[str], None]


def output_names(
    name: str, method: str, labels: list[str], keep_copier: bool = True, what: str = "the output name"
) -> list[str]:
    """The names of the files a job writes (before `-2`, `-3` … where one is taken), checked before any training:
    the name itself (called `what`), then each file's, which the effects' labels may make too long."""
    check_name(name, what)
    kinds = _EFFECT_KINDS.get(method, (method,))
    names = [_stem(name, "", "copier")] if method in COPIER_METHODS and keep_copier else []
    names += [_stem(name, label, kind) for label in labels for kind in kinds]
    return [check_name(n) for n in names]


def _stem(name: str, label: str, kind: str) -> str:
    return "-".join(part for part in (name, label, SUFFIX[kind]) if part)


def check_job(job: Job, backend: Backend) -> None:
    if job.method not in METHODS:
        raise CopierError(f"unknown method {job.method!r}; choose one of {', '.join(METHODS)}")
    if not job.originals:
        raise CopierError("the job has no original image")
    check_effect_count(job.method, len(job.effects))
    job.config()  # validates the preset and every override
    check_folder(job.out_dir)
    labels = [e.label for e in job.effects]
    if len(set(labels)) != len(labels):
        raise CopierError("two effects have the same label; each processed LoRA needs its own name")
    output_names(job.name, job.method, labels, job.keep_copier)
    multiple = side_multiple(backend.resolution)
    for image in job.originals:
        if image.width % multiple or image.height % multiple:
            raise CopierError(
                f"the original is {image.width}x{image.height}; both sides must be multiples of {multiple} "
                "(use fit_image first)"
            )
        check_area(image.size, backend.resolution)


def check_effect_count(method: str, effects: int) -> None:
    if not effects and method != "copier":
        raise CopierError(f"the {method} method needs at least one effect or processed image")


def run_job(backend: Backend, job: Job, callbacks: Callbacks | None = None, stage: Stage | None = None) -> list[Result]:
    check_job(job, backend)
    processed = {effect.label: effect.process_all(job.originals) for effect in job.effects}
    callbacks, stage = callbacks or Callbacks(), stage or (lambda text: None)
    config, processed_config = job.config(), job.processed_config()
    extraction_rank = RECIPE_PRESETS[job.preset]["extraction_rank"]
    pending: list[_Pending] = []
    current = ("copier", "")  # what is training now, so an interrupted run's partial LoRA is named for it
    trained: dict[tuple[str, str], list[tuple[Weights, TrainResult]]] = {}
    try:
        for i, original in enumerate(job.originals):
            tag = f" (original {i + 1}/{len(job.originals)})" if len(job.originals) > 1 else ""
            if job.method in COPIER_METHODS:
                stage(f"copier{tag}")
                current = ("copier", "")
                copier = train_copier(backend, original, job.captions(), config, callbacks)
                config, processed_config = _as_run(copier, config, processed_config)
                copier_weights = _cpu(copier.network.to_weights())
                if job.keep_copier:
                    note = f"Copier LoRA of {job.name}{tag}"
                    pending.append(_pending("copier", "", copier_weights, [copier], note))
            for effect in job.effects:
                processed_image = processed[effect.label][i]
                if job.method in PAIR_LOSSES:
                    stage(f"{job.method}: {effect.label}{tag}")
                    current = (job.method, effect.label)
                    run = train_pair(backend, original, processed_image, job.captions(), config, job.method, callbacks)
                    config, processed_config = _as_run(run, config, processed_config)
                    trained.setdefault((effect.label, job.method), []).append((_cpu(run.network.to_weights()), run))
                if job.method in ("copier", "both"):
                    stage(f"processed: {effect.label}{tag}")
                    current = ("processed", effect.label)
                    run = train_processed(
                        backend, copier.network, processed_image, job.captions(), processed_config, callbacks
                    )
                    config, processed_config = _as_run(run, config, processed_config)
                    trained.setdefault((effect.label, "processed"), []).append((_cpu(run.network.to_weights()), run))
                if job.method in ("extraction", "both"):
                    stage(f"extraction: {effect.label}{tag}")
                    current = ("processed-copier", effect.label)
                    run = train_copier(backend, processed_image, job.captions(), config, callbacks)
                    config, processed_config = _as_run(run, config, processed_config)
                    weights = extraction(
                        copier_weights, _cpu(run.network.to_weights()), extraction_rank, callbacks.counted
                    )
                    trained.setdefault((effect.label, "extraction"), []).append((weights, run))
    except Cancelled as cancelled:
        if config.save_on_cancel:
            partial = cancelled.result
            kind, label = current
            note = f"{kind} LoRA {label}, interrupted at step {partial.steps}".replace("  ", " ")
            finished = _merged(job, config, trained, callbacks.counted)
            weights = _cpu(partial.network.to_weights())
            pending.append(_pending(kind, label, weights, [partial], note, _chain_json(job, label)))
            cancelled.kept = _finish(backend, job, pending + finished, grids=False)
        raise
    stage("merging and resizing")
    finished = _merged(job, config, trained, callbacks.counted)
    stage("strength grids")
    try:
        return _finish(backend, job, pending + finished, grids=True, progress=_stoppable(callbacks))
    except Interrupted as interrupted:
        if config.save_on_cancel:  # every LoRA is finished: kept, without grids
            interrupted.kept = _finish(backend, job, pending + finished, grids=False)
        raise


def _stoppable(callbacks: Callbacks) -> Progress:
    """The grids' progress, which also stops them between two images when the run is asked to stop."""

    def progress(done: int, total: int) -> None:
        if callbacks.counted:
            callbacks.counted(done, total)
        if callbacks.cancelled and callbacks.cancelled():
            raise Interrupted("interrupted while drawing the strength grids")

    return progress


def _as_run(run: TrainResult, *configs: TrainConfig) -> tuple[TrainConfig, ...]:
    """The job's settings for its later trainings: once a run ran out of GPU memory and finished with gradient
    checkpointing, the rest start with it rather than each running out of memory first."""
    if not run.config.gradient_checkpointing:
        return configs
    return tuple(dataclasses.replace(c, gradient_checkpointing=True) for c in configs)


def _merged(job: Job, config: TrainConfig, trained: dict, progress: Progress | None) -> list[_Pending]:
    """One result per effect and kind: the LoRAs of several originals merged, processed ones resized."""
    ranks = RECIPE_PRESETS[job.preset]
    out = []
    for (label, kind), items in trained.items():
        if kind == "processed":
            merged = merge_processed([w for w, _ in items], ranks["resize_rank"] or config.rank, progress)
            weights = shrink(merged, ranks["resize_rank"], progress)
        elif kind == "extraction":
            weights = merge_processed([w for w, _ in items], ranks["extraction_rank"], progress)
        else:  # a pair method's LoRA keeps its trained rank
            weights = merge_processed([w for w, _ in items], config.rank, progress)
        runs = [run for _, run in items]
        out.append(_pending(kind, label, weights, runs, f"{kind} LoRA: {label}", _chain_json(job, label)))
    return out


def _chain_json(job: Job, label: str) -> str:
    """The effect chain that made the processed image of effect `label`, for the LoRA's metadata ("" for the copier
    and for an image the user edited)."""
    return next((e.chain.to_json() for e in job.effects if e.label == label and e.chain), "")


def _offset(progress: Progress | None, index: int, count: int) -> Progress | None:
    """Grid `index` of `count` equal grids, counted as part of them all."""
    if progress is None:
        return None
    return lambda done, total: progress(index * total + done, count * total)


def _cpu(weights: Weights) -> Weights:
    return {k: LoRAWeights(w.down.detach().cpu(), w.up.detach().cpu(), w.alpha) for k, w in weights.items()}


def _pending(kind, effect, weights, runs: list[TrainResult], description, chain_json="") -> _Pending:
    loss = runs[-1].losses[-1] if runs[-1].losses else None
    steps, seconds = sum(r.steps for r in runs), sum(r.seconds for r in runs)
    return _Pending(kind, effect, weights, steps, seconds, loss, description, runs[-1].config, chain_json)


def _finish(
    backend: Backend, job: Job, pending: list[_Pending], grids: bool, progress: Progress | None = None
) -> list[Result]:
    names: set[str] = set()
    prepared, unchanged = [], {}
    for i, item in enumerate(pending):
        stem = _stem(job.name, item.effect, item.kind)
        name = free_name([job.out_dir, *filter(None, [job.publish_dir])], stem, names | job.taken)
        names.add(name)
        grid = None
        if grids and job.grid_prompts:
            network = LoRANetwork.from_weights(item.weights).to(backend.device)
            render = network_render(backend, network, unchanged)
            drawn = _offset(progress, i, len(pending))
            side = job.grid_side or backend.resolution
            grid = strength_grid(
                render, job.grid_prompts, side, seed=job.grid_seed, steps=job.grid_steps, progress=drawn
            )
        prepared.append((item, name, grid))
    results = []
    with all_or_nothing() as done:
        for item, name, grid in prepared:
            info = _info(backend, job, item, name)
            written = write_result(
                job.out_dir, name, item.weights, info, sidecar(backend.family, item.description), grid
            )
            done += [written.lora, written.sidecar, written.grid]
            results.append(
                Result(item.kind, item.effect, written, item.steps, item.seconds, item.final_loss, item.config.seed)
            )
    return results


def _info(backend: Backend, job: Job, item: _Pending, name: str) -> NetworkInfo:
    config = item.config
    first = next(iter(item.weights.values()))
    return NetworkInfo(
        family=backend.family,
        rank=max(w.rank for w in item.weights.values()),
        alpha=float(first.alpha),
        title=name,
        v_prediction=backend.prediction == "v",
        resolution=job.originals[0].size,
        comment=item.description,
        description=item.description,
        training={
            "copier_recipe": item.kind,
            "copier_effects": item.chain_json,
            "copier_preset": job.preset,
            "copier_method": job.method,
            "copier_originals": len(job.originals),
            "copier_caption": job.training_caption,
            "copier_prompt_pool": json.dumps(job.prompt_pool),
            "seed": config.seed,
            "max_train_steps": item.steps,
            "learning_rate": config.lr,
            "sd_model_name": job.base_model,
            "copier_train_config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        },
    )
