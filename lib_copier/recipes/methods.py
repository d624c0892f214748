"""The method's recipes over a Backend, as functions from images to LoRA weights (files are outputs.py's job).

- copier: A overfits the original O against the base model M.
- processed: B learns P against M + A (A fused at weight 1), so it holds only the effect P − O.
- extraction: A′ learns P against M; SVD(A′ − A) to a small rank, oriented so a positive weight moves toward P.
- slider / addift (the pair methods): one LoRA learned from (O, P) directly, with no copier (trainer.train_pair).
- several originals: one B per original, merged by SVD with equal shares.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from lib_copier.backends import Backend
from lib_copier.lora.network import LoRANetwork
from lib_copier.lora.ops import Progress, merge_svd, resize
from lib_copier.lora.weights import LoRAWeights
from lib_copier.train.config import TrainConfig
from lib_copier.train.trainer import Callbacks, TrainResult, train_lora

Weights = dict[str, LoRAWeights]


def train_copier(
    backend: Backend,
    original: Image.Image,
    caption: str | Sequence[str],
    config: TrainConfig,
    callbacks: Callbacks | None = None,
) -> TrainResult:
    return train_lora(backend, original, caption, config, callbacks=callbacks)


def train_processed(
    backend: Backend,
    copier: LoRANetwork,
    processed: Image.Image,
    caption: str | Sequence[str],
    config: TrainConfig,
    callbacks: Callbacks | None = None,
) -> TrainResult:
    return train_lora(backend, processed, caption, config, frozen=[(copier, 1.0)], callbacks=callbacks)


def shrink(weights: Weights, rank: int | None, progress: Progress | None = None) -> Weights:
    """Resize to `rank` (kohya's resize, fixed rank); None keeps the trained rank."""
    return weights if rank is None else resize(weights, rank, conv_rank=rank, progress=progress)[0]


def extraction(copier: Weights, processed_copier: Weights, rank: int, progress: Progress | None = None) -> Weights:
    """(A′ − A) at `rank`, its best approximation there (no kohya clamp): positive weights move toward P.

    The write-ups merged (A, A′) with ratios (1, −1), whose positive weight *removed* the effect; we flip it."""
    return merge_svd([(processed_copier, 1.0), (copier, -1.0)], rank, conv_rank=rank, progress=progress)


def merge_processed(processed: list[Weights], rank: int, progress: Progress | None = None) -> Weights:
    """One LoRA from the B of several originals: their mean, at `rank`."""
    if len(processed) == 1:
        return processed[0]
    share = 1.0 / len(processed)
    return merge_svd([(weights, share) for weights in processed], rank, conv_rank=rank, progress=progress)
