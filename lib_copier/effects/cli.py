"""`python -m lib_copier effects list|apply`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lib_copier.errors import CopierError, check_file


def add_commands(commands: argparse._SubParsersAction) -> None:
    effects = commands.add_parser("effects", help="list effects, or make a processed image from an original")
    sub = effects.add_subparsers(dest="effects_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="every effect with its parameters, ranges and defaults")
    p.set_defaults(func=run_list)
    p = sub.add_parser("apply", help="apply effects in order; also writes OUT_preview.png (before | after)")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--effect", action="append", default=[], metavar="NAME[:k=v,…]", help="repeat to chain effects")
    p.add_argument(
        "--chain",
        type=Path,
        help="the effects of a chain JSON file, of a PNG this command wrote, or of a processed LoRA Copier LoRA wrote",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT and its preview if they exist")
    p.set_defaults(func=run_apply)


def run_list(args: argparse.Namespace) -> int:
    from lib_copier.effects.registry import all_effects

    for effect in all_effects():
        print(f"{effect.name:14} {effect.description}")
        for p in effect.params:
            if p.kind == "bool":
                span = "true/false"
            else:  # whole numbers in full: a seed's range is 0..2147483647, not 0..2.14748e+09
                span = f"{int(p.min)}..{int(p.max)}" if p.kind == "int" else f"{p.min:g}..{p.max:g}"
            print(f"    {p.name}={p.default} ({p.kind} {span}) {p.help}")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from PIL import PngImagePlugin

    from lib_copier.atomic import atomic_write, check_target
    from lib_copier.effects.chain import Chain
    from lib_copier.effects.image_io import load_image, side_by_side

    if bool(args.effect) == bool(args.chain):
        which = "both" if args.effect else "neither"
        raise CopierError(f"give effects with --effect NAME[:k=v,…] (repeatable) or a --chain file; {which} given")
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(args.output.suffix.lower())
    if fmt is None:
        raise CopierError(f"{args.output} must end in .png, .jpg or .webp")
    preview = args.output.with_name(f"{args.output.stem}_preview.png")
    for path in (args.output, preview):
        check_target(path, args.overwrite, "choose another output or pass --overwrite")
    chain = read_chain(args.chain) if args.chain else Chain.parse(args.effect)
    original = load_image(args.input)
    processed = chain.apply(original)
    options = {"quality": 95} if fmt != "PNG" else {}
    if fmt == "PNG":  # the chain travels with the image, so it records how it was made
        info = PngImagePlugin.PngInfo()
        info.add_text(CHAIN_KEY, chain.to_json())
        options["pnginfo"] = info
    atomic_write(args.output, lambda tmp: processed.save(tmp, fmt, **options), args.overwrite)
    atomic_write(preview, lambda tmp: side_by_side(original, processed).save(tmp, "PNG"), args.overwrite)
    print(f"wrote {args.output} and {preview}")
    return 0


CHAIN_KEY = "copier_effects"  # the PNG text chunk; a LoRA's metadata has it as ss_copier_effects


def read_chain(path: Path):
    """The effect chain in a chain JSON file, in a PNG `apply` wrote, or in a processed LoRA's metadata: the same
    effect can then be applied to another image."""
    from PIL import Image, UnidentifiedImageError

    from lib_copier.effects.chain import Chain

    check_file(path, "chain file")
    if path.suffix.lower() == ".safetensors":
        return Chain.from_json(_lora_chain(path))
    try:
        with Image.open(path) as image:
            text = image.info.get(CHAIN_KEY)
        if not text:
            raise CopierError(f"{path} records no effect chain (effects apply writes one into the PNGs it makes)")
        return Chain.from_json(text)
    except UnidentifiedImageError:
        pass
    try:
        return Chain.from_json(path.read_text("utf-8"))
    except UnicodeDecodeError:
        raise CopierError(f"chain file {path} is not text; it must be an effect chain's JSON") from None


def _lora_chain(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CopierError(f"{path} is not a readable .safetensors file ({exc})") from exc
    text = metadata.get(f"ss_{CHAIN_KEY}")
    if not text:
        raise CopierError(
            f"{path} records no effect chain: only the processed LoRAs Copier LoRA trains from an effect do "
            "(not a copier LoRA, nor one trained from your own edit)"
        )
    return text
