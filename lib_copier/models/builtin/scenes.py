"""Seeded procedural scenes with captions: the training data of the built-in model.

Each scene has a background (flat, linear or radial gradient, two-tone split) and one to three objects (circle,
square, triangle, star, ring, cross) with named colours, sizes and positions, optional soft shading, dark outlines
and textures, so that every effect the method cares about (outline, flatten, contrast, posterize, JPEG noise,
grayscale) has something to act on. Captions are built from the parameters, largest object first.

Held-out captions: (largest object's colour, its shape, background colour) triples whose hash falls in a fixed
bucket never occur in training, so evaluation prompts are combinations the model has not seen.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 40),
    "green": (50, 170, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 180),
    "pink": (240, 130, 190),
    "brown": (120, 75, 40),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
SIZES = {"small": 0.22, "medium": 0.34, "large": 0.5}  # object diameter as a fraction of the image side
BACKGROUNDS = ("flat", "gradient", "radial", "split")
TEXTURE_PERIOD = 8  # image pixels; the VAE's downscale
HELD_OUT_BUCKETS = 10  # one triple in ten is held out


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, as fractions of the image side
    cy: float
    shading: bool = False
    outline: bool = False
    texture: str = ""  # "", "striped" or "dotted"

    def phrase(self) -> str:
        words = ["a", self.size]
        if self.texture:
            words.append(self.texture)
        words += [self.colour, self.shape]
        extras = [e for e, on in (("shading", self.shading), ("a dark outline", self.outline)) if on]
        if extras:
            words += ["with", " and ".join(extras)]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    background: str
    bg_colour: str
    bg_colour2: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def caption(self) -> str:
        things = " and ".join(o.phrase() for o in self.objects)
        if self.background == "flat":
            where = f"on {article(self.bg_colour)} {self.bg_colour} background"
        elif self.background == "split":
            where = f"on {article(self.bg_colour)} {self.bg_colour} and {self.bg_colour2} split background"
        else:
            kind = "gradient" if self.background == "gradient" else "radial gradient"
            where = f"on {article(self.bg_colour)} {self.bg_colour} {kind} background"
        return f"{things} {where}"

    @property
    def main(self) -> SceneObject:
        return self.objects[0]


def is_held_out(colour: str, shape: str, bg_colour: str) -> bool:
    digest = hashlib.sha256(f"{colour}|{shape}|{bg_colour}".encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def random_scene(rng: random.Random, held_out: bool = False) -> Scene:
    """A scene whose main triple is in the held-out set exactly when `held_out` is set."""
    colours = list(PALETTE)
    while True:
        bg = rng.choice(colours)
        main_shape = rng.choice(SHAPES)
        main_colour = rng.choice([c for c in colours if c != bg])
        if is_held_out(main_colour, main_shape, bg) == held_out:
            break
    background = rng.choice(BACKGROUNDS)
    bg2 = rng.choice([c for c in colours if c not in (bg, main_colour)])
    count = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
    sizes = sorted((rng.choice(list(SIZES)) for _ in range(count)), key=lambda s: -SIZES[s])
    sizes[0] = max(sizes[0], "medium", key=lambda s: SIZES[s])  # the main object is never the smallest kind
    objects = []
    for i, size in enumerate(sizes):
        radius = SIZES[size] / 2
        objects.append(
            SceneObject(
                shape=main_shape if i == 0 else rng.choice(SHAPES),
                colour=main_colour if i == 0 else rng.choice([c for c in colours if c != bg]),
                size=size,
                cx=rng.uniform(radius, 1 - radius),
                cy=rng.uniform(radius, 1 - radius),
                shading=rng.random() < 0.4,
                outline=rng.random() < 0.3,
                texture=rng.choice(("", "", "", "striped", "dotted")),
            )
        )
    return Scene(background, bg, bg2, tuple(objects))


def sample_captions(count: int, seed: int) -> list[str]:
    """Captions of the kind the model was trained on: prompts the built-in model understands."""
    rng = random.Random(seed)
    return [random_scene(rng).caption() for _ in range(count)]


def _background(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    c1 = np.array(PALETTE[scene.bg_colour], dtype=np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)
    if scene.background == "flat":
        return np.broadcast_to(c1, (n, n, 3)).copy()
    if scene.background == "split":
        c2 = np.array(PALETTE[scene.bg_colour2], dtype=np.float32)
        angle = rng.uniform(0, np.pi)
        side = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) > 0
        return np.where(side[..., None], c1, c2)
    # Gradients run from the named colour to a darker shade of it, so the caption's colour still dominates.
    if scene.background == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)) / np.sqrt(0.5) * 0.5 + 0.5
    else:
        t = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / np.sqrt(0.5)
    t = np.clip(t, 0, 1)[..., None]
    return c1 * (1 - 0.3 * t)


def _shape_mask(obj: SceneObject, n: int) -> Image.Image:
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    r = SIZES[obj.size] / 2 * n
    cx, cy = obj.cx * n, obj.cy * n
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj.shape == "circle":
        draw.ellipse(box, fill=255)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=255)
    elif obj.shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -np.pi / 2 + k * np.pi / 5
            points.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        draw.polygon(points, fill=255)
    elif obj.shape == "ring":
        draw.ellipse(box, fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif obj.shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return mask


def _fill(obj: SceneObject, n: int) -> np.ndarray:
    colour = np.array(PALETTE[obj.colour], dtype=np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    fill = np.broadcast_to(colour, (n, n, 3)).copy()
    r = SIZES[obj.size] / 2
    if obj.shading:
        # Light from the upper left: brighter towards it, darker away from it.
        d = ((xx - (obj.cx - r * 0.4)) ** 2 + (yy - (obj.cy - r * 0.4)) ** 2) ** 0.5 / (2 * r)
        fill = fill * (1.25 - 0.7 * np.clip(d, 0, 1))[..., None]
    # Textures repeat every 8 image pixels (16 on the 2x canvas): one VAE latent cell, so every cell holds the same
    # piece of pattern and the small VAE can reproduce it instead of blurring it.
    period = 2 * TEXTURE_PERIOD
    if obj.texture == "striped":
        stripes = (np.floor((xx + yy) * n / (period / 2)) % 2 == 0)[..., None]
        fill = np.where(stripes, fill * 0.65, fill)
    elif obj.texture == "dotted":
        dots = ((xx * n) % period - period / 2) ** 2 + ((yy * n) % period - period / 2) ** 2 < (period * 0.3) ** 2
        fill = np.where(dots[..., None], 255 - (255 - fill) * 0.35, fill)
    return fill


def render(scene: Scene, size: int = 128, seed: int = 0) -> Image.Image:
    """Draw at twice the size and downsample, so edges are anti-aliased like real pictures."""
    n = size * 2
    rng = np.random.default_rng(seed)
    canvas = _background(scene, n, rng)
    # Draw the smaller objects last so the main object (largest) is never hidden.
    for obj in reversed(scene.objects):
        mask_img = _shape_mask(obj, n)
        mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255
        canvas = canvas * (1 - mask) + _fill(obj, n) * mask
        if obj.outline:
            width = max(5, n // 32) | 1
            edge = np.asarray(mask_img.filter(ImageFilter.MaxFilter(width)), dtype=np.float32) - np.asarray(
                mask_img.filter(ImageFilter.MinFilter(width)), dtype=np.float32
            )
            edge = (edge[..., None] / 255) * 0.9
            canvas = canvas * (1 - edge) + 20 * edge
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _render_job(job: tuple[Scene, int, int]) -> Image.Image:
    scene, size, seed = job
    return render(scene, size, seed)


def dataset(
    count: int, seed: int, held_out: bool = False, size: int = 128, workers: int = 1
) -> list[tuple[Image.Image, str]]:
    """`count` seeded (image, caption) pairs; the same for any number of worker processes."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, held_out) for _ in range(count)]
    jobs = [(scene, size, seed * 1_000_003 + i) for i, scene in enumerate(scenes)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            images = pool.map(_render_job, jobs, chunksize=64)
    else:
        images = [_render_job(job) for job in jobs]
    return [(image, scene.caption()) for image, scene in zip(images, scenes, strict=True)]
