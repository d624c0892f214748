"""The A1111 side of the WebUI backend: the host's conditioning and txt2img, and leaving its model as it was; and
`current_host()`, which picks the adapter for the WebUI this runs in (Forge's extends A1111's, forge_host.py).

Imported only inside a running WebUI (it imports `modules.*` and the built-in Lora extension's `networks`).
What A1111 does that matters here is written up in docs/dev/a1111-internals.md.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import torch
from PIL import Image

from lib_copier.backends import StepProgress
from lib_copier.errors import CopierError, Interrupted
from lib_copier.models.generate import Txt2Img
from lib_copier.models.sampling import WEBUI_NAMES
from lib_copier.webui.jobs import in_own_thread
from lib_copier.webui.medvram import kept_on_device


def current_host(load: bool = True):
    """The host adapter for the WebUI this runs in, told by what it exposes: Forge's memory manager (`backend`), or
    the older design's (`ldm_patched`: Forge Classic's, or reForge's newer one), or Forge's model objects; else
    A1111. `load`: Forge loads the checkpoint picked in its dropdown first, which only a caller holding the WebUI's
    queue lock may ask for."""
    from modules import shared

    from lib_copier.backends.forge import is_forge_model

    if "backend.memory_management" in sys.modules:
        from lib_copier.webui.forge_host import ForgeHost

        return ForgeHost(load)
    if "ldm_patched.modules.model_management" in sys.modules:
        from lib_copier.webui.ldm_patched_host import ClassicHost, ReForgeHost, is_reforge

        host = ReForgeHost if is_reforge(sys.modules["ldm_patched.modules.model_management"]) else ClassicHost
        return host(load)
    if is_forge_model(shared.sd_model):
        from lib_copier.webui.forge_host import ForgeHost

        return ForgeHost(load)
    return A1111Host()


def lora_dir() -> str:
    from modules import shared

    return getattr(shared.cmd_opts, "copier_lora_dir", None) or shared.cmd_opts.lora_dir


def lora_dirs() -> list[Path]:
    """Where the Utilities find LoRAs: the folder this writes to (`lora_dir`), then each folder the WebUI's own Lora
    cards list, as its Lora page says (A1111 and reForge add models/LyCORIS, Forge Neo its `--lora-dirs`)."""
    unique: dict[Path, Path] = {}
    for folder in [lora_dir(), *_listed_dirs()]:
        if folder:
            unique.setdefault(Path(folder).resolve(), Path(folder))
    return list(unique.values())


def _listed_dirs() -> list[str]:
    """The folders the WebUI's Lora cards list and its `<lora:…>` tags load from (their subfolders too)."""
    from modules import shared, ui_extra_networks

    folders = [shared.cmd_opts.lora_dir]
    for page in getattr(ui_extra_networks, "extra_pages", []):
        if getattr(page, "name", None) == "lora":
            folders += page.allowed_directories_for_previews()
    return folders


def check_lora_dir() -> None:
    """A `--copier-lora-dir` outside the WebUI's LoRA folders is refused before a run or a Utilities tool writes
    there: the strength grids' `<lora:…>` tags found nothing there (every column drawn without the LoRA), nor would
    txt2img's."""
    out = Path(lora_dir()).resolve()
    listed = list(dict.fromkeys(Path(folder).resolve() for folder in _listed_dirs() if folder))
    if not any(out == folder or folder in out.parents for folder in listed):
        raise CopierError(
            f"--copier-lora-dir {out} is outside the folders the WebUI loads LoRAs from "
            f"({', '.join(map(str, listed))}), so the strength grids and txt2img could not use what it trains; "
            "choose a folder inside one of them, or start the WebUI without it"
        )


def _networks():
    """The built-in Lora extension's module, if it is loaded."""
    return sys.modules.get("networks")


class A1111Host:
    def __init__(self):
        from modules import shared

        if shared.sd_model is None:
            raise CopierError("the WebUI has no model loaded; pick a checkpoint first")
        self.sd_model = shared.sd_model
        self.checkpoint = getattr(getattr(self.sd_model, "sd_checkpoint_info", None), "title", "")
        self.picked = _picked_checkpoint()

    def backend(self):
        from lib_copier.backends.webui import WebUIBackend

        return WebUIBackend(self)

    @property
    def device(self) -> torch.device:
        from modules import devices

        return devices.device

    def resident(self, modules):
        from modules import lowvram

        return kept_on_device(lowvram, self.sd_model, modules)

    def conditioning(self, prompts: list[str], height: int, width: int):
        from modules import devices, prompt_parser

        with devices.autocast():
            return self.sd_model.get_learned_conditioning(
                prompt_parser.SdConditioning(prompts, width=width, height=height)
            )

    def txt2img(self, request: Txt2Img, progress: StepProgress | None = None) -> Image.Image:
        from modules import processing, scripts, shared

        clear_cached_conditioning()  # a text-encoder LoRA attached now is not part of the cache's key
        native = None if request.width and request.height else self.backend().resolution  # None: the model's side
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=self.sd_model,
            prompt=request.prompt,
            negative_prompt=request.negative,
            seed=request.seed,
            steps=request.steps,
            cfg_scale=request.cfg,
            width=request.width or native,
            height=request.height or native,
            sampler_name=WEBUI_NAMES.get(request.sampler, request.sampler),
            do_not_save_grid=True,
            do_not_save_samples=True,
            do_not_reload_embeddings=True,
        )
        # No script of the WebUI's runs on our images, but reForge reads `p.scripts.alwayson_scripts` unguarded.
        p.scripts = scripts.ScriptRunner()
        if hasattr(p, "scheduler") and p.scheduler is None:  # the WebUI would log an "autocorrection" per image
            p.scheduler = "Automatic"
        saved = shared.state.job_count, shared.state.job_no, shared.state.textinfo
        try:
            with closing(p):
                processed = processing.process_images(p)
        finally:
            shared.state.job_count, shared.state.job_no, shared.state.textinfo = saved
        if not processed.images:
            if self.interrupted():  # before the sampler's first step
                raise Interrupted("interrupted before the image was drawn")
            raise CopierError("the WebUI's txt2img returned no image")
        if shared.state.interrupted:  # the sampler stopped at a step and returned its noisy latent, decoded
            raise Interrupted("interrupted while the image was drawn")
        return processed.images[0]

    def zero_terminal_snr(self) -> bool:
        from modules import shared

        return getattr(shared.opts, "sd_noise_schedule", "Default") == "Zero Terminal SNR"

    def interrupted(self) -> bool:
        from modules import shared

        # Pressed while more than one job step is counted (a run shows its training steps so), the Interrupt button
        # asks to "stop after the current image" by default (Settings: "Don't Interrupt in the middle"): a flag of its
        # own, which txt2img reads too. For a run, both mean stop now.
        return bool(shared.state.interrupted or getattr(shared.state, "stopping_generation", False))

    def show_progress(self, text: str, step: int, total: int) -> None:
        """Onto the WebUI's progress bar: `job_no / job_count` is its fraction, `textinfo` its text."""
        from modules import shared

        shared.state.textinfo = text
        shared.state.job_count, shared.state.job_no, shared.state.sampling_step = total, step, 0

    def show_preview(self, image: Image.Image) -> None:
        from modules import shared

        shared.state.assign_current_image(image)

    def model_changed(self) -> bool:
        """A checkpoint picked during the run is a change before the WebUI loads it: the next txt2img (a grid's)
        loads it first, into the same model object where its architecture is the same."""
        from modules import shared

        return shared.sd_model is not self.sd_model or _picked_checkpoint() != self.picked

    @contextmanager
    def prepared(self) -> Iterator[None]:
        """The model as its checkpoint has it for the whole job, and the WebUI's caches fresh after it."""
        from modules import sd_unet, shared

        if getattr(shared.cmd_opts, "lowvram", False):
            raise CopierError("Copier LoRA cannot train under --lowvram; restart the WebUI with --medvram or neither")
        unet_override = sd_unet.current_unet is not None
        if unet_override:
            sd_unet.apply_unet("None")
        undo_lora_merges(self.sd_model)
        try:
            yield
        finally:
            undo_lora_merges(self.sd_model)  # the host-drawn grids merged the new LoRAs into the weights
            clear_cached_conditioning()
            if unet_override:
                sd_unet.apply_unet()
            refresh_loras()


def _picked_checkpoint() -> str | None:
    """The checkpoint setting, which the dropdown (or the API's options) sets at once and the WebUI loads later."""
    from modules import shared

    return getattr(getattr(shared, "opts", None), "sd_model_checkpoint", None)


def undo_lora_merges(sd_model) -> None:
    """Take out what the built-in Lora extension merged in place, and forget it, so training starts from the
    checkpoint's weights and the next generation re-merges from them."""
    networks = _networks()
    if networks is None:
        return
    networks.loaded_networks.clear()
    with torch.no_grad():  # A1111's parameters require grad; the Lora extension restores under no_grad too
        for module in getattr(sd_model, "network_layer_mapping", {}).values():
            networks.network_restore_weights_from_backup(module)
            networks.network_reset_cached_weight(module)


def clear_cached_conditioning() -> None:
    from modules import processing

    for cls, names in (
        (processing.StableDiffusionProcessing, ("cached_c", "cached_uc")),
        (processing.StableDiffusionProcessingTxt2Img, ("cached_hr_c", "cached_hr_uc")),
    ):
        for name in names:
            if isinstance(getattr(cls, name, None), list):  # [None, None] in A1111, three entries in Forge
                setattr(cls, name, [None] * len(getattr(cls, name)))


def refresh_loras() -> None:
    """The Lora list re-read, and Forge's cache of LoRA files by name dropped (a new file may reuse a name)."""
    networks = _networks()
    if networks is None:
        return
    cache = getattr(networks, "load_lora_state_dict", None)
    if hasattr(cache, "cache_clear"):
        cache.cache_clear()
    # In a thread of its own, outside the exception of a run that stopped: the WebUI's report of an unreadable LoRA
    # file in the folder printed that exception's traceback too, as if the run had crashed.
    in_own_thread(networks.list_available_networks)
