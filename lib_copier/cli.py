"""`python -m lib_copier …`: the command line.

Each package adds its own sub-commands through `add_commands(subparsers)` and, optionally, its own
benchmarks through `add_benchmarks(subparsers)` (under `python -m lib_copier bench …`). This module only
dispatches and turns a `CopierError` (a refused argument included, or an unforeseen `OSError`) into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lib_copier.errors import CopierError, Interrupted, sentence

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


class _Parser(argparse.ArgumentParser):
    """argparse's refusal of an argument as a CopierError (one line), not a usage block and an exit; its
    sub-command parsers are of this class too."""

    def error(self, message: str):
        raise CopierError(f"{message} ({self.prog} --help says more)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lib_copier", description="Copier LoRA, headless.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _contributors("add_commands"):
        add(commands)
    bench = commands.add_parser("bench", help="run a benchmark and print its figures")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for add in _contributors("add_benchmarks"):
        add(benchmarks)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        result = args.func(args)
    except Interrupted as exc:  # stopped by the user between two steps: the sentence says where, and what was kept
        print(exc, file=sys.stderr)
        return 130
    except CopierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # what reads the output stopped reading (`| head`): nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # what no check foresaw (a disk that fills, a folder another process removes): one line
        print(f"error: {sentence(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
