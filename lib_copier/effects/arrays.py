"""Small numpy helpers the effects share."""

from __future__ import annotations

import numpy as np
from PIL import Image

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, what PIL's convert("L") uses


def as_float(image: Image.Image) -> np.ndarray:
    """H x W x 3 float32 in 0..1."""
    return np.asarray(image, dtype=np.float32) * (1.0 / 255.0)


def to_image(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), "RGB")


def luminance(values: np.ndarray) -> np.ndarray:
    return values @ LUMA


def lut(function) -> list[int]:
    """A 256-entry table of `function(x)` for x in 0..1, repeated for the three channels of Image.point."""
    x = np.arange(256, dtype=np.float64) / 255.0
    table = np.clip(np.rint(function(x) * 255.0), 0, 255).astype(np.uint8).tolist()
    return table * 3
