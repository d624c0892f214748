"""The Backend over the model Forge (and Forge Neo) has loaded: `sd_model.forge_objects`, trained in place.

Forge keeps the LDM names for its UNet but little else of A1111's model; what differs, each point measured inside a
running Forge (main dfdcbab6), and what is done about it:
- Its weights are inference tensors (loaded under `torch.inference_mode`), which autograd refuses to save and
  in-place fusing refuses to touch: `borrowed` swaps them for ordinary tensors for the job, one tensor at a time
  (no second copy of the model), and makes them inference tensors with the same bits again afterwards.
- Its LoRA loader bakes LoRAs into new Parameters until the next refresh (Neo: until its patcher is unpatched):
  `borrowed` takes them out before and after the job and makes Forge re-apply its LoRAs at its next generation.
- `BasicTransformerBlock` adds residuals in place into a tensor its LayerNorms saved for backward: while training,
  the UNet's LayerNorms read a copy of their input.
- `KModel.apply_model` works in sigma space and returns x0: `predict` calls the UNet itself.
- `VAE.encode` samples the posterior: `encode_images` takes the encoder's mean, shifted and scaled by the VAE's own
  `process_in`.
- Its conditioning is made under inference mode: `HostBackend.encode_prompts` copies it.
- Its memory manager moves models between devices: the UNet is loaded before the loop and again if it moved.
- Low-bit storage (fp8, nf4, gguf) cannot be fused and restored bit-exactly: refused.
Its `Linear` is not an `nn.Linear` (Neo's is); nothing here (or in `lora.network`) relies on the class.
Forge Neo keeps all of this but moves some of it: what differs (LoRA patchers, the VAE's scaling, SD2 and
`ALWAYS_VRAM_OFFLOAD` gone, more low-bit formats) is handled where it is used, from what the objects expose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from lib_copier.backends.webui import Host, HostBackend, native_resolution, posterior_mean
from lib_copier.errors import CopierError
from lib_copier.lora.naming import forge_to_ldm
from lib_copier.models.sd_model import Conditioning

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
_FULL_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def is_forge_model(sd_model) -> bool:
    return getattr(sd_model, "forge_objects_original", None) is not None


def forge_family(sd_model) -> str:
    """sd1 / sd2 / sdxl from the flags Forge's engines set; one sentence for everything else (Flux, SD3). SD2 is told
    by its text encoder, `clip_h`, as well: Forge Classic (seen live) and reForge flag every SD2 model as SD1 (their
    test looks for OpenCLIP's `.model` on A1111's prompt wrapper, which does not show it)."""
    sd2 = hasattr(sd_model.forge_objects_original.clip.cond_stage_model, "clip_h")
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"  # the SDXL refiner is refused with the other backends' models (`HostBackend`)
    if sd2 or getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    raise CopierError(
        f"Copier LoRA trains SD1, SD2 and SDXL models; the loaded model is a {type(sd_model).__name__}: "
        "pick an SD1, SD2 or SDXL checkpoint"
    )


def live_parameters(sd_model, family: str) -> Iterator[tuple[str, nn.Parameter]]:
    """Forge's UNet and text-encoder parameters under their LDM names, as the modules hold them now."""
    objects = sd_model.forge_objects_original
    for module in (objects.unet.model, objects.clip.cond_stage_model):
        for name, param in module.named_parameters():
            ldm = forge_to_ldm(name, family)
            if ldm is not None:
                yield ldm, param


def forge_conditioning(sd_model, prompts):
    """Forge's own `get_learned_conditioning` for `prompts` (an `SdConditioning`, which carries the image size). It
    runs under inference mode, which gives no gradient; for text-encoder training the function it wraps is called."""
    method = type(sd_model).get_learned_conditioning
    if torch.is_grad_enabled():
        method = getattr(method, "__wrapped__", None)
        if method is None:
            raise CopierError("this Forge's prompt encoding cannot be trained through; turn off train_text_encoder")
    return method(sd_model, prompts)


class ForgeBackend(HostBackend):
    _LOW_BITS_ADVICE = "set Forge's 'Diffusion in Low Bits' to Automatic (fp16) and load the model again"

    def __init__(self, host: Host, load: Callable[[object], None] = lambda patcher: None):
        """`load` is Forge's `memory_management.load_model_gpu`: it puts a patcher's model on its device."""
        sd_model = host.sd_model
        self._objects = sd_model.forge_objects_original
        family = forge_family(sd_model)
        self._load = load
        kmodel = self._objects.unet.model
        for module in (kmodel, self._objects.clip.cond_stage_model):
            if (low := _low_bits(module)) is not None:
                raise CopierError(
                    f"the loaded model stores its weights in low bits ({low}); LoRA training needs fp16, bf16 or "
                    f"fp32 weights: {self._LOW_BITS_ADVICE}"
                )
        layers = {}
        for module in (kmodel, self._objects.clip.cond_stage_model):
            for name, layer in module.named_modules():
                if (ldm := forge_to_ldm(name, family)) is not None:
                    layers[ldm] = layer
        super().__init__(host, dict(live_parameters(sd_model, family)), layers, family)
        self.prediction = self._prediction(kmodel)
        self.resolution = native_resolution(family, self.prediction)
        self.device = torch.device(self._objects.unet.load_device)
        self.dtype = self._computation_dtype(kmodel)

    # What differs between Forge's designs (Forge Classic's: `forge_classic.py`).

    def _prediction(self, kmodel: nn.Module) -> str:
        prediction = getattr(kmodel.predictor, "prediction_type", None)
        if prediction not in PREDICTIONS or not hasattr(kmodel.predictor, "alphas_cumprod"):
            raise CopierError(
                f"the loaded model is not a diffusion model with a noise schedule (prediction {prediction!r}, "
                "e.g. flow matching); Copier LoRA trains epsilon and v-prediction SD1, SD2 and SDXL models"
            )
        return PREDICTIONS[prediction]

    def _computation_dtype(self, kmodel: nn.Module) -> torch.dtype:
        return kmodel.computation_dtype

    def _scaled_latents(self, mean: torch.Tensor) -> torch.Tensor:
        return self._objects.vae.first_stage_model.process_in(mean)  # Forge's shift and scale

    def _unet_loaded(self) -> bool:
        return _same_device(next(self.unet().parameters()).device, self.device)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Forge replaces Parameter objects (LoRA refresh, device moves): read them where they are now.
        return live_parameters(self.sd_model, self.family)

    def alphas_cumprod(self) -> torch.Tensor:
        schedule = self._objects.unet.model.predictor.alphas_cumprod.detach().to("cpu", torch.float32)
        # A checkpoint with a `ztsnr` key (NoobAI's v-prediction SDXL) was trained on a zero-terminal-SNR schedule,
        # and Forge samples it so (its sigmas rescaled for each generation; the predictor keeps the plain schedule).
        return self._as_sampled(schedule, getattr(getattr(self.sd_model, "model_config", None), "ztsnr", False))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self._load(self._objects.vae.patcher)
        mean = posterior_mean(self._objects.vae.first_stage_model, images)
        return self._scaled_latents(mean).float().to(self.device)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        unet = self.unet()
        if not self._unet_loaded():
            self._load(self._objects.unet)  # drawing a preview may have made room for the VAE
        extra = {} if cond.vector is None else {"y": cond.vector}
        return unet(x, t, context=cond.context, **extra).float()

    def unet(self) -> nn.Module:
        return self._objects.unet.model.diffusion_model

    def text_encoders(self) -> list[nn.Module]:
        return list(self._objects.clip.cond_stage_model.children())

    def _while_training(self, stack: ExitStack, text_encoders: bool) -> None:
        self._load(self._objects.unet)
        for module in self.unet().modules():
            if isinstance(module, nn.LayerNorm):
                stack.callback(module.register_forward_pre_hook(_read_a_copy).remove)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)  # "cuda" is "cuda:0"


def _read_a_copy(module: nn.Module, args: tuple) -> tuple:
    # The block adds its residual in place into the very tensor this norm read; autograd needs the norm's input.
    return (args[0].clone(), *args[1:]) if torch.is_grad_enabled() else args


def _low_bits(module: nn.Module) -> object | None:
    """What stores `module`'s weights in low bits, or None where every weight is fp16, bf16 or fp32."""
    storage = getattr(module, "storage_dtype", torch.float16)
    if storage not in _FULL_PRECISION:
        return storage
    for p in module.parameters():
        # bitsandbytes (nf4/fp4) and gguf mark their parameters; Neo's mixed-precision and int8 formats are tensor
        # subclasses or other dtypes.
        if hasattr(p, "bnb_quantized") or hasattr(p, "gguf_cls") or type(p.data) is not torch.Tensor:
            return type(p.data).__name__
        if p.dtype not in _FULL_PRECISION:
            return p.dtype
    return None


@contextmanager
def borrowed(sd_model, unload_clones: Callable[[object], None] | None = None) -> Iterator[None]:
    """For one job: Forge's model without any LoRA baked in, its weights ordinary tensors that autograd and fusing
    can use; afterwards the same bits as inference tensors again, and Forge's LoRA state reset so that its next
    generation applies whatever LoRAs its prompt asks for from the original weights. `unload_clones`: Forge
    Classic's `model_management.unload_model_clones` (see `forget_loras`)."""
    objects = sd_model.forge_objects_original
    forget_loras(sd_model, unload_clones)
    slots = [
        (layer, name)
        for module in (objects.unet.model, objects.clip.cond_stage_model)
        for layer in module.modules()
        for name, param in layer._parameters.items()
        if param is not None and param.is_inference()
    ]
    try:
        _replace_parameters(slots, lambda param: param.detach().clone())
        yield
    finally:
        forget_loras(sd_model, unload_clones)  # restores what the host-drawn grids baked into the weights
        with torch.inference_mode():
            _replace_parameters(slots, lambda param: param if param.is_inference() else param.detach().clone())


def forget_loras(sd_model, unload_clones: Callable[[object], None] | None = None) -> None:
    """Forge's LoRAs out of the weights, and its cache of what it applied reset. Forge refreshes a patcher to the
    LoRAs it carries (the original ones carry none); Neo's ComfyUI-style patchers restore their shared backups.
    Forge Classic's keep their backups per clone, and the clone that carries the LoRAs stays loaded (weights and
    all) until the memory manager unloads it: `unload_clones(original)` does that."""
    objects = sd_model.forge_objects_original
    for patcher in (objects.unet, objects.clip.patcher):
        if unload_clones is not None:
            unload_clones(patcher)
        elif hasattr(patcher, "refresh_loras"):
            patcher.refresh_loras()
        else:
            patcher.unpatch_model()
    sd_model.current_lora_hash = str([])
    sd_model.forge_objects = objects.shallow_copy()
    sd_model.forge_objects_after_applying_lora = objects.shallow_copy()


def _replace_parameters(slots: list[tuple[nn.Module, str]], copy: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Each parameter in `slots` replaced by `copy` of it (unless that returns it), one at a time so that at most
    one tensor is held twice; a weight shared by several layers stays shared."""
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for layer, name in slots:
        groups.setdefault(id(layer._parameters[name]), []).append((layer, name))
    for where in groups.values():
        layer, name = where[0]
        old = layer._parameters[name]
        new = copy(old)
        if new is not old:
            new = nn.Parameter(new, requires_grad=False)
            for layer, name in where:
                layer._parameters[name] = new
        del old, new
