"""The evaluation's measures (issue 8) move the right way on constructed images with known changes."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from lib_copier.effects.chain import Chain
from lib_copier.evaluate import metrics

SIZE = 128


def scene(shift: int = 0, colours=((220, 40, 40), (40, 80, 220), (245, 220, 40))) -> Image.Image:
    """A shaded gradient background with a disc and a square; `shift` moves the shapes right."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    values = np.stack([70 + 120 * x, 90 + 90 * y, 170 - 70 * x], -1)
    image = Image.fromarray(values.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((16 + shift, 16, 66 + shift, 66), fill=colours[0])
    draw.rectangle((70 + shift // 2, 72, 116 + shift // 2, 118), fill=colours[1])
    draw.polygon([(30, 120), (50, 84), (70, 120)], fill=colours[2])
    return image


def noisy(image: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    values = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (image.height, image.width, 1))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_chroma_falls_as_colour_is_removed():
    image = scene()
    gray = image.convert("L").convert("RGB")
    values = [metrics.chroma(Image.blend(image, gray, amount)) for amount in (0, 0.25, 0.5, 1.0)]
    assert values[0] > values[1] > values[2] > values[3] == 0


def test_tone_levels_fall_with_posterization():
    image = scene()
    levels = [metrics.tone_levels(Chain.parse([f"posterize:levels={n}"]).apply(image)) for n in (16, 6, 3, 2)]
    assert metrics.tone_levels(image) > levels[0] > levels[1] > levels[2] > levels[3]
    assert levels[3] <= 2.0 + 1e-9  # two levels per channel at most


def test_edge_darkness_rises_with_thin_dark_lines_not_with_dark_areas():
    image = scene()
    lined, blocked = image.copy(), image.copy()
    ImageDraw.Draw(lined).ellipse((16, 16, 66, 66), outline=(10, 10, 10), width=2)
    ImageDraw.Draw(blocked).rectangle((80, 10, 110, 40), fill=(10, 10, 10))  # a wide dark area, not line art
    base = metrics.edge_darkness(image)
    assert metrics.edge_darkness(lined) > base + 1.0
    assert metrics.edge_darkness(lined) - base > 3 * (metrics.edge_darkness(blocked) - base)
    assert metrics.edge_darkness(Chain.parse(["outline"]).apply(image)) > base + 1.0


def test_luminance_spread_follows_contrast():
    image = scene()
    spreads = [metrics.luminance_spread(ImageEnhance.Contrast(image).enhance(f)) for f in (0.5, 1.0, 1.5)]
    assert spreads[0] < spreads[1] < spreads[2]
    assert metrics.luminance_spread(Chain.parse(["high_contrast"]).apply(image)) > spreads[1]


def test_local_variation_falls_when_shading_and_texture_go():
    image = noisy(scene(), 6)
    smooth = image.filter(ImageFilter.MedianFilter(5))
    flat = Chain.parse(["flatten"]).apply(image)
    assert metrics.local_variation(noisy(scene(), 12)) > metrics.local_variation(image)
    assert metrics.local_variation(smooth) < metrics.local_variation(image)
    assert metrics.local_variation(flat) < 0.5 * metrics.local_variation(image)


def test_blockiness_rises_with_8x8_blocks_only():
    image = scene().filter(ImageFilter.GaussianBlur(2))
    base = metrics.blockiness(image)
    assert metrics.blockiness(jpeg(image, 5)) > base + 0.5
    assert metrics.blockiness(Chain.parse(["jpeg_noise"]).apply(image)) > base + 0.5
    # the same blocks, off the 8-pixel grid by 4 pixels, are not JPEG blocking
    blocks = np.asarray(image, dtype=np.float64).reshape(16, 8, 16, 8, 3).mean(axis=(1, 3))
    aligned = np.repeat(np.repeat(blocks, 8, 0), 8, 1)
    shifted = np.roll(aligned, 4, axis=(0, 1))
    as_image = [Image.fromarray(a.astype(np.uint8), "RGB") for a in (aligned, shifted)]
    assert metrics.blockiness(as_image[0]) > 2.0 > metrics.blockiness(as_image[1])


def test_layout_sees_shapes_and_places_not_colours():
    image = scene()
    recoloured = scene(colours=((40, 200, 60), (240, 130, 190), (25, 25, 25)))
    assert metrics.layout(image, image) == pytest.approx(1.0)
    assert metrics.layout(image, image.convert("L").convert("RGB")) > 0.99
    assert metrics.layout(image, ImageEnhance.Contrast(image).enhance(1.6)) > 0.95
    moved = [metrics.layout(image, scene(shift)) for shift in (0, 8, 24)]
    assert moved[0] > moved[1] > moved[2]
    rng = np.random.default_rng(1)
    unrelated = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).filter(ImageFilter.BoxBlur(6))
    assert abs(metrics.layout(image, unrelated)) < 0.3
    assert metrics.layout(image, Image.new("RGB", (SIZE, SIZE), "gray")) == 0.0  # a flat image has no layout
    assert metrics.layout(image, recoloured) < metrics.layout(image, image)


def test_psnr_falls_with_noise_and_is_capped_for_identical_images():
    image = scene()
    assert metrics.psnr(image, image) == metrics.PSNR_CAP
    assert metrics.psnr(image, noisy(image, 3)) > metrics.psnr(image, noisy(image, 12)) > 10


def test_every_seed_effect_has_a_metric_that_its_effect_moves_its_way():
    image = noisy(scene(), 4)
    for name, metric in metrics.EFFECT_METRICS.items():
        change = metric.fn(Chain.parse([name]).apply(image)) - metric.fn(image)
        assert change * metric.direction > 0, name
    assert metrics.metric_for(["posterize", "outline"]).name == "tone levels"
    assert metrics.metric_for(["blur"]) is None
