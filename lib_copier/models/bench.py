"""`python -m lib_copier bench load|generate`: checkpoint-loading memory and sampling speed."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib_copier.arguments import positive
from lib_copier.errors import CopierError


def add_benchmarks(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser("load", help="peak RAM while loading a full-size checkpoint with random weights")
    p.add_argument("--family", default="sd1", choices=("sd1", "sd2", "sdxl"))
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--file", help="an existing checkpoint to load instead of writing a random one")
    p.set_defaults(func=bench_load)

    g = benchmarks.add_parser("generate", help="seconds per image with the default model (or --model)")
    g.add_argument("--model")
    g.add_argument("--steps", type=positive(), default=20)
    g.add_argument("--threads", type=positive(), default=1, help="torch CPU threads (default 1: one core)")
    g.add_argument("--repeat", type=positive(), default=3)
    g.set_defaults(func=bench_generate)


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; other systems: best effort


def _measure_load(path: str) -> None:
    """Runs in a fresh process so the peak belongs to the load alone."""
    import torch  # noqa: F401  (imported before the baseline so its own memory is not counted)

    from lib_copier.models.checkpoint import load_checkpoint

    base = _peak_rss_mb()
    start = time.perf_counter()
    model = load_checkpoint(path)
    seconds = time.perf_counter() - start
    # Safetensors tensors can stay backed by the file until read; read every weight so the peak is the real cost.
    checksum = sum(float(p.float().sum()) for p in model.parameters())
    print(json.dumps({"peak_over_baseline_mb": _peak_rss_mb() - base, "seconds": seconds, "checksum": checksum}))


def bench_load(args: argparse.Namespace) -> int:
    import torch

    from lib_copier.models.checkpoint import save_checkpoint
    from lib_copier.models.sd_model import build_model

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file
        if path is not None:
            from lib_copier.models.checkpoint import TensorSource

            TensorSource(Path(path))  # a missing or damaged file: its sentence, before the measurement starts
        else:
            path = str(Path(tmp) / f"random-{args.family}.safetensors")
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
            save_checkpoint(build_model(args.family, dtype=dtype, seed=0), path)
        size_mb = Path(path).stat().st_size / 2**20
        out = subprocess.run(
            [sys.executable, "-c", f"from lib_copier.models.bench import _measure_load; _measure_load({path!r})"],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["no message"])[-1]
            raise CopierError(f"loading {path} failed in the measuring process: {last}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["peak_over_baseline_mb"] / size_mb
    print(f"file: {size_mb:,.0f} MB ({args.family}, {args.dtype if not args.file else 'as stored'})")
    print(f"peak RSS over baseline while loading: {result['peak_over_baseline_mb']:,.0f} MB = {ratio:.2f}x the file")
    print(f"load time: {result['seconds']:.1f} s")
    return 0


def bench_generate(args: argparse.Namespace) -> int:
    import torch

    from lib_copier.models.generate import Txt2Img, generate
    from lib_copier.models.loading import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype="fp32")
    generate(model, Txt2Img("warm up", steps=2))
    times = []
    for i in range(args.repeat):
        start = time.perf_counter()
        generate(model, Txt2Img("a large yellow star on a purple background", seed=i, steps=args.steps))
        times.append(time.perf_counter() - start)
    size = model.config.resolution
    print(
        f"{args.steps} Euler steps, {size}x{size}, {args.threads} thread(s): "
        f"best {min(times):.3f} s, mean {sum(times) / len(times):.3f} s per image"
    )
    return 0
