"""What the Copier LoRA tab's form means: its ticked effects as chain specs, the `TrainRequest` it makes, and the
names its sentences give its boxes."""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import Image

from lib_copier.effects.image_io import read_image, to_rgb
from lib_copier.effects.registry import all_effects
from lib_copier.errors import CopierError
from lib_copier.fields import quoted
from lib_copier.infotext import Infotext, image_infotext
from lib_copier.names import slug
from lib_copier.recipes.job import method_config
from lib_copier.recipes.processed import make_effects
from lib_copier.recipes.request import DEFAULT_GRID_PROMPTS, DEFAULT_GRID_STEPS, TrainRequest

# Sentences name these boxes by their label, not by the API's field ('"Training size" is -64; …').
FIELD_LABELS = {"size": "Training size", "grid_steps": "Grid sampling steps", "steps": "Steps", "cfg": "CFG scale"}
FIELD_LABELS |= dict.fromkeys(("width", "height"), "Width and height")
FIELD_LABELS["caption"] = "Prompt in the image's parameters"  # the training caption, which the tab has no box for


def labelled(field: str) -> str:
    return f'"{FIELD_LABELS[field]}"' if field in FIELD_LABELS else quoted(field)


def effect_specs(selected: list[str], values: dict[str, float]) -> list[list[str]]:
    """Ticked effects (by label) with their parameter values → one chain spec per effect."""
    specs = []
    for effect in all_effects():
        if effect.label in selected:
            given = [(p.name, values.get(f"{effect.name}.{p.name}")) for p in effect.params]
            params = ",".join(f"{key}={value}" for key, value in given if value is not None)
            specs.append([f"{effect.name}:{params}" if params else effect.name])
    return specs


def default_name(image: Image.Image | None) -> str:
    """From the image's prompt; the effect is added by each result's own file name (`<name>-<effect>`)."""
    info = image_infotext(image) if image is not None else None
    return (slug(info.prompt, 24) if info and info.prompt else "") or "copier"


def build_request(
    image,
    name,
    selected,
    values,
    edited,
    method,
    preset,
    settings,
    save_on_interrupt,
    grid_prompts,
    size=0,
    grid_steps=DEFAULT_GRID_STEPS,
    more=(),
):
    if image is None:
        raise CopierError("there is no original image: upload one, take one from a gallery, or generate one")
    more_images = [read_image(_path(f), _more_label(f)) for f in more or ()]
    edits = [("edited", to_rgb(edited, "your edit"))] if edited is not None else []
    effects = make_effects(effect_specs(selected, values), edits)
    caption = (image_infotext(image) or Infotext("")).prompt
    return TrainRequest(
        image=to_rgb(image, "the original"),
        name=name.strip() or default_name(image),
        effects=effects,
        method=method,
        preset=preset,
        overrides=form_overrides(method, preset, settings),
        caption=caption,
        grid_prompts=[p for p in grid_prompts.splitlines() if p.strip()] or list(DEFAULT_GRID_PROMPTS),
        save_on_interrupt=save_on_interrupt,
        size=int(size) if size else None,  # 0, or an emptied number box (None): the model's native side
        grid_steps=DEFAULT_GRID_STEPS if grid_steps is None else int(grid_steps),  # 0 is refused, not replaced
        more_images=more_images,
    )


def _path(file) -> str:
    """A gr.File item's path: a temp-file object on gradio 3, a path string on gradio 4."""
    return getattr(file, "name", file)


def _more_label(file) -> str:
    return f"original {Path(_path(file)).name}"


def form_overrides(method: str, preset: str, settings: dict) -> dict:
    """Advanced's values where they differ from what the method and preset set (an emptied box keeps theirs)."""
    defaults = method_config(method, preset, {})
    return {k: v for k, v in settings.items() if v is not None and v != getattr(defaults, k)}


def more_sizes(more) -> list[tuple[str, tuple[int, int]]]:
    """Each of "More originals" by its name in the tab's sentences, with its size; each file is read (and refused as
    Train refuses it) once, not at each change of the form."""
    return [(_more_label(f), _image_size(_path(f))) for f in more or ()]


@functools.lru_cache(maxsize=64)
def _image_size(path: str) -> tuple[int, int]:  # gradio gives each upload a path of its own
    return read_image(path, _more_label(path)).size
