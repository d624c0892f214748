"""An A1111-shaped stand-in over our own models, for testing the WebUI backend without a WebUI.

It keeps what `WebUIBackend` relies on from A1111 1.10: the LDM/SGM attribute layout, the hijack's `.wrapped`
level around each text encoder, `get_learned_conditioning` returning a tensor (SD1/SD2) or a dict (SDXL),
`apply_model`, `alphas_cumprod_original`, `parameterization`, `scale_factor`, and the built-in checkpoint flags
of LDM blocks. The modules are the model's own, so both backends train the very same weights.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from lib_copier.backends.webui import WebUIBackend
from lib_copier.lora.files import read_lora
from lib_copier.lora.naming import by_key, lora_targets
from lib_copier.lora.network import LoRANetwork
from lib_copier.models.generate import generate
from lib_copier.models.sd_model import Conditioning, StableDiffusion

LORA_TAG = re.compile(r"<lora:([^:>]+):([-0-9.]+)>")


class Hijacked(nn.Module):
    """A1111's `FrozenCLIPEmbedderWithCustomWords` and friends: the real embedder sits under `.wrapped`."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.wrapped = embedder
        self.is_trainable = False

    def forward(self, prompts: list[str]):
        return self.wrapped.encode(prompts)


class Conditioner(nn.Module):
    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(Hijacked(e) for e in embedders)


class A1111Model(nn.Module):
    def __init__(self, model: StableDiffusion):
        super().__init__()
        self.ours = [model]  # a list, so the module tree below is A1111's, not ours
        self.model = model.model
        self.first_stage_model = model.first_stage_model
        if hasattr(model, "conditioner"):
            self.conditioner = Conditioner(model.conditioner.embedders)
            self.cond_stage_model = self.conditioner  # as A1111 does for SDXL
        else:
            self.cond_stage_model = Hijacked(model.cond_stage_model)
        self.parameterization = model.config.prediction
        self.scale_factor = model.config.scale_factor
        self.alphas_cumprod_original = model.schedule.alphas_cumprod.clone()
        self.is_sdxl = hasattr(model, "conditioner")
        for module in self.model.diffusion_model.modules():
            if type(module).__name__ == "BasicTransformerBlock":
                module.checkpoint = True  # on in A1111's SD2 and SDXL configs

    def get_learned_conditioning(self, prompts: list[str], height: int, width: int):
        # SGM's conditioner runs embedders that do not say they are trainable under no_grad.
        trainable = not self.is_sdxl or all(e.is_trainable for e in self.conditioner.embedders)
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            cond = self.ours[0].encode_prompts(prompts, height, width)
        return cond.context if cond.vector is None else {"crossattn": cond.context, "vector": cond.vector}

    def apply_model(self, x, t, cond):
        if isinstance(cond, dict):
            return self.ours[0].predict(x, t, Conditioning(cond["crossattn"], cond["vector"]))
        return self.ours[0].predict(x, t, Conditioning(cond))


class StandInUI:
    """What every stand-in host shows and takes like a WebUI: a progress bar, previews and an Interrupt button that
    tests can read and press, the prompts it drew, and whether its model was replaced."""

    def __init__(self, model: StableDiffusion, lora_dir: Path | None):
        self.model = model
        self.lora_dir = lora_dir
        self.prompts: list[str] = []
        self.lora_files: list[Path] = []  # each LoRA file the host loaded, relative to lora_dir
        self.shown: list[tuple[str, int, int]] = []
        self.previews = 0
        self.interrupt_when = lambda shown: False
        self.prepared_jobs = 0
        self.replaced = False

    def model_changed(self):
        return self.replaced

    def find_lora(self, name: str) -> Path:
        """As the WebUIs' Lora extensions do: by file name, anywhere under the LoRA folder."""
        path = next(self.lora_dir.rglob(f"{name}.safetensors"))
        self.lora_files.append(path.relative_to(self.lora_dir))
        return path

    def interrupted(self):
        return self.interrupt_when(self.shown)

    def show_progress(self, text, step, total):
        self.shown.append((text, step, total))

    def show_preview(self, image):
        self.previews += 1


class A1111Host(StandInUI):
    """The host side: conditioning and txt2img as A1111 does them, `<lora:name:w>` loaded from `lora_dir` the way
    its Lora extension would."""

    def __init__(self, model: StableDiffusion, lora_dir: Path | None = None):
        super().__init__(model, lora_dir)
        self.sd_model = A1111Model(model)
        self.checkpoint = "stand-in.safetensors"

    def backend(self):
        return WebUIBackend(self)

    def conditioning(self, prompts, height, width):
        return self.sd_model.get_learned_conditioning(prompts, height, width)

    def txt2img(self, request, progress=None):
        self.prompts.append(request.prompt)
        model = self.sd_model.ours[0]
        with ExitStack() as stack:
            for name, weight in LORA_TAG.findall(request.prompt):
                lora = read_lora(self.find_lora(name))
                network = LoRANetwork.from_weights(lora.modules)
                table = by_key(
                    lora_targets({n: tuple(p.shape) for n, p in model.named_parameters()}, lora.family, True)
                )
                stack.enter_context(network.applied(dict(model.named_modules()), table, float(weight)))
            request = dataclasses.replace(request, prompt=LORA_TAG.sub("", request.prompt).strip())
            return generate(model, request, progress)

    @contextmanager
    def prepared(self):
        self.prepared_jobs += 1
        yield
