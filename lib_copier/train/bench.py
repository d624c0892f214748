"""`python -m lib_copier bench train`: trainer speed and memory, per recipe stage, and where a step's time goes.

On the default (built-in) model by default; `--family sd1|sd2|sdxl` builds a full-size model with random weights
instead (training speed does not depend on the weight values), for the GPU targets at 512² / 1024².
On a trained model (the built-in one, or `--model`) it also measures the copier's fidelity: how close the model
with the copier draws the original, in PSNR, beside the model alone.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from lib_copier.arguments import number, positive
from lib_copier.atomic import atomic_write, check_target
from lib_copier.train.config import PRESETS, make_config

STAGES = ("copier", "processed", "extraction")
FIDELITY_SEEDS = (1, 2, 3)


def add_benchmarks(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser("train", help="steps/s, seconds per recipe and peak memory of LoRA training")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="checkpoint to train on (default: the built-in model)")
    model.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="a full-size model with random weights instead")
    p.add_argument(
        "--resolution",
        type=positive(),
        help="image side: a multiple of 64, or of 32 on the small built-in model (default: the model's native one)",
    )
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick", help="trainer preset (default quick)")
    p.add_argument("--steps", type=positive(), help="steps per LoRA (default: the preset's; quick 500)")
    p.add_argument("--rank", type=positive(), help="LoRA rank, and alpha with it (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a trainer setting")
    p.add_argument("--stages", default=",".join(STAGES), help=f"which of {','.join(STAGES)} to run, in that order")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--threads", type=number(int, 0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--fidelity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the copier's fidelity (default; never on --family's random weights)",
    )
    p.add_argument("--profile", type=Path, help="profile 20 more copier steps; write the per-op table to this file")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--overwrite", action="store_true", help="replace the --json and --profile files if they exist")
    p.set_defaults(func=bench_train)


def _config(args):
    """The config of the model the options name, read without its weights (a missing or unreadable --model is refused
    here)."""
    from lib_copier.models.configs import FAMILIES
    from lib_copier.models.loading import read_config

    return FAMILIES[args.family] if args.family is not None else read_config(args.model)


def _check_resolution(side: int | None, config) -> None:
    from lib_copier.errors import CopierError
    from lib_copier.recipes.sizes import side_multiple, training_side

    multiple = side_multiple(config.resolution)
    if side is not None and side % multiple:
        raise CopierError(
            f"--resolution {side} is not a multiple of {multiple}, as this model's image sides must be "
            f"(the nearest is {training_side(side, config.resolution)})"
        )


def _model(args):
    from lib_copier.models.loading import load_model, pick_device, pick_dtype
    from lib_copier.models.sd_model import build_model

    if args.family is None:
        return load_model(args.model, args.device, args.dtype)
    device = pick_device(args.device)
    return build_model(args.family, device=device, dtype=pick_dtype(device, args.dtype), seed=0)


def _image(backend, side: int):
    """A generated image on the built-in model (a realistic target); noise of the right size on random models."""
    import numpy as np
    from PIL import Image

    from lib_copier.models.generate import Txt2Img

    if side <= 256:
        return backend.generate(Txt2Img("a large yellow star on a purple background", seed=1, width=side, height=side))
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _stages(text: str) -> list[str]:
    from lib_copier.errors import CopierError

    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages or any(s not in STAGES for s in stages) or stages[0] != "copier":
        raise CopierError(f"--stages {text!r}: copier, then any of {', '.join(STAGES[1:])}")
    return stages


def bench_train(args: argparse.Namespace) -> int:
    import torch

    from lib_copier.backends.standalone import StandaloneBackend
    from lib_copier.models.bench import _peak_rss_mb
    from lib_copier.recipes.cli import parse_overrides

    stages = _stages(args.stages)
    for path in (args.profile, args.json):
        if path is not None:
            check_target(path, args.overwrite, "choose another name, or --overwrite")  # before the work
    _check_resolution(args.resolution, _config(args))
    overrides = {} if args.steps is None else {"steps": args.steps}
    if args.rank is not None:
        overrides.update(rank=args.rank, alpha=float(args.rank))
    if args.gradient_checkpointing:
        overrides.update(gradient_checkpointing=True)
    overrides.update(parse_overrides(args.set))  # --set wins over the flags
    config = make_config(args.preset, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = StandaloneBackend(_model(args))
    cuda = backend.device.type == "cuda"
    side = args.resolution or backend.resolution
    image = _image(backend, side)
    if cuda:
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    precision = config.mixed_precision if cuda else "no"  # what it computes in: a CPU trains in fp32
    figures = {
        "model": f"{backend.family} ({'random weights' if args.family else args.model or 'built-in'})",
        "device": torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads",
        "dtype": str(backend.dtype).removeprefix("torch."),
        "resolution": side,
        "torch": torch.__version__,
        "config": {
            "preset": args.preset,
            **{k: getattr(config, k) for k in ("steps", "rank", "alpha", "lr", "batch_size", "gradient_checkpointing")},
            "mixed_precision": precision,
        },
    }
    print(
        f"model: {figures['model']}, {side}x{side}, {figures['device']}, {figures['dtype']}, rank {config.rank}, "
        f"{config.steps} steps, batch {config.batch_size}, mixed precision {precision}"
    )
    figures["stages"], copier = _run_stages(backend, image, config, stages)
    figures["recipe_seconds"] = sum(s["seconds"] for s in figures["stages"].values())
    if args.fidelity and not args.family:
        f = figures["fidelity_db"] = _fidelity(backend, copier, image)
        print(f"fidelity: the copier draws the original at {f['copier']:.1f} dB PSNR, the model alone {f['base']:.1f}")
    figures["peak_rss_mb"] = _peak_rss_mb()
    print(f"peak RSS: {figures['peak_rss_mb']:,.0f} MB")
    if cuda:
        figures["cuda_model_gib"] = loaded / 2**30
        figures["cuda_peak_over_model_gib"] = extra = (torch.cuda.max_memory_allocated() - loaded) / 2**30
        print(f"CUDA: model {loaded / 2**30:.2f} GiB, peak over the loaded model {extra:.2f} GiB")
        figures["host_syncs_per_step"] = _syncs_per_step(backend, image, config)
        print(f"host syncs per training step: {figures['host_syncs_per_step']:g}")
    if args.profile:
        p = figures["profile"] = _profile(backend, image, config, args.profile, args.overwrite)
        busy = f", GPU busy {p['gpu_busy']:.0%} of it" if cuda else ""
        print(f"profile: {p['ms_per_step']:.1f} ms per step{busy} ({args.profile})")
    if args.json:
        atomic_write(args.json, lambda path: path.write_text(json.dumps(figures, indent=2)), args.overwrite)
    return 0


def _run_stages(backend, image, config, stages: list[str]):
    """Each stage's seconds (caching its latents and prompt included; extraction's SVD too), loop speed and final
    loss; and the copier's network."""
    import torch

    from lib_copier.effects.chain import Chain
    from lib_copier.recipes.methods import extraction, train_copier, train_processed

    processed = Chain.parse(["grayscale"]).apply(image)
    figures = {}
    for stage in stages:
        start = time.perf_counter()
        if stage == "copier":
            run = copier = train_copier(backend, image, "", config)
        elif stage == "processed":
            run = train_processed(backend, copier.network, processed, "", config)
        else:
            run = train_copier(backend, processed, "", config)
            extraction(copier.network.to_weights(), run.network.to_weights(), rank=8)
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        seconds, steps_per_s = time.perf_counter() - start, run.steps / run.seconds
        loss = sum(run.losses[-50:]) / len(run.losses[-50:])
        timesteps_per_s = steps_per_s * config.batch_size  # what compares across batch sizes (Quick against Fast)
        figures[stage] = {
            "seconds": seconds,
            "steps_per_s": steps_per_s,
            "timesteps_per_s": timesteps_per_s,
            "final_loss": loss,
        }
        per = f" ({timesteps_per_s:.1f} timesteps/s)" if config.batch_size > 1 else ""
        print(f"{stage:>10}: {seconds:7.1f} s in all, {steps_per_s:6.1f} steps/s in the loop{per}, loss {loss:.4f}")
    return figures, copier.network


def _fidelity(backend, network, image) -> dict[str, float]:
    """Mean PSNR to the original of the training caption's draws over a few seeds, with the copier and without."""
    from lib_copier.evaluate.metrics import psnr
    from lib_copier.models.generate import Txt2Img

    requests = [Txt2Img("", seed=s, width=image.width, height=image.height) for s in FIDELITY_SEEDS]
    base = backend.generate_batch(requests)
    copier = backend.generate_batch(requests, loras=[(network, 1.0)])
    return {
        "base": sum(psnr(g, image) for g in base) / len(base),
        "copier": sum(psnr(g, image) for g in copier) / len(copier),
    }


def _syncs_per_step(backend, image, config) -> float:
    """How often a training step makes the host wait for the GPU: CUDA's sync warnings of a 15-step run minus a
    5-step one, per step (the difference leaves out the setup's own waits)."""
    import dataclasses

    import torch

    from lib_copier.train.trainer import train_lora

    counts = []
    for steps in (5, 15):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_lora(backend, image, "", dataclasses.replace(config, steps=steps))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in seen))
    return (counts[1] - counts[0]) / 10


def _profile(backend, image, config, path: Path, overwrite: bool, steps: int = 20) -> dict[str, float]:
    """20 copier steps under torch's profiler: the per-op table sorted by GPU time (CPU time on a CPU), and on a
    GPU the share of the wall time it was computing."""
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity, profile

    from lib_copier.train.trainer import train_lora

    cuda = backend.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    train_lora(backend, image, "", dataclasses.replace(config, steps=3))  # warm-up outside the profile
    with profile(activities=activities) as prof:
        run = train_lora(backend, image, "", dataclasses.replace(config, steps=steps))
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort, row_limit=40)
    atomic_write(path, lambda tmp: tmp.write_text(table), overwrite)
    figures = {"ms_per_step": 1000 * run.seconds / run.steps}
    if cuda:
        figures["gpu_busy"] = sum(e.self_device_time_total for e in averages) / 1e6 / run.seconds
    return figures
