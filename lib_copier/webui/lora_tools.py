"""Merge, SVD-merge, resize and extract over the files in the WebUI's folders, for the Utilities tab and the API.

Requests name files, not paths: LoRAs by their path below one of the LoRA folders (subfolders included, as the
WebUI's Lora cards list them; results go to the first folder), checkpoints among the WebUI's checkpoints. Each tool
has one typed request (`REQUESTS`); `check_tool` checks it completely, names and files included, before any lock is
taken, and `run_checked` runs it through the very command line `python -m lib_copier lora …`, so the numbers and
files are the same as there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np

from lib_copier.errors import CopierError, reported, shown
from lib_copier.fields import from_json, quoted, setting
from lib_copier.lora.ops import DYNAMIC_METHODS, check_dynamic
from lib_copier.lora.options import MAX_RATIO
from lib_copier.lora.weights import KOHYA_CLAMP
from lib_copier.recipes.outputs import check_name
from lib_copier.webui.jobs import in_own_thread
from lib_copier.webui.training import STAGING

SUFFIX = ".safetensors"
TAG_SUFFIXES = (SUFFIX, ".pt", ".ckpt")  # the files the WebUIs' Lora cards list, and so their `<lora:…>` tags know
PRECISIONS = ("fp32", "fp16", "bf16")  # lora.files.PRECISIONS without kohya's alias "float"
DEFAULT_PRECISION = "fp32"  # kohya's, and the CLI's
_OUT = "name of the file to write, without .safetensors"
_LORAS = 'LoRA names: paths below the LoRA folder, without .safetensors ("ink", "styles/ink")'
_RATIOS = "one per LoRA (default 1 each); a negative ratio subtracts"
_RANK = "rank of linear layers and 1x1 convolutions"
_CONV = "rank of 3x3 convolutions (none: the rank)"
_EXTRACT_CONV = "rank of 3x3 convolutions; none leaves the ResNet and sampler layers out, as kohya's default"


def _precision():
    return setting(DEFAULT_PRECISION, "save precision", choices=PRECISIONS)


def _clamp():
    text = "kohya's clamp of the new factors at this quantile of their values; 1 turns it off and keeps the best "
    return setting(KOHYA_CLAMP, text + "approximation of the rank", 0.5, 1.0)


@dataclass
class Merge:
    loras: list[str] = setting(help=_LORAS, lo=1, hi=32)
    out: str = setting(help=_OUT)
    ratios: list[float] | None = setting(None, _RATIOS)
    checkpoint: str | None = setting(
        None, "merge into this checkpoint instead; writes a model to the checkpoint folder"
    )
    precision: str = _precision()


@dataclass
class SvdMerge:
    loras: list[str] = setting(help=_LORAS, lo=1, hi=32)
    out: str = setting(help=_OUT)
    rank: int = setting(help=_RANK, lo=1, hi=1024)
    ratios: list[float] | None = setting(None, _RATIOS)
    conv_rank: int | None = setting(None, _CONV, 1, 1024)
    clamp_quantile: float = _clamp()
    precision: str = _precision()


@dataclass
class Resize:
    lora: str = setting(help='the LoRA to resize, named as in "loras"')
    out: str = setting(help=_OUT)
    rank: int = setting(help="new rank (the most, with dynamic_method)", lo=1, hi=1024)
    conv_rank: int | None = setting(None, _CONV, 1, 1024)
    dynamic_method: str | None = setting(None, "pick each module's rank by its spectrum", choices=DYNAMIC_METHODS)
    dynamic_param: float | None = setting(None, "the dynamic method's threshold", 0.0, 1e6)
    precision: str = _precision()


@dataclass
class Extract:
    original: str = setting(help="the base checkpoint, by name")
    tuned: str = setting(help="the fine-tuned checkpoint, by name")
    out: str = setting(help=_OUT)
    rank: int = setting(help=_RANK, lo=1, hi=1024)
    conv_rank: int | None = setting(None, _EXTRACT_CONV, 1, 1024)
    clamp_quantile: float = _clamp()
    precision: str = _precision()


REQUESTS = {"merge": Merge, "svd-merge": SvdMerge, "resize": Resize, "extract": Extract}
TOOLS = tuple(REQUESTS)
_FLAGS = {"rank": "--new-rank", "conv_rank": "--new-conv-rank"}
_EXTRACT_FLAGS = {"rank": "--dim", "conv_rank": "--conv-dim"}


@dataclass
class CheckedTool:
    argv: list[str]
    path: Path


def lora_names(folders: Sequence[Path], suffixes: Sequence[str] = (SUFFIX,)) -> list[str]:
    """The LoRA files under `folders` as requests name them: the path below its folder, with "/", without
    .safetensors ("styles/ink"); where two folders hold the same path, the first one's. With `suffixes`
    (`TAG_SUFFIXES`), the other files that take a name too."""
    return list(_lora_paths(folders, suffixes))


def _lora_paths(folders: Sequence[Path], suffixes: Sequence[str] = (SUFFIX,)) -> dict[str, Path]:
    """Each LoRA name and its file. Subfolders and linked folders are searched, as the WebUI's Lora cards search
    them; the folder of unfinished runs is not, and a link back up the tree is followed once."""
    paths: dict[str, Path] = {}
    for folder in folders:
        seen = {folder.resolve()}
        for root, dirs, files in os.walk(folder, followlinks=True):
            here, kept = Path(root), []
            for name in sorted(dirs):
                real = (here / name).resolve()
                if real not in seen and not (here == folder and name == STAGING):
                    seen.add(real)
                    kept.append(name)
            dirs[:] = kept
            below = here.relative_to(folder).as_posix()
            prefix = "" if below == "." else below + "/"
            for file in sorted(files):
                stem, suffix = os.path.splitext(file)
                if suffix in suffixes:
                    paths.setdefault(prefix + stem, here / file)
    return paths


def lora_file(folders: Sequence[Path], name: str, field: str = "loras") -> Path:
    """The file a LoRA name stands for: its path below one of `folders` as `lora_names` gives it, or, where the name
    has no folder, the one LoRA of that name in any subfolder."""
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else [""]
    if any(part.strip() in ("", ".", "..") for part in parts) or PureWindowsPath(name).drive:
        raise CopierError(f"{quoted(field)} {shown(name)} is not a LoRA name: give it as the list shows it")
    for folder in folders:
        path = folder.joinpath(*parts[:-1], parts[-1] + SUFFIX)
        if path.is_file():
            return path
    paths = _lora_paths(folders) if len(parts) == 1 else {}
    found = [n for n in paths if n.rpartition("/")[2] == name]
    if len(found) > 1:
        raise CopierError(f"{len(found)} LoRAs are named {shown(name)}: {', '.join(found)}; give one with its folder")
    if not found:
        where = " or ".join(str(folder) for folder in folders)
        raise CopierError(f"there is no LoRA named {shown(name)} in {where}")
    return paths[found[0]]


def check_tool(
    tool: str, body, lora_dirs: Sequence[Path], checkpoint: Callable[[str], Path] | None = None, checkpoint_dir=None
) -> CheckedTool:
    """The request of one tool, checked through to its files, as the command line it runs; nothing is locked.
    LoRAs are read from any of `lora_dirs` and written to the first."""
    if tool not in REQUESTS:
        raise CopierError(f"unknown tool {shown(tool)}; choose one of {', '.join(TOOLS)}")
    request = from_json(REQUESTS[tool], body, what=f"the {tool} request")
    into_checkpoint = isinstance(request, Merge) and request.checkpoint
    if into_checkpoint and (checkpoint is None or checkpoint_dir is None):
        raise CopierError("checkpoints are not available here")
    folder = Path(checkpoint_dir) if into_checkpoint else lora_dirs[0]
    out = folder / f"{check_name(request.out, quoted('out'))}.safetensors"
    if out.exists():
        raise CopierError(f'{out.name} already exists in {folder}; choose another "out"')
    listed = {} if into_checkpoint else _lora_paths(lora_dirs, TAG_SUFFIXES)
    same = [name + path.suffix for name, path in listed.items() if name.rpartition("/")[2] == out.stem]
    if same:  # the WebUI's tags name a LoRA without its folder (or its suffix: the Utilities list .safetensors only)
        raise CopierError(
            f'the LoRA {same[0]} is listed already, and <lora:{out.stem}:…> would load either; choose another "out"'
        )
    argv = ["lora", tool]
    if isinstance(request, Merge | SvdMerge):
        argv += [str(lora_file(lora_dirs, name)) for name in request.loras]
        if request.ratios is not None and len(request.ratios) != len(request.loras):
            raise CopierError(f'{len(request.loras)} "loras" but {len(request.ratios)} "ratios"; give one per LoRA')
        for i, ratio in enumerate(request.ratios or ()):  # said here: the command line's sentence names --ratios
            if not abs(ratio) <= MAX_RATIO:
                raise CopierError(
                    f'"ratios" item {i + 1} is {ratio:g}; it must be between {-MAX_RATIO:g} and {MAX_RATIO:g}'
                )
    if isinstance(request, Resize):
        argv.append(str(lora_file(lora_dirs, request.lora, "lora")))
        check_dynamic(request.dynamic_method, request.dynamic_param)
    if isinstance(request, Extract) or into_checkpoint:
        if checkpoint is None:
            raise CopierError("checkpoints are not available here")
        if isinstance(request, Extract):
            argv += [str(checkpoint(request.original)), str(checkpoint(request.tuned))]
        else:
            argv += ["--model", str(checkpoint(request.checkpoint))]
    flags = _EXTRACT_FLAGS if isinstance(request, Extract) else _FLAGS
    for field, value in vars(request).items():
        if value is None or field in ("loras", "lora", "original", "tuned", "checkpoint", "out"):
            continue
        option = flags.get(field, "--" + field.replace("_", "-"))
        values = value if isinstance(value, list) else [value]
        # Floats written positionally: argparse takes "-1e-05" for an option, "-0.00001" for a number.
        argv += [option, *(np.format_float_positional(v, trim="-") if isinstance(v, float) else str(v) for v in values)]
    return CheckedTool(_parsable([*argv, "--out", str(out)]), out)


def _parsable(argv: list[str]) -> list[str]:
    """`argv`, once the command line has parsed it: what it refuses is a CopierError before anything is locked."""
    from lib_copier.cli import build_parser

    build_parser().parse_args(argv)
    return argv


def run_checked(checked: CheckedTool) -> dict:
    """Run a checked tool in a thread of its own (`in_own_thread`: a merge into a checkpoint frees gigabytes, which
    a long-lived worker thread would keep cached); returns {"path": the file written, "log": what the tool said}.
    Its progress bars go to the WebUI's console."""
    from lib_copier.cli import build_parser

    lines: list[str] = []
    args = build_parser().parse_args(checked.argv)
    args.say = lines.append
    try:
        in_own_thread(lambda: args.func(args))
    except CopierError:
        raise
    except Exception as exc:  # no check foresaw it (a full disk, out of memory): one line, its traceback on the console
        raise CopierError(reported(exc)) from exc
    return {"path": str(checked.path), "log": "\n".join(lines)}
