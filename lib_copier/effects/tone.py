"""Tone and colour effects: per-pixel changes of brightness, contrast, levels and colour."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from lib_copier.effects.arrays import as_float, lut, to_image
from lib_copier.effects.params import Param
from lib_copier.effects.registry import effect


@effect(
    "grayscale",
    "Grayscale",
    "Removes colour, fully or partly.",
    Param("amount", "float", 1.0, 0.0, 1.0, 0.05, "1 = no colour left, 0 = unchanged"),
)
def grayscale(image: Image.Image, p: dict) -> Image.Image:
    gray = ImageOps.grayscale(image).convert("RGB")
    return Image.blend(image, gray, p["amount"])


@effect(
    "high_contrast",
    "High contrast",
    "Stretches the tones so darks get darker and lights lighter (an S-curve).",
    Param("strength", "float", 0.6, 0.0, 1.0, 0.05, "how steep the curve is"),
)
def high_contrast(image: Image.Image, p: dict) -> Image.Image:
    stretched = ImageOps.autocontrast(image, cutoff=1)
    k = 1.0 + 12.0 * p["strength"]

    def curve(x):
        s = 1 / (1 + np.exp(-k * (x - 0.5)))
        lo, hi = 1 / (1 + np.exp(k * 0.5)), 1 / (1 + np.exp(-k * 0.5))
        return (s - lo) / (hi - lo)

    return stretched.point(lut(curve))


@effect(
    "posterize",
    "Posterize",
    "Reduces every channel to a few evenly spaced levels.",
    Param("levels", "int", 4, 2, 32, 1, "levels per channel"),
)
def posterize(image: Image.Image, p: dict) -> Image.Image:
    n = p["levels"] - 1
    return image.point(lut(lambda x: np.rint(x * n) / n))


@effect(
    "exposure",
    "Exposure",
    "Brightens or darkens as a camera's exposure would, in linear light.",
    Param("stops", "float", 0.5, -3.0, 3.0, 0.1, "+1 doubles the light, -1 halves it"),
)
def exposure(image: Image.Image, p: dict) -> Image.Image:
    gain = 2.0 ** p["stops"]
    return image.point(lut(lambda x: np.clip((x**2.2) * gain, 0, 1) ** (1 / 2.2)))


@effect(
    "saturation",
    "Saturation",
    "Makes colours more vivid (positive) or duller (negative).",
    Param("amount", "float", 0.5, -1.0, 2.0, 0.05, "0 = unchanged, -1 = gray"),
)
def saturation(image: Image.Image, p: dict) -> Image.Image:
    return ImageEnhance.Color(image).enhance(1.0 + p["amount"])


@effect(
    "temperature",
    "Colour temperature",
    "Warms (towards orange) or cools (towards blue) the whole image.",
    Param("warmth", "float", 0.3, -1.0, 1.0, 0.05, "positive warms, negative cools"),
)
def temperature(image: Image.Image, p: dict) -> Image.Image:
    w = 0.25 * p["warmth"]
    gains = np.array([1 + w, 1 + 0.2 * w, 1 - w], dtype=np.float32)
    return to_image(as_float(image) * gains)


@effect(
    "hue_shift",
    "Hue shift",
    "Rotates every colour around the colour wheel.",
    Param("degrees", "float", 30.0, -180.0, 180.0, 1.0, "rotation of the hue"),
)
def hue_shift(image: Image.Image, p: dict) -> Image.Image:
    h, s, v = image.convert("HSV").split()
    shift = round(p["degrees"] / 360.0 * 256)
    h = h.point([(i + shift) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


@effect("invert", "Invert", "Negative image: dark line art on light becomes light on dark.")
def invert(image: Image.Image, p: dict) -> Image.Image:
    return ImageOps.invert(image)


@effect(
    "vignette",
    "Vignette",
    "Darkens towards the corners.",
    Param("strength", "float", 0.5, 0.0, 1.0, 0.05, "how dark the corners get"),
    Param("radius", "float", 0.7, 0.2, 1.5, 0.05, "where darkening starts, as a fraction of the half-diagonal"),
)
def vignette(image: Image.Image, p: dict) -> Image.Image:
    w, h = image.size
    y = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / max(h / 2, 1)
    x = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / max(w / 2, 1)
    r = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2) / np.sqrt(2)
    falloff = np.clip((r - p["radius"]) / max(1.0 - p["radius"], 0.05), 0, 1)
    gain = 1.0 - p["strength"] * falloff**2
    return to_image(as_float(image) * gain[..., None])
