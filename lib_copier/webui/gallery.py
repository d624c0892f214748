"""The Copier LoRA button under the txt2img and img2img galleries, and reading the image it was clicked for.

A1111 fires `after_component` for every component; the button goes in after the last of the image buttons, while
that row is still open, and the gallery and its generation info are remembered for the tab to wire the click.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from PIL import Image

from lib_copier.errors import CopierError, sentence
from lib_copier.infotext import image_infotext, parse_infotext

LAST_BUTTON = {"txt2img_upscale": "txt2img", "img2img_send_to_extras": "img2img"}
galleries: dict[str, list] = {}  # tab → [gallery, generation info, button], filled as the WebUI builds its UI


def remember(component, elem_id: str | None) -> None:
    if elem_id in ("txt2img_gallery", "img2img_gallery"):
        galleries.setdefault(elem_id.split("_")[0], [None, None, None])[0] = component
    elif elem_id in ("generation_info_txt2img", "generation_info_img2img"):
        galleries.setdefault(elem_id.rsplit("_", 1)[1], [None, None, None])[1] = component
    elif elem_id in LAST_BUTTON:
        from modules.ui_components import ToolButton

        tab = LAST_BUTTON[elem_id]
        button = ToolButton("🧬", elem_id=f"copier_lora_from_{tab}", tooltip="Train a Copier LoRA on this image")
        galleries.setdefault(tab, [None, None, None])[2] = button


def complete() -> dict[str, tuple]:
    """The galleries whose gallery, info and button all exist."""
    return {tab: tuple(parts) for tab, parts in galleries.items() if all(p is not None for p in parts)}


def _path(item) -> str | None:
    """A gallery item's file on gradio 3 ({"name": path}) and gradio 4 ((path, caption) or {"image": {"path"}})."""
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):
        inner = item.get("image", item)
        return inner.get("path") or inner.get("name") if isinstance(inner, dict) else inner
    return item if isinstance(item, str) else None


def open_item(item) -> Image.Image:
    """A gallery item's image file (gradio 3 adds a `?timestamp` to the name to defeat caches)."""
    path = _path(item)
    if path is None:
        raise CopierError("the gallery's image could not be read")
    return Image.open(path.split("?", 1)[0])


def take(gallery, generation_info: str, selected: str, tab: str, load: Callable | None = None):
    """A "From txt2img" or 🧬 click: (the image, its description), or a gradio error with the sentence, which also
    stops the training the 🧬 button chains to it. `selected` is the page's {"txt2img": index, "img2img": index} of
    each gallery's selected thumbnail (-1: none)."""
    import gradio as gr

    try:
        index = json.loads(selected).get(tab, -1)
    except (ValueError, TypeError, AttributeError):
        index = -1
    try:
        image = selected_image(gallery, generation_info, index, load or open_item)
    except CopierError as exc:
        raise gr.Error(str(exc)) from None
    return image, describe_image(image)


def describe_image(image: Image.Image | None) -> str:
    if image is None:
        return ""
    info = image_infotext(image)
    if info is None:
        return f"{image.width}x{image.height}, no generation parameters"
    seed, size = info.params.get("Seed", "?"), info.params.get("Size", f"{image.width}x{image.height}")
    return f"{info.prompt}\nseed {seed}, size {size}"


def selected_image(gallery, generation_info: str, index, load: Callable = open_item) -> Image.Image:
    """The gallery's selected image (if none is, or the batch's grid is, its first image), with its infotext as PNG
    `parameters`.

    In the WebUI `load` is its own `image_from_url_text`, which also refuses files outside its output folders."""
    items = list(gallery or [])
    if not items:
        raise CopierError("the gallery is empty; generate an image first")
    info = {}
    try:
        info = json.loads(generation_info or "{}")
    except json.JSONDecodeError:
        pass
    info = info if isinstance(info, dict) else {}
    try:
        index = int(float(index))
    except (TypeError, ValueError):
        index = -1
    first = info.get("index_of_first_image", 0)
    first = first if isinstance(first, int) and 0 <= first < len(items) else 0
    index = index if first <= index < len(items) else first  # the batch's grid, shown selected after generating: not it
    try:
        image = load(items[index])
        if image is None:
            raise OSError("no image")
        image.load()
    except (OSError, AssertionError) as exc:  # moved or deleted since, or outside the WebUI's output folders
        raise CopierError(f"the gallery's image could not be read ({sentence(exc)}); generate it again") from exc
    texts = info.get("infotexts", [])
    texts = texts if isinstance(texts, list) else []
    if index < len(texts) and texts[index] and parse_infotext(texts[index]).prompt is not None:
        image.info["parameters"] = texts[index]
    return image.convert("RGB") if image.mode != "RGB" else image
