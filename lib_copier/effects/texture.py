"""Texture and print effects: JPEG noise, film grain, halftone, pixelate, bloom."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from lib_copier.effects.arrays import as_float, luminance, to_image
from lib_copier.effects.params import Param
from lib_copier.effects.registry import effect


@effect(
    "jpeg_noise",
    "JPEG noise",
    "Compression artefacts: 8x8 blocks and ringing from repeated low-quality JPEG saves.",
    Param("quality", "int", 15, 1, 95, 1, "JPEG quality; lower is blockier"),
    Param("passes", "int", 3, 1, 10, 1, "how many times the image is re-encoded"),
)
def jpeg_noise(image: Image.Image, p: dict) -> Image.Image:
    for i in range(p["passes"]):
        buffer = io.BytesIO()
        # A slightly different quality each pass keeps re-encoding from converging to a fixed point.
        image.save(buffer, "JPEG", quality=max(1, p["quality"] - i % 3), subsampling=2)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            image = decoded.convert("RGB")
    return image


@effect(
    "film_grain",
    "Film grain",
    "Adds fine, seeded luminance noise like film grain.",
    Param("amount", "float", 0.3, 0.0, 1.0, 0.05, "grain strength"),
    Param("size", "int", 1, 1, 4, 1, "grain size in pixels"),
    Param("seed", "int", 0, 0, 2**31 - 1, 1, "the same seed gives the same grain"),
)
def film_grain(image: Image.Image, p: dict) -> Image.Image:
    rng = np.random.default_rng(p["seed"])
    w, h = image.size
    size = p["size"]
    noise = rng.standard_normal((-(-h // size), -(-w // size))).astype(np.float32)
    noise = np.repeat(np.repeat(noise, size, axis=0), size, axis=1)[:h, :w]
    return to_image(as_float(image) + (0.12 * p["amount"]) * noise[..., None])


@effect(
    "halftone",
    "Halftone",
    "Print-style dots: each cell becomes an ink dot whose size follows the darkness there.",
    Param("cell", "int", 8, 3, 32, 1, "dot spacing in pixels"),
    Param("color", "bool", False, help="keep each cell's colour for its dot instead of black ink"),
)
def halftone(image: Image.Image, p: dict) -> Image.Image:
    cell = p["cell"]
    w, h = image.size
    cells = image.reduce(cell) if min(w, h) >= cell else image.resize((1, 1), Image.Resampling.BOX)
    means = as_float(cells)
    gh, gw = means.shape[:2]
    darkness = 1.0 - luminance(means)
    # Dot area proportional to darkness: radius = cell * sqrt(darkness / pi).
    radius = cell * np.sqrt(darkness / np.pi)
    ys, xs = np.arange(h), np.arange(w)
    cy, cx = np.minimum(ys // cell, gh - 1), np.minimum(xs // cell, gw - 1)
    dy = (ys % cell) + 0.5 - cell / 2
    dx = (xs % cell) + 0.5 - cell / 2
    inside = (dy[:, None] ** 2 + dx[None, :] ** 2) <= radius[cy][:, cx] ** 2
    ink = means[cy][:, cx] * 0.6 if p["color"] else np.zeros((h, w, 3), np.float32)
    return to_image(np.where(inside[..., None], ink, 1.0))


@effect(
    "pixelate",
    "Pixelate",
    "Large square pixels, like pixel art.",
    Param("block", "int", 8, 2, 64, 1, "pixel size"),
)
def pixelate(image: Image.Image, p: dict) -> Image.Image:
    block = p["block"]
    w, h = image.size
    small = image.resize((max(1, -(-w // block)), max(1, -(-h // block))), Image.Resampling.BOX)
    big = small.resize((small.width * block, small.height * block), Image.Resampling.NEAREST)
    return big.crop((0, 0, w, h))


@effect(
    "bloom",
    "Bloom",
    "Bright areas glow and bleed light into their surroundings.",
    Param("strength", "float", 0.8, 0.0, 2.0, 0.05, "glow intensity"),
    Param("threshold", "float", 0.7, 0.0, 1.0, 0.05, "how bright a pixel must be to glow"),
    Param("radius", "float", 12.0, 2.0, 40.0, 1.0, "glow spread in pixels"),
)
def bloom(image: Image.Image, p: dict) -> Image.Image:
    values = as_float(image)
    bright = np.clip((luminance(values) - p["threshold"]) / max(1.0 - p["threshold"], 1e-3), 0, 1)
    glow_source = to_image(values * bright[..., None])
    glow = as_float(glow_source.filter(ImageFilter.GaussianBlur(p["radius"]))) * p["strength"]
    return to_image(1.0 - (1.0 - values) * (1.0 - np.clip(glow, 0, 1)))  # screen blend
