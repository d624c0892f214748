"""The Forge (Forge Neo, Forge Classic) side of the WebUI backend: Forge's conditioning, memory manager and LoRA
loader.

Forge keeps A1111's `modules` (processing, shared.state, call_queue, infotext_utils), so txt2img, progress and
Interrupt are A1111Host's; what differs is the model (`lib_copier.backends.forge`) and how it is left as loaded.
Imported only inside a running Forge.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from lib_copier.backends.forge import ForgeBackend, borrowed, forge_conditioning, is_forge_model
from lib_copier.backends.forge_classic import ClassicBackend
from lib_copier.errors import CopierError
from lib_copier.webui.host import A1111Host, clear_cached_conditioning, refresh_loras

# Forge's memory states in which weights live in CPU memory and are cast per call ("swap"): training there would
# stream the whole UNet every step, and LoRA fusing would miss the weights Forge keeps elsewhere.
_SWAP_STATES = ("LOW_VRAM", "NO_VRAM")


class ForgeHost(A1111Host):
    def __init__(self):
        from modules import sd_models

        # Forge loads the checkpoint picked in its dropdown only at the next generation: until then the model is
        # none (just after startup) or the one picked before. Load it now (the caller holds the queue lock, as a
        # generation does), so the job trains the model the user picked and its grids are drawn with that one.
        reload = getattr(sd_models, "forge_model_reload", None)
        if reload is not None:
            try:
                reload()
            except ValueError as exc:  # "You do not have any model!": no checkpoint to load
                raise CopierError(f"Forge could not load a checkpoint ({exc}); pick one first") from exc
        super().__init__()
        if not is_forge_model(self.sd_model):
            raise CopierError("Forge has no Stable Diffusion model loaded; pick a checkpoint first")

    @staticmethod
    def memory_management():
        from backend import memory_management

        return memory_management

    def backend(self) -> ForgeBackend:
        memory_management = self.memory_management()
        load = memory_management.load_model_gpu
        if "force_full_load" in inspect.signature(memory_management.load_models_gpu).parameters:
            # Neo loads models partially when memory is short, leaving layers on the CPU: training needs them all.
            def load(patcher):
                memory_management.load_models_gpu([patcher], force_full_load=True)

        return ForgeBackend(self, load=load)

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
        if state in _SWAP_STATES or getattr(memory_management, "ALWAYS_VRAM_OFFLOAD", False):
            raise CopierError(
                f"Copier LoRA cannot train while Forge keeps the model in CPU memory ({state.lower()} mode, "
                "--always-low-vram / --always-no-vram / --always-offload-from-vram); restart Forge without them"
            )
        try:
            with borrowed(self.sd_model, self.unload_clones()):
                yield
        finally:
            clear_cached_conditioning()
            refresh_loras()


class ClassicHost(ForgeHost):
    """Forge Classic (`ldm_patched`): Forge's model objects, ComfyUI's memory manager and patchers, and A1111's
    prompt encoding (`lib_copier.backends.forge_classic` says what differs in the model)."""

    def __init__(self):
        if not hasattr(self.memory_management(), "unload_model_clones"):  # what a job's start and end rely on
            raise CopierError(
                "this WebUI is built on the older Forge design (ldm_patched) with a newer memory manager than Forge "
                "Classic's, as reForge is; Copier LoRA does not train on it yet: use Forge Classic, Forge or A1111 1.10"
            )
        super().__init__()

    @staticmethod
    def memory_management():
        from ldm_patched.modules import model_management

        return model_management

    def backend(self) -> ClassicBackend:
        memory_management = self.memory_management()

        def load(patcher):
            memory_management.load_model_gpu(patcher)
            # Short of memory, it loads part of the model and streams the rest from CPU memory per call ("async").
            loaded = memory_management.current_loaded_models
            if any(m.model is patcher and getattr(m, "model_accelerated", False) for m in loaded):
                raise CopierError(
                    "the GPU has too little free memory to hold the whole model, so Forge would stream part of it "
                    "from CPU memory at every step; close other GPU programs, or train a smaller model"
                )

        return ClassicBackend(self, load=load)

    conditioning = A1111Host.conditioning  # A1111's model object and prompt code, which autograd can go through

    def unload_clones(self):
        return self.memory_management().unload_model_clones

    @contextmanager
    def differentiable_attention(self) -> Iterator[None]:
        """PyTorch's attention in the UNet for the block where Classic chose SageAttention (SDXL, with the
        `sageattention` package installed), which has no backward pass."""
        from ldm_patched.ldm.modules import attention

        chosen = attention.optimized_attention, attention.optimized_attention_masked
        if any(getattr(f, "__name__", "") == "attention_sage" for f in chosen):
            attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
        try:
            yield
        finally:
            attention.optimized_attention, attention.optimized_attention_masked = chosen
