"""`python -m lib_copier generate`: text to image with a checkpoint or the default model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib_copier.arguments import number
from lib_copier.errors import CopierError
from lib_copier.models.sampling import SAMPLERS
from lib_copier.names import slug


def add_model_arguments(parser: argparse.ArgumentParser, threads_help: str = "") -> None:
    """The options every command that loads a model shares."""
    parser.add_argument("--model", help="LDM-layout .safetensors checkpoint (default: the built-in model)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="the model's precision (default: fp16 on a GPU, fp32 on a CPU, where fp16 is many times slower)",
    )
    parser.add_argument("--prediction", choices=("eps", "v"), help="override the detected prediction type")
    parser.add_argument(
        "--threads",
        type=number(int, 0),
        default=0,
        # Measured: with other work on the same two cores, the demo took about ten times as long on torch's default
        # threads as on one (248 s).
        help=threads_help
        or "torch CPU threads (default 0: torch's own choice, all cores; on a CPU other work shares, "
        "1 can be many times faster)",
    )


def load(args: argparse.Namespace):
    """The model the shared options name, with a note where the precision asked for is slow on its device."""
    import torch

    from lib_copier.models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device, args.dtype, args.prediction)
    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype == torch.float16:
        # Measured: a 10-step copier run with its grid took 169 s in fp16 and 8 s in fp32 or bf16 on two cores.
        print("note: fp16 on a CPU is about 20 times slower than fp32; bf16 halves memory as well", file=sys.stderr)
    return model


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="generate an image from a prompt and save it as PNG")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--width", type=int, help="default: the model's native resolution")
    p.add_argument("--height", type=int)
    p.add_argument("--sampler", default="euler", choices=SAMPLERS)
    p.add_argument("--out", help="output PNG (default: outputs/<seed>-<prompt>.png, never overwriting)")
    add_model_arguments(p)
    p.set_defaults(func=run_generate)


def infotext(request, size: tuple[int, int], model: str | None) -> str:
    """The request as A1111 words its generation parameters."""
    from lib_copier.infotext import Infotext, build_infotext
    from lib_copier.models.sampling import WEBUI_NAMES

    params = {
        "Steps": request.steps,
        "Sampler": WEBUI_NAMES[request.sampler],
        "CFG scale": f"{request.cfg:g}",
        "Seed": request.seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": Path(model).stem if model else "built-in",
    }
    return build_infotext(Infotext(request.prompt, request.negative, params))


def free_path(directory: Path, stem: str, suffix: str) -> Path:
    """`directory/stem.suffix`, or the first `stem-N.suffix` that does not exist yet."""
    candidate = directory / f"{stem}{suffix}"
    n = 1
    while candidate.exists():
        n += 1
        candidate = directory / f"{stem}-{n}{suffix}"
    return candidate


def run_generate(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    from lib_copier.atomic import atomic_write, check_target
    from lib_copier.fields import check
    from lib_copier.infotext import save_options
    from lib_copier.models.generate import Txt2Img, check_size, generate
    from lib_copier.models.loading import read_config
    from lib_copier.seeds import fixed_seed

    drawn, args.seed = args.seed == -1, fixed_seed(args.seed)  # drawn here, so that it can be said
    request = Txt2Img(
        args.prompt, args.negative, args.seed, args.steps, args.cfg, args.width, args.height, args.sampler
    )
    check(request, lambda name: f"--{name}")  # the limits the WebUI's API has
    if args.out:
        out = check_target(args.out, advice="choose another --out")
    else:
        out = check_target(free_path(Path("outputs"), f"{args.seed}-{slug(args.prompt)}", ".png"))
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt not in Image.SAVE:
        raise CopierError(f"--out {out} must end in an image format's extension, such as .png")
    config = read_config(args.model)  # from the file's header: its family's sizes, said before it loads
    native = config.resolution
    try:
        check_size(config, request.height or native, request.width or native)
    except ValueError as exc:
        raise CopierError(str(exc)) from exc
    model = load(args)
    with tqdm(total=args.steps, desc="sampling", unit="step") as bar:
        image = generate(model, request, progress=lambda i, n: bar.update(1))
    options = save_options(fmt, infotext(request, image.size, args.model))  # the WebUIs' PNG Info reads it
    atomic_write(out, lambda tmp: image.save(tmp, fmt, **options))
    print(out)
    if drawn:  # the file's name says it only when it is made here
        print(f"seed {args.seed}", file=sys.stderr)
    return 0
