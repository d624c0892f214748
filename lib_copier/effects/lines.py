"""Effects on edges and regions: outline, flatten, sharpen, blur."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from lib_copier.effects.arrays import as_float, luminance, to_image
from lib_copier.effects.params import Param
from lib_copier.effects.registry import effect


def edge_strength(values: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the luminance, 0..~4 (edge-replicated borders, so borders are not edges)."""
    y = np.pad(luminance(values), 1, mode="edge")
    gx = (y[:-2, 2:] + 2 * y[1:-1, 2:] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[1:-1, :-2] + y[2:, :-2])
    gy = (y[2:, :-2] + 2 * y[2:, 1:-1] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[:-2, 1:-1] + y[:-2, 2:])
    return np.hypot(gx, gy)


@effect(
    "outline",
    "Outline",
    "Draws dark line art along the edges of shapes; flat areas stay as they are.",
    Param("thickness", "int", 2, 1, 8, 1, "line width in pixels"),
    Param("darkness", "float", 0.9, 0.0, 1.0, 0.05, "1 = black lines"),
    Param("sensitivity", "float", 0.5, 0.0, 1.0, 0.05, "higher finds fainter edges"),
)
def outline(image: Image.Image, p: dict) -> Image.Image:
    values = as_float(image)
    threshold = 0.05 + 0.75 * (1.0 - p["sensitivity"])
    mask = Image.fromarray(((edge_strength(values) > threshold) * 255).astype(np.uint8), "L")
    for _ in range(p["thickness"] - 1):  # grow the line one pixel at a time: cheap 3x3 filters
        mask = mask.filter(ImageFilter.MaxFilter(3))
    ink = np.asarray(mask, dtype=np.float32)[..., None] * (p["darkness"] / 255.0)
    return to_image(values * (1.0 - ink))


def _kmeans(samples: np.ndarray, k: int, seed: int, iterations: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = samples[rng.choice(len(samples), size=min(k, len(samples)), replace=False)]
    for _ in range(iterations):
        labels = _nearest(samples, centres)
        for i in range(len(centres)):
            members = samples[labels == i]
            if len(members):
                centres[i] = members.mean(axis=0)
    return centres


def _nearest(pixels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 is the same for every centre, so it can be left out.
    return np.argmin((centres**2).sum(axis=1)[None, :] - 2.0 * pixels @ centres.T, axis=1)


@effect(
    "flatten",
    "Flatten",
    "Removes shading and texture but keeps each region's colour, like cel shading.",
    Param("colors", "int", 8, 2, 32, 1, "how many flat colours remain"),
    Param("smoothing", "int", 2, 0, 3, 1, "edge-preserving smoothing passes before the colours are picked"),
)
def flatten(image: Image.Image, p: dict) -> Image.Image:
    small = image.reduce(2) if min(image.size) >= 64 else image
    for _ in range(p["smoothing"]):  # median filters smooth texture but keep edges where they are
        small = small.filter(ImageFilter.MedianFilter(3))
    smooth = small.resize(image.size, Image.Resampling.BILINEAR) if small.size != image.size else small
    pixels = as_float(smooth).reshape(-1, 3)
    step = max(1, len(pixels) // 20000)
    centres = _kmeans(pixels[::step].copy(), p["colors"], seed=0)
    labels = _nearest(pixels, centres)
    return to_image(centres[labels].reshape(image.height, image.width, 3))


@effect(
    "sharpen",
    "Sharpen / detail",
    "Crisper edges and fine detail (unsharp mask).",
    Param("amount", "float", 1.0, 0.0, 3.0, 0.05, "strength"),
    Param("radius", "float", 1.5, 0.5, 5.0, 0.1, "size of the detail that is enhanced, in pixels"),
)
def sharpen(image: Image.Image, p: dict) -> Image.Image:
    return image.filter(ImageFilter.UnsharpMask(radius=p["radius"], percent=round(100 * p["amount"]), threshold=0))


@effect(
    "blur",
    "Blur / soft focus",
    "Softens the image; soft focus blends the blur over the sharp image instead.",
    Param("radius", "float", 3.0, 0.5, 20.0, 0.5, "blur radius in pixels"),
    Param("soft_focus", "bool", False, help="blend the blur over the original instead of replacing it"),
)
def blur(image: Image.Image, p: dict) -> Image.Image:
    blurred = image.filter(ImageFilter.GaussianBlur(p["radius"]))
    if not p["soft_focus"]:
        return blurred
    return Image.blend(image, blurred, 0.5)
