"""The size an original trains at: about the training size's pixels, its sides on the model's multiple, its aspect
kept; an original too long and thin for that is refused."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from lib_copier.errors import CopierError


def side_multiple(resolution: int) -> int:
    """What image sides must be a multiple of: 64 for full-size models, 32 for the small 128-pixel ones."""
    return 64 if resolution >= 512 else 32


def training_side(size: int | None, model_resolution: int) -> int:
    """The side an original trains at (about side² pixels): the asked size, or the model's own, on its multiple."""
    multiple = side_multiple(model_resolution)
    return max(multiple, round((size or model_resolution) / multiple) * multiple)


MAX_AREA_GROWTH = 2  # times the training size's pixels: 64x128 at 64 is still taken; 4096x1 at 512 (32768x64) is not


def fitted_size(
    width: int, height: int, resolution: int, model_resolution: int, what: str = "the original"
) -> tuple[int, int]:
    """About `resolution`² pixels with sides that are multiples of the `side_multiple` of the model whose native side
    is `model_resolution`, keeping the aspect; an image too long and thin for that is refused, called `what`."""
    multiple = side_multiple(model_resolution)
    scale = (resolution * resolution / (width * height)) ** 0.5
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    if w * h > MAX_AREA_GROWTH * resolution * resolution:  # a long, thin image's short side rounded up a long way
        raise CopierError(
            f"{what} is {width}x{height}, too long and thin: it would train at {w}x{h}, "
            f"{w * h / resolution**2:.0f} times the pixels of the {resolution}x{resolution} training size; crop it, "
            "or ask for a larger training size"
        )
    return w, h


def check_fits(originals: Sequence[tuple[str, tuple[int, int]]], size: int | None, model_resolution: int) -> None:
    """Each (name, size) of `originals` can train at the training size `size` (None: the model's native side):
    `fitted_size`'s refusal, said before a job waits for its turn."""
    side = training_side(size, model_resolution)
    for what, (width, height) in originals:
        fitted_size(width, height, side, model_resolution, what)


def fit_image(image: Image.Image, resolution: int, model_resolution: int, what: str = "the original") -> Image.Image:
    """The image scaled to `fitted_size`."""
    w, h = fitted_size(image.width, image.height, resolution, model_resolution, what)
    image = image.convert("RGB")
    return image if image.size == (w, h) else image.resize((w, h), Image.Resampling.LANCZOS)


# Attention memory grows with the fourth power of the side: the built-in 128-px model takes 3 GB at 1024 and more
# than 14 GB at 2048. Full-size models stay under the request's 2048 anyway.
MAX_SIDE_FACTOR = 8


def check_training_sizes(sizes: Sequence[tuple[int, int]], size: int | None, resolution: int) -> None:
    """Originals of these sizes train at the training size `size` (None: the model's side) on a model whose native
    side is `resolution`: what `fit_image` and `check_job` would refuse, said before the model loads."""
    side = training_side(size, resolution)
    for width, height in sizes:
        check_area(fitted_size(width, height, side, resolution), resolution)


def check_area(size: tuple[int, int], resolution: int) -> None:
    largest = MAX_SIDE_FACTOR * resolution
    if size[0] * size[1] > largest * largest:
        raise CopierError(
            f"the original would train at {size[0]}x{size[1]}, more than {MAX_SIDE_FACTOR} times the side "
            f"of this {resolution}-px model; ask for a training size of at most {largest}"
        )
