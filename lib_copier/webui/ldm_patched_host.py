"""The hosts on Forge's first design (`ldm_patched`): Forge Classic and reForge. Both keep Forge's model objects and
A1111's prompt encoding; their memory managers and LoRA patchers are ComfyUI's, of two ages
(`lib_copier.backends.forge_classic` says what differs in the model). Imported only inside such a WebUI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lib_copier.backends.forge_classic import ClassicBackend, ReForgeBackend
from lib_copier.errors import CopierError
from lib_copier.webui.forge_host import ForgeHost
from lib_copier.webui.host import A1111Host

# ComfyUI's attention kernels without a backward pass (SageAttention 1/2 and 3, its FlashAttention custom op): with
# one of them, gradients would stop at every attention of the UNet.
_NO_BACKWARD = ("attention_sage", "attention_sage3", "attention_flash")


def is_reforge(memory_management) -> bool:
    """reForge's memory manager is ComfyUI's newer one, without `unload_model_clones` (Classic's has it)."""
    return not hasattr(memory_management, "unload_model_clones")


class ClassicHost(ForgeHost):
    """Forge Classic: LoRAs stay baked in by patcher clones the memory manager keeps loaded; a model it cannot hold
    whole is streamed from CPU memory ("async" loads)."""

    BACKEND = ClassicBackend

    @staticmethod
    def memory_management():
        from ldm_patched.modules import model_management

        return model_management

    def loader(self) -> Callable[[object], None]:
        memory_management = self.memory_management()

        def load(patcher):
            memory_management.load_model_gpu(patcher)
            loaded = memory_management.current_loaded_models
            if any(m.model is patcher and getattr(m, "model_accelerated", False) for m in loaded):
                raise CopierError(
                    "the GPU has too little free memory to hold the whole model, so Forge would stream part of it "
                    "from CPU memory at every step; close other GPU programs, or train a smaller model"
                )

        return load

    conditioning = A1111Host.conditioning  # A1111's model object and prompt code, which autograd can go through

    def unload_clones(self):
        return self.memory_management().unload_model_clones

    @contextmanager
    def differentiable_attention(self) -> Iterator[None]:
        """PyTorch's attention in the UNet for the block, where the WebUI chose a kernel without a backward pass
        (SageAttention for SDXL when its package is installed)."""
        from ldm_patched.ldm.modules import attention

        chosen = attention.optimized_attention, attention.optimized_attention_masked
        if any(getattr(f, "__name__", "") in _NO_BACKWARD for f in chosen):
            attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
        try:
            yield
        finally:
            attention.optimized_attention, attention.optimized_attention_masked = chosen


class ReForgeHost(ClassicHost):
    """reForge (main): clones share the original patchers' backups (the originals' `unpatch_model` restores them),
    loads can be asked to be whole, and `--always-offload-from-vram` does nothing."""

    BACKEND = ReForgeBackend
    OFFLOAD_SWAPS = False
    loader = ForgeHost.loader

    def unload_clones(self):
        return None
