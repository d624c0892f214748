"""The five methods' LoRAs for each effect, from the same originals, with each run's training time.

- naive: B trained on P against the base model alone, used as the effect LoRA. That is exactly the processed
  image's copier A′, so naive and extraction share one training run per original and effect.
- copier: B trained on P against the base model with the original's copier A fused in (the method).
- extraction: A′ − A, SVD-merged to `extraction_rank`, oriented so that a positive weight adds the effect.
- slider, addift: one LoRA from the pair (O, P) with no copier (trainer.train_pair), at their own settings.

Training time per method and effect is what a user waits for that one LoRA: naive A′; copier A + B; extraction
A + A′ (A is shared by all effects of an original, and counted in full for each); slider and addift their one run.

Variants: "single" uses the first original's LoRAs; "merged" merges each method's LoRAs over all originals by SVD
(their mean), as the `copier` command does with several `--image`s. One task trains everything of one original.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lib_copier.evaluate.workers import Packed, Workers, backend, pack, unpack
from lib_copier.recipes.methods import extraction, merge_processed, train_copier, train_processed
from lib_copier.recipes.processed import Effect
from lib_copier.train.config import PAIR_LOSSES, TrainConfig
from lib_copier.train.trainer import train_pair

METHODS = ("naive", "copier", "extraction", *PAIR_LOSSES)
VARIANTS = ("single", "merged")


@dataclass
class Trained:
    copiers: list[Packed]  # A of each original
    loras: dict[tuple[str, str, str], Packed] = field(default_factory=dict)  # (variant, effect, method) → LoRA
    seconds_each: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (effect, method) → per original
    runs: int = 0
    seconds: float = 0.0

    def mean_seconds(self, method: str) -> float:
        """Training seconds of one of `method`'s LoRAs, the mean over originals and effects."""
        return float(np.mean([s for (_, m), each in self.seconds_each.items() if m == method for s in each]))

    def variants(self) -> list[str]:
        return list(dict.fromkeys(variant for variant, _, _ in self.loras))


@dataclass(frozen=True)
class TrainTask:
    original: Image.Image
    effects: list[Effect]
    captions: list[str]
    config: TrainConfig
    processed_config: TrainConfig  # the copier method's B (experiments may change it alone)
    extraction_rank: int
    pair_configs: dict[str, TrainConfig]  # slider / addift


def train_original(task: TrainTask) -> tuple[Packed, dict[tuple[str, str], Packed], dict[tuple[str, str], float]]:
    """A, and per effect the five methods' LoRAs and their training seconds, for one original."""
    model, captions, config = backend(), task.captions, task.config
    copier_run = train_copier(model, task.original, captions, config)
    copier = copier_run.network
    copier_weights = unpack(pack(copier.to_weights()))  # a detached copy on the CPU
    out: dict[tuple[str, str], Packed] = {}
    seconds: dict[tuple[str, str], float] = {}
    for effect in task.effects:
        processed = effect.process(task.original)
        b = train_processed(model, copier, processed, captions, task.processed_config)
        out[(effect.label, "copier")] = pack(b.network.to_weights())
        a_prime_run = train_copier(model, processed, captions, config)
        a_prime = unpack(pack(a_prime_run.network.to_weights()))
        out[(effect.label, "naive")] = pack(a_prime)
        started = time.perf_counter()
        out[(effect.label, "extraction")] = pack(extraction(copier_weights, a_prime, task.extraction_rank))
        svd = time.perf_counter() - started
        seconds[(effect.label, "naive")] = a_prime_run.seconds
        seconds[(effect.label, "copier")] = copier_run.seconds + b.seconds
        seconds[(effect.label, "extraction")] = copier_run.seconds + a_prime_run.seconds + svd
        for method, pair_config in task.pair_configs.items():
            run = train_pair(model, task.original, processed, captions, pair_config, method)
            out[(effect.label, method)] = pack(run.network.to_weights())
            seconds[(effect.label, method)] = run.seconds
    return pack(copier_weights), out, seconds


def train_methods(
    workers: Workers,
    originals: list[Image.Image],
    effects: list[Effect],
    captions: list[str],
    config: TrainConfig,
    processed_config: TrainConfig | None = None,
    extraction_rank: int = 8,
    stage: Callable[[str], None] = lambda text: None,
    pair_configs: dict[str, TrainConfig] | None = None,
) -> Trained:
    start = time.perf_counter()
    processed_config = processed_config or config
    pair_configs = pair_configs or {}
    tasks = [
        TrainTask(o, effects, captions, config, processed_config, extraction_rank, pair_configs) for o in originals
    ]
    done = workers.map(train_original, tasks, lambda k, n: stage(f"{k}/{n} originals done"))
    runs = len(originals) * (1 + (2 + len(pair_configs)) * len(effects))
    trained = Trained([copier for copier, _, _ in done], runs=runs)
    for key, lora in done[0][1].items():
        trained.loras[("single", *key)] = lora
    for _, _, seconds in done:
        for key, value in seconds.items():
            trained.seconds_each.setdefault(key, []).append(value)
    ranks = {"extraction": extraction_rank, "copier": processed_config.rank}
    ranks.update({method: c.rank for method, c in pair_configs.items()})
    if len(originals) > 1:
        stage("merging over the originals")
        for label, method in done[0][1]:
            trained.loras[("merged", label, method)] = pack(
                merge_processed(
                    [unpack(loras[(label, method)]) for _, loras, _ in done], ranks.get(method, config.rank)
                )
            )
    trained.seconds = time.perf_counter() - start
    return trained
