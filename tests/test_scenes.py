"""The built-in model's training data: deterministic, captions true to the picture, held-out split respected."""

import random

import numpy as np

from lib_copier.models.builtin.scenes import PALETTE, Scene, SceneObject, dataset, is_held_out, random_scene, render


def test_same_seed_same_pictures_and_captions():
    a, b = dataset(4, seed=5, size=64), dataset(4, seed=5, size=64)
    assert [c for _, c in a] == [c for _, c in b]
    assert all(x.tobytes() == y.tobytes() for (x, _), (y, _) in zip(a, b, strict=True))
    assert [c for _, c in dataset(4, seed=6, size=64)] != [c for _, c in a]


def test_held_out_triples_never_appear_in_training():
    rng = random.Random(0)
    train = [random_scene(rng) for _ in range(500)]
    held = [random_scene(rng, held_out=True) for _ in range(50)]
    assert not any(is_held_out(s.main.colour, s.main.shape, s.bg_colour) for s in train)
    assert all(is_held_out(s.main.colour, s.main.shape, s.bg_colour) for s in held)
    assert {s.caption() for s in held}.isdisjoint({s.caption() for s in train})


def _nearest(rgb):
    return min(PALETTE, key=lambda name: sum((a - int(b)) ** 2 for a, b in zip(PALETTE[name], rgb, strict=True)))


def test_caption_colours_are_the_colours_drawn():
    obj = SceneObject("circle", "red", "large", 0.5, 0.5)
    scene = Scene("flat", "blue", "green", (obj,))
    assert scene.caption() == "a large red circle on a blue background"
    pixels = np.asarray(render(scene, size=64))
    assert _nearest(pixels[32, 32]) == "red"  # the centre of the circle
    assert _nearest(pixels[1, 1]) == "blue"  # a corner of the background


def test_outline_and_shading_change_the_picture_where_promised():
    plain = SceneObject("square", "yellow", "large", 0.5, 0.5)
    outlined = SceneObject("square", "yellow", "large", 0.5, 0.5, outline=True)
    shaded = SceneObject("square", "yellow", "large", 0.5, 0.5, shading=True)
    base = np.asarray(render(Scene("flat", "white", "gray", (plain,)), 64), dtype=float).mean(-1)
    edge = np.asarray(render(Scene("flat", "white", "gray", (outlined,)), 64), dtype=float).mean(-1)
    shade = np.asarray(render(Scene("flat", "white", "gray", (shaded,)), 64), dtype=float).mean(-1)
    assert (edge < 80).sum() > (base < 80).sum() + 50  # dark line art added …
    assert abs(edge[32, 32] - base[32, 32]) < 1  # … but not inside the object
    assert shade[24:40, 24:40].std() > base[24:40, 24:40].std() + 5  # shading varies the fill
