"""The options of the `lora` commands: inputs given in place or by kohya's option names, ranks, ratios and the output
(kohya's `--save_to`, `--save_precision`, `--device` taken too)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lib_copier.arguments import number, positive
from lib_copier.errors import CopierError


class _Precision(argparse.Action):
    """--precision, or kohya's --save_precision, which wins: in kohya's commands --precision is the precision the
    merge computes in (ours compute in fp32 whatever is saved)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--save_precision":
            namespace.save_precision_given = True
        if option_string == "--save_precision" or not getattr(namespace, "save_precision_given", False):
            namespace.precision = values


def output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", "--save_to", dest="out", required=True, help="output .safetensors file")
    for option in ("--precision", "--save_precision"):
        parser.add_argument(
            option,
            dest="precision",
            default="fp32",
            choices=("fp32", "float", "fp16", "bf16"),
            action=_Precision,
            help="save precision (default fp32, as kohya; fp16 halves the file and adds about 3e-4 relative error; "
            "kohya's --save_precision wins over its --precision)"
            if option == "--precision"
            else argparse.SUPPRESS,
        )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def kohya_device(parser: argparse.ArgumentParser) -> None:
    """kohya's --device, taken so that its commands run: these SVDs are of cores the size of the ranks, on the CPU."""
    parser.add_argument("--device", help=argparse.SUPPRESS)


MAX_RATIO = 1e4  # a merge's ratio, either sign
# kohya's option for each input our commands take in place (`--models a b`, `resize --model a`, `extract --model_org`).
KOHYA_INPUTS = {"loras": "--models", "lora": "--model", "original": "--model_org", "tuned": "--model_tuned"}


def input_option(parser: argparse.ArgumentParser, name: str, many: bool = False) -> None:
    """An input given in place (`lora resize A.safetensors`) or by kohya's option for it (`--model A.safetensors`)."""
    parser.add_argument(name, nargs="*" if many else "?", type=Path, metavar=metavar(name))
    kohya = KOHYA_INPUTS[name]
    parser.add_argument(kohya, dest=f"{name}_kohya", nargs="+" if many else None, type=Path, help=argparse.SUPPRESS)


def metavar(name: str) -> str:
    return "LORA" if name == "loras" else name.upper()


def inputs_given(args: argparse.Namespace, *names: str) -> None:
    """Each input from its place or its kohya option (one of the two), or a CopierError naming it."""
    for name in names:
        here, kohya = getattr(args, name), getattr(args, f"{name}_kohya")
        if here and kohya:
            raise CopierError(f"{metavar(name)} is given twice: in place and as {KOHYA_INPUTS[name]}; give it once")
        if not (here or kohya):
            raise CopierError(f"give {metavar(name)} (or {KOHYA_INPUTS[name]}, as kohya names it)")
        setattr(args, name, here or kohya)


def inputs_with_ratios(parser: argparse.ArgumentParser) -> None:
    input_option(parser, "loras", many=True)
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=number(float, -MAX_RATIO, MAX_RATIO),
        help="one per LoRA (default 1 each); negative subtracts",
    )


def rank_options(parser: argparse.ArgumentParser, name: str, conv_name: str, help_text: str) -> None:
    """`--new-rank` also answers to kohya's `--new_rank`; the conv option is the rank of kxk convolutions."""
    names, conv_names = ({f"--{n}": None, f"--{n.replace('-', '_')}": None} for n in (name, conv_name))  # no twins
    parser.add_argument(*names, dest="rank", type=positive(), required=True, help=help_text)
    parser.add_argument(*conv_names, dest="conv_rank", type=positive())
