"""The Copier LoRA tab: source image, effects, method and settings, training with progress, results.

Works on gradio 3.41 (A1111 1.10) and gradio 4: components take constructor arguments only, and event JS goes
through `_on` (gradio 3's `_js`, gradio 4's `js`). The host's pieces (queue lock, bar, paste) come in through `Hooks`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr
from PIL import Image

from lib_copier.effects.image_io import to_rgb
from lib_copier.effects.registry import all_effects
from lib_copier.errors import CopierError, reported
from lib_copier.fields import check, check_field
from lib_copier.infotext import Infotext, build_infotext
from lib_copier.models.generate import Txt2Img
from lib_copier.recipes.estimate import describe_run
from lib_copier.recipes.job import RECIPE_PRESETS, method_config
from lib_copier.recipes.kinds import DEFAULT_METHOD, METHODS
from lib_copier.recipes.processed import make_effects
from lib_copier.recipes.request import DEFAULT_GRID_PROMPTS, DEFAULT_GRID_STEPS, TrainRequest, check_request
from lib_copier.seeds import RANDOM, fixed_seed
from lib_copier.train.config import PRESETS, field_info
from lib_copier.webui.gallery import describe_image
from lib_copier.webui.gallery import take as gallery_take
from lib_copier.webui.jobs import JobState
from lib_copier.webui.tab_form import build_request, default_name, effect_specs, form_overrides, labelled, more_sizes
from lib_copier.webui.tab_results import (
    BUSY,
    DRAWING,
    RUNNING,
    WITHDRAWN,
    result_outputs,
    results_html,
    said,
    txt2img_prompt,
)
from lib_copier.webui.turns import PageRuns
from lib_copier.webui.utilities_tab import build_utilities


@dataclass
class Hooks:
    run: Callable[[TrainRequest, JobState], list[dict]]  # trains on the host; blocks until done
    # the host's queue lock and progress (wrap_gradio_gpu_call); a call given up (task id) stops waiting for its turn
    wrap: Callable[[Callable, Callable[[str], bool]], Callable] = lambda fn, given_up: fn
    galleries: dict = field(default_factory=dict)  # tab name → (gallery, generation info, button), from gallery.py
    gallery_trains: Callable[[], bool] = lambda: True
    busy: Callable[[], bool] = lambda: False  # a Copier LoRA run is going or queued: an API job, another page's run
    # Marks a task id the page's progress bar polls as ended, where its run never entered the queue: the bar (and
    # Train, hidden meanwhile) waited for it until the WebUI's 40-second inactivity timeout.
    end_task: Callable[[str], None] = lambda task: None
    stop_host: Callable[[], None] = lambda: None  # the WebUI's Interrupt: what holds the WebUI stops
    generate: Callable[[Txt2Img], Image.Image] | None = None  # the host's txt2img, for "Generate here"
    run_tool: Callable[[str, dict], dict] | None = None  # (tool, body) → lora_tools check_tool, then run_checked
    loras: Callable[[], list[str]] = list
    checkpoints: Callable[[], list[str]] = list
    open_gallery_item: Callable | None = None  # the host's own reader of gallery items (it checks the folder)
    # (torch device type, whether the model is SDXL, its native side), None while no model is loaded yet; raises
    # CopierError for a model Train refuses
    model_kind: Callable[[], tuple[str, bool, int] | None] | None = None


def _on(event, fn, inputs, outputs, js: str | None = None, waits: bool = False):
    """`component.click(...)` etc. with JS, on gradio 3 and 4. `waits`: the call waits for the WebUI's queue lock,
    which orders the runs; gradio 4 would also run one call of the event at a time (gradio 3's WebUIs allow 64), so
    a run pressed after one still waiting (withdrawn, or another page's) waited in gradio's queue, unknown to the
    WebUI's progress bar, which gave up on it after 40 s and showed Train again."""
    kwargs = {}
    if js:
        kwargs["js" if GRADIO_4 else "_js"] = js
    if waits and GRADIO_4:
        kwargs["concurrency_limit"] = None
    return event(fn=fn, inputs=inputs, outputs=outputs, **kwargs)


# Told by the version, not by the event's signature: Forge wraps every event listener in a (*args, **kwargs) one.
GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


LABELS = {e.name: e.label for e in all_effects()}
IMAGE_HEIGHT = 400  # pixels, of the image boxes
METHOD_HELP = (
    "copier: trains a copier of the image, then one effect LoRA on top of it (the seeds' method); "
    "extraction: a copier of each processed image too, and their difference; both: each kind; "
    "slider: one LoRA from the image and its processed version, +weight toward the effect, -weight away "
    "(Concept Sliders' image sliders); addift (the default: most effect for the least time in our measurements): "
    "the same pair, learned against the model's own predictions, in few steps (after TrainTrain's ADDifT)"
)
PRESET_HELP = (  # from the presets themselves, so it cannot drift from them
    f"quick: rank {PRESETS['quick']['rank']}, {PRESETS['quick']['steps']} steps per LoRA; fast: rank "
    f"{PRESETS['fast']['rank']}, {PRESETS['fast']['steps']} steps of {PRESETS['fast']['batch_size']} timesteps each, "
    f"as close to the image (faster on a GPU with memory to spare); thorough: rank {PRESETS['thorough']['rank']}, "
    f"{PRESETS['thorough']['steps']}-{RECIPE_PRESETS['thorough']['processed_steps']} steps, resized to rank "
    f"{RECIPE_PRESETS['thorough']['resize_rank']}; the pair methods train at their own settings with any"
)
SETTING_GROUPS = {
    "Network": ("rank", "alpha", "conv_rank", "conv_alpha", "train_text_encoder", "text_lr"),
    "Optimisation": ("steps", "lr", "optimizer", "weight_decay", "max_grad_norm", "batch_size", "scheduler",
                     "warmup_steps"),
    "Noise and timesteps": ("timestep_min", "timestep_max", "min_snr_gamma", "noise_offset", "flip", "seed",
                            "pair_weight"),
    "Memory and output": ("mixed_precision", "gradient_checkpointing", "preview_every"),  # + "Keep what is finished"
}  # fmt: skip


def effect_descriptions(chosen: list[str]) -> str:
    """One line per ticked effect (by label): what it does to the image."""
    return "\n".join(f"- **{e.label}**: {e.description}" for e in all_effects() if e.label in chosen)


def build_tab(hooks: Hooks) -> gr.Blocks:
    with gr.Blocks(analytics_enabled=False) as tab:
        effects = all_effects()
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column(scale=1):
                    # image_mode None: the file's own mode reaches `to_rgb`, which lays transparency over white and
                    # scales 16 bits, as the API and the command line do (gradio's "RGB" turns both into black or
                    # white)
                    # A fixed height: a tall portrait would otherwise push the whole form a screen or more down
                    image = gr.Image(
                        label="Original", type="pil", image_mode=None, height=IMAGE_HEIGHT, elem_id="copier_lora_image"
                    )
                    info = gr.Textbox(label="Its generation parameters", lines=2, interactive=False)
                    with gr.Row():
                        from_buttons = {tab_name: gr.Button(f"From {tab_name}") for tab_name in ("txt2img", "img2img")}
                    with gr.Accordion("Generate here, with the loaded model", open=False):
                        gen_prompt = gr.Textbox(label="Prompt", lines=2)
                        gen_negative = gr.Textbox(label="Negative prompt")
                        with gr.Row():
                            gen_seed = gr.Number(-1, label="Seed (-1: random)", precision=0)
                            gen_steps = gr.Number(20, label="Steps", precision=0)
                            gen_cfg = gr.Number(7.0, label="CFG scale")
                            gen_size = gr.Number(512, label="Width and height", precision=0)
                        gen_button = gr.Button("Generate", elem_id="copier_lora_generate")
                        gen_said = gr.HTML("", elem_id="copier_lora_generate_status")
                    edited = gr.Image(
                        label="Or your own edit of it (a processed image)", type="pil", image_mode=None,
                        height=IMAGE_HEIGHT, elem_id="copier_lora_edited",
                    )  # fmt: skip
                    more = gr.File(
                        label="More originals (optional): each effect LoRA is learned over all of them",
                        file_count="multiple", file_types=["image"], elem_id="copier_lora_more_originals",
                    )  # fmt: skip
                with gr.Column(scale=1):
                    selected = gr.CheckboxGroup(
                        [e.label for e in effects], value=[LABELS["grayscale"]], label="Effects",
                        info="one effect LoRA per ticked effect", elem_id="copier_lora_effects",
                    )  # fmt: skip
                    described = gr.Markdown(effect_descriptions([LABELS["grayscale"]]))
                    previews = gr.Gallery(label="Processed previews", columns=4, height=200)
                    sliders, groups = {}, {}
                    for effect in effects:
                        with gr.Column(visible=effect.name == "grayscale") as groups[effect.name]:
                            for p in effect.params:
                                key = f"{effect.name}.{p.name}"
                                label = f"{effect.label}: {p.name.replace('_', ' ')}"
                                if p.kind == "bool":
                                    sliders[key] = gr.Checkbox(value=bool(p.default), label=label, info=p.help)
                                else:
                                    sliders[key] = gr.Slider(
                                        p.min, p.max, value=p.default, step=p.step or (1 if p.kind == "int" else 0.01),
                                        label=label, info=p.help,
                                    )  # fmt: skip
            with gr.Row():
                method = gr.Radio(
                    list(METHODS), value=DEFAULT_METHOD, label="Method", info=METHOD_HELP, elem_id="copier_lora_method"
                )
                preset = gr.Radio(
                    list(RECIPE_PRESETS), value="quick", label="Preset", info=PRESET_HELP, elem_id="copier_lora_preset"
                )
                name = gr.Textbox(label="Output name", placeholder="from the image and effect")
                save_on_interrupt = gr.Checkbox(False, label="Keep what is finished when interrupted")
            settings = {}
            with gr.Accordion("Advanced", open=False):
                grid_prompts = gr.Textbox("\n".join(DEFAULT_GRID_PROMPTS), lines=2, label="Strength grid prompts")
                with gr.Row():
                    size = gr.Number(
                        0, label="Training size", info="image side to train at; 0: the model's native",
                        elem_id="copier_lora_size", precision=0,
                    )  # fmt: skip
                    grid_steps = gr.Number(
                        DEFAULT_GRID_STEPS, label="Grid sampling steps", elem_id="copier_lora_grid_steps", precision=0
                    )
                shown, fields = method_config(DEFAULT_METHOD, "quick", {}), field_info()
                with gr.Row():
                    for group, keys in SETTING_GROUPS.items():
                        with gr.Column(min_width=220):
                            gr.Markdown(f"**{group}**")
                            for key in keys:
                                meta = fields[key]
                                label = key.replace("_", " ")
                                common = {"label": label, "info": meta["help"], "elem_id": f"copier_lora_{key}"}
                                default = getattr(shown, key)
                                if meta["choices"]:
                                    settings[key] = gr.Dropdown(list(meta["choices"]), value=default, **common)
                                elif meta["type"] is bool:
                                    settings[key] = gr.Checkbox(default, **common)
                                else:  # whole numbers for int settings; an emptied box keeps the preset's value
                                    precision = 0 if meta["type"] is int else None
                                    settings[key] = gr.Number(default, precision=precision, **common)
            with gr.Row():
                train = gr.Button("Train", variant="primary", elem_id="copier_lora_train")
                interrupt = gr.Button("Interrupt", elem_id="copier_lora_interrupt")
            estimated = gr.Markdown(elem_id="copier_lora_estimate")
            with gr.Column(elem_id="copier_lora_progress"):  # the WebUI's progress bar is drawn at its top
                status = gr.HTML(elem_id="copier_lora_status")
            grids = gr.Gallery(  # one grid large at a time (square thumbnails would letterbox the wide grids)
                label="Strength grids (weights -1, 0, +0.5, +1, +1.5)", elem_id="copier_lora_results",
                columns=4, object_fit="contain", height=480, preview=True,
            )  # fmt: skip
            results_json = gr.Textbox(visible=False)
            with gr.Row():
                pick = gr.Dropdown([], label="LoRA to send")
                send_prompt = gr.Textbox(label="Prompt to send with it", placeholder="empty: added to txt2img's")
                send = gr.Button("Send to txt2img", elem_id="copier_lora_send_txt2img")
            paste_text = gr.Textbox(visible=False, elem_id="copier_lora_paste")
            task_id = gr.Textbox(visible=False)
            # The name the tab itself put in the box: a new image replaces it, not a typed one. Made inside the tab:
            # a component made between two tabs splits them into two tab bars.
            filled_name = gr.State("")

        slider_list = list(sliders.values())

        def preview(img, chosen, *values):
            if img is None:
                return []
            by_key = dict(zip(sliders, values, strict=True))
            try:
                img = to_rgb(img)
            except CopierError:  # too large: the estimate says why Train would refuse it
                return []
            return [effect.preview(img) for effect in make_effects(effect_specs(chosen, by_key))]

        def on_image(img, current_name, filled):
            if current_name and current_name != filled:
                return describe_image(img), current_name, filled
            return describe_image(img), default_name(img), default_name(img)

        image.change(on_image, [image, name, filled_name], [info, name, filled_name])
        for choice in (method, preset):  # Advanced shows what the method and preset mean for the trainer
            choice.change(
                lambda meth, pre: [gr.update(value=getattr(method_config(meth, pre, {}), key)) for key in settings],
                [method, preset],
                list(settings.values()),
            )

        def estimate_text(meth, pre, chosen, side, extra, img, edit, grid_step_count, *values):
            if hooks.model_kind is None:
                return ""
            effect_count = len(chosen) + (edit is not None)  # your own edit is one more processed LoRA
            try:
                if grid_step_count is not None:  # an emptied box: the default, as at Train
                    check_field(TrainRequest, "grid_steps", int(grid_step_count), labelled)
                overrides = form_overrides(meth, pre, dict(zip(settings, values, strict=True)))
                kind = hooks.model_kind()
                if kind is None:
                    return "The estimate follows once the WebUI has loaded the checkpoint."
                device, sdxl, native = kind
                shape, more = img.size if img is not None else None, more_sizes(extra)
                return describe_run(
                    meth, pre, overrides, effect_count, 1 + len(more), device, int(side or 0), sdxl, native, shape, more
                )
            except CopierError as exc:  # said as the user types, not only at Train
                return f"Train would refuse this: {exc}."

        estimate_inputs = [method, preset, selected, size, more, image, edited, grid_steps, *settings.values()]
        for component in estimate_inputs:  # not at build time: the WebUI may still be loading its model
            # Gradio 3 drops a change made while the estimate of the one before is still running (a digit typed
            # quickly): the second call reads the boxes once more, so the estimate ends on what they hold.
            component.change(estimate_text, estimate_inputs, [estimated], queue=False).then(
                estimate_text, estimate_inputs, [estimated], queue=False
            )

        for trigger in (image.change, selected.change, *(slider.change for slider in slider_list)):
            trigger(preview, [image, selected, *slider_list], [previews])
        selected.change(
            lambda chosen: [effect_descriptions(chosen)] + [gr.update(visible=e.label in chosen) for e in effects],
            [selected],
            [described, *groups.values()],
        )

        runs = PageRuns()

        def start(task, img, out_name, chosen, edit, meth, pre, grid_text, keep, side, grid_step_count, extra, *rest):
            state = runs.begin(task)
            if state is None:  # withdrawn: it ends here (the WebUI adds its time taken to the status text)
                return gr.update(), gr.update(), gr.update(), said(WITHDRAWN)
            values = dict(zip(sliders, rest[: len(sliders)], strict=True))
            chosen_settings = dict(zip(settings, rest[len(sliders) :], strict=True))
            try:
                request = build_request(img, out_name, chosen, values, edit, meth, pre, chosen_settings, keep,
                                        grid_text, side, grid_step_count, extra)  # fmt: skip
                check_request(request, labelled)
                results = hooks.run(request, state)
            except Exception as exc:  # out of memory, say, too: Forge's wrapper showed an earlier error in its place
                return *result_outputs(state.results), said(reported(exc))  # the LoRAs an interrupted run kept, to send
            finally:
                runs.end(task)
            return *result_outputs(results), results_html(results)

        train_inputs = [task_id, image, name, selected, edited, method, preset, grid_prompts, save_on_interrupt, size,
                        grid_steps, more, *slider_list, *settings.values()]  # fmt: skip
        train_outputs = [grids, results_json, pick, status]
        queued = hooks.wrap(start, runs.withdrawn)

        def train_unless_running(task, *args):  # no task id: a run this page started still goes (copierLoraStart)
            if not task:  # said at once, not after waiting for the WebUI's queue behind that run
                return gr.update(), gr.update(), gr.update(), said(RUNNING)
            return queued(task, *args)

        _on(train.click, train_unless_running, train_inputs, train_outputs, js="copierLoraStart", waits=True)

        def start_from_gallery(*args):
            if not hooks.gallery_trains():  # Settings → Copier LoRA: the button only loads the image
                return gr.update(), gr.update(), gr.update(), ""
            if args[0] and hooks.busy():  # one click should not queue a run behind another for who knows how long
                hooks.end_task(args[0])
                return gr.update(), gr.update(), gr.update(), said(BUSY)
            return train_unless_running(*args)

        def interrupt_run(task):  # the page's run by its task id, or none (copierLoraInterrupt)
            if task and runs.withdraw(task):  # it still waits in the queue: only it stops
                hooks.end_task(task)  # the page's bar ends and Train is back, not at the turn of the withdrawn run
                return said(WITHDRAWN)
            hooks.stop_host()  # its image too, for a run that goes; else Generate here, or what holds the WebUI
            return gr.update()

        _on(interrupt.click, interrupt_run, [task_id], [status], js="copierLoraInterrupt")

        def sent_prompt(prompt, results, chosen):
            return txt2img_prompt(prompt, json.loads(results or "[]"), chosen)

        composed = send.click(sent_prompt, [send_prompt, results_json, pick], [paste_text])
        _on(composed.then, None, [paste_text], [], js="copierLoraSend")  # into txt2img's prompt box, and go there

        def take(tab_name: str, button):  # the gallery's selected image and its description, or its sentence
            gallery, generation_info, _ = hooks.galleries[tab_name]
            fn = functools.partial(gallery_take, tab=tab_name, load=hooks.open_gallery_item)
            return _on(button.click, fn, [gallery, generation_info, task_id], [image, info], js="copierLoraTake")

        for tab_name, button in from_buttons.items():
            if tab_name in hooks.galleries:
                take(tab_name, button)

        def generate_here(prompt, negative, seed, steps, cfg, side):
            seed = fixed_seed(int(seed) if seed is not None and seed >= 0 else RANDOM)  # recorded in the infotext
            try:  # an emptied box reads None, which the check names
                if side is None:  # which Txt2Img would read as the model's own side
                    raise CopierError(f"{labelled('width')} is required")
                request = check(Txt2Img(prompt, negative, seed, steps, cfg, side, side), labelled)
                yield gr.update(), f"<p>{DRAWING}</p>"  # at once: gradio's own counter said nothing of a wait
                img = hooks.generate(request)
            except CopierError as exc:  # under the button (a gr.Error prints a traceback per toast in gradio 4)
                yield gr.update(), said(str(exc))
                return
            size = f"{img.width}x{img.height}"  # as drawn: a WebUI rounds a side to a multiple of 8
            params = {"Steps": int(steps), "CFG scale": cfg, "Seed": seed, "Size": size}
            img.info["parameters"] = build_infotext(Infotext(prompt, negative, params))
            yield img, ""

        if hooks.generate:
            _on(gen_button.click, generate_here, [gen_prompt, gen_negative, gen_seed, gen_steps, gen_cfg, gen_size],
                [image, gen_said])  # fmt: skip
        if hooks.run_tool:
            with gr.Tab("Utilities") as utilities:
                ran = build_utilities(utilities, hooks.run_tool, hooks.loras, hooks.checkpoints)
            _on(ran.then, None, [], [], js="copierLoraRefreshCards")  # what it wrote, on txt2img's Lora cards
        for tab_name, (_, _, button) in hooks.galleries.items():
            taken = take(tab_name, button)  # its training only where the image was taken
            _on(taken.success, start_from_gallery, train_inputs, train_outputs, js="copierLoraGalleryStart", waits=True)
    return tab
