"""The Backend over the model a WebUI has loaded: its UNet, text encoders and VAE, in place, never copied.

Everything host-specific (A1111's prompt parsing, txt2img, its Lora extension) is behind the small `Host`
protocol; `lib_copier.webui.host` implements it for A1111, the tests with an A1111-shaped stand-in over our own
models. What is here only relies on the LDM/SGM module layout that A1111 keeps: `model.diffusion_model`,
`first_stage_model`, `cond_stage_model` or `conditioner.embedders`, with A1111's hijack wrappers adding `.wrapped`
levels that checkpoints and LoRA files do not have.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from lib_copier.backends import StepProgress
from lib_copier.errors import CopierError
from lib_copier.lora.naming import Target, lora_targets, model_family
from lib_copier.lora.network import LoRANetwork, all_applied
from lib_copier.models.checkpoint import check_plain_unet
from lib_copier.models.generate import Txt2Img
from lib_copier.models.sampling import zero_terminal_snr
from lib_copier.models.sd_model import Conditioning

_WRAPPED = re.compile(r"\.wrapped(?=\.|$)")
_REFINER = (
    "the loaded model is the SDXL refiner, which has no CLIP-L text encoder and no LoRA format of its own; "
    "Copier LoRA trains SD1, SD2 and SDXL base models: pick one"
)
_FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


class Host(Protocol):
    sd_model: Any  # the loaded LatentDiffusion / DiffusionEngine

    def conditioning(self, prompts: list[str], height: int, width: int) -> Any:
        """The host's own `get_learned_conditioning`: a tensor (SD1/SD2) or {"crossattn", "vector"} (SDXL)."""

    def txt2img(self, request: Txt2Img, progress: StepProgress | None = None) -> Image.Image:
        """One image through the host's own txt2img, with whatever is attached to the model now."""

    def zero_terminal_snr(self) -> bool:
        """Whether the user's setting has the host sample every model on a zero-terminal-SNR schedule (the WebUIs'
        "Noise schedule for sampling", meant for models trained on one)."""


class PlacingHost(Host, Protocol):
    """A host that may keep parts of its model off the GPU between uses (A1111's --medvram)."""

    device: torch.device  # where the host computes with its model

    def resident(self, modules: list[nn.Module]) -> AbstractContextManager[None]:
        """`modules` on `device` for the whole block, whatever the host's offloading would do meanwhile."""


def checkpoint_name(name: str) -> str:
    """A live module or parameter name → its name in checkpoints and LoRA files (A1111's `.wrapped` dropped)."""
    return _WRAPPED.sub("", name)


class HostBackend(ABC):
    """What every WebUI backend shares: the host's conditioning and txt2img, LoRA layers by LDM name, training mode.

    A subclass finds the host's weights and layers under their LDM names and says how to encode, predict and
    which modules are the UNet and the text encoders."""

    def __init__(self, host: Host, params: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module], family: str):
        check_plain_unet({n: tuple(p.shape) for n, p in params.items()}, family, "the loaded model's UNet")
        if family == "sdxl" and not any(n.startswith("conditioner.embedders.0.transformer.") for n in params):
            raise CopierError(_REFINER)  # its one text encoder, OpenCLIP-G, where SDXL's CLIP-L belongs
        self.host = host
        self.sd_model = host.sd_model
        self._params = dict(params)
        self._layers = dict(layers)
        self.family = family

    @abstractmethod
    def unet(self) -> nn.Module:
        """The denoiser module."""

    @abstractmethod
    def text_encoders(self) -> list[nn.Module]:
        """The text encoder modules."""

    def encode_prompts(self, prompts: list[str], height: int, width: int) -> Conditioning:
        cond = self.host.conditioning(list(prompts), height, width)
        if isinstance(cond, dict):
            return Conditioning(_ordinary(cond["crossattn"]), _ordinary(cond["vector"]))
        return Conditioning(_ordinary(cond))

    def lora_layers(self) -> Mapping[str, nn.Module]:
        return self._layers

    def _as_sampled(self, schedule: torch.Tensor, trained_so: bool = False) -> torch.Tensor:
        """The model's noise schedule as the host samples with it: rescaled to zero terminal SNR where the
        checkpoint says it was trained so (`trained_so`) or the user's setting asks for it, as the WebUIs do."""
        return zero_terminal_snr(schedule) if trained_so or self.host.zero_terminal_snr() else schedule

    def lora_targets(self, conv: bool = False) -> list[Target]:
        return lora_targets({n: tuple(p.shape) for n, p in self._params.items()}, self.family, conv=conv)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._params.items())

    @contextmanager
    def training_mode(self, text_encoders: bool, gradient_checkpointing: bool) -> Iterator[None]:
        unet = self.unet()
        training = [unet, *(self.text_encoders() if text_encoders else [])]
        with ExitStack() as stack:
            for module in training:
                stack.callback(module.train, module.training)
                module.train()
            # LDM/SGM's own checkpointing (on in the SD2 and SDXL configs) differentiates only the block's own
            # parameters, so a LoRA attached from outside would get no gradient: off while training.
            for module in unet.modules():
                for flag in ("checkpoint", "use_checkpoint"):
                    if isinstance(getattr(module, flag, None), bool):
                        stack.callback(setattr, module, flag, getattr(module, flag))
                        setattr(module, flag, False)
            self._while_training(stack, text_encoders)
            if gradient_checkpointing:
                for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
                    stack.callback(_restore_forward, block, block.__dict__.get("forward"))
                    block.forward = _checkpointed(block.forward)
            yield

    @abstractmethod
    def _while_training(self, stack: ExitStack, text_encoders: bool) -> None:
        """What else the host's model needs while it trains; undone by `stack`."""

    def generate(
        self,
        request: Txt2Img,
        loras: list[tuple[LoRANetwork, float]] = (),
        progress: StepProgress | None = None,
    ) -> Image.Image:
        table = {t.key: t for t in self.lora_targets(conv=True)}
        with all_applied(loras, self._layers, table):
            return self.host.txt2img(request, progress)


class WebUIBackend(HostBackend):
    """A1111's loaded model: LDM/SGM modules with the hijack's `.wrapped` levels."""

    def __init__(self, host: PlacingHost):
        params = {checkpoint_name(n): p for n, p in host.sd_model.named_parameters()}
        if any(p.dtype in _FP8 for p in params.values()):
            raise CopierError(
                "the loaded model stores its weights in fp8 (Settings → Optimizations → FP8 weight); "
                "LoRA training needs it off"
            )
        layers: dict[str, nn.Module] = {}
        for name, module in host.sd_model.named_modules():
            layers.setdefault(checkpoint_name(name), module)
        super().__init__(host, params, layers, model_family(params))
        self.prediction = ldm_prediction(self.sd_model)
        self.resolution = native_resolution(self.family, self.prediction)
        # The host's device, not the UNet's: under --medvram the UNet waits on the CPU between uses.
        self.device, self.dtype = host.device, next(self.unet().parameters()).dtype

    # What the trainer reads.

    def alphas_cumprod(self) -> torch.Tensor:
        return self._as_sampled(ldm_schedule(self.sd_model))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        # The posterior's mean straight from the encoder: no sampling, and none of the host's encode options
        # (TAESD approximation) apply.
        vae = self.sd_model.first_stage_model
        with self.host.resident([vae]):
            mean = posterior_mean(vae, images)
        return (mean * float(self.sd_model.scale_factor)).to(self.device)

    def encode_prompts(self, prompts: list[str], height: int, width: int) -> Conditioning:
        # Under --medvram the text encoders leave the GPU again afterwards, even while the UNet is kept there.
        with self.host.resident(self.text_encoders()):
            return super().encode_prompts(prompts, height, width)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        c = cond.context if cond.vector is None else {"crossattn": cond.context, "vector": cond.vector}
        return self.sd_model.apply_model(x, t, c).float()

    def unet(self) -> nn.Module:
        return self.sd_model.model.diffusion_model

    def text_encoders(self) -> list[nn.Module]:
        if hasattr(self.sd_model, "conditioner"):
            return [e for e in self.sd_model.conditioner.embedders if next(e.parameters(), None) is not None]
        return [self.sd_model.cond_stage_model]

    def _while_training(self, stack: ExitStack, text_encoders: bool) -> None:
        stack.enter_context(self.host.resident([self.unet(), *(self.text_encoders() if text_encoders else [])]))
        if text_encoders:
            # SGM's conditioner runs embedders under no_grad unless they say they are trainable.
            for embedder in self.text_encoders():
                if hasattr(embedder, "is_trainable"):
                    stack.callback(setattr, embedder, "is_trainable", embedder.is_trainable)
                    embedder.is_trainable = True


def ldm_prediction(sd_model) -> str:
    """The prediction ("eps" or "v") an LDM/SGM model object (A1111's, Forge Classic's) samples with."""
    return "v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps"


def ldm_schedule(sd_model) -> torch.Tensor:
    """An LDM/SGM model object's noise schedule, float32 on the CPU. A1111 (and Forge Classic) rewrite
    `alphas_cumprod` per generation (downcast to fp16, rescaled to zero terminal SNR): this is the original, which
    `HostBackend._as_sampled` rescales where the host samples so; the downcast is rounding, left out."""
    schedule = getattr(sd_model, "alphas_cumprod_original", None)
    if schedule is None:
        schedule = sd_model.alphas_cumprod
    return schedule.detach().to("cpu", torch.float32)


def native_resolution(family: str, prediction: str) -> int:
    """The image side a model family was trained at: SDXL 1024, SD2-v 768, SD1 and SD2 (eps) 512."""
    return {"sdxl": 1024, "sd2": 768 if prediction == "v" else 512}.get(family, 512)


def posterior_mean(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The unscaled mean of an LDM-style VAE's posterior, float32, on the VAE's device."""
    param = next(vae.parameters())
    moments = vae.encoder(images.to(param.device, param.dtype))
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)
    mean = moments[:, : moments.shape[1] // 2].float()
    if not torch.isfinite(mean).all():
        raise CopierError(
            "the VAE gave NaN for this image (an fp16 VAE overflow); start the WebUI with its full-precision VAE "
            "(--no-half-vae in A1111, --vae-in-fp32 in Forge)"
        )
    return mean


def _ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor made under `torch.inference_mode` (Forge's conditioning) cannot enter autograd: copy it."""
    return tensor.clone() if tensor.is_inference() else tensor


def _checkpointed(forward: Callable) -> Callable:
    """Non-reentrant activation checkpointing: gradients reach every parameter used, LoRA ones included."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _restore_forward(module: nn.Module, own: Callable | None) -> None:
    if own is None:
        del module.forward  # back to the class's forward
    else:
        module.forward = own
