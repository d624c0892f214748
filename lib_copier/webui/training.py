"""One training run inside the WebUI, as the tab, the gallery button and the HTTP API start it.

The job runs on the host's loaded model (the host's `backend()`), writes into the WebUI's LoRA folder, and then
draws each result's strength grid through the host's own txt2img with `<lora:name:w>`, so the WebUI's own LoRA
loader reads the new file: a grid is also proof that the WebUI reads it. Progress goes to a `JobState` (the API) and
to the host's progress bar; the WebUI's Interrupt button and the job's own interrupt both stop it between steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image

from lib_copier.atomic import atomic_write
from lib_copier.backends import Backend
from lib_copier.backends.webui import Host
from lib_copier.errors import CopierError, Interrupted, reported
from lib_copier.infotext import with_lora
from lib_copier.models.generate import Txt2Img
from lib_copier.recipes.grid import Render, strength_grid
from lib_copier.recipes.job import Job, Result, run_job
from lib_copier.recipes.prompts import prompt_pool
from lib_copier.recipes.request import TrainRequest, check_request
from lib_copier.recipes.sizes import fit_image, training_side
from lib_copier.train.trainer import Callbacks, Progress
from lib_copier.webui.jobs import JobState


class WebUIHost(Host, Protocol):
    """One WebUI (A1111, Forge): everything the tab, the API and the job runner need from it."""

    checkpoint: str  # the loaded checkpoint's title, recorded in the LoRA's metadata

    def backend(self) -> Backend:
        """The trainer's view of the loaded model, in place; made inside `prepared()`."""

    def prepared(self):
        """A context: the model as its checkpoint has it during the job, the WebUI's caches fresh after it."""

    def model_changed(self) -> bool: ...

    def interrupted(self) -> bool:
        """The WebUI's own Interrupt button was pressed."""

    def show_progress(self, text: str, step: int, total: int) -> None: ...

    def show_preview(self, image: Image.Image) -> None: ...


STAGING = "copier-lora-unfinished"  # in the LoRA folder, where the WebUI finds the LoRAs to draw their grids


def train_in_webui(
    request: TrainRequest, host: WebUIHost, out_dir: Path, state: JobState, listed: Sequence[Path] = ()
) -> list[dict]:
    """Train, write the results into a folder of their own inside the LoRA folder, draw their grids through the
    host, and only then move them into the LoRA folder: a run that fails leaves nothing (unless the request keeps
    an interrupted run's LoRAs, which its sentence then names). `listed`: the other folders the WebUI's Lora cards
    list; no name is used that a file there (or in a subfolder) has, as `<lora:name>` would load that one."""
    check_request(request)
    staging = out_dir / STAGING / f"{os.getpid()}-{state.id}"
    _drop_leftovers(staging)
    try:
        # prepared() refreshes the WebUI's LoRA list at its end: after the files have moved and the folder is gone,
        # or a `<lora:…>` tag of the next run would find this run's deleted file.
        with host.prepared():
            try:
                results = _train_and_draw(request, host, out_dir, staging, state, _names_in([out_dir, *listed]))
            except BaseException as exc:
                _keep_what_is_finished(request, staging, out_dir, exc, state)
                raise
            finally:
                _remove(staging)
                # Forge copies each weight back into an inference tensor: seconds on a CPU, the bar otherwise frozen
                host.show_progress("putting the WebUI's model back as it was", 0, 0)
        return [_describe(r, out_dir) for r in results]
    finally:
        _remove(staging)


def _keep_what_is_finished(
    request: TrainRequest, staging: Path, out_dir: Path, exc: BaseException, state: JobState
) -> None:
    """With `save_on_interrupt`, what a stopped run wrote is kept: the sentence that stopped it (an interrupt, or a
    failure while its grids were drawn) names it, and the job's results describe it."""
    kept = []
    if request.save_on_interrupt:
        with contextlib.suppress(CopierError):
            kept = [file.stem for file in _publish(staging, out_dir) if file.suffix == ".safetensors"]
    if not isinstance(exc, Exception):
        return
    if not kept:
        if isinstance(exc, Interrupted):  # the user's question after an interrupt
            raise Interrupted(f"{exc}; nothing was written") from exc
        return
    state.results = [_describe(r, out_dir) for r in getattr(exc, "kept", ())]
    kind = Interrupted if isinstance(exc, Interrupted) else CopierError
    raise kind(f"{reported(exc)}; kept {', '.join(kept)}") from exc


def _names_in(folders: Sequence[Path]) -> frozenset[str]:
    """The names the WebUI's `<lora:…>` tags know: each LoRA file's (.pt and .ckpt ones too), in whichever folder or
    subfolder it is."""
    from lib_copier.webui.lora_tools import TAG_SUFFIXES, lora_names  # which imports STAGING from here

    return frozenset(name.rsplit("/", 1)[-1] for name in lora_names(folders, TAG_SUFFIXES))


def _train_and_draw(
    request: TrainRequest, host: WebUIHost, out_dir: Path, staging: Path, state: JobState, taken: frozenset[str]
):
    backend = host.backend()
    side = training_side(request.size, backend.resolution)  # the grids' too
    image = request.image
    if image is None:
        state.on_stage("generating the original")
        try:
            image = host.txt2img(request.generate)
        except Interrupted:  # before its first step: no image
            image = None
        if image is None or state.interrupted.is_set() or host.interrupted():  # or stopped early: a half-drawn one
            raise Interrupted("interrupted while generating the original")
    more = [(f"image {i} of the more originals", original) for i, original in enumerate(request.more_images, 1)]
    job = Job(
        originals=[
            fit_image(original, side, backend.resolution, what) for what, original in [("the original", image), *more]
        ],
        effects=request.effects,
        name=request.name,
        out_dir=staging,
        publish_dir=out_dir,
        taken=taken,
        method=request.method,
        preset=request.preset,
        overrides={**request.overrides, "save_on_cancel": request.save_on_interrupt},
        caption=request.caption,
        prompt_pool=prompt_pool(False, request.prompt_pool),
        base_model=host.checkpoint,
    )
    callbacks = _callbacks(host, state)
    preview_prompt = job.training_caption or next(iter(request.grid_prompts), "")
    callbacks.preview_request = Txt2Img(preview_prompt, steps=request.grid_steps, width=side, height=side)
    staging.mkdir(parents=True, exist_ok=True)
    results = run_job(backend, job, callbacks, _stage(host, state))
    try:
        _host_grids(host, request, results, side, state)
    except Exception as exc:
        exc.kept = results  # every LoRA is finished; the grids drawn so far are beside them
        raise
    _publish(staging, out_dir)
    return results


def _remove(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # only when no other run's files are in it


def _drop_leftovers(staging: Path) -> None:
    """A run's folder is named by its WebUI's process id. Runs are one at a time in a process, so a folder of this
    one's (this run's own included: the tab's runs share an id) or of a process no longer running is from a run
    that died with its WebUI (killed, out of memory): its files never finished, and would show in the Lora list.
    Another WebUI sharing the LoRA folder may be running one of its own."""
    for folder in staging.parent.glob("*"):
        pid = folder.name.partition("-")[0]
        if folder.is_dir() and (not pid.isdigit() or int(pid) == os.getpid() or not _running(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    if os.name == "nt":  # where os.kill would end the process
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if handle:
            ctypes.windll.kernel32.CloseHandle(handle)
        return bool(handle)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process, or a pid this cannot check: left alone
    return True


def _publish(staging: Path, out_dir: Path) -> list[Path]:
    """Move a run's files into the LoRA folder, all of them or (a name taken there meanwhile) none; returns them."""
    files = sorted(staging.glob("*")) if staging.is_dir() else []
    clash = [f.name for f in files if (out_dir / f.name).exists()]
    if clash:
        raise CopierError(f"{clash[0]} appeared in {out_dir} during the run, so nothing was written; run it again")
    for file in files:
        os.replace(file, out_dir / file.name)
    return files


def _callbacks(host: WebUIHost, state: JobState) -> Callbacks:
    def progress(p: Progress) -> None:
        state.on_progress(p)
        eta = f", {p.eta:.0f} s left" if p.eta is not None else ""
        host.show_progress(f"{state.stage}: step {p.step}/{p.total}, loss {p.loss:.4f}{eta}", p.step, p.total)

    def cancelled() -> bool:
        _check_model(host)
        return state.interrupted.is_set() or host.interrupted()

    def counted(done: int, total: int) -> None:
        state.on_count(done, total)
        host.show_progress(f"{state.stage}: {done}/{total} modules", done, total)

    def notice(text: str) -> None:
        print(f"Copier LoRA: job {state.id}, {state.stage}: {text}", file=sys.stderr)
        _stage(host, state)(f"{state.stage} ({text})")  # the stage starts over

    return Callbacks(
        progress=progress,
        cancelled=cancelled,
        preview=lambda step, image: host.show_preview(image),
        counted=counted,
        notice=notice,
    )


def _check_model(host: WebUIHost) -> None:
    if host.model_changed():
        raise CopierError("the WebUI's model was changed during the run, so the run stopped")


def _stage(host: WebUIHost, state: JobState):
    def stage(text: str) -> None:
        state.on_stage(text)
        host.show_progress(text, 0, 0)

    return stage


def _host_grids(host: WebUIHost, request: TrainRequest, results: list[Result], side: int, state: JobState) -> None:
    unchanged: dict[Txt2Img, Image.Image] = {}
    for result in results:
        name = result.written.name
        state.on_stage(f"strength grid: {name}")

        def progress(done: int, total: int, name=name) -> None:
            state.on_count(done, total)
            host.show_progress(f"strength grid: {name}", done, total)
            if state.interrupted.is_set() or host.interrupted():
                raise Interrupted  # said below, as an interrupt inside the host's txt2img is

        try:
            grid = strength_grid(
                _tag_render(host, name, unchanged),
                request.grid_prompts,
                side,
                seed=request.grid_seed,
                steps=request.grid_steps,
                progress=progress,
            )
        except Interrupted as exc:  # by progress, after an image, or by the host's txt2img, before one
            raise Interrupted("interrupted while drawing the strength grids") from exc
        # Beside the LoRA, where the Lora page takes its card's preview from.
        atomic_write(result.written.lora.with_suffix(".png"), lambda tmp, grid=grid: grid.save(tmp, format="PNG"))


def _tag_render(host: WebUIHost, name: str, unchanged: dict) -> Render:
    def render(request: Txt2Img, weight: float) -> Image.Image:
        _check_model(host)  # the LoRA's grid, drawn with the model it was trained on
        if weight:
            return host.txt2img(dataclasses.replace(request, prompt=with_lora(request.prompt, name, weight)))
        if request not in unchanged:
            unchanged[request] = host.txt2img(request)
        return unchanged[request]

    return render


def _describe(result: Result, out_dir: Path) -> dict:
    """A published result; `grid` is None for a LoRA kept from an interrupted run without its grid."""
    grid = out_dir / f"{result.written.name}.png"
    return {
        "kind": result.kind,
        "effect": result.effect,
        "name": result.written.name,
        "lora": str(out_dir / result.written.lora.name),
        "sidecar": str(out_dir / result.written.sidecar.name),
        "grid": str(grid) if grid.is_file() else None,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "seed": result.seed,
        "prompt": with_lora("", result.written.name, 1.0),
    }
