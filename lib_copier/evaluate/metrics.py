"""Image measures for the evaluation: each effect's own metric, layout similarity and PSNR.

They take 8-bit RGB images and return one float; numpy and PIL only, so each is unit-tested on constructed images
(tests/test_evaluate_metrics.py). Pixel values are in 0..255 throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L") and the grayscale effect use
PSNR_CAP = 60.0  # dB for identical images, so JSON never holds infinity


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def luma(image: Image.Image) -> np.ndarray:
    return rgb(image) @ LUMA


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = float(((rgb(a) - rgb(b)) ** 2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255**2 / mse))


def mean_abs_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(rgb(a) - rgb(b)).mean())


def layout(a: Image.Image, b: Image.Image, cell: int = 4) -> float:
    """Correlation of the two images' luminance, averaged over `cell`² blocks: 1 when the same shapes sit in the
    same places (whatever the colours, contrast or brightness), about 0 for unrelated scenes."""
    x, y = _blocks(luma(a), cell).ravel(), _blocks(luma(b), cell).ravel()
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if norm < 1e-9 else float((x * y).sum() / norm)


def _blocks(values: np.ndarray, cell: int) -> np.ndarray:
    h, w = values.shape[0] // cell * cell, values.shape[1] // cell * cell
    return values[:h, :w].reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3))


# --- each effect's own metric ---


def chroma(image: Image.Image) -> float:
    """Colourfulness: the mean of max(R,G,B) − min(R,G,B); 0 for a gray image."""
    p = rgb(image)
    return float((p.max(-1) - p.min(-1)).mean())


def tone_levels(image: Image.Image, bins: int = 64) -> float:
    """The effective number of levels per channel: 2 ** (entropy of the channel's histogram), averaged over R, G, B.
    A channel posterized to 4 levels has at most 4; a smooth gradient has about `bins`."""
    p = rgb(image)
    levels = []
    for c in range(3):
        counts = np.bincount((p[..., c] * bins / 256).astype(int).ravel(), minlength=bins)
        share = counts[counts > 0] / counts.sum()
        levels.append(2 ** float(-(share * np.log2(share)).sum()))
    return float(np.mean(levels))


def edge_darkness(image: Image.Image, size: int = 9) -> float:
    """How much thin dark line art there is: the mean of the luminance's morphological black-hat (closing − image),
    which is large on dark lines narrower than `size` pixels and zero on flat areas, wide shapes and soft edges.
    9 pixels: the outline effect's lines on a 128-pixel image are 3 to 5 pixels wide, which a 5x5 closing misses."""
    gray = image.convert("L")
    closed = gray.filter(ImageFilter.MaxFilter(size)).filter(ImageFilter.MinFilter(size))
    return float((np.asarray(closed, dtype=np.float64) - np.asarray(gray, dtype=np.float64)).mean())


def luminance_spread(image: Image.Image) -> float:
    """Contrast: the standard deviation of the luminance."""
    return float(luma(image).std())


def local_variation(image: Image.Image, edge_share: float = 0.1) -> float:
    """Shading and texture: the mean standard deviation of the luminance in 3x3 windows, leaving out the
    `edge_share` of pixels with the most (the edges between regions, which flattening keeps)."""
    y = np.pad(luma(image), 1, mode="edge")
    h, w = y.shape[0] - 2, y.shape[1] - 2
    windows = np.stack([y[i : i + h, j : j + w] for i in range(3) for j in range(3)])
    local = windows.std(axis=0).ravel()
    return float(np.sort(local)[: max(1, int(len(local) * (1 - edge_share)))].mean())


def blockiness(image: Image.Image, block: int = 8) -> float:
    """JPEG blocking: the mean luminance step across `block`-pixel block borders minus the mean step elsewhere."""
    y = luma(image)
    steps = []
    for d in (np.abs(np.diff(y, axis=1)), np.abs(np.diff(y, axis=0)).T):
        border = (np.arange(d.shape[1]) + 1) % block == 0
        steps.append(d[:, border].mean() - d[:, ~border].mean())
    return float(np.mean(steps))


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Image.Image], float]
    direction: int  # +1: the effect raises it, −1: the effect lowers it
    description: str


EFFECT_METRICS = {
    "grayscale": Metric("chroma", chroma, -1, "mean max(R,G,B) − min(R,G,B)"),
    "posterize": Metric("tone levels", tone_levels, -1, "levels per channel: 2^entropy of a 64-bin histogram"),
    "outline": Metric("edge darkness", edge_darkness, +1, "mean black-hat (9x9 closing − image) of the luminance"),
    "high_contrast": Metric("luminance spread", luminance_spread, +1, "standard deviation of the luminance"),
    "flatten": Metric("local variation", local_variation, -1, "mean 3x3 luminance std, strongest 10 % left out"),
    "jpeg_noise": Metric("blockiness", blockiness, +1, "mean luminance step across 8x8 block borders minus elsewhere"),
}


def metric_for(effects: list[str]) -> Metric | None:
    """The metric of the first effect of a chain that has one; None when none has (only the generic measure)."""
    return next((EFFECT_METRICS[name] for name in effects if name in EFFECT_METRICS), None)
