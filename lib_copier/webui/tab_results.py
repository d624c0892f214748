"""What the tab shows of a run: its sentences, its results and grids, and the prompt Send to txt2img sends."""

from __future__ import annotations

import json
from html import escape

import gradio as gr
from PIL import Image

from lib_copier.infotext import with_lora

RUNNING = "A training started on this page is still running: wait for its end, or press Interrupt."
WITHDRAWN = "Interrupted while it waited for its turn: nothing was trained."
DRAWING = "Drawing… (after the generation or training the WebUI is busy with, if there is one)"


def said(sentence: str) -> str:
    """A sentence the tab shows in place of a result: a refusal, an interrupt, a run that cannot start now."""
    return f"<p class='copier-lora-error'>{escape(sentence)}</p>"


BUSY = (
    "Another Copier LoRA run is going (from the HTTP API or another page): the image is loaded; press Train to run "
    "after it."
)


def results_html(results: list[dict]) -> str:
    rows = "".join(
        f"<li><b>{escape(r['name'])}</b> ({r['kind']}{', ' + escape(r['effect']) if r['effect'] else ''}): "
        f"{r['steps']} steps in {r['seconds']} s, seed {r['seed']} — <code>{escape(r['lora'])}</code></li>"
        for r in results
    )
    return f"<ul>{rows}</ul>"


def result_outputs(results: list[dict]) -> tuple:
    """The grids, the results Send reads, and the choice of LoRA to send (the last one trained)."""
    names = [r["name"] for r in results]
    grids = [(Image.open(r["grid"]), r["name"]) for r in results if r["grid"]]  # none for a LoRA an interrupt kept
    return grids, json.dumps(results), gr.update(choices=names, value=names[-1] if names else None)


def txt2img_prompt(prompt: str, results: list[dict], pick: str) -> str:
    """What "Send to txt2img" puts in txt2img's prompt box, and nothing else there changes (the WebUI's infotext
    paste would empty the negative prompt and set Clip skip): the prompt with the chosen LoRA at weight 1 (the tag
    alone joins the prompt there: copierLoraSend)."""
    chosen = next((r for r in results if r["name"] == pick), results[0] if results else None)
    return with_lora(prompt, chosen["name"], 1.0) if chosen else prompt
