"""`python -m lib_copier bench train`: trainer speed and memory, per recipe stage.

On the default (built-in) model by default; `--family sd1|sdxl` builds a full-size model with random weights
instead (training speed does not depend on the weight values), for the GPU targets at 512² / 1024².
"""

from __future__ import annotations

import argparse
import time


def add_benchmarks(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser("train", help="steps/s, seconds per recipe and peak memory of LoRA training")
    p.add_argument("--model", help="checkpoint to train on (default: the built-in model)")
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="a full-size model with random weights instead")
    p.add_argument("--resolution", type=int, help="image side (default: the model's native one)")
    p.add_argument("--steps", type=int, default=500, help="steps per LoRA (default 500, the Quick preset)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.set_defaults(func=bench_train)


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


def bench_train(args: argparse.Namespace) -> int:
    import torch

    from lib_copier.backends.standalone import StandaloneBackend
    from lib_copier.effects.chain import Chain
    from lib_copier.models.bench import _peak_rss_mb
    from lib_copier.recipes.methods import extraction, train_copier, train_processed
    from lib_copier.train.config import make_config

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = StandaloneBackend(_model(args))
    cuda = backend.device.type == "cuda"
    side = args.resolution or backend.resolution
    image = _image(backend, side)
    processed = Chain.parse(["grayscale"]).apply(image)
    overrides = dict(steps=args.steps, rank=args.rank, alpha=float(args.rank))
    config = make_config("quick", gradient_checkpointing=args.gradient_checkpointing, **overrides)
    if cuda:
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    print(
        f"model: {backend.family} ({'random weights' if args.family else args.model or 'built-in'}), "
        f"{side}x{side}, {backend.device} {str(backend.dtype).removeprefix('torch.')}, rank {args.rank}, "
        f"{args.steps} steps, threads {torch.get_num_threads()}"
    )
    for stage in ("copier", "processed", "extraction"):
        # Each stage's time includes caching its latents and prompt embedding; extraction includes the SVD.
        start = time.perf_counter()
        if stage == "copier":
            run = copier = train_copier(backend, image, "", config)
        elif stage == "processed":
            run = train_processed(backend, copier.network, processed, "", config)
        else:
            run = train_copier(backend, processed, "", config)
            extraction(copier.network.to_weights(), run.network.to_weights(), rank=8)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        steps_per_s = run.steps / run.seconds
        print(f"{stage:>10}: {seconds:7.1f} s in all, {steps_per_s:6.1f} steps/s in the loop")
    print(f"peak RSS: {_peak_rss_mb():,.0f} MB")
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - loaded) / 2**30
        print(f"CUDA: model {loaded / 2**30:.2f} GiB, peak over the loaded model {extra:.2f} GiB")
    return 0
