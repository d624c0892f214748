"""`python -m lib_copier copier …` and `python -m lib_copier demo`."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

from lib_copier.arguments import number, positive
from lib_copier.errors import CopierError, Interrupted, shown
from lib_copier.models.cli import add_model_arguments, load
from lib_copier.models.generate import MAX_STEPS
from lib_copier.names import slug
from lib_copier.recipes.kinds import DEFAULT_METHOD, METHODS
from lib_copier.recipes.prompts import grid_prompts, prompt_pool
from lib_copier.train.config import PRESETS, field_info

DEMO_PROMPT = "a large yellow star with shading and a dark outline on a purple background"
DEMO_EFFECTS = ["grayscale", "outline:thickness=3", "posterize:levels=3"]
DEMO_STEPS = 150
DEMO_PAIR_METHOD = "addift"  # shown beside the copier method's LoRAs


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("copier", help="train effect LoRAs (pair, copier or extraction) for one or more images")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", action="append", help="original image (repeat for several originals)")
    source.add_argument("--generate", metavar="PROMPT", help="generate the original with the model instead")
    p.add_argument("--seed", type=int, default=0, help="seed for --generate")
    p.add_argument(
        "--effect",
        action="append",
        default=[],
        help="an effect chain, e.g. grayscale or posterize:levels=4+outline (repeat: one LoRA per effect)",
    )
    p.add_argument("--processed-image", action="append", default=[], help="a processed image you edited yourself")
    p.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help=f"slider, addift: one LoRA from each (original, processed) pair, with no copier; copier: copier A, then "
        f"B on top of it; extraction: A′ − A; both: B and A′ − A (default: {DEFAULT_METHOD})",
    )
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    p.add_argument("--caption", default="", help="training caption (default: empty, as the method suggests)")
    p.add_argument(
        "--prompt-pool",
        type=number(int, 0, 1024),
        default=32,
        metavar="N",
        help="train with N varied prompts mixed with the caption, so the copier ignores the prompt (0: caption only)",
    )
    p.add_argument(
        "--size",
        type=positive(),
        help="the side the images are trained at, about size² pixels (default: the model's native side; "
        "on a CPU 64-128 trains about ten times faster than 512)",
    )
    p.add_argument("--name", help="output name (default: from the image or prompt)")
    p.add_argument("--out", default="models/Lora", help="output folder (default: models/Lora)")
    p.add_argument("--grid-prompt", action="append", default=[], help="a prompt for the strength grid's rows")
    p.add_argument(
        "--grid-steps",
        type=number(int, 0, MAX_STEPS),
        default=20,
        metavar="N",
        help="sampling steps of each strength-grid image, drawn at the training size (default 20; 0: no grids)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a trainer setting")
    for name in ("steps", "rank", "alpha", "lr"):
        p.add_argument(f"--{name}", type=field_info()[name]["type"], help=field_info()[name]["help"])
    add_model_arguments(p)
    p.set_defaults(func=run_copier)

    d = commands.add_parser("demo", help="the whole method on the built-in model, into ./copier-demo/")
    d.add_argument("--out", default="copier-demo")
    # 150 steps and 12-step grids keep the demo under two minutes on two CPU cores; `copier` runs the full presets.
    d.add_argument(
        "--steps",
        type=positive(),
        help=f"training steps per LoRA (default {DEMO_STEPS} for the copier methods, the pair method's own)",
    )
    add_model_arguments(d)
    d.set_defaults(func=run_demo)


def parse_overrides(items: list[str], option: str = "--set") -> dict:
    info, overrides = field_info(), {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in info:
            raise CopierError(f"{option} {shown(item)}: expected KEY=VALUE with KEY one of {', '.join(info)}")
        kind = info[key]["type"]
        if kind is bool:
            word = value.strip().lower()
            if word not in _TRUE + _FALSE:  # a typo ("ture") must not quietly turn the setting off
                raise CopierError(f"{option} {shown(item)}: {key} takes true or false, not {shown(value)}")
            overrides[key] = word in _TRUE
            continue
        try:
            overrides[key] = kind(value)
        except ValueError as exc:
            raise CopierError(f"{option} {shown(item)}: {shown(value)} is not a valid {kind.__name__}") from exc
    return overrides


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _effects(specs: list[str], processed_images: list[str]):
    from lib_copier.effects.chain import split_specs
    from lib_copier.effects.image_io import load_image
    from lib_copier.recipes.processed import make_effects

    return make_effects(
        [split_specs(spec) for spec in specs], [(Path(p).stem, load_image(p)) for p in processed_images]
    )


def _bar_callbacks(bar_holder: dict):
    from lib_copier.train.trainer import Callbacks

    def progress(p):
        bar = bar_holder["bar"]
        bar.total = p.total
        bar.update(p.step - bar.n)
        bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}")

    def counted(done, total):
        bar = bar_holder["bar"]
        bar.total, bar.unit = total, "image" if bar.desc == "strength grids" else "module"
        bar.set_postfix_str("", refresh=False)  # a stage that trained first showed its last loss and lr here
        bar.update(done - bar.n)

    def notice(text):
        bar_holder["bar"].write(f"{bar_holder['bar'].desc}: {text}")

    return Callbacks(progress=progress, counted=counted, notice=notice)


@contextlib.contextmanager
def _first_ctrl_c_stops_between_steps():
    """The first Ctrl-C stops a training between two steps, or the grids between two images (what it trained is kept
    with `save_on_cancel`); a second one stops at once. Yields the callback saying whether the run was told to stop."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield asked.is_set
        return

    def first(signum, frame):
        asked.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after this step or grid image (Ctrl-C again stops at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield asked.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def run_job_with_progress(backend, job):
    from tqdm import tqdm

    from lib_copier.recipes.job import run_job

    holder: dict = {}

    def stage(text: str):
        if "bar" in holder:
            holder["bar"].close()
        holder["bar"] = tqdm(desc=text, unit="step", leave=True)

    callbacks = _bar_callbacks(holder)
    try:
        with _first_ctrl_c_stops_between_steps() as callbacks.cancelled:
            return run_job(backend, job, callbacks, stage)
    except Interrupted as exc:
        kept = f"what it trained is in {job.out_dir}" if job.config().save_on_cancel else "nothing was written"
        raise Interrupted(f"{exc}; {kept}") from exc
    finally:
        if "bar" in holder:
            holder["bar"].close()


def print_summary(results) -> None:
    rows = [("kind", "effect", "steps", "seconds", "final loss", "seed", "file")]
    for r in results:
        loss = "" if r.final_loss is None else f"{r.final_loss:.4f}"
        rows.append((r.kind, r.effect or "-", str(r.steps), f"{r.seconds:.1f}", loss, str(r.seed), str(r.written.lora)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def _resolution(args) -> int | None:
    """The native side of the model `args` name, from its file's header; None where only its weights tell it (an SD2
    file's side follows its prediction)."""
    from lib_copier.models.loading import read_config

    config = read_config(args.model)
    return None if config.family == "sd2" else config.resolution


def _load(args):
    from lib_copier.backends.standalone import StandaloneBackend

    return StandaloneBackend(load(args))


def run_copier(args: argparse.Namespace) -> int:
    from lib_copier.atomic import check_folder
    from lib_copier.effects.image_io import load_image
    from lib_copier.fields import check, check_field
    from lib_copier.models.generate import Txt2Img
    from lib_copier.recipes.job import Job, check_effect_count, method_config, output_names
    from lib_copier.recipes.processed import check_pairs
    from lib_copier.recipes.request import TrainRequest
    from lib_copier.recipes.sizes import check_training_sizes, fit_image, training_side
    from lib_copier.seeds import fixed_seed

    check_folder(args.out)
    request = Txt2Img(args.generate or "", seed=fixed_seed(args.seed))  # drawn here, so that it can be said
    check(request, lambda name: "--generate" if name == "prompt" else f"--{name}")
    overrides = parse_overrides(args.set)
    overrides.update({k: getattr(args, k) for k in ("steps", "rank", "alpha", "lr") if getattr(args, k) is not None})
    method_config(args.method, args.preset, overrides)  # a setting out of range: said before the model loads
    if args.size is not None:
        check_field(TrainRequest, "size", args.size, lambda name: f"--{name}")
    effects = _effects(args.effect, args.processed_image)
    check_effect_count(args.method, len(effects))  # before the model loads and the original is drawn
    generating = args.generate is not None  # "" draws the empty prompt
    name = args.name or slug(args.generate if generating else Path(args.image[0]).stem, 30)
    output_names(name, args.method, [effect.label for effect in effects], what="--name")  # before the model loads
    if not generating:
        given = [load_image(path) for path in args.image]
        check_pairs(effects, given)  # before the model loads
    resolution = _resolution(args)
    if resolution:  # the originals' training sizes, before the model loads (and draws the original)
        sizes = [(resolution, resolution)] if generating else [image.size for image in given]
        check_training_sizes(sizes, args.size, resolution)
    backend = _load(args)
    if generating:
        given = [backend.generate(request)]
        print(f"the original: {request.prompt!r}, seed {request.seed}")
        check_pairs(effects, given)
    side = training_side(args.size, backend.resolution)  # the grids' too
    originals = [fit_image(image, side, backend.resolution) for image in given]
    job = Job(
        originals=originals,
        effects=effects,
        name=name,
        out_dir=Path(args.out),
        method=args.method,
        preset=args.preset,
        overrides=overrides,
        caption=args.caption,
        prompt_pool=prompt_pool(args.model is None, args.prompt_pool),
        grid_prompts=(args.grid_prompt or grid_prompts(args.model is None)) if args.grid_steps else [],
        grid_steps=args.grid_steps,
        grid_side=side,
        base_model=Path(args.model).name if args.model else "built-in",
    )
    start = time.perf_counter()
    results = run_job_with_progress(backend, job)
    print_summary(results)
    print(f"done in {time.perf_counter() - start:.0f} s; files in {Path(args.out).resolve()}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from lib_copier.atomic import all_or_nothing, check_folder
    from lib_copier.models.generate import Txt2Img
    from lib_copier.recipes.job import Job
    from lib_copier.recipes.processed import changed

    start = time.perf_counter()
    out = check_folder(args.out)
    if out.exists() and any(out.iterdir()):
        raise CopierError(f"{out} is not empty (an earlier demo?); remove it or choose another --out")
    backend = _load(args)
    original = backend.generate(Txt2Img(DEMO_PROMPT, seed=1))
    effects = []
    for effect in _effects(DEMO_EFFECTS, []):  # another --model may draw the prompt without edges, say
        if changed(original, effect.process(original)):
            effects.append(effect)
        else:
            print(f"{effect.label} is left out: it leaves the original this model drew unchanged")
    if not effects:
        raise CopierError("none of the demo's effects changes the original this model drew; try the built-in model")
    steps = {"steps": args.steps} if args.steps else {}
    common = dict(
        originals=[original],
        effects=effects,
        name="demo",
        out_dir=out,
        prompt_pool=prompt_pool(args.model is None, 32),
        # The grids' first row is the original's own prompt and seed (at weight 0 about O itself), then another prompt.
        grid_prompts=[DEMO_PROMPT, *grid_prompts(args.model is None, 1)],
        grid_seed=1,
        grid_steps=12,
        base_model=Path(args.model).name if args.model else "built-in",
    )
    # Three times the Quick rate: in 150 steps the copier gets about as close to O as Quick does in 400.
    copier = Job(method="both", overrides={"steps": DEMO_STEPS, "lr": 3e-3, **steps}, **common)
    pair = Job(method=DEMO_PAIR_METHOD, overrides=steps, **common)
    with all_or_nothing() as written:  # Ctrl-C, say: all of the demo or nothing (or the next demo is refused)
        results = run_job_with_progress(backend, copier)
        written += [path for r in results for path in (r.written.lora, r.written.sidecar, r.written.grid)]
        results += run_job_with_progress(backend, pair)
    original.save(out / "original.png")
    for effect in effects:
        effect.process(original).save(out / f"processed-{effect.label}.png")
    print_summary(results)
    summary = {
        "prompt": DEMO_PROMPT,
        "seconds": round(time.perf_counter() - start, 1),
        "results": [
            {"kind": r.kind, "effect": r.effect, "lora": str(r.written.lora), "grid": str(r.written.grid)}
            for r in results
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(
        f"demo done in {summary['seconds']:.0f} s: the original, processed images, LoRAs and strength grids "
        f"are in {out.resolve()}"
    )
    return 0
