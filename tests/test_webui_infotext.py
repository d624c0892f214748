"""Reading and writing A1111 generation parameters, and the prompt sent to txt2img."""

import io
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from lib_copier.infotext import Infotext, build_infotext, image_infotext, parse_infotext, with_lora

DATA = Path(__file__).parent / "data"
WEBUI_TEXT = (
    "a cat, (masterpiece:1.2),\nsitting on a chair\n"
    "Negative prompt: blurry, lowres\nugly\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "cute: 1a2b3c, other: 4d5e6f", Version: v1.10.1'
)


def test_a_webui_infotext_is_parsed():
    info = parse_infotext(WEBUI_TEXT)
    assert info.prompt == "a cat, (masterpiece:1.2),\nsitting on a chair"
    assert info.negative == "blurry, lowres\nugly"
    assert (info.seed, info.steps, info.cfg, info.size) == (3141592, 28, 6.5, (512, 768))
    assert info.params["Sampler"] == "DPM++ 2M" and info.params["Lora hashes"] == "cute: 1a2b3c, other: 4d5e6f"
    assert info.params["Version"] == "v1.10.1"


@pytest.mark.parametrize(
    "text, prompt, negative",
    [
        ("just a prompt, with commas, and more", "just a prompt, with commas, and more", ""),
        ("style: anime, a cat", "style: anime, a cat", ""),
        ("", "", ""),
        ("Negative prompt: only negative\nSteps: 5, Seed: 1, Size: 64x64", "", "only negative"),
    ],
)
def test_texts_without_a_full_parameter_line_stay_prompts(text, prompt, negative):
    info = parse_infotext(text)
    assert (info.prompt, info.negative) == (prompt, negative)


def test_building_and_parsing_round_trip_with_awkward_values():
    info = Infotext("a dog\non grass", "bad", {"Steps": "20", "Seed": "7", "Size": "64x64", "Note": 'a, "b": c'})
    again = parse_infotext(build_infotext(info))
    assert again == info
    assert parse_infotext(build_infotext(Infotext("x", "", {}))).prompt == "x"


def test_the_png_parameters_chunk_is_read_and_other_images_have_none():
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", WEBUI_TEXT)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=chunk)
    info = image_infotext(Image.open(io.BytesIO(buffer.getvalue())))
    assert info is not None and info.seed == 3141592
    assert image_infotext(Image.new("RGB", (8, 8))) is None


@pytest.mark.parametrize("suffix", ["jpg", "webp"])
def test_the_exif_user_comment_of_the_webuis_jpeg_and_webp_files_is_read(suffix):
    """A1111 and Forge save JPEG and WebP images with their parameters in EXIF UserComment (UTF-16, as these files,
    written by A1111's own code, have them); the tab read only PNGs' and showed "no generation parameters"."""
    image = Image.open(DATA / f"infotext.{suffix}")
    params = {"Steps": "20", "Sampler": "Euler", "Seed": "42", "Size": "16x16"}
    for seen in (image, image.convert("RGB")):  # as the file, and as gradio hands it over
        assert image_infotext(seen) == Infotext("a red fox, (snow:1.2) 雪 🦊", "blurry", params)
    broken = Image.new("RGB", (8, 8))
    broken.info["exif"] = b"Exif\0\0not a tiff header"
    assert image_infotext(broken) is None


def test_the_lora_tag_is_added_once():
    assert with_lora("a cat", "cat-grayscale") == "a cat <lora:cat-grayscale:1>"
    assert with_lora("a cat <lora:cat-grayscale:0.5>", "cat-grayscale", 1.5) == "a cat <lora:cat-grayscale:1.5>"
    assert with_lora("<lora:other:1> a cat", "mine", -1) == "<lora:other:1> a cat <lora:mine:-1>"
    assert with_lora("", "mine") == "<lora:mine:1>"
