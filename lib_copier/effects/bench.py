"""`python -m lib_copier bench effects`: seconds per effect on a 1024x1024 image, on one CPU core."""

from __future__ import annotations

import argparse
import statistics
import time

from lib_copier.arguments import number, positive

LIMIT_S = 0.5


def add_benchmarks(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser("effects", help="time every effect at its defaults on a synthetic picture")
    p.add_argument("--size", type=number(int, 8, 4096), default=1024)
    p.add_argument("--repeat", type=positive(), default=3, help="runs per effect; the median is reported")
    p.set_defaults(func=run_bench)


def test_picture(size: int):
    """Gradients, flat shapes, thin strokes and noise: every effect has something to work on."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    values = np.stack([x, y, 1 - x * y], -1) * 200 + rng.normal(0, 8, (size, size, 3))
    image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    s = size
    draw.ellipse((s * 0.1, s * 0.1, s * 0.45, s * 0.45), fill=(220, 40, 40))
    draw.rectangle((s * 0.55, s * 0.5, s * 0.9, s * 0.9), fill=(30, 60, 200))
    for i in range(12):
        draw.line((s * 0.1, s * (0.55 + i * 0.03), s * 0.45, s * (0.55 + i * 0.03)), fill=(0, 0, 0), width=2)
    return image


def run_bench(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from lib_copier.effects.registry import all_effects

    image = test_picture(args.size)
    print(f"{'effect':14} {'s / image':>10}  (median of {args.repeat}, {args.size}x{args.size}, limit {LIMIT_S} s)")
    slow = 0
    for effect in all_effects():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            effect.apply(image)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        slow += median > LIMIT_S
        print(f"{effect.name:14} {median:10.3f}  {'ok' if median <= LIMIT_S else 'SLOW'}")
    return 1 if slow else 0
