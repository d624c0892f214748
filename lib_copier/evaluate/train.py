"""The three methods' LoRAs for each effect, from the same originals, copiers and training settings.

- naive: B trained on P against the base model alone, used as the effect LoRA. That is exactly the processed
  image's copier A′, so naive and extraction share one training run per original and effect.
- copier: B trained on P against the base model with the original's copier A fused in (the method).
- extraction: A′ − A, SVD-merged to `extraction_rank`, oriented so that a positive weight adds the effect.

Variants: "single" uses the first original's LoRAs; "merged" merges each method's LoRAs over all originals by SVD
(their mean), as the `copier` command does with several `--image`s. One task trains everything of one original.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from lib_copier.evaluate.workers import Packed, Workers, backend, pack, unpack
from lib_copier.recipes.job import Effect
from lib_copier.recipes.methods import extraction, merge_processed, train_copier, train_processed
from lib_copier.train.config import TrainConfig

METHODS = ("naive", "copier", "extraction")
VARIANTS = ("single", "merged")


@dataclass
class Trained:
    copiers: list[Packed]  # A of each original
    loras: dict[tuple[str, str, str], Packed] = field(default_factory=dict)  # (variant, effect, method) → LoRA
    runs: int = 0
    seconds: float = 0.0

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


def train_original(task: TrainTask) -> tuple[Packed, dict[tuple[str, str], Packed]]:
    """A, and per effect the three methods' LoRAs, for one original."""
    model, captions, config = backend(), task.captions, task.config
    copier = train_copier(model, task.original, captions, config).network
    copier_weights = unpack(pack(copier.to_weights()))  # a detached copy on the CPU
    out: dict[tuple[str, str], Packed] = {}
    for effect in task.effects:
        processed = effect.process(task.original)
        b = train_processed(model, copier, processed, captions, task.processed_config).network
        out[(effect.label, "copier")] = pack(b.to_weights())
        a_prime = unpack(pack(train_copier(model, processed, captions, config).network.to_weights()))
        out[(effect.label, "naive")] = pack(a_prime)
        out[(effect.label, "extraction")] = pack(extraction(copier_weights, a_prime, task.extraction_rank))
    return pack(copier_weights), out


def train_methods(
    workers: Workers,
    originals: list[Image.Image],
    effects: list[Effect],
    captions: list[str],
    config: TrainConfig,
    processed_config: TrainConfig | None = None,
    extraction_rank: int = 8,
    stage: Callable[[str], None] = lambda text: None,
) -> Trained:
    start = time.perf_counter()
    processed_config = processed_config or config
    tasks = [TrainTask(o, effects, captions, config, processed_config, extraction_rank) for o in originals]
    done = workers.map(train_original, tasks, lambda k, n: stage(f"{k}/{n} originals done"))
    trained = Trained([copier for copier, _ in done], runs=len(originals) * (1 + 2 * len(effects)))
    for key, lora in done[0][1].items():
        trained.loras[("single", *key)] = lora
    if len(originals) > 1:
        stage("merging over the originals")
        for label, method in done[0][1]:
            rank = {"extraction": extraction_rank, "copier": processed_config.rank}.get(method, config.rank)
            trained.loras[("merged", label, method)] = pack(
                merge_processed([unpack(loras[(label, method)]) for _, loras in done], rank)
            )
    trained.seconds = time.perf_counter() - start
    return trained
