"""Draw every method's LoRA at every weight on held-out prompts × seeds, and turn the images into numbers.

Per image (prompt p, seed s, weight w; G_w the generation, G_0 the base model's, T = the effect applied to G_0):
- metric: the effect's own metric of G_w; transfer = (metric(G_w) − metric(G_0)) / (metric(T) − metric(G_0)),
  so 0 is no change and 1 is as much change as the effect itself makes to that image;
- closeness: 1 − |G_w − T| / |G_0 − T| (mean absolute pixel differences): the same idea for any effect;
- leak_psnr, leak_layout: PSNR and layout correlation to the originals O the LoRA was trained from (their mean),
  minus the same at weight 0; control_psnr, control_layout: the same to control images, drawn like the originals
  but never trained on; leak = leak_psnr − control_psnr, the part of the change specific to the originals (a LoRA
  that only greys or blurs an image also moves its PSNR to every image of this kind);
- kept_layout, kept_psnr: layout correlation and PSNR of G_w to G_0.
Ratios are taken of means over prompts, per seed; every summary is the mean ± standard deviation over seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lib_copier.evaluate import metrics
from lib_copier.evaluate.train import METHODS, Trained
from lib_copier.evaluate.workers import Packed, Workers, backend, unpack
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.generate import Txt2Img
from lib_copier.recipes.processed import Effect

WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
BATCH = 12


@dataclass
class Plan:
    prompts: list[str]
    seeds: list[int]
    weights: tuple[float, ...] = WEIGHTS
    sample_steps: int = 20
    grid_rows: int = 1  # prompts shown in the strength grids, at the first seed


@dataclass
class Measured:
    results: dict
    # (variant, effect, method) → one row of images (one per weight) per grid prompt
    grids: dict[tuple[str, str, str], list[list[Image.Image]]] = field(default_factory=dict)
    targets: dict[str, list[Image.Image]] = field(default_factory=dict)  # the effect applied to the grid's G_0
    base: list[Image.Image] = field(default_factory=list)  # G_0 of the grid rows
    images: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RenderTask:
    loras: tuple[tuple[Packed, float], ...]
    prompts: list[str]
    seeds: list[int]
    steps: int


def render_task(task: RenderTask) -> list[Image.Image]:
    model = backend()
    loras = [(LoRANetwork.from_weights(unpack(lora)).to(model.device), weight) for lora, weight in task.loras]
    requests = [Txt2Img(p, seed=s, steps=task.steps) for p, s in zip(task.prompts, task.seeds, strict=True)]
    # A dozen images per UNet call: the evaluation draws thousands of them, and batches are much faster on a CPU.
    batches = [requests[i : i + BATCH] for i in range(0, len(requests), BATCH)]
    return [image for batch in batches for image in model.generate_batch(batch, loras)]


def measure(
    workers: Workers,
    originals: list[Image.Image],
    controls: list[Image.Image],
    effects: list[Effect],
    trained: Trained,
    plan: Plan,
    stage: Callable[[str], None] = lambda text: None,
) -> Measured:
    if 0.0 not in plan.weights:
        raise ValueError("the weights must include 0, the reference every change is measured from")
    start = time.perf_counter()
    zero = plan.weights.index(0.0)
    prompts = [p for p in plan.prompts for _ in plan.seeds]
    seeds = [s for _ in plan.prompts for s in plan.seeds]
    shape = (len(plan.prompts), len(plan.seeds))
    grid_index = [i * len(plan.seeds) for i in range(min(plan.grid_rows, len(plan.prompts)))]

    # Every image first (one task per LoRA and weight, spread over the workers), then the numbers.
    def task(*loras) -> RenderTask:
        return RenderTask(tuple(loras), prompts, seeds, plan.sample_steps)

    keys: list[tuple] = [("base",)] + [("fidelity", i) for i in range(len(originals))]
    tasks = [task()] + [task((copier, 1.0)) for copier in trained.copiers]
    for effect in effects:  # does B, on top of the copier it was trained against, turn O into P?
        keys.append(("on copier", effect.label))
        tasks.append(task((trained.copiers[0], 1.0), (trained.loras[("single", effect.label, "copier")], 1.0)))
    for (variant, label, method), lora in trained.loras.items():
        for w in plan.weights:
            if w:
                keys.append((variant, label, method, w))
                tasks.append(task((lora, w)))
    step = max(1, len(tasks) // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            stage(f"{done}/{total} batches drawn")

    drawn = dict(zip(keys, workers.map(render_task, tasks, progress), strict=True))

    out = Measured(results={}, images=len(tasks) * len(prompts))
    base = drawn[("base",)]
    out.base = [base[i] for i in grid_index]
    fidelity = {"base": [], "copier": []}
    for i, original in enumerate(originals):
        fidelity["base"].append(_grid([metrics.psnr(g, original) for g in base], shape))
        fidelity["copier"].append(_grid([metrics.psnr(g, original) for g in drawn[("fidelity", i)]], shape))
    out.results["fidelity"] = {
        "raw": {k: _clean(np.stack(v)) for k, v in fidelity.items()},
        # per seed: the mean over originals and prompts
        "summary": {k: _stat(np.stack(v).mean(axis=(0, 1))) for k, v in fidelity.items()},
    }

    effects_out = {}
    for effect in effects:
        stage(f"measuring {effect.label}")
        targets = [effect.process(g) for g in base]
        out.targets[effect.label] = [targets[i] for i in grid_index]
        names = [s.effect for s in effect.chain.steps] if effect.chain else []
        metric = metrics.metric_for(names)
        reference = {
            "distance": _grid([metrics.mean_abs_difference(g, t) for g, t in zip(base, targets, strict=True)], shape),
            "kept_layout": _grid([metrics.layout(t, g) for g, t in zip(base, targets, strict=True)], shape),
        }
        if metric:
            reference["metric_base"] = _grid([metric.fn(g) for g in base], shape)
            reference["metric_effect"] = _grid([metric.fn(t) for t in targets], shape)
        processed = effect.process(originals[0])
        with_b, with_a = drawn[("on copier", effect.label)], drawn[("fidelity", 0)]
        on_copier = {
            "a_b_to_p": _grid([metrics.psnr(g, processed) for g in with_b], shape),
            "a_b_to_o": _grid([metrics.psnr(g, originals[0]) for g in with_b], shape),
            "a_to_p": _grid([metrics.psnr(g, processed) for g in with_a], shape),
        }
        variants = {}
        for variant in trained.variants():
            near = originals[:1] if variant == "single" else originals
            methods_out = {}
            for method in METHODS:
                images = {w: base if w == 0 else drawn[(variant, effect.label, method, w)] for w in plan.weights}
                raw = _quantities(images, base, targets, near, controls, metric, shape, plan.weights)
                out.grids[(variant, effect.label, method)] = [[images[w][i] for w in plan.weights] for i in grid_index]
                summary = _summary(raw, reference, zero)
                methods_out[method] = {"raw": {k: _clean(v) for k, v in raw.items()}, "summary": summary}
            variants[variant] = methods_out
        effects_out[effect.label] = {
            "chain": effect.chain.to_json() if effect.chain else "",
            "metric": metric.name if metric else None,
            "metric_description": metric.description if metric else None,
            "reference": {k: _clean(v) for k, v in reference.items()},
            # PSNR (dB) of M + A1 + B1 to P1 and to O1, and of M + A1 to P1: per seed, the mean over prompts
            "on_copier": {k: _stat(v.mean(axis=0)) for k, v in on_copier.items()},
            "variants": variants,
        }
    out.results["effects"] = effects_out
    out.seconds = time.perf_counter() - start
    return out


def _quantities(drawn, base, targets, near, controls, metric, shape, weights) -> dict[str, np.ndarray]:
    """Per-image values, each of shape (weights, prompts, seeds)."""

    def mean_to(fn, image, others):
        return float(np.mean([fn(image, other) for other in others]))

    keys = ("distance", "leak_psnr", "control_psnr", "leak_layout", "control_layout", "kept_layout", "kept_psnr")
    per = {k: [] for k in keys + (("metric",) if metric else ())}
    for w in weights:
        images = drawn[w]
        per["distance"].append([metrics.mean_abs_difference(g, t) for g, t in zip(images, targets, strict=True)])
        per["leak_psnr"].append([mean_to(metrics.psnr, g, near) for g in images])
        per["control_psnr"].append([mean_to(metrics.psnr, g, controls) for g in images])
        per["leak_layout"].append([mean_to(metrics.layout, g, near) for g in images])
        per["control_layout"].append([mean_to(metrics.layout, g, controls) for g in images])
        per["kept_layout"].append([metrics.layout(g, g0) for g, g0 in zip(images, base, strict=True)])
        per["kept_psnr"].append([metrics.psnr(g, g0) for g, g0 in zip(images, base, strict=True)])
        if metric:
            per["metric"].append([metric.fn(g) for g in images])
    return {k: np.array(v, dtype=np.float64).reshape(len(weights), *shape) for k, v in per.items()}


def _summary(raw: dict[str, np.ndarray], reference: dict[str, np.ndarray], zero: int) -> dict[str, dict]:
    seeds = {k: v.mean(axis=1) for k, v in raw.items()}  # (weights, seeds): the mean over prompts, per seed

    def change(key: str) -> np.ndarray:
        return seeds[key] - seeds[key][zero]

    out = {
        "closeness": _stat(1 - seeds["distance"] / reference["distance"].mean(axis=0)),
        "leak": _stat(change("leak_psnr") - change("control_psnr")),
        "leak_psnr": _stat(change("leak_psnr")),
        "control_psnr": _stat(change("control_psnr")),
        "leak_layout": _stat(change("leak_layout")),
        "control_layout": _stat(change("control_layout")),
        "kept_layout": _stat(seeds["kept_layout"]),
        "kept_psnr": _stat(seeds["kept_psnr"]),
    }
    if "metric" in seeds:
        target = reference["metric_effect"].mean(axis=0) - reference["metric_base"].mean(axis=0)
        out["metric"] = _stat(seeds["metric"])
        out["transfer"] = _stat(change("metric") / np.where(np.abs(target) < 1e-9, np.nan, target))
    return out


def _grid(values: list[float], shape: tuple[int, int]) -> np.ndarray:
    return np.array(values, dtype=np.float64).reshape(shape)


def _stat(per_seed: np.ndarray) -> dict[str, list]:
    """Mean ± sample standard deviation over the last axis (seeds): lists per weight, or numbers for one axis."""
    sd = per_seed.std(axis=-1, ddof=1) if per_seed.shape[-1] > 1 else np.zeros(per_seed.shape[:-1])
    return {"mean": _clean(per_seed.mean(axis=-1)), "sd": _clean(sd)}


def _clean(values: np.ndarray) -> list:
    """Rounded nested lists for JSON, NaN as None."""
    rounded = np.round(np.asarray(values, dtype=np.float64), 4)
    return np.where(np.isnan(rounded), None, rounded).tolist()
