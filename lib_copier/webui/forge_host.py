"""The Forge (and Forge Neo) side of the WebUI backend: Forge's conditioning, memory manager and LoRA loader; Forge
Classic's and reForge's extend it (`ldm_patched_host.py`).

Forge keeps A1111's `modules` (processing, shared.state, call_queue, infotext_utils), so txt2img, progress and
Interrupt are A1111Host's; what differs is the model (`lib_copier.backends.forge`) and how it is left as loaded.
Imported only inside a running Forge.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lib_copier.backends.forge import ForgeBackend, borrowed, forge_conditioning, is_forge_model
from lib_copier.errors import CopierError
from lib_copier.webui.host import A1111Host, clear_cached_conditioning, refresh_loras

# Forge's memory states in which weights live in CPU memory and are cast per call ("swap"): training there would
# stream the whole UNet every step, and LoRA fusing would miss the weights Forge keeps elsewhere.
_SWAP_STATES = ("LOW_VRAM", "NO_VRAM")
# The launch flags that choose them, as each design names them (Forge, Forge Classic, reForge; then Neo's).
_SWAP_FLAGS = ("always_low_vram", "always_no_vram", "always_offload_from_vram", "lowvram", "novram")


def swap_flags(memory_management) -> list[str]:
    """The swap flags this process was started with, as typed ("--lowvram"), read from the memory manager's own
    arguments; all of Forge's where it has none."""
    args = getattr(memory_management, "args", None)
    named = [flag for flag in _SWAP_FLAGS if getattr(args, flag, False) is True] or _SWAP_FLAGS[:3]
    return ["--" + flag.replace("_", "-") for flag in named]


class NotLoadedYet(CopierError):
    """Forge has loaded no checkpoint yet, and may not now: a run holds its queue (and may be loading one)."""


class ForgeHost(A1111Host):
    def __init__(self, load: bool = True):
        from modules import sd_models, shared

        # Forge loads the checkpoint picked in its dropdown only at the next generation: until then the model is
        # none (just after startup) or the one picked before. Load it now (the caller holds the queue lock, as a
        # generation does), so the job trains the model the user picked and its grids are drawn with that one.
        # Without the lock, what is loaded is read as it is: a load would unload the model under a running job.
        reload = getattr(sd_models, "forge_model_reload", None)
        if not load:
            if not is_forge_model(shared.sd_model):
                raise NotLoadedYet("Forge has not loaded a checkpoint yet")
        elif reload is not None:
            try:
                reload()
            except ValueError as exc:  # "You do not have any model!": no checkpoint to load
                raise CopierError(f"Forge could not load a checkpoint ({exc}); pick one first") from exc
        super().__init__()
        if not is_forge_model(self.sd_model):
            raise CopierError("Forge has no Stable Diffusion model loaded; pick a checkpoint first")

    BACKEND = ForgeBackend
    OFFLOAD_SWAPS = True  # whether --always-offload-from-vram keeps the model in CPU memory (reForge ignores it)

    def model_changed(self) -> bool:
        """Forge loads a checkpoint picked during the run at its next generation, which would draw the grids with it:
        a pick (or a VAE or text encoder) waiting to be loaded is a change already."""
        from modules import sd_models

        data = getattr(sd_models, "model_data", None)
        pending = data is not None and hasattr(data, "forge_loading_parameters") and hasattr(data, "forge_hash")
        return super().model_changed() or (pending and str(data.forge_loading_parameters) != data.forge_hash)

    @staticmethod
    def memory_management():
        from backend import memory_management

        return memory_management

    def backend(self) -> ForgeBackend:
        return self.BACKEND(self, load=self.loader())

    def loader(self) -> Callable[[object], None]:
        """What puts a patcher's model on its device, whole."""
        memory_management = self.memory_management()
        if "force_full_load" in inspect.signature(memory_management.load_models_gpu).parameters:
            # Neo (and reForge) load models partially when memory is short, leaving layers on the CPU: training
            # needs them all.
            return lambda patcher: memory_management.load_models_gpu([patcher], force_full_load=True)
        return memory_management.load_model_gpu

    def unload_clones(self):
        """What takes the LoRAs out of the weights besides the original patchers (`backends.forge.forget_loras`)."""
        return None

    def conditioning(self, prompts: list[str], height: int, width: int):
        from modules import prompt_parser

        return forge_conditioning(self.sd_model, prompt_parser.SdConditioning(prompts, width=width, height=height))

    @contextmanager
    def prepared(self) -> Iterator[None]:
        memory_management = self.memory_management()
        state = getattr(memory_management.vram_state, "name", "")
        offload = self.OFFLOAD_SWAPS and getattr(memory_management, "ALWAYS_VRAM_OFFLOAD", False)
        if state in _SWAP_STATES or offload:
            flags = swap_flags(memory_management)
            raise CopierError(
                f"Copier LoRA cannot train while Forge keeps the model in CPU memory ({' / '.join(flags)}); restart "
                f"Forge without {'it' if len(flags) == 1 else 'them'}"
            )
        try:
            with borrowed(self.sd_model, self.unload_clones()):
                yield
        finally:
            clear_cached_conditioning()
            refresh_loras()
