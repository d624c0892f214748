"""Safe image loading and normalisation to 8-bit RGB.

Every effect works on 8-bit RGB. Transparent images are composited over white (what a user sees in a viewer),
16-bit images are scaled rather than clipped, and an image over 4096 px on a side, or a file whose header
claims an absurd size (a decompression bomb), is refused before it is decoded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lib_copier.errors import CopierError, check_file

MAX_SIDE = 4096


def check_size(size: tuple[int, int], what: str = "the image") -> None:
    if max(size) > MAX_SIDE:
        raise CopierError(f"{what} is {size[0]}x{size[1]} px; the largest side allowed is {MAX_SIDE} px")
    if min(size) < 1:
        raise CopierError(f"{what} is empty ({size[0]}x{size[1]} px)")


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
    else:  # I;16 and I: 16-bit data unless every value already fits in 8 bits
        top = 255.0 if values.max(initial=0) <= 255 else 65535.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, what: str = "the image") -> Image.Image:
    """The image as 8-bit RGB, upright (EXIF orientation applied), transparency composited over white."""
    check_size(image.size, what)
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scaled_to_8bit(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "RGBa", "La"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    path = check_file(Path(path), "image")
    return read_image(path, f"image {path}")


def read_image(source, what: str = "the image") -> Image.Image:
    """8-bit RGB from a path or a binary file object; its size is checked from the header before any pixel is
    decoded, and a header that claims an absurd size is refused as a decompression bomb."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                check_size(image.size, what)
                image.load()
                return to_rgb(image, what)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CopierError(f"{what} claims {exc}; refused as a possible decompression bomb") from exc
    except UnidentifiedImageError as exc:
        raise CopierError(f"{what} is not an image PIL can read (PNG, JPEG, WebP ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CopierError(f"{what} is damaged or truncated ({exc})") from exc


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """A preview: the two images next to each other on white."""
    height = max(left.height, right.height)
    canvas = Image.new("RGB", (left.width + gap + right.width, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas
