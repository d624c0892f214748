"""Run the evaluation's tasks in a few single-threaded processes, each with its own copy of the model.

Why processes and not torch threads: on a shared CPU (another job on the same cores) torch's threads wait for each
other at every operation and a two-thread run slowed down more than tenfold here, while independent one-thread
processes just share the cores. On two idle cores two processes are also a little faster than two threads.
With one worker (and always on a GPU) the tasks run in this process.

Task functions take one picklable argument and find the model through `backend()`; LoRA weights travel as numpy
arrays (`pack`, `unpack`), images as PIL images.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_copier.backends.standalone import StandaloneBackend
from lib_copier.errors import CopierError
from lib_copier.lora.weights import LoRAWeights

_backend: StandaloneBackend | None = None
_failure: CopierError | None = None  # why this worker could not load the model: its tasks raise it

Packed = dict[str, tuple]


@dataclass(frozen=True)
class ModelSpec:
    path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    prediction: str | None = None


def default_workers(device: str = "auto") -> int:
    from lib_copier.models.loading import pick_device

    return 1 if pick_device(device).type != "cpu" else max(1, min(2, os.cpu_count() or 1))


def check_model(spec: ModelSpec) -> None:
    """The refusals of loading that read no weights (a missing file, an image or a LoRA given as the model, an
    inpainting UNet, a device this machine lacks), in this process before any worker starts."""
    from lib_copier.models.checkpoint import TensorSource, check_plain_unet, detect_config
    from lib_copier.models.loading import pick_device

    pick_device(spec.device)
    if spec.path is not None:
        source = TensorSource(Path(spec.path))
        check_plain_unet(source.shapes(), detect_config(source).family, f"the UNet of checkpoint {source.path}")


def backend() -> StandaloneBackend:
    if _failure is not None:
        raise _failure
    if _backend is None:
        raise RuntimeError("no model loaded in this process; tasks must run through Workers")
    return _backend


def _init(spec: ModelSpec, threads: int) -> None:
    from lib_copier.models.loading import load_model

    global _backend
    if threads or spec.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(threads or 1)
    _backend = StandaloneBackend(load_model(spec.path, spec.device, spec.dtype, spec.prediction))


def _init_worker(spec: ModelSpec, threads: int) -> None:
    """A pool's initializer: its refusal is kept for the tasks to raise, since one that escapes an initializer breaks
    the pool, and the parent then sees BrokenProcessPool instead of the sentence."""
    global _failure
    try:
        _init(spec, threads)
    except CopierError as exc:
        _failure = exc


def _resolution(_) -> int:
    return backend().resolution


class Workers:
    """`map(fn, items)`: results in order, progress reported as tasks finish."""

    def __init__(self, spec: ModelSpec, count: int, threads: int = 0):
        self.count = count
        if count <= 1:
            _init(spec, threads)
            self._pool = None
        else:
            self._pool = ProcessPoolExecutor(
                count,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(spec, threads),
            )

    def map(self, fn: Callable, items: Iterable, progress: Callable[[int, int], None] | None = None) -> list:
        items = list(items)
        if self._pool is None:
            results = []
            for i, item in enumerate(items):
                results.append(fn(item))
                if progress:
                    progress(i + 1, len(items))
            return results
        futures = {self._pool.submit(fn, item): i for i, item in enumerate(items)}
        results: list = [None] * len(items)
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress:
                progress(done, len(items))
        return results

    def resolution(self) -> int:
        """The model's native image side."""
        return self.map(_resolution, [None])[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pack(weights: dict[str, LoRAWeights]) -> Packed:
    return {k: (w.down.detach().cpu().numpy(), w.up.detach().cpu().numpy(), float(w.alpha)) for k, w in weights.items()}


def unpack(packed: Packed) -> dict[str, LoRAWeights]:
    return {k: LoRAWeights(torch.from_numpy(d), torch.from_numpy(u), a) for k, (d, u, a) in packed.items()}
