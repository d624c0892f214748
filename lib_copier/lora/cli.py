"""`python -m lib_copier lora info|merge|svd-merge|resize|extract`, in kohya's vocabulary."""

from __future__ import annotations

import argparse
from pathlib import Path

from lib_copier.arguments import FRACTION, number
from lib_copier.errors import CopierError
from lib_copier.lora.options import (
    input_option,
    inputs_given,
    inputs_with_ratios,
    kohya_device,
    output,
    rank_options,
)
from lib_copier.lora.weights import KOHYA_CLAMP


def _tqdm(desc: str):
    """A `(done, total)` progress callback drawing a tqdm bar that closes when done reaches total."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="module", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def add_commands(commands: argparse._SubParsersAction) -> None:
    lora = commands.add_parser("lora", help="inspect, merge, resize and extract kohya-format LoRAs")
    sub = lora.add_subparsers(dest="lora_command", metavar="ACTION", required=True)

    p = sub.add_parser("info", help="family, modules, ranks, alphas, metadata and hashes of a LoRA")
    p.add_argument("lora", type=Path)
    p.set_defaults(func=run_info)

    p = sub.add_parser("merge", help="merge LoRAs exactly into one LoRA, or into a checkpoint with --model")
    inputs_with_ratios(p)
    p.add_argument("--model", "--sd_model", dest="model", type=Path, help="checkpoint to merge into (writes a model)")
    output(p)
    kohya_device(p)
    p.set_defaults(func=run_merge)

    p = sub.add_parser("svd-merge", help="merge LoRAs with ratios and re-factor them to a new rank (SVD)")
    inputs_with_ratios(p)
    rank_options(p, "new-rank", "new-conv-rank", "rank of the merged LoRA")
    p.add_argument("--clamp-quantile", "--clamp_quantile", type=FRACTION, default=KOHYA_CLAMP)
    output(p)
    kohya_device(p)
    p.set_defaults(func=run_svd_merge)

    p = sub.add_parser("resize", help="reduce a LoRA's rank, fixed or dynamic (kohya's resize_lora.py)")
    input_option(p, "lora")
    rank_options(p, "new-rank", "new-conv-rank", "new rank (the maximum, with --dynamic-method)")
    p.add_argument("--dynamic-method", "--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"))
    p.add_argument(
        "--dynamic-param",
        "--dynamic_param",
        type=number(float, 0, above=True),
        help="sv_ratio: the largest singular value over the smallest kept (at least 1); sv_fro, sv_cumulative: the "
        "share of the Frobenius norm or of the singular values' sum to keep (at most 1)",
    )
    p.add_argument("--verbose", action="store_true", help="print the rank and Frobenius norm kept per module")
    output(p)
    kohya_device(p)
    p.set_defaults(func=run_resize)

    p = sub.add_parser("extract", help="extract a LoRA from the difference of two checkpoints")
    input_option(p, "original")
    input_option(p, "tuned")
    rank_options(p, "dim", "conv-dim", "rank of the extracted LoRA")
    p.add_argument("--clamp-quantile", "--clamp_quantile", type=FRACTION, default=KOHYA_CLAMP)
    p.add_argument(
        "--min-diff", "--min_diff", type=number(float, 0), default=0.01, help="drop text encoders that differ less"
    )
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    p.add_argument(
        "--svd",
        default="lowrank",
        choices=("lowrank", "exact"),
        help="lowrank (default): a randomized SVD for the large modules, seconds instead of minutes; exact: a full "
        "SVD of every module, as kohya",
    )
    output(p)
    p.set_defaults(func=run_extract)


def _check_out(args: argparse.Namespace) -> Path:
    from lib_copier.atomic import check_target

    out = check_target(args.out, args.overwrite, "choose another --out or pass --overwrite")
    if out.suffix != ".safetensors":
        raise CopierError(f"--out {out} must end in .safetensors")
    return out


def _merge_inputs(args: argparse.Namespace):
    """The LoRAs with their ratios and common family, after checking the output can be written."""
    from lib_copier.lora.files import read_lora
    from lib_copier.lora.ops import cancels

    inputs_given(args, "loras")
    _check_out(args)
    ratios = args.ratios or [1.0] * len(args.loras)
    if len(ratios) != len(args.loras):
        raise CopierError(f"{len(args.loras)} LoRAs but {len(ratios)} ratios; give one ratio per LoRA")
    loras = [read_lora(path).check_finite(path) for path in args.loras]
    families = {lora.family for lora in loras} - {None}
    if len(families) > 1:
        named = ", ".join(f"{path.name} ({lora.family})" for path, lora in zip(args.loras, loras, strict=True))
        raise CopierError(f"the LoRAs are for different model families: {named}")
    family = families.pop() if families else None
    pairs = [(lora.modules, ratio) for lora, ratio in zip(loras, ratios, strict=True)]
    if cancels(pairs):
        raise CopierError(f"{_recipe(args, ratios)} cancel out in every layer: the merge would change nothing")
    return loras, ratios, family, pairs


def _merged_info(args, family: str | None, loras, rank, alpha, comment: str, conv_rank=None):
    from lib_copier.lora.metadata import NetworkInfo

    if family is None:
        raise CopierError(
            "the LoRAs do not say which model family they are for: no metadata names it, and none has a layer whose "
            "shape tells (a text-encoder, cross-attention key/value or transformer projection layer)"
        )
    v = any(lora.metadata.get("modelspec.prediction_type") == "v" for lora in loras)
    return NetworkInfo(family, rank, alpha, Path(args.out).stem, v, conv_rank, conv_rank, comment=comment)


def _say(args, text: str) -> None:
    """A line for the user: printed, or given to `args.say` where the WebUI runs the command in one of its threads
    (redirecting the process's stdout there would take other threads' lines, and two runs could leave it redirected)."""
    getattr(args, "say", print)(text)


def _write(args, modules, info) -> None:
    from lib_copier.lora.files import write_lora
    from lib_copier.lora.metadata import build_metadata

    path = write_lora(args.out, modules, build_metadata(info), args.precision, args.overwrite)
    _say(args, f"wrote {path} ({len(modules)} modules)")


def _recipe(args, ratios) -> str:
    return ", ".join(f"{path.name} x {ratio:g}" for path, ratio in zip(args.loras, ratios, strict=True))


def run_info(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from lib_copier.lora.files import read_lora
    from lib_copier.lora.hashes import sshs_hashes

    lora = read_lora(args.lora)
    text = sum(key.startswith("lora_te") for key in lora.modules)
    alphas = sorted({m.alpha for m in lora.modules.values()})
    _say(args, f"file      {args.lora}")
    _say(args, f"family    {lora.family or 'unknown'}")
    _say(args, f"modules   {len(lora.modules)} ({len(lora.modules) - text} UNet, {text} text encoder)")
    _say(args, f"types     {', '.join(f'{kind} {count}' for kind, count in sorted(lora.types.items()))}")
    plain = "" if set(lora.types) == {"LoRA"} else " (as plain LoRA factors)"
    _say(args, f"ranks     {', '.join(map(str, sorted(lora.ranks)))}{plain}")
    _say(args, f"alphas    {', '.join(f'{a:g}' for a in alphas)}{plain}")
    stored = lora.metadata.get("sshs_model_hash")
    if stored:
        with safe_open(str(args.lora), framework="pt") as f:
            actual, _ = sshs_hashes({name: f.get_tensor(name) for name in f.keys()}, lora.metadata)
        matches = "matches the tensors" if actual == stored else "does NOT match the tensors"
        _say(args, f"hash      {stored} ({matches})")
    for key in sorted(lora.metadata):
        value = lora.metadata[key]
        _say(args, f"  {key} = {value if len(value) <= 100 else value[:97] + '...'}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from lib_copier.lora.ops import merge_exact

    loras, ratios, family, pairs = _merge_inputs(args)
    if args.model is not None:
        return _merge_into_checkpoint(args, pairs, family)
    modules = merge_exact(pairs)
    rank = max(m.rank for m in modules.values())
    _write(args, modules, _merged_info(args, family, loras, rank, rank, f"merged: {_recipe(args, ratios)}"))
    return 0


def _merge_into_checkpoint(args, pairs, family: str | None) -> int:
    from safetensors.torch import save_file

    from lib_copier.atomic import atomic_write
    from lib_copier.lora.files import PRECISIONS
    from lib_copier.lora.naming import by_key, lora_targets
    from lib_copier.lora.ops import apply_to_state_dict
    from lib_copier.models.checkpoint import TensorSource

    source = TensorSource(args.model)
    shapes = source.shapes()  # the family and the layers from the keys, before any weight is read
    model = _family(source)
    if family is not None and family != model:
        raise CopierError(f"the LoRAs are for {family} but {args.model} is an {model} checkpoint")
    table = by_key(lora_targets(shapes, model, conv=True))
    dtype = PRECISIONS[args.precision]
    state = {name: source.get(name) for name in shapes}
    count = apply_to_state_dict(state, pairs, table, _tqdm("merging"), dtype)
    for name, tensor in state.items():  # in place, one at a time: the file's and the written precision's copies
        if tensor.is_floating_point() and not _schedule(name):  # never add up to two models
            state[name] = tensor.to(dtype)
    metadata = dict(sorted(source.metadata.items()))
    atomic_write(args.out, lambda tmp: save_file(state, str(tmp), metadata=metadata), args.overwrite)
    _say(args, f"wrote {args.out} ({count} LoRA modules merged into {args.model.name})")
    return 0


def _family(source) -> str:
    """A checkpoint's model family from its keys, or a sentence that names the file."""
    from lib_copier.lora.naming import model_family
    from lib_copier.models.checkpoint import check_ldm_checkpoint

    check_ldm_checkpoint(source)  # a LoRA or a VAE given for a checkpoint is said so
    try:
        return model_family(source.keys)
    except CopierError as exc:
        raise CopierError(f"{source.path.name}: {exc}") from None


def _schedule(name: str) -> bool:
    """A noise-schedule buffer (`alphas_cumprod`, `betas`, …, top-level names) or the EMA's counters: the WebUIs
    sample with them as the file holds them, so they keep their precision."""
    return "." not in name or name in ("model_ema.decay", "model_ema.num_updates")


def run_svd_merge(args: argparse.Namespace) -> int:
    from lib_copier.lora.ops import merge_svd

    loras, ratios, family, pairs = _merge_inputs(args)
    modules = merge_svd(pairs, args.rank, args.conv_rank, args.clamp_quantile, _tqdm("svd merge"))
    comment = f"svd-merged to rank {args.rank}: {_recipe(args, ratios)}"
    _write(args, modules, _merged_info(args, family, loras, args.rank, args.rank, comment, args.conv_rank))
    return 0


def run_resize(args: argparse.Namespace) -> int:
    from lib_copier.lora.files import read_lora, write_lora
    from lib_copier.lora.metadata import NETWORK_MODULE
    from lib_copier.lora.ops import check_dynamic, resize

    inputs_given(args, "lora")
    _check_out(args)
    check_dynamic(args.dynamic_method, args.dynamic_param)
    lora = read_lora(args.lora).check_finite(args.lora)
    modules, report = resize(
        lora.modules, args.rank, args.conv_rank, args.dynamic_method, args.dynamic_param, _tqdm("resizing")
    )
    if args.verbose:
        for row in report:
            _say(args, f"{row.key:80} rank {row.old_rank:>4} -> {row.new_rank:<4} fro kept {row.fro_retained:.1%}")
    ranks = [r.new_rank for r in report]
    mean = sum(r.fro_retained for r in report) / len(report)
    _say(args, f"mean Frobenius norm kept {mean:.2%}; ranks {min(ranks)}..{max(ranks)}")
    old = max(lora.ranks)
    metadata = dict(lora.metadata)
    if metadata.get("ss_network_module", NETWORK_MODULE) != NETWORK_MODULE:  # a LyCORIS file, written as plain LoRA
        metadata["ss_network_module"] = NETWORK_MODULE
        metadata.pop("ss_network_args", None)  # its algo and the like; network_shape writes the conv ones
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method:
        metadata["ss_training_comment"] = (
            f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old}; {comment}"
        )
    else:
        metadata["ss_training_comment"] = f"dimension is resized from {old} to {max(ranks)}; {comment}"
    path = write_lora(args.out, modules, metadata, args.precision, args.overwrite)
    _say(args, f"wrote {path} ({len(modules)} modules)")
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from lib_copier.lora.metadata import NetworkInfo
    from lib_copier.lora.naming import lora_targets
    from lib_copier.lora.ops import extract
    from lib_copier.models.checkpoint import TensorSource
    from lib_copier.models.loading import pick_device

    inputs_given(args, "original", "tuned")
    out = _check_out(args).resolve()
    device = pick_device(args.device)
    if args.original.resolve() == args.tuned.resolve():
        raise CopierError(
            f"the original and the tuned checkpoint are the same file, {args.original}: there is no difference to "
            "extract"
        )
    if out in (args.original.resolve(), args.tuned.resolve()):
        raise CopierError(f"--out {args.out} is one of the checkpoints, which the LoRA would replace; choose another")
    original, tuned = TensorSource(args.original), TensorSource(args.tuned)
    shapes, tuned_shapes = original.shapes(), tuned.shapes()
    family, tuned_family = (_family(source) for source in (original, tuned))
    if tuned_family != family:
        raise CopierError(f"{args.original.name} is an {family} checkpoint and {args.tuned.name} an {tuned_family} one")
    targets = lora_targets(shapes, family, conv=args.conv_rank is not None)
    if args.conv_rank is None and (left := len(lora_targets(shapes, family, conv=True)) - len(targets)):
        _say(args, f"{left} ResNet and sampler layers left out, as kohya does: a conv rank (--conv-dim) takes them in")
    # Only the layers a LoRA covers must match: EMA weights, schedule buffers and position ids vary between tools.
    for name in dict.fromkeys(t.param_name for t in targets):
        if tuned_shapes.get(name) != shapes[name]:
            found = "lacks it" if name not in tuned_shapes else f"has {tuple(tuned_shapes[name])}"
            raise CopierError(
                f"{args.original.name} and {args.tuned.name} differ in a layer a LoRA covers: {name} is "
                f"{tuple(shapes[name])} in the first, and the second {found}"
            )
    modules, text, kept = extract(
        lambda name: original.get(name).to(device),
        lambda name: tuned.get(name).to(device),
        targets,
        args.rank,
        args.conv_rank,
        args.clamp_quantile,
        args.min_diff,
        _tqdm("extracting"),
        randomized=args.svd == "lowrank",
    )
    if not text:
        _say(args, f"text encoders differ by at most {args.min_diff}: left out")
    lowest = min(kept, key=kept.get)
    _say(
        args,
        f"Frobenius norm of the difference kept: mean {sum(kept.values()) / len(kept):.2%}, "
        f"lowest {kept[lowest]:.2%} ({lowest})",
    )
    v = tuned.metadata.get("modelspec.prediction_type") == "v"
    comment = f"extracted from {args.tuned.name} - {args.original.name}"
    info = NetworkInfo(
        family,
        args.rank,
        float(args.rank),
        Path(args.out).stem,
        v,
        args.conv_rank,
        None if args.conv_rank is None else float(args.conv_rank),
        comment=comment,
    )
    _write(args, modules, info)
    return 0
