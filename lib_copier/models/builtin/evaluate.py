"""Measure the built-in model on held-out scenes: `python -m lib_copier.models.builtin.evaluate`.

- VAE reconstruction PSNR on held-out scenes.
- For held-out captions (combinations never seen in training): is the generated background (border pixels) nearest,
  in Lab, to the named background colour, and the main object (the pixels least like the background) nearest to
  the named object colour, among the palette.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch
from PIL import Image, ImageFilter

from lib_copier.models.builtin.config import WEIGHTS
from lib_copier.models.builtin.scenes import PALETTE, dataset, random_scene
from lib_copier.models.generate import Txt2Img, generate
from lib_copier.models.loading import load_model


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..255 (any leading shape) → CIE Lab (D65)."""
    c = rgb.astype(np.float64) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


PALETTE_LAB = {name: srgb_to_lab(np.array(rgb)) for name, rgb in PALETTE.items()}


NAMES = list(PALETTE)
PALETTE_LAB_ARRAY = np.stack([PALETTE_LAB[n] for n in NAMES])


def majority_colour(rgb: np.ndarray) -> str:
    """The palette name most of these pixels are nearest to: robust to shading, textures and gradients."""
    lab = srgb_to_lab(rgb.reshape(-1, 3))
    nearest = ((lab[:, None, :] - PALETTE_LAB_ARRAY[None]) ** 2).sum(-1).argmin(1)
    return NAMES[int(np.bincount(nearest, minlength=len(NAMES)).argmax())]


def read_colours(image: Image.Image) -> tuple[str, str]:
    """(background colour, main object colour) as the nearest palette names."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate(
        [
            pixels[:3].reshape(-1, 3),
            pixels[-3:].reshape(-1, 3),
            pixels[:, :3].reshape(-1, 3),
            pixels[:, -3:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    distance = np.sqrt(((srgb_to_lab(pixels) - srgb_to_lab(background)) ** 2).sum(-1))
    # The object: pixels clearly unlike the background, eroded so edges and dark outlines do not vote.
    mask = Image.fromarray(((distance > 20) * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(5))
    inside = np.asarray(mask) > 0
    foreground = pixels[inside] if inside.sum() >= 16 else pixels[distance >= np.quantile(distance, 0.97)]
    return majority_colour(border), majority_colour(foreground)


def held_out_captions(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(caption, background colour, main colour) for single-object, flat or gradient held-out scenes."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        scene = random_scene(rng, held_out=True)
        if scene.background == "split":
            continue  # a split background has no single colour to check
        scene = type(scene)(scene.background, scene.bg_colour, scene.bg_colour2, scene.objects[:1])
        out.append((scene.caption(), scene.bg_colour, scene.main.colour))
    return out


@torch.no_grad()
def vae_psnr(model, count: int = 64, seed: int = 12345) -> float:
    images = [im for im, _ in dataset(count, seed, held_out=True, size=model.config.resolution)]
    param = next(model.vae.parameters())
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).to(param.device)
    x = x.to(param.dtype) / 127.5 - 1
    recon = model.vae.decode(model.vae.encode(x).mode()).float().clamp(-1, 1)
    mse = ((recon - x.float()) / 2).pow(2).mean().item()
    return 10 * np.log10(1 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_copier.models.builtin.evaluate")
    parser.add_argument("--model", default=str(WEIGHTS))
    parser.add_argument("--captions", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--grid", help="write the generations as one PNG grid here")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    model = load_model(args.model, device=args.device, dtype="fp32")
    rows, images = [], []
    for i, (caption, bg, main_colour) in enumerate(held_out_captions(args.captions, seed=2024)):
        image = generate(model, Txt2Img(caption, seed=i, steps=args.steps, cfg=args.cfg))
        got_bg, got_main = read_colours(image)
        rows.append(
            {
                "caption": caption,
                "background": bg,
                "got_background": got_bg,
                "object": main_colour,
                "got_object": got_main,
            }
        )
        images.append(image)
    result = {
        "vae_psnr_db": round(vae_psnr(model), 2),
        "background_accuracy": sum(r["background"] == r["got_background"] for r in rows) / len(rows),
        "object_accuracy": sum(r["object"] == r["got_object"] for r in rows) / len(rows),
        "captions": len(rows),
    }
    print(json.dumps(result))
    for r in rows:
        print(json.dumps(r))
    if args.grid:
        side = images[0].width
        cols = 10
        grid = Image.new("RGB", (side * cols, side * ((len(images) + cols - 1) // cols)))
        for i, im in enumerate(images):
            grid.paste(im, ((i % cols) * side, (i // cols) * side))
        grid.save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
