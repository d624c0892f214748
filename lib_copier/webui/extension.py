"""What `scripts/copier_lora.py` registers with the WebUI: the routes, the tab, the gallery buttons, the settings.

Nothing here imports the WebUI at import time, and nothing asks which WebUI it is: A1111 and Forge keep the same
`modules` for everything registered here, and the model-specific part is the host adapter `current_host()` picks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lib_copier.webui.host import lora_dir, lora_dirs
from lib_copier.webui.jobs import JobRunner

SECTION = ("copier_lora", "Copier LoRA")
_runner: JobRunner | None = None


def runner() -> JobRunner:
    global _runner
    if _runner is None:
        from modules import call_queue

        # An interrupt also stops the original or grid image the job's txt2img is drawing (a full one was drawn first)
        _runner = JobRunner(call_queue.queue_lock, stop_host=stop_host)
    return _runner


def stop_host() -> None:
    """The WebUI's Interrupt: whatever holds the WebUI stops (a sampler at its next step, a training between steps)."""
    from modules import shared

    shared.state.interrupt()


_running = 0  # runs in train_in_webui now: the tab's and the API's


def run(request, state):
    """Train on the loaded model into the LoRA folder (the caller holds the queue lock)."""
    from lib_copier.webui.host import check_lora_dir, current_host
    from lib_copier.webui.training import train_in_webui

    global _running
    _running += 1
    try:
        check_lora_dir()
        return train_in_webui(request, current_host(), Path(lora_dir()), state, lora_dirs())
    finally:
        _running -= 1


def tool_dirs() -> list[Path]:
    """The LoRA folders of a Utilities run, which writes into the first: refused where the WebUI would not find it."""
    from lib_copier.webui.host import check_lora_dir

    check_lora_dir()
    return lora_dirs()


def busy() -> bool:
    """A run is going, or an API job waits for its turn."""
    jobs = _runner.states() if _runner is not None else []
    return _running > 0 or any(s.status in ("queued", "running") for s in jobs)


def run_api_job(request, state):
    """An API job has no gradio call around it to begin and end the WebUI's job state."""
    from modules import shared

    shared.state.begin(job="copier-lora")
    try:
        return run(request, state)
    finally:
        shared.state.end()
        total = getattr(shared, "total_tqdm", None)
        if total is not None:  # as the WebUI's own API ends a job: an interrupted draw left its total on the console
            total.clear()


def model_kind() -> tuple[str, bool, int] | None:
    """The loaded model's device type, whether it is SDXL, and its native side; a model Train refuses is its
    sentence (CopierError). None while Forge has no checkpoint loaded and a run holds the WebUI: it may be loading
    one, and a run will load the one picked."""
    from modules import call_queue, devices

    from lib_copier.webui.forge_host import NotLoadedYet
    from lib_copier.webui.host import current_host

    # Forge loads the checkpoint picked in its dropdown when the host is made: only while nothing else runs, under
    # the queue lock as its own generations load it; while a run holds the lock, the model loaded is read as it is.
    lock = call_queue.queue_lock
    try:
        if lock.acquire(blocking=False):
            try:
                host = current_host()
            finally:
                lock.release()
        else:
            host = current_host(load=False)
    except NotLoadedYet:
        return None
    backend = host.backend()  # names only: nothing is loaded or moved
    return devices.device.type, backend.family == "sdxl", backend.resolution


def checkpoint_file(name: str) -> Path:
    from modules import sd_models

    from lib_copier.errors import CopierError, shown

    info = _exact_checkpoint(sd_models, name)
    if info is None and register_new_checkpoints():
        info = _exact_checkpoint(sd_models, name)
    if info is None:
        raise CopierError(f"there is no checkpoint named {shown(name)}")
    return Path(info.filename)


def _exact_checkpoint(sd_models, name: str):
    """The checkpoint `name` names exactly: its title (as the dropdown shows it, with a hash that may have changed
    since), file name, name without the extension, or hash. Not the WebUI's closest match, which takes any checkpoint
    whose title contains the text: an extraction from 'anime' would have run on 'sd15-anime-finetune'."""
    aliases = sd_models.checkpoint_aliases
    return aliases.get(name) or aliases.get(re.sub(r"\s*\[[^]]+]\s*$", "", name))


def register_new_checkpoints() -> int:
    """Checkpoints written since the WebUI listed its own (a merge from Utilities, a file copied in) made known to it;
    returns how many. Its own refresh re-reads the whole list, which may also switch the selected checkpoint back to
    --ckpt: here only the new files are added."""
    from modules import sd_models, shared

    known = {os.path.abspath(info.filename) for info in sd_models.checkpoints_list.values()}
    new = [
        path
        for folder in {sd_models.model_path, getattr(shared.cmd_opts, "ckpt_dir", None)} - {None}
        for path in sorted(Path(folder).rglob("*"))
        if path.suffix in (".safetensors", ".ckpt")
        and not path.name.endswith((".vae.safetensors", ".vae.ckpt"))
        and os.path.abspath(path) not in known
        and path.is_file()
    ]
    for path in new:
        sd_models.CheckpointInfo(str(path)).register()
    return len(new)


def checkpoint_titles() -> list[str]:
    """The WebUI's checkpoints, new files included, as its dropdown names them."""
    from modules import sd_models

    register_new_checkpoints()
    return list(sd_models.checkpoint_tiles())


def checkpoint_dir() -> Path:
    from modules import sd_models

    return Path(sd_models.model_path)


def on_app_started(demo, app) -> None:
    """The HTTP routes, with the WebUI's own API only (`--api`, or `--nowebui`): without it, a WebUI shared on a
    network behind gradio's login had them open to anyone, who could train or write checkpoints to its disk."""
    from modules import shared

    from lib_copier.webui.api import add_routes

    if not (getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False)):
        return
    add_routes(
        app,
        runner(),
        run_api_job,
        tool_dirs,
        checkpoint_file,
        checkpoint_dir,
        getattr(shared.cmd_opts, "api_auth", None),
        model_side=lambda: (kind := model_kind()) and kind[2],
    )


def on_ui_settings() -> None:
    import gradio as gr
    from modules import shared

    shared.opts.add_option(
        "copier_lora_gallery_trains",
        shared.OptionInfo(
            True,
            "The gallery's Copier LoRA button starts training (off: it only loads the image into the tab)",
            gr.Checkbox,
            section=SECTION,
        ),
    )


def make_temp_dir() -> None:
    """The WebUI writes each image a tab shows into its temp folder ("Directory for temporary images") when one is
    set, and creates that folder only when the setting changes. Forge Neo sets one by default (`tmp/`) without
    creating it, so every image this tab showed there failed with FileNotFoundError until something made it."""
    from modules import shared

    if temp_dir := getattr(shared.opts, "temp_dir", ""):
        Path(temp_dir).mkdir(parents=True, exist_ok=True)


def generate_alone(request):
    """The tab's Generate here: a WebUI job of its own, as txt2img's Generate is; its start clears an Interrupt
    pressed before, which every later image would read as pressed (and draw nothing)."""
    from modules import shared

    from lib_copier.webui.host import current_host

    shared.state.begin(job="copier_lora_generate")
    try:
        return current_host().txt2img(request)
    finally:
        shared.state.end()


def gpu_call(fn, given_up):
    """The WebUI's `wrap_gradio_gpu_call(fn)` (its queue lock, job state, progress bar and time taken) for a call
    whose first argument is its task id, except that a call given up while it waits for its turn (`given_up(task)`)
    returns `fn`'s answer at once, without the lock: gradio 3 ignores a click on an event whose call is pending."""
    import gradio as gr
    from modules import call_queue, progress, shared

    from lib_copier.webui.turns import wait_for_turn

    record = getattr(progress, "record_results", lambda task, res: None)  # for a page reloaded; reForge keeps none

    def held(task, *args):
        shared.state.begin(job=task)
        progress.start_task(task)
        try:
            res = fn(task, *args)
            record(task, res)
        finally:
            progress.finish_task(task)
        shared.state.end()
        return res

    shown = call_queue.wrap_gradio_call(held, extra_outputs=[[], "[]", gr.update()], add_stats=True)

    def call(task, *args):
        progress.add_task_to_queue(task)
        if not wait_for_turn(call_queue.queue_lock, lambda: given_up(task)):
            progress.pending_tasks.pop(task, None)  # no longer in the queue the progress bars count places in
            return fn(task, *args)  # not through the WebUI's wrapper, which resets the job state of the run that goes
        try:
            return shown(task, *args)
        finally:
            call_queue.queue_lock.release()

    return call


def on_ui_tabs():
    from modules import call_queue, infotext_utils, progress, shared

    from lib_copier.webui import gallery
    from lib_copier.webui.jobs import in_own_thread
    from lib_copier.webui.lora_tools import check_tool, lora_names, run_checked
    from lib_copier.webui.tab import Hooks, build_tab

    def tool(name: str, body: dict) -> dict:  # checked before it waits for the WebUI's queue
        checked = check_tool(name, body, tool_dirs(), checkpoint_file, checkpoint_dir())
        return call_queue.wrap_queued_call(run_checked)(checked)

    hooks = Hooks(
        run=lambda request, state: in_own_thread(lambda: run(request, state)),
        generate=call_queue.wrap_queued_call(generate_alone),
        run_tool=tool,
        loras=lambda: lora_names(lora_dirs()),
        checkpoints=checkpoint_titles,
        open_gallery_item=infotext_utils.image_from_url_text,
        wrap=gpu_call,
        galleries=gallery.complete(),
        gallery_trains=lambda: bool(getattr(shared.opts, "copier_lora_gallery_trains", True)),
        busy=busy,
        end_task=progress.finish_task,
        stop_host=stop_host,
        model_kind=model_kind,
    )
    make_temp_dir()
    return [(build_tab(hooks), "Copier LoRA", "copier_lora")]


def on_after_component(component, **kwargs) -> None:
    from lib_copier.webui.gallery import remember

    remember(component, kwargs.get("elem_id"))


def on_before_reload() -> None:
    if _runner is not None:
        _runner.interrupt_all()
