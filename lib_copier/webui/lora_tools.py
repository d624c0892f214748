"""Merge, SVD-merge, resize and extract over the files in the WebUI's folders, for the Utilities tab and the API.

Requests name files, not paths: LoRAs in the LoRA folder, checkpoints among the WebUI's checkpoints. They are run
through the very command line `python -m lib_copier lora …`, so the checks and results are the same as there.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

from lib_copier.errors import CopierError
from lib_copier.recipes.outputs import check_name

TOOLS = ("merge", "svd-merge", "resize", "extract")
_OPTIONS = {  # JSON field → command-line option, per tool
    "merge": ("ratios", "precision"),
    "svd-merge": ("ratios", "rank", "conv_rank", "precision"),
    "resize": ("rank", "conv_rank", "dynamic_method", "dynamic_param", "precision"),
    "extract": ("rank", "conv_rank", "precision"),
}
_FLAGS = {"rank": "--new-rank", "conv_rank": "--new-conv-rank"}
_EXTRACT_FLAGS = {"rank": "--dim", "conv_rank": "--conv-dim"}


def lora_file(folder: Path, name: str) -> Path:
    path = folder / f"{check_name(name)}.safetensors"
    if not path.is_file():
        raise CopierError(f"there is no LoRA named {name!r} in {folder}")
    return path


def run_tool(
    tool: str, body: dict, lora_dir: Path, checkpoint: Callable[[str], Path] | None = None, checkpoint_dir=None
) -> dict:
    """Run one tool; returns {"path": the file written, "log": what the tool printed}."""
    if tool not in TOOLS:
        raise CopierError(f"unknown tool {tool!r}; choose one of {', '.join(TOOLS)}")
    allowed = {"out", "loras", "lora", "original", "tuned", "checkpoint", *_OPTIONS[tool]}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise CopierError(f"{tool} takes {', '.join(sorted(allowed))}; not {', '.join(unknown)}")
    if "out" not in body:
        raise CopierError(f'{tool} needs "out", the name of the file to write')
    into_checkpoint = tool == "merge" and body.get("checkpoint")
    out_folder = Path(checkpoint_dir) if into_checkpoint else lora_dir
    out = out_folder / f"{check_name(body['out'])}.safetensors"
    argv = ["lora", tool]
    if tool in ("merge", "svd-merge"):
        argv += [str(lora_file(lora_dir, n)) for n in body.get("loras", [])] or _missing(tool, "loras")
    elif tool == "resize":
        argv.append(str(lora_file(lora_dir, body.get("lora") or _missing(tool, "lora"))))
    if tool == "extract" or into_checkpoint:
        if checkpoint is None:
            raise CopierError("checkpoints are not available here")
        names = ["original", "tuned"] if tool == "extract" else ["checkpoint"]
        paths = [str(checkpoint(body.get(n) or _missing(tool, n))) for n in names]
        argv += paths if tool == "extract" else ["--model", paths[0]]
    flags = _EXTRACT_FLAGS if tool == "extract" else _FLAGS
    for field in _OPTIONS[tool]:
        value = body.get(field)
        if value is None:
            continue
        option = flags.get(field, "--" + field.replace("_", "-"))
        argv += [option, *map(str, value)] if isinstance(value, list) else [option, str(value)]
    argv += ["--out", str(out)]
    return {"path": str(out), "log": _run(argv)}


def _missing(tool: str, field: str):
    raise CopierError(f'{tool} needs "{field}"')


def _run(argv: list[str]) -> str:
    from lib_copier.cli import build_parser

    output, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            raise CopierError(errors.getvalue().strip().splitlines()[-1]) from exc
        args.func(args)
    return output.getvalue().strip()
