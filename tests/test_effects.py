"""Each effect does what it promises, measured on pictures drawn here; odd inputs behave as documented."""

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lib_copier.cli import main
from lib_copier.effects.chain import Chain
from lib_copier.effects.image_io import load_image, to_rgb
from lib_copier.effects.registry import all_effects, get_effect
from lib_copier.errors import CopierError

SIZE = 256


def picture(size=SIZE):
    """A smooth gradient background, two flat shapes and a block of thin dark strokes (text-like)."""
    y, x = np.mgrid[0:size, 0:size] / size
    values = np.stack([60 + 120 * x, 80 + 100 * y, 160 - 60 * x], -1)
    image = Image.fromarray(values.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 30, 110, 110), fill=(220, 40, 40))
    draw.rectangle((140, 130, 230, 230), fill=(30, 60, 200))
    for i in range(6):
        draw.line((20, 150 + 12 * i, 110, 150 + 12 * i), fill=(10, 10, 10), width=2)
    return image


def flat(color=(120, 140, 160), size=64):
    return Image.new("RGB", (size, size), color)


def arr(image):
    return np.asarray(image, dtype=np.float64)


def luma(image):
    return arr(image) @ np.array([0.299, 0.587, 0.114])


def chroma(image):
    a = arr(image)
    return (a.max(-1) - a.min(-1)).mean()


def high_freq(image):
    y = luma(image)
    return np.abs(np.diff(y, axis=0)).mean() + np.abs(np.diff(y, axis=1)).mean()


def apply(name, image=None, **params):
    return get_effect(name).apply(image or picture(), params)


def test_there_are_at_least_fourteen_effects_with_described_params():
    effects = all_effects()
    assert len(effects) >= 14
    for effect in effects:
        assert effect.description and effect.label
        for p in effect.params:
            assert p.help and (p.kind == "bool" or p.min <= p.default <= p.max)


@pytest.mark.parametrize("effect", all_effects(), ids=lambda e: e.name)
@pytest.mark.parametrize("size", [(1, 1), (37, 19), (SIZE, SIZE)])
def test_every_effect_returns_rgb_of_the_input_size(effect, size):
    image = picture().resize(size)
    out = effect.apply(image)
    assert out.mode == "RGB" and out.size == size
    assert effect.apply(image).tobytes() == out.tobytes()  # deterministic


def test_grayscale_removes_chroma():
    assert chroma(picture()) > 30
    assert chroma(apply("grayscale")) < 1.0
    assert 0 < chroma(apply("grayscale", amount=0.5)) < chroma(picture())


def test_posterize_keeps_at_most_n_levels():
    out = arr(apply("posterize", levels=3))
    for c in range(3):
        assert len(np.unique(out[..., c])) <= 3


def test_high_contrast_spreads_luminance():
    assert luma(apply("high_contrast")).std() > luma(picture()).std() * 1.2


def blockiness(image):
    """Mean luminance jump across 8x8 block borders, relative to jumps inside blocks."""
    y = luma(image)
    cols = np.abs(np.diff(y, axis=1))
    border = cols[:, 7::8].mean()
    inside = np.delete(cols, np.s_[7::8], axis=1).mean()
    return border / inside


def test_jpeg_noise_adds_8x8_blockiness():
    image = picture().resize((SIZE, SIZE))
    assert blockiness(apply("jpeg_noise", image, quality=10)) > blockiness(image) * 1.3


def test_outline_darkens_edges_only():
    image = picture()
    out = apply("outline", image, thickness=2)
    dark_before, dark_after = luma(image) < 60, luma(out) < 60
    rim = np.zeros((SIZE, SIZE), bool)
    rim[128:133, 150:220] = True  # the rectangle's top border (y = 130)
    assert dark_after[rim].sum() > dark_before[rim].sum() + 50
    interior = (slice(160, 220), slice(160, 220))  # inside the flat blue rectangle
    assert np.array_equal(arr(out)[interior], arr(image)[interior])
    background = (slice(5, 20), slice(200, 250))  # smooth gradient: no lines
    assert np.abs(arr(out)[background] - arr(image)[background]).max() <= 1


def test_flatten_removes_texture_and_keeps_region_edges():
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.clip(arr(picture()) + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8))
    out = apply("flatten", image, colors=6)
    region = (slice(150, 220), slice(150, 220))
    assert arr(out)[region].std(axis=(0, 1)).mean() < arr(image)[region].std(axis=(0, 1)).mean() / 3
    assert len(np.unique(arr(out).reshape(-1, 3), axis=0)) <= 6
    # the rectangle's left edge (x = 140) stays within 2 px
    row = luma(out)[180]
    jump = int(np.argmax(np.abs(np.diff(row[120:160])))) + 120
    assert abs(jump - 139) <= 2


def test_exposure_saturation_temperature_hue():
    base = picture()
    assert luma(apply("exposure", stops=1)).mean() > luma(base).mean() + 15
    assert luma(apply("exposure", stops=-1)).mean() < luma(base).mean() - 15
    assert chroma(apply("saturation", amount=1)) > chroma(base) * 1.3
    assert chroma(apply("saturation", amount=-1)) < 1
    warm, cool = arr(apply("temperature", warmth=1)), arr(apply("temperature", warmth=-1))
    assert (warm[..., 0] - warm[..., 2]).mean() > (arr(base)[..., 0] - arr(base)[..., 2]).mean() + 20
    assert (cool[..., 0] - cool[..., 2]).mean() < (arr(base)[..., 0] - arr(base)[..., 2]).mean() - 20
    red = flat((230, 30, 30))
    h_before = np.asarray(red.convert("HSV"))[..., 0].mean()
    h_after = np.asarray(apply("hue_shift", red, degrees=120).convert("HSV"))[..., 0].mean()
    assert abs((h_after - h_before) % 256 - 256 / 3) < 3


def test_sharpen_and_blur_change_high_frequencies():
    base = picture()
    assert high_freq(apply("sharpen", amount=2)) > high_freq(base) * 1.2
    assert high_freq(apply("blur", radius=4)) < high_freq(base) * 0.7
    soft = apply("blur", radius=4, soft_focus=True)
    assert high_freq(apply("blur", radius=4)) < high_freq(soft) < high_freq(base)


def test_pixelate_makes_constant_blocks():
    out = arr(apply("pixelate", block=8))
    blocks = out.reshape(SIZE // 8, 8, SIZE // 8, 8, 3)
    assert blocks.std(axis=(1, 3)).max() == 0
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 20


def test_halftone_is_ink_dots_that_follow_darkness():
    out = luma(apply("halftone", cell=8))
    assert ((out < 10) | (out > 245)).mean() > 0.99
    cells = SIZE // 8
    ink = (out < 128).reshape(cells, 8, cells, 8).mean(axis=(1, 3))
    darkness = 1 - luma(picture()).reshape(cells, 8, cells, 8).mean(axis=(1, 3)) / 255
    assert np.corrcoef(ink.ravel(), darkness.ravel())[0, 1] > 0.85


def test_invert_and_vignette():
    assert np.array_equal(arr(apply("invert")), 255 - arr(picture()))
    image = flat(size=101)
    out = luma(apply("vignette", image, strength=0.8))
    assert out[50, 50] == pytest.approx(luma(image)[50, 50], abs=1)
    assert out[0, 0] < luma(image)[0, 0] - 40


def test_film_grain_is_seeded_noise():
    image = flat()
    a, b, c = (apply("film_grain", image, seed=s, amount=0.5) for s in (1, 1, 2))
    assert a.tobytes() == b.tobytes() != c.tobytes()
    assert luma(a).std() > 5 and abs(luma(a).mean() - luma(image).mean()) < 2


def test_bloom_brightens_around_bright_areas_only():
    image = Image.new("RGB", (128, 128), (20, 20, 20))
    ImageDraw.Draw(image).ellipse((54, 54, 74, 74), fill=(255, 255, 255))
    out = luma(apply("bloom", image, strength=1.5, threshold=0.5, radius=8))
    assert out[64, 80] > luma(image)[64, 80] + 10  # just outside the bright disc
    assert abs(out[5, 5] - luma(image)[5, 5]) <= 1  # far away


@pytest.mark.parametrize(
    ("params", "message"),
    [({"levels": 1}, "outside"), ({"levels": 2.5}, "whole number"), ({"colours": 3}, "no parameter colours")],
)
def test_bad_params_are_refused(params, message):
    with pytest.raises(CopierError, match=message):
        get_effect("posterize").apply(picture(), params)
    with pytest.raises(CopierError, match="unknown effect"):
        get_effect("sepia-ish")


def test_chain_round_trips_through_json_and_applies_in_order():
    chain = Chain.parse(["outline:thickness=3", "posterize:levels=4", "grayscale"])
    again = Chain.from_json(chain.to_json())
    assert again == chain and again.steps[0].params == {"thickness": 3, "darkness": 0.9, "sensitivity": 0.5}
    expected = apply("grayscale", apply("posterize", apply("outline", thickness=3), levels=4))
    assert chain.apply(picture()).tobytes() == expected.tobytes()
    with pytest.raises(CopierError, match="unknown effect"):
        Chain.from_json(json.dumps({"format": "copier-effects/1", "steps": [{"effect": "nope"}]}))
    with pytest.raises(CopierError, match="not valid JSON"):
        Chain.from_json("{")
    for shaped_wrong in ([{"effect": "outline"}], {"format": "copier-effects/1", "steps": [["outline"]]}):
        with pytest.raises(CopierError, match='must be JSON shaped as {"format": "copier-effects/1", "steps": '):
            Chain.from_json(json.dumps(shaped_wrong))  # not Python's "'list' object has no attribute 'get'"


def save(image, path, **kw):
    image.save(path, **kw)
    return path


def test_odd_inputs_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent over white
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert abs(to_rgb(half).getpixel((0, 0))[0] - 127) <= 1
    palette = picture().quantize(16)
    assert to_rgb(palette).mode == "RGB"
    wide = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert wide.mode.startswith("I;16") and to_rgb(wide).getpixel((0, 0)) == (255, 255, 255)
    mid = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert to_rgb(mid).getpixel((0, 0))[0] == 128
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    sixteen = save(Image.fromarray(np.full((4, 4), 65535, np.uint16)), tmp_path / "16.png")
    assert load_image(sixteen).getpixel((0, 0)) == (255, 255, 255)


def test_too_large_corrupt_and_bomb_files_are_refused(tmp_path):
    big = save(Image.new("L", (4097, 2)), tmp_path / "big.png")
    with pytest.raises(CopierError, match="4097x2 px; the largest side allowed is 4096"):
        load_image(big)
    with pytest.raises(CopierError, match="largest side"):
        to_rgb(Image.new("RGB", (2, 4097)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(save(picture(), io.BytesIO(), format="PNG").getvalue()[:300])
    with pytest.raises(CopierError, match="damaged or truncated"):
        load_image(broken)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(CopierError, match="not an image"):
        load_image(tmp_path / "text.png")
    with pytest.raises(CopierError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))
    with pytest.raises(CopierError, match="decompression bomb|largest side"):
        load_image(bomb)


def png_header(width, height):
    """A PNG that claims a huge size and holds no pixels: what a decompression bomb's header looks like."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_cli_apply_writes_output_preview_and_chain(tmp_path, capsys):
    source = save(picture(), tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert (
        main(["effects", "apply", str(source), str(out), "--effect", "outline:thickness=3", "--effect", "grayscale"])
        == 0
    )
    with Image.open(out) as written:
        recorded = Chain.from_json(written.info["copier_effects"])
        assert written.size == (SIZE, SIZE)
    preview = tmp_path / "out_preview.png"
    with Image.open(preview) as p:
        assert p.width > 2 * SIZE and p.height == SIZE
    assert recorded.steps[0].params["thickness"] == 3
    before = out.read_bytes()
    assert main(["effects", "apply", str(source), str(out), "--effect", "invert"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    chain_file = tmp_path / "chain.json"
    chain_file.write_text(recorded.to_json())
    again = tmp_path / "again.png"
    assert main(["effects", "apply", str(source), str(again), "--chain", str(chain_file)]) == 0
    assert arr(Image.open(again)).tobytes() == arr(Image.open(out)).tobytes()
    from_png = tmp_path / "from-png.webp"  # the PNG apply wrote is its own recipe
    assert main(["effects", "apply", str(source), str(from_png), "--chain", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["effects", "apply", str(source), str(tmp_path / "x.png"), "--chain", str(from_png)]) == 2
    assert "records no effect chain (effects apply writes one into the PNGs" in capsys.readouterr().err
    assert main(["effects", "apply", str(source), str(tmp_path / "x.png"), "--effect", "outline:thick=3"]) == 2
    assert "no parameter thick" in capsys.readouterr().err
    assert main(["effects", "list"]) == 0
    listed = capsys.readouterr().out
    assert "levels=4 (int 2..32)" in listed and "seed=0 (int 0..2147483647)" in listed  # not 0..2.14748e+09


@pytest.mark.parametrize("spec", ["blur:radius=nan", "sharpen:radius=inf", "grayscale:amount=nan"])
def test_nan_and_infinite_parameters_are_refused(spec):
    """NaN passes `value < min or value > max`; blur's kernel of NaN size crashed the process."""
    with pytest.raises(CopierError, match="must be a number, not (nan|inf)"):
        Chain.parse([spec])


def test_specs_chain_with_plus_as_copier_takes_them_and_a_parameter_given_twice_is_refused():
    assert [s.effect for s in Chain.parse(["posterize:levels=4+outline", "grayscale"]).steps] == [
        "posterize",
        "outline",
        "grayscale",
    ]
    for spec in ("grayscale+", "+outline", "grayscale++invert"):  # was "unknown effect 'grayscale+'", or ''
        with pytest.raises(CopierError, match="has a '\\+' without an effect on each side; chain effects as"):
            Chain.parse([spec])
    assert Chain.parse(["exposure:stops=+1+grayscale"]).steps[0].params["stops"] == 1.0  # a sign, not a chain
    with pytest.raises(CopierError, match="gives levels twice"):
        Chain.parse(["posterize:levels=4,levels=5"])
    with pytest.raises(CopierError, match="takes a whole number, not 'x'"):
        Chain.parse(["posterize:levels=x"])
    # Spaces around the words, as people type them, are not part of them (it said " grayscale  has no parameter …")
    assert Chain.parse([" outline : thickness = 3 , darkness= 0.5 + grayscale "]) == Chain.parse(
        ["outline:thickness=3,darkness=0.5+grayscale"]
    )
    with pytest.raises(CopierError, match="^grayscale has no parameter amout; it takes amount$"):
        Chain.parse([" grayscale : amout = 1"])


def test_cli_apply_refuses_bad_input_in_one_line_before_any_work(tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(source)
    binary = tmp_path / "chain.bin"
    binary.write_bytes(b"\x89PNG\xff\xfe\x00")
    (tmp_path / "taken.png").mkdir()
    cases = [
        ([str(tmp_path / "o.png"), "--effect", "blur:radius=nan"], "must be a number, not nan"),
        ([str(tmp_path / "o.png"), "--chain", str(binary)], "is not text"),
        ([str(tmp_path / "o.png")], "neither given"),
        ([str(tmp_path / "o.txt"), "--effect", "outline"], "must end in .png, .jpg or .webp"),
        ([str(tmp_path / "taken.png"), "--effect", "outline", "--overwrite"], "is a folder"),
        ([str(source / "o.png"), "--effect", "outline"], "is a file, not a folder"),
    ]
    for args, message in cases:
        assert main(["effects", "apply", str(source), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.bin", "in.png", "taken.png"]


def test_a_plus_before_a_number_is_its_sign_not_a_new_effect():
    chain = Chain.parse(["exposure:stops=+1+grayscale", "posterize:levels=3 + outline"])
    assert [(s.effect, s.params.get("stops")) for s in chain.steps] == [
        ("exposure", 1.0),
        ("grayscale", None),
        ("posterize", None),
        ("outline", None),
    ]


def test_cli_apply_takes_the_effect_chain_of_a_processed_lora(tmp_path, capsys):
    """A processed LoRA records the chain that made its processed image: the same effect applies to another image."""
    import torch
    from safetensors.torch import save_file

    chain = Chain.parse(["posterize:levels=3+outline:thickness=2"])
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1)}
    processed = tmp_path / "cat-posterize.safetensors"
    save_file(tensors, processed, metadata={"ss_copier_effects": chain.to_json()})
    copier = tmp_path / "cat-copier.safetensors"
    save_file(tensors, copier, metadata={"ss_copier_effects": ""})
    source = save(picture(), tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["effects", "apply", str(source), str(out), "--chain", str(processed)]) == 0
    assert arr(Image.open(out)).tobytes() == arr(chain.apply(Image.open(source))).tobytes()
    assert main(["effects", "apply", str(source), str(tmp_path / "o2.png"), "--chain", str(copier)]) == 2
    assert "records no effect chain: only the processed LoRAs" in capsys.readouterr().err
    assert not (tmp_path / "o2.png").exists()
