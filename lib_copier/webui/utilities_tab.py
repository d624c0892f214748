"""The Utilities sub-tab: merge, SVD-merge, resize and extract over the WebUI's LoRA and checkpoint files."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from lib_copier.errors import CopierError, shown
from lib_copier.lora.ops import DYNAMIC_METHODS
from lib_copier.webui.lora_tools import DEFAULT_PRECISION, PRECISIONS


def _numbers(text: str, count: int) -> list[float] | None:
    """The ratios typed for `count` LoRAs, apart by spaces or commas."""
    try:
        numbers = [float(x) for x in text.replace(",", " ").split()] or None
    except ValueError as exc:
        raise CopierError(f"ratios must be numbers, not {shown(text)}") from exc
    if numbers and len(numbers) != count and "," in text:
        raise CopierError(
            f"{count} LoRA(s) but {len(numbers)} ratios in {shown(text)}: a comma separates two ratios, so write a "
            "decimal with a point (0.5)"
        )
    return numbers


def tool_body(
    tool: str, loras, checkpoint, original, tuned, ratios, rank, conv_rank, clamp, dynamic, dynamic_param, precision,
    out,
):  # fmt: skip
    """The form's values → the body of the tool's request (the same as the HTTP API's)."""
    body: dict = {"out": out.strip() if isinstance(out, str) else out, "precision": precision}  # as Train's name
    if tool != "extract" and not loras:
        raise CopierError("pick a LoRA" + (" or more" if tool != "resize" else ""))
    if tool == "extract" and not (original and tuned):
        raise CopierError("pick the Original and the Tuned checkpoint")
    if tool != "merge" and rank is None:  # an emptied number box
        raise CopierError("give a Rank")
    if tool in ("merge", "svd-merge"):
        body["loras"] = list(loras)
        body["ratios"] = _numbers(ratios or "", len(loras))
        if tool == "merge" and checkpoint:
            body["checkpoint"] = checkpoint
    if tool == "resize":
        body["lora"] = loras[0]
    if tool == "extract":
        body["original"], body["tuned"] = original, tuned
    if tool != "merge":
        body["rank"] = rank
        body["conv_rank"] = conv_rank or None
    if tool in ("svd-merge", "extract") and clamp is False:
        body["clamp_quantile"] = 1.0  # no clamp; the default is kohya's
    if tool == "resize" and dynamic != "none":
        body["dynamic_method"], body["dynamic_param"] = dynamic, dynamic_param
    return {k: v for k, v in body.items() if v is not None}


def result_text(run_tool: Callable[[str, dict], dict], tool: str, *values) -> str:
    """What the Result box shows: the tool's own lines, its "wrote <path> (<n> modules)" among them; or the error."""
    try:
        return run_tool(tool, tool_body(tool, *values))["log"]
    except CopierError as exc:
        return f"error: {exc}"


# Each tool: what it does, and the form's fields it reads (the others are hidden while it is chosen).
TOOLS = {
    "merge": (
        "LoRAs added at their ratios into one LoRA, exactly (the ranks add up); or into a checkpoint",
        {"lora_files", "ratios", "checkpoint"},
    ),
    "svd-merge": (
        "LoRAs added at their ratios, then brought to one rank by SVD",
        {"lora_files", "ratios", "rank", "conv_rank", "clamp"},
    ),
    "resize": (
        "a LoRA brought to a lower rank by SVD: one rank for all modules, or one per module (dynamic)",
        {"lora_files", "rank", "conv_rank", "dynamic", "dynamic_param"},
    ),
    "extract": (
        "a LoRA from the difference between two checkpoints (tuned minus original)",
        {"original", "tuned", "rank", "conv_rank", "clamp"},
    ),
}
FIELDS = (
    "lora_files", "ratios", "checkpoint", "original", "tuned", "rank", "conv_rank", "clamp", "dynamic", "dynamic_param"
)  # fmt: skip
# What a conv rank of 0 does: the merges and resize bring 3x3 convs to the Rank; extract, like kohya's, leaves the
# ResNet layers (3x3 convs among them) and the samplers out.
CONV_LABELS = {"extract": "Conv rank (0: no ResNet layers, as kohya's default)"}
CONV_LABEL = "Conv rank of 3x3 convs (0: the Rank)"
# Each dynamic method's parameter as the form first offers it: sv_ratio's is a ratio of singular values (at least 1),
# the others a share (at most 1).
DYNAMIC_PARAMS = {"sv_ratio": 4.0, "sv_fro": 0.9, "sv_cumulative": 0.9}
WORKING = "Working… (after the generation or training the WebUI is busy with, if there is one)"


def shown_fields(tool: str, dynamic: str = "none") -> tuple[str, dict[str, bool]]:
    """The tool's description, and which of `FIELDS` the form shows for it (the dynamic parameter with a method)."""
    text, used = TOOLS[tool]
    shown = {name: name in used for name in FIELDS}
    shown["dynamic_param"] &= dynamic != "none"
    return f"**{tool}**: {text}.", shown


def build_utilities(
    tab, run_tool: Callable[[str, dict], dict], loras: Callable[[], list[str]], checkpoints: Callable[[], list[str]]
):
    """Inside the open gr.Tab `tab`: the form, run through `run_tool(tool, body)`; its lists are read again each time
    the tab is opened. Returns the Run button's event, which ends once the lists show what it wrote."""
    text, visible = shown_fields("merge")
    tool = gr.Radio(list(TOOLS), value="merge", label="Tool")
    about = gr.Markdown(text)
    with gr.Row():
        lora_files = gr.Dropdown(
            loras(), multiselect=True, label="LoRAs (resize: the first)", visible=visible["lora_files"]
        )
        refresh = gr.Button("Refresh lists")
    ratios = gr.Textbox(label="Ratios, one per LoRA (negative subtracts)", placeholder="1 1", visible=visible["ratios"])
    with gr.Row():
        checkpoint = gr.Dropdown(
            [""] + checkpoints(), value="", label="Merge into this checkpoint (optional)", visible=visible["checkpoint"]
        )
        original = gr.Dropdown(checkpoints(), label="Original checkpoint", visible=visible["original"])
        tuned = gr.Dropdown(checkpoints(), label="Tuned checkpoint", visible=visible["tuned"])
    with gr.Row():
        rank = gr.Number(8, label="Rank", precision=0, visible=visible["rank"])
        conv_rank = gr.Number(0, label=CONV_LABEL, precision=0, visible=visible["conv_rank"])
        clamp = gr.Checkbox(
            True, label="kohya's clamp (off: the best approximation of the rank)", visible=visible["clamp"]
        )
        dynamic = gr.Dropdown(
            ["none", *DYNAMIC_METHODS], value="none", label="Dynamic resize",
            visible=visible["dynamic"],
        )  # fmt: skip
        dynamic_param = gr.Number(DYNAMIC_PARAMS["sv_fro"], label="Dynamic parameter", visible=False)
    with gr.Row():
        out = gr.Textbox(label="Output name (written as <name>.safetensors)")
        precision = gr.Dropdown(list(PRECISIONS), value=DEFAULT_PRECISION, label="Save precision (fp16: half the file)")
    go = gr.Button("Run", variant="primary", elem_id="copier_lora_utilities_run")
    log = gr.Textbox(label="Result", lines=4, interactive=False)

    fields = [lora_files, ratios, checkpoint, original, tuned, rank, conv_rank, clamp, dynamic, dynamic_param]

    def choose(chosen: str, method: str):
        text, shown = shown_fields(chosen, method)
        updates = {name: gr.update(visible=shown[name]) for name in FIELDS}
        updates["conv_rank"] = gr.update(visible=shown["conv_rank"], label=CONV_LABELS.get(chosen, CONV_LABEL))
        return [text, *updates.values()]

    tool.change(choose, [tool, dynamic], [about, *fields])

    def method_chosen(chosen: str, method: str):
        return gr.update(visible=shown_fields(chosen, method)[1]["dynamic_param"], value=DYNAMIC_PARAMS.get(method))

    dynamic.change(method_chosen, [tool, dynamic], [dynamic_param])
    lists = [lora_files, checkpoint, original, tuned]

    def listed():
        names = checkpoints()
        return [gr.update(choices=loras()), gr.update(choices=[""] + names), *(gr.update(choices=names),) * 2]

    def run(*values):  # said at once: a run waits for the WebUI's current generation or training
        yield [WORKING, *(gr.update() for _ in lists)]
        yield [result_text(run_tool, *values), *listed()]

    form = [tool, lora_files, checkpoint, original, tuned, ratios, rank, conv_rank, clamp, dynamic, dynamic_param]
    form += [precision, out]
    refresh.click(listed, [], lists)
    tab.select(listed, [], lists)  # the lists were the WebUI's start's: LoRAs trained since were missing
    return go.click(run, form, [log, *lists])
