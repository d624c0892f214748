"""`python -m lib_copier …`: the command line.

Each package adds its own sub-commands through `add_commands(subparsers)` and, optionally, its own
benchmarks through `add_benchmarks(subparsers)` (under `python -m lib_copier bench …`). This module only
dispatches and turns a `CopierError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lib_copier.errors import CopierError

# Packages that contribute commands, imported lazily so `--help` of one does not load the others' heavy deps.
COMMAND_MODULES = (
    "lib_copier.models.cli",
    "lib_copier.models.bench",
    "lib_copier.effects.cli",
    "lib_copier.effects.bench",
    "lib_copier.lora.cli",
    "lib_copier.lora.bench",
    "lib_copier.recipes.cli",
    "lib_copier.evaluate.cli",
    "lib_copier.train.bench",
)


def _contributors(hook: str):
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # that package (or its parent) has no commands yet
            raise
        if hasattr(module, hook):
            yield getattr(module, hook)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_copier", description="Copier LoRA, headless.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _contributors("add_commands"):
        add(commands)
    bench = commands.add_parser("bench", help="run a benchmark and print its figures")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for add in _contributors("add_benchmarks"):
        add(benchmarks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except CopierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
