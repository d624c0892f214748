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
from lib_copier.webui.medvram import kept_on_device

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


class Medvram:
    """A1111's --medvram (modules/lowvram.py) as `lib_copier.webui.medvram` meets it: the UNet, the text encoder(s)
    and the VAE wait off the device until a forward pre-hook named `send_me_to_gpu` (for the VAE, its wrapped
    `decode`) brings one in and sends out the one tracked in `module_in_gpu`.

    On a GPU "out" is the CPU. With no GPU, "out" fills a unit's weights with NaN and keeps their values aside, so a
    computation with a unit that is out fails (non-finite) where on a GPU it would fail across devices."""

    def __init__(self, sd_model: A1111Model, device: torch.device):
        self.device = device
        self.module_in_gpu = None
        self._kept: dict[torch.Tensor, torch.Tensor] = {}
        units = {"unet": sd_model.model, "te": sd_model.cond_stage_model, "vae": sd_model.first_stage_model}
        self.units = units
        parents = {sd_model.model.diffusion_model: units["unet"]}
        for embedder in sd_model.ours[0].text_embedders:
            parents[getattr(embedder, "transformer", None) or embedder.model] = units["te"]

        def send_me_to_gpu(module, _):
            module = parents.get(module, module)
            if self.module_in_gpu is module:
                return
            if self.module_in_gpu is not None:
                self._out(self.module_in_gpu)
            self._in(module)
            self.module_in_gpu = module

        for unit in units.values():
            self._out(unit)
        for module in [*parents, units["vae"]]:
            module.register_forward_pre_hook(send_me_to_gpu)
        decode = units["vae"].decode
        units["vae"].decode = lambda z: (send_me_to_gpu(units["vae"], None), decode(z))[1]
        sd_model.lowvram = True

    def send_everything_to_cpu(self):
        if self.module_in_gpu is not None:
            self._out(self.module_in_gpu)
        self.module_in_gpu = None

    def value(self, tensor: torch.Tensor) -> torch.Tensor:
        """A weight's value, wherever it waits."""
        return self._kept.get(tensor, tensor.data).to(self.device)

    def units_in(self) -> list[str]:
        """The units on the device now: "unet", "te", "vae"."""
        return [name for name, unit in self.units.items() if not self._is_out(unit)]

    def _is_out(self, unit: nn.Module) -> bool:
        if self.device.type != "cpu":
            return all(p.device.type == "cpu" for p in unit.parameters())
        return all(p in self._kept for p in unit.parameters())

    def _out(self, unit: nn.Module):
        if self.device.type != "cpu":
            unit.to("cpu")
            return
        for tensor in [*unit.parameters(), *unit.buffers()]:
            if tensor.is_floating_point() and tensor not in self._kept:
                self._kept[tensor] = tensor.data
                tensor.data = torch.full((), float("nan"), dtype=tensor.dtype).expand(tensor.shape)

    def _in(self, unit: nn.Module):
        if self.device.type != "cpu":
            unit.to(self.device)
            return
        for tensor in [*unit.parameters(), *unit.buffers()]:
            if tensor in self._kept:
                tensor.data = self._kept.pop(tensor)


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
        self.noise_schedule = "Default"  # the WebUIs' setting "Noise schedule for sampling"

    def list_loras(self) -> None:
        """As the adapters have the WebUI do at the end of a job: its list of LoRA files read again."""
        folder = self.lora_dir
        files = folder.rglob("*.safetensors") if folder else []
        self.listed = sorted(p.relative_to(folder).as_posix() for p in files)

    def model_changed(self):
        return self.replaced

    def zero_terminal_snr(self):
        return self.noise_schedule == "Zero Terminal SNR"

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
        self.device = next(model.parameters()).device
        self.medvram: Medvram | None = None

    def start_medvram(self):
        """From now on as if the WebUI had been started with --medvram."""
        self.medvram = Medvram(self.sd_model, self.device)

    def backend(self):
        return WebUIBackend(self)

    def resident(self, modules):
        return kept_on_device(self.medvram, self.sd_model, modules)

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
            # A1111 draws on its device whatever --medvram has moved out; `generate` computes where the weights are.
            stack.enter_context(self.resident([self.sd_model.model, *self.sd_model.ours[0].text_embedders, model.vae]))
            return generate(model, request, progress)

    @contextmanager
    def prepared(self):
        self.prepared_jobs += 1
        try:
            yield
        finally:
            self.list_loras()
