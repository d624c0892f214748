"""`python -m lib_copier bench lora`: merge, SVD merge, resize and extract on SD1-size inputs it builds itself.

The LoRAs are random (rank `--rank`, every UNet and text-encoder module of SD1, 3x3 convs included); the SVD merge
is also timed beside what kohya's `svd_merge_lora.py` does (the dense delta and a full SVD) on the largest modules,
in the same run, and the ratio printed. `extract` runs on two SD1.5-size checkpoints (fp16, one with a LoRA merged
in) in a child process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib_copier.arguments import number, positive


def add_benchmarks(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser("lora", help="seconds of merge, svd-merge, resize and extract at SD1 size")
    p.add_argument("--rank", type=positive(), default=32, help="rank of each of the two LoRAs (default 32)")
    p.add_argument(
        "--dense-modules", type=number(int, 0), default=12, help="largest modules timed with a dense SVD too"
    )
    p.add_argument("--no-extract", action="store_true", help="skip extraction (it writes two 2 GB checkpoints)")
    p.add_argument("--extract-rank", type=positive(), default=8)
    p.add_argument(
        "--svd", default="lowrank", choices=("lowrank", "exact", "both"), help="extract's SVD (both: each in turn)"
    )
    p.add_argument(
        "--workdir", type=Path, help="the folder the checkpoints go in, made if missing (default: a temporary folder)"
    )
    p.set_defaults(func=bench_lora)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _random_lora(targets, rank: int, seed: int):
    import torch

    from lib_copier.lora.weights import LoRAWeights

    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for t in targets:
        down = torch.randn(rank, *t.shape[1:], generator=generator) / (t.shape[1] * rank) ** 0.5
        up = torch.randn(t.shape[0], rank, *((1, 1) if len(t.shape) == 4 else ()), generator=generator) * 0.05
        modules[t.key] = LoRAWeights(down, up, float(rank))
    return modules


def _dense_svd(modules: list, ratios: list[float], rank: int):
    """kohya's way: the dense weighted sum of the deltas, then a full SVD and truncation."""
    import torch

    for parts in modules:
        delta = sum(r * m.delta() for m, r in zip(parts, ratios, strict=True)).flatten(1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        _ = (u[:, :rank] * s[:rank]) @ vh[:rank]


def _relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def bench_lora(args: argparse.Namespace) -> int:
    import torch

    from lib_copier.atomic import check_folder
    from lib_copier.lora.naming import lora_targets
    from lib_copier.lora.ops import merge_exact, merge_svd, resize
    from lib_copier.lora.weights import KOHYA_CLAMP
    from lib_copier.models.sd_model import build_model

    if args.workdir is not None:
        check_folder(args.workdir)  # before the minute of merging that comes before extract writes there
    shapes = {k: tuple(v.shape) for k, v in build_model("sd1", device="meta").state_dict().items()}
    targets = lora_targets(shapes, "sd1", conv=True)
    a, b = _random_lora(targets, args.rank, 1), _random_lora(targets, args.rank, 2)
    pairs = [(a, 1.0), (b, -0.5)]
    figures: dict[str, object] = {"modules": len(targets), "rank": args.rank, "threads": torch.get_num_threads()}
    exact, figures["merge_s"] = _timed(lambda: merge_exact(pairs))
    _, figures["svd_merge_s"] = _timed(lambda: merge_svd(pairs, args.rank, args.rank, KOHYA_CLAMP))
    full, figures["svd_merge_full_rank_s"] = _timed(lambda: merge_svd(pairs, 2 * args.rank, 2 * args.rank, KOHYA_CLAMP))
    figures["svd_merge_full_rank_worst_error"] = max(_relative_error(full[k].delta(), exact[k].delta()) for k in exact)
    _, figures["resize_s"] = _timed(lambda: resize(exact, args.rank, args.rank))
    largest = sorted(targets, key=lambda t: -torch.Size(t.shape).numel())[: args.dense_modules]
    subset = [({t.key: a[t.key]}, 1.0) for t in largest] + [({t.key: b[t.key]}, -0.5) for t in largest]
    _, factored = _timed(lambda: merge_svd(subset, args.rank, args.rank, KOHYA_CLAMP))
    _, dense = _timed(lambda: _dense_svd([(a[t.key], b[t.key]) for t in largest], [1.0, -0.5], args.rank))
    figures[f"svd_merge_{len(largest)}_largest_s"] = factored
    figures[f"dense_svd_{len(largest)}_largest_s"] = dense
    figures["dense_over_factored"] = dense / factored
    if not args.no_extract:
        figures.update(_bench_extract(args, shapes, a))
    for name, value in figures.items():
        print(f"{name:34} {value:.4g}" if isinstance(value, float) else f"{name:34} {value}")
    return 0


_CHILD = """
import json, sys, time
from lib_copier.arguments import number, positive
from lib_copier.cli import main
from lib_copier.models.bench import _peak_rss_mb
start = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(), "code": code}))
"""


def _bench_extract(args, shapes, lora) -> dict[str, float]:
    from safetensors.torch import save_file

    from lib_copier.lora.naming import by_key, lora_targets
    from lib_copier.lora.ops import apply_to_state_dict
    from lib_copier.models.sd_model import build_model

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        folder = Path(folder)
        state = {k: v.half().contiguous() for k, v in build_model("sd1", seed=0).state_dict().items()}
        save_file(state, str(folder / "base.safetensors"))
        apply_to_state_dict(state, [(lora, 1.0)], by_key(lora_targets(shapes, "sd1", conv=True)))
        save_file(state, str(folder / "tuned.safetensors"))
        del state
        figures = {}
        for svd in ("lowrank", "exact") if args.svd == "both" else (args.svd,):
            figures.update(_extract_once(args, folder, lora, svd))
    return figures


def _extract_once(args, folder: Path, lora, svd: str) -> dict[str, float]:
    import torch

    from lib_copier.lora.files import read_lora

    out = folder / f"extracted-{svd}.safetensors"
    command = ["lora", "extract", str(folder / "base.safetensors"), str(folder / "tuned.safetensors")]
    command += ["--dim", str(args.extract_rank), "--conv-dim", str(args.extract_rank), "--svd", svd]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *command, "--out", str(out)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"extract failed: {done.stderr.strip()[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    extracted = read_lora(out).modules
    # How close each module comes to the best rank-r approximation of the true delta (exact SVD).
    worst = 0.0
    for key in sorted(lora, key=lambda k: -lora[k].down.numel())[:12]:
        truth = lora[key].delta().flatten(1)
        s = torch.linalg.svdvals(truth)
        optimum = float(s[args.extract_rank :].norm() / s.norm())
        worst = max(worst, _relative_error(extracted[key].delta().flatten(1), truth) - optimum)
    return {
        f"extract_{svd}_s": child["seconds"],
        f"extract_{svd}_peak_rss_mb": child["peak_rss_mb"],
        f"extract_{svd}_error_over_optimum_worst": worst,
    }
