"""`python -m lib_copier evaluate`: naive, copier, extraction, slider and addift, per effect, into a report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from lib_copier.arguments import number, positive
from lib_copier.errors import CopierError, check_file
from lib_copier.models.cli import add_model_arguments

MAX_WORKERS = 64
SETTINGS = ("originals", "prompts", "seeds", "steps", "lr", "prompt_pool", "sample_steps", "grid_rows")


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "evaluate",
        help="measure the methods: naive, copier, extraction, slider and addift LoRAs per effect, into a report",
        description="Train naive, copier, extraction, slider and addift LoRAs for each effect from the same "
        "originals, draw them at weights -1 … +1.5 on held-out prompts and seeds, and measure effect transfer, "
        "content leakage, structure kept, copier fidelity and training time. Writes report.md, results.json and "
        "images/ into --out.",
    )
    p.add_argument("--out", default="copier-evaluate", help="output folder (default: copier-evaluate)")
    p.add_argument("--name", help="file stem: NAME.md, NAME.json and images/NAME/ instead of report.md, results.json")
    p.add_argument(
        "--effect",
        action="append",
        help="an effect chain to evaluate, e.g. posterize:levels=3 or outline+grayscale (repeat); 'seeds' stands "
        "for the six default effects (outline, flatten, high_contrast, posterize, jpeg_noise, grayscale)",
    )
    p.add_argument("--image", action="append", default=[], help="an original image (repeat) instead of generated ones")
    p.add_argument("--originals", type=positive(), help="how many generated originals (default 8; quick 2)")
    p.add_argument("--prompts", type=positive(), help="held-out prompts (default 4; quick 2)")
    p.add_argument("--seeds", type=positive(), help="seeds per prompt (default 3; quick 2)")
    p.add_argument("--steps", type=positive(), help="training steps per copier-method LoRA (default 400; quick 250)")
    p.add_argument("--lr", type=positive(float), help="learning rate of the copier methods' LoRAs (default 3e-3)")
    p.add_argument(
        "--prompt-pool", type=number(int, 0, 1024), help="training prompts mixed with the empty caption (default 32)"
    )
    p.add_argument("--sample-steps", type=positive(), help="Euler steps per evaluation image (default 16; quick 12)")
    p.add_argument("--grid-rows", type=positive(), help="prompts per method in the strength grids (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a trainer setting")
    p.add_argument(
        "--processed-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a trainer setting of the copier method's B only (experiments: timestep range, rank …)",
    )
    p.add_argument(
        "--pair-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a trainer setting of the pair methods (slider, addift), which otherwise train as the "
        "copier command trains them",
    )
    p.add_argument("--quick", action="store_true", help="a small evaluation (a few minutes on 2 CPU cores)")
    p.add_argument("--notes", help="a Markdown file whose text goes into the report under the result")
    p.add_argument(
        "--workers",
        type=number(int, 1, MAX_WORKERS),
        help=f"processes drawing and training in parallel, each with its own copy of the model, 1 to {MAX_WORKERS} "
        "(default: 2 on a CPU, 1 on a GPU)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    add_model_arguments(p, threads_help="torch threads per worker (default 1 on a CPU)")
    p.set_defaults(func=run_evaluate)


def settings_from(args: argparse.Namespace, originals: list = ()):
    """The evaluation's settings, each effect checked against the `originals` given (none: generated later)."""
    from lib_copier.evaluate.run import QUICK, SEED_EFFECTS, Settings, available, configs, made_effects
    from lib_copier.recipes.cli import parse_overrides
    from lib_copier.recipes.processed import check_pairs

    values = {**Settings().__dict__, **(QUICK if args.quick else {})}
    asked = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    for name, most in available(args.model is None).items():
        if name in asked and most is not None and asked[name] > most and not (name == "originals" and args.image):
            model = "the built-in model's" if args.model is None else "another model's"
            raise CopierError(f"--{name} is {asked[name]}, but {model} evaluation has {most}; ask for at most {most}")
        values[name] = values[name] if most is None else min(values[name], most)  # a default above it: all there are
    values.update(asked)
    if originals:
        values["originals"] = len(originals)  # what the report is of
    effects = []
    for spec in args.effect or ["seeds"]:
        effects += list(SEED_EFFECTS) if spec == "seeds" else [spec]
    effects = list(dict.fromkeys(effects))  # "seeds" and one of them by name: evaluated once
    settings = Settings(
        **{
            **values,
            "effects": effects,
            "overrides": parse_overrides(args.set),
            "processed_overrides": parse_overrides(args.processed_set, "--processed-set"),
            "pair_overrides": parse_overrides(args.pair_set, "--pair-set"),
        }
    )
    made = made_effects(settings)  # a bad effect stops here, before any model loads
    if originals:
        check_pairs(made, list(originals))  # and one that leaves the originals given unchanged
    configs(settings)  # and a setting out of range
    return settings


def run_evaluate(args: argparse.Namespace) -> int:
    from lib_copier.atomic import check_folder
    from lib_copier.effects.image_io import load_image
    from lib_copier.evaluate.report import Layout, headline
    from lib_copier.evaluate.run import evaluate, made_effects
    from lib_copier.evaluate.workers import ModelSpec, Workers, check_model, default_workers
    from lib_copier.recipes.outputs import check_name
    from lib_copier.recipes.sizes import fit_image

    given = [load_image(path) for path in args.image]
    settings = settings_from(args, given)
    layout = Layout(check_folder(args.out), check_name(args.name) if args.name else None)
    existing = layout.existing([effect.label for effect in made_effects(settings)])
    if existing and not args.overwrite:
        raise CopierError(f"{existing[0]} already exists; choose another --out or --name, or --overwrite")
    notes = check_file(Path(args.notes), "--notes").read_text(encoding="utf-8") if args.notes else ""
    spec = ModelSpec(args.model, args.device, args.dtype, args.prediction)
    check_model(spec)  # here: a worker that cannot load the model breaks the pool before it can say why
    start = time.perf_counter()

    def stage(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    count = args.workers or default_workers(args.device)
    with Workers(spec, count, args.threads) as workers:
        side = workers.resolution()  # the model's native side, which the originals are trained at
        images = [fit_image(image, side, side) for image in given]
        results = evaluate(
            workers, settings, layout, args.model is None, _command(), images, notes, args.overwrite, stage=stage
        )
    print(f"done in {time.perf_counter() - start:.0f} s: {layout.markdown.resolve()}")
    print("\n".join(headline(results)))
    return 0


def _command() -> str:
    argv = sys.argv[1:]
    return "python -m lib_copier " + shlex.join(argv) if argv[:1] == ["evaluate"] else "lib_copier.evaluate"
