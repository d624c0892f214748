"""One training request, as the tab, the HTTP API and the gallery button make it, checked completely before any work.

Every field carries its help and limits (`lib_copier.fields`); `check_request` adds the rules between fields. The
API reads the same type from JSON (`request_from_json`), so its /docs schema, its checks and the tab's are one.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from dataclasses import dataclass

from PIL import Image

from lib_copier.effects.chain import split_specs
from lib_copier.effects.image_io import read_image
from lib_copier.errors import CopierError, shown
from lib_copier.fields import Name, from_json, quoted, setting
from lib_copier.fields import check as check_fields
from lib_copier.models.generate import MAX_PROMPT, MAX_STEPS, Txt2Img
from lib_copier.names import slug
from lib_copier.recipes.job import method_config, output_names
from lib_copier.recipes.kinds import DEFAULT_METHOD, METHODS
from lib_copier.recipes.processed import Effect, check_pairs, make_effects
from lib_copier.recipes.prompts import GRID_PROMPTS
from lib_copier.recipes.sizes import check_fits
from lib_copier.train.config import PRESETS

DEFAULT_GRID_PROMPTS = GRID_PROMPTS[:2]
DEFAULT_GRID_STEPS = 20
MAX_IMAGE_BYTES = 64 * 2**20  # of base64 text: a 4096-px PNG fits several times over
MAX_MORE_IMAGES = 15
_URL_SAFE = str.maketrans("-_", "+/")


def decode_image(data: str, what: str = '"image"') -> Image.Image:
    """A base64 image (a `data:image/...;base64,` prefix allowed) → RGB, or one sentence saying what is wrong."""
    if len(data) > MAX_IMAGE_BYTES:
        raise CopierError(f"{what} is {len(data) // 2**20} MB of base64; the most allowed is 64 MB")
    if data[:5].lower() == "data:":
        data = data.partition(",")[2]
    # As `base64` and encoders wrap it (lines, spaces), or URL-safe and unpadded; any other character is refused.
    data = "".join(data.split()).translate(_URL_SAFE)
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CopierError(f"{what} is not valid base64") from exc
    return read_image(io.BytesIO(raw), what)


def decode_images(items: list) -> list[Image.Image]:
    """Further originals, each base64 like "image"."""
    if not all(isinstance(item, str) for item in items):
        raise CopierError('"more_images" must be a list of base64 images')
    if len(items) > MAX_MORE_IMAGES:  # before decoding any of them
        raise CopierError(f'"more_images" has {len(items)} items; it must have at most {MAX_MORE_IMAGES}')
    return [decode_image(item, f'"more_images"[{i}]') for i, item in enumerate(items)]


def parse_effects(specs: list) -> list[Effect]:
    """Effect chains as strings like "outline:thickness=3+grayscale" or lists of steps."""
    chains = []
    for spec in specs:
        if isinstance(spec, str):
            chains.append(split_specs(spec))
        elif isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec):
            chains.append(spec)
        else:
            raise CopierError(f'each of "effects" is a string like "outline:thickness=3+grayscale", not {shown(spec)}')
    return make_effects(chains)


@dataclass
class TrainRequest:
    image: Image.Image | None = setting(
        None,
        "the original image, base64 PNG, JPEG or WebP (a data: URL is fine); or give generate",
        decode=decode_image,
        json_type=str,
    )
    more_images: list[Image.Image] = setting(
        factory=list,
        help="further originals, base64 like image: each effect LoRA is learned over all of them (merged by SVD)",
        hi=MAX_MORE_IMAGES,
        decode=decode_images,
        json_type=list,
    )
    name: str = setting("", "output name; the files are <name>-copier, <name>-<effect> ... (default: from the prompt)")
    generate: Txt2Img | None = setting(None, "draw the original with the loaded model instead of giving image")
    effects: list[Effect] = setting(
        factory=list,
        help='effect chains, e.g. ["grayscale", "outline:thickness=3+posterize:levels=4"]; one LoRA per chain',
        hi=16,
        decode=parse_effects,
        json_type=list,
    )
    method: str = setting(
        DEFAULT_METHOD,
        "addift or slider (the pair methods), copier, extraction, or both (copier and extraction); all but copier "
        "need an effect",
        choices=METHODS,
    )
    preset: str = setting("quick", "trainer preset", choices=tuple(PRESETS))
    overrides: dict = setting(factory=dict, help='trainer settings over the preset, e.g. {"steps": 200}')
    caption: str = setting("", "training caption; its <lora:…> tags are left out, as txt2img does", hi=MAX_PROMPT)
    prompt_pool: int = setting(32, "varied prompts mixed with the caption; 0: the caption only", 0, 1024)
    size: int | None = setting(None, "the side the image is trained at, about size² pixels (default: native)", 64, 2048)
    grid_prompts: list[str] = setting(
        factory=lambda: list(DEFAULT_GRID_PROMPTS),
        help="one strength-grid row per prompt",
        lo=1,
        hi=8,
        item_hi=MAX_PROMPT,
    )
    grid_steps: int = setting(DEFAULT_GRID_STEPS, "sampling steps of each grid image", 1, MAX_STEPS)
    grid_seed: int = setting(0, "seed of the grid images", 0, 2**32 - 1)
    save_on_interrupt: bool = setting(False, "an interrupted run keeps what it trained so far")


def check_request(request: TrainRequest, name: Name = quoted) -> TrainRequest:
    """The request itself, or one sentence naming what is wrong: field types and limits (each field called as `name`
    says: the tab names its boxes), then the rules between fields. Nothing here touches a model, a file or a lock."""
    check_fields(request, name)
    if (request.image is None) == (request.generate is None):
        raise CopierError('give either "image" or "generate", not both or neither')
    if request.method != "copier" and not request.effects:
        raise CopierError(f'method "{request.method}" needs at least one effect in "effects"')
    output_names(request.name, request.method, [effect.label for effect in request.effects])  # and the name itself
    if "save_on_cancel" in request.overrides:  # the job sets it from save_on_interrupt: one name for one thing
        raise CopierError('set "save_on_interrupt" instead of the trainer setting "save_on_cancel"')
    # unknown settings, values out of range, and the rules between them, on what the method trains with
    method_config(request.method, request.preset, request.overrides)
    if request.image is not None:
        check_pairs(request.effects, [request.image, *request.more_images])
    return request


def check_originals_fit(request: TrainRequest, model_side: int, name: Name = quoted) -> None:
    """Each original, given or to be generated, can train at the request's size on a model of native side
    `model_side` (`check_fits`): said before the job waits for its turn and draws the original."""
    given = [("the original", request.image.size)] if request.image is not None else []
    if request.generate is not None:
        width, height = request.generate.width, request.generate.height
        given.append((f"the original {name('generate')} asks for", (width or model_side, height or model_side)))
    given += [(f"{name('more_images')}[{i}]", image.size) for i, image in enumerate(request.more_images)]
    check_fits(given, request.size, model_side)


def request_from_json(body, default_name: str = "copier") -> TrainRequest:
    """POST /train's JSON → a checked request; the name defaults to one made from the prompt."""
    request = from_json(TrainRequest, body)
    if not request.name:
        prompt = request.generate.prompt if request.generate else ""
        request = dataclasses.replace(request, name=slug(prompt, 30) or default_name)
    return check_request(request)
