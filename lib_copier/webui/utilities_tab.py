"""The Utilities sub-tab: merge, SVD-merge, resize and extract over the WebUI's LoRA and checkpoint files."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from lib_copier.errors import CopierError, shown


def _numbers(text: str) -> list[float] | None:
    try:
        return [float(x) for x in text.replace(",", " ").split()] or None
    except ValueError as exc:
        raise CopierError(f"ratios must be numbers, not {shown(text)}") from exc


def tool_body(tool: str, loras, checkpoint, original, tuned, ratios, rank, conv_rank, dynamic, dynamic_param, out):
    """The form's values → the body of the tool's request (the same as the HTTP API's)."""
    body: dict = {"out": out}
    if tool in ("merge", "svd-merge"):
        body["loras"] = list(loras or [])
        body["ratios"] = _numbers(ratios or "")
        if tool == "merge" and checkpoint:
            body["checkpoint"] = checkpoint
    if tool == "resize":
        body["lora"] = (loras or [None])[0]
    if tool == "extract":
        body["original"], body["tuned"] = original, tuned
    if tool != "merge":  # an emptied number box reads None: left out, so the check says that it is required
        body["rank"] = rank
        body["conv_rank"] = conv_rank or None
    if tool == "resize" and dynamic != "none":
        body["dynamic_method"], body["dynamic_param"] = dynamic, dynamic_param
    return {k: v for k, v in body.items() if v is not None}


def result_text(run_tool: Callable[[str, dict], dict], tool: str, *values) -> str:
    """What the Result box shows: the tool's own lines, its "wrote <path> (<n> modules)" among them; or the error."""
    try:
        return run_tool(tool, tool_body(tool, *values))["log"]
    except CopierError as exc:
        return f"error: {exc}"


def build_utilities(
    run_tool: Callable[[str, dict], dict], loras: Callable[[], list[str]], checkpoints: Callable[[], list[str]]
) -> None:
    """Inside an open gr.Tab: the form, run through `run_tool(tool, body)`."""
    tool = gr.Radio(["merge", "svd-merge", "resize", "extract"], value="merge", label="Tool")
    with gr.Row():
        lora_files = gr.Dropdown(loras(), multiselect=True, label="LoRAs (resize: the first)")
        refresh = gr.Button("Refresh lists")
    ratios = gr.Textbox(label="Ratios, one per LoRA (merge, svd-merge; negative subtracts)", placeholder="1 1")
    with gr.Row():
        checkpoint = gr.Dropdown([""] + checkpoints(), value="", label="Merge into this checkpoint (optional)")
        original = gr.Dropdown(checkpoints(), label="Extract: original checkpoint")
        tuned = gr.Dropdown(checkpoints(), label="Extract: tuned checkpoint")
    with gr.Row():
        rank = gr.Number(8, label="Rank (svd-merge, resize, extract)", precision=0)
        conv_rank = gr.Number(0, label="Conv rank (0: none)", precision=0)
        dynamic = gr.Dropdown(["none", "sv_ratio", "sv_fro", "sv_cumulative"], value="none", label="Dynamic resize")
        dynamic_param = gr.Number(0.9, label="Dynamic parameter")
    out = gr.Textbox(label="Output name (written as <name>.safetensors)")
    go = gr.Button("Run", variant="primary", elem_id="copier_lora_utilities_run")
    log = gr.Textbox(label="Result", lines=4, interactive=False)

    form = [tool, lora_files, checkpoint, original, tuned, ratios, rank, conv_rank, dynamic, dynamic_param, out]
    go.click(lambda *values: result_text(run_tool, *values), form, [log])
    refresh.click(
        lambda: (gr.update(choices=loras()), gr.update(choices=[""] + checkpoints()),
                 gr.update(choices=checkpoints()), gr.update(choices=checkpoints())),
        [], [lora_files, checkpoint, original, tuned],
    )  # fmt: skip
