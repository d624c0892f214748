"""The Backends over the model Forge Classic or reForge has loaded: Forge's first design (`ldm_patched`, ComfyUI's
model patchers and memory manager), kept alive by Forge Classic (Haoming02/sd-webui-forge-classic) and, with
ComfyUI's newer patchers and memory manager, by reForge (Panchovix/stable-diffusion-webui-reForge).

It holds the same `forge_objects` as Forge (a UNet patcher whose model has `.diffusion_model` under LDM names, a
CLIP whose `cond_stage_model` has `clip_l` / `clip_g` / `clip_h` in the Hugging Face layout, a VAE with a patcher),
so `ForgeBackend` reads and trains it; what differs is read where Forge Classic keeps it:
- the model family: Classic flags SD2 models as SD1, and `forge_family` tells them by their `clip_h` encoder;
- `shared.sd_model` is still A1111's LDM/SGM object, and A1111's samplers sample it: the prediction is its
  `parameterization` and the schedule its `alphas_cumprod(_original)`, as for A1111 (`KModel.predictor` does not
  exist; the UNet's `model_sampling` has sigmas only), rescaled to zero terminal SNR where the checkpoint says so;
- the UNet computes in `manual_cast_dtype` where one is set (fp16 weights on a card without fp16 compute), else in
  its weights' dtype;
- the VAE has no `process_in`: latents are scaled by the UNet's `latent_format`;
- its LoRAs live in patcher clones that stay loaded until the memory manager unloads them (`forget_loras`);
- with the `sageattention` package installed it computes SDXL's attention with SageAttention, which has no backward
  pass (gradients would stop at every attention): while training, the host's `differentiable_attention()`.
reForge's differences are listed at `ReForgeBackend`. The host side (memory manager, prompt encoding, LoRA clones,
attention) is `lib_copier.webui.ldm_patched_host`.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from lib_copier.backends.forge import ForgeBackend
from lib_copier.backends.webui import ldm_prediction, ldm_schedule
from lib_copier.errors import CopierError


class ClassicBackend(ForgeBackend):
    _LOW_BITS_ADVICE = (
        "turn off Settings → Optimizations → 'Store UNet Weights in fp8', or start Forge without "
        "--unet-in-fp8-e4m3fn / --unet-in-fp8-e5m2 / --clip-in-fp8-…"
    )

    def _prediction(self, kmodel: nn.Module) -> str:
        return ldm_prediction(self.sd_model)

    def _computation_dtype(self, kmodel: nn.Module) -> torch.dtype:
        return getattr(kmodel, "manual_cast_dtype", None) or kmodel.get_dtype()

    def alphas_cumprod(self) -> torch.Tensor:
        schedule = ldm_schedule(self.sd_model)
        # A v checkpoint with a `ztsnr` key (NoobAI's v-prediction SDXL) was trained on a zero-terminal-SNR schedule,
        # and Classic samples it so (it leaves an eps model's schedule as it is).
        return self._as_sampled(schedule, getattr(self.sd_model, "ztsnr", False) and self.prediction == "v")

    def _scaled_latents(self, mean: torch.Tensor) -> torch.Tensor:
        return self._objects.unet.model.latent_format.process_in(mean)

    def _while_training(self, stack: ExitStack, text_encoders: bool) -> None:
        super()._while_training(stack, text_encoders)
        stack.enter_context(self.host.differentiable_attention())


# ComfyUI's discrete SD schedules: `ModelSampling(ModelSamplingDiscrete, EPS | V_PREDICTION)`; its subclasses and
# the other parameterisations (EDM, flow, x0) are other kinds of model.
_NOT_SD_SAMPLING = {
    "ModelSamplingDiscreteEDM",
    "ModelSamplingDiscreteFlow",
    "StableCascadeSampling",
    "EDM",
    "CONST",
    "X0",
}


class ReForgeBackend(ClassicBackend):
    """reForge: Forge Classic's objects over ComfyUI's 2025 patchers and memory manager (read in reForge main
    3b56b268). What differs from Classic:
    - the prediction is the UNet's `model_sampling` class (reForge reads a checkpoint's `v_pred` key there, not in
      A1111's `parameterization`), and so is a zero-terminal-SNR schedule (its `zsnr`, from the checkpoint's
      `ztsnr` key); EDM, flow and x0 samplings are refused;
    - clones share the original patcher's weight backups, so the original's `unpatch_model` takes a generation's LoRAs
      out (no `unload_model_clones`);
    - the memory manager may load a model partially, or unload part of it to make room: loads are full
      (`force_full_load`), and the UNet is loaded again whenever part of it is off the device;
    - `--torch-compile` wraps the UNet (`_orig_mod` in every name), and 32-channel SDXL variants use the SDXL flag:
      both refused."""

    def __init__(self, host, load):
        kmodel = host.sd_model.forge_objects_original.unet.model
        if any("._orig_mod." in name for name, _ in kmodel.named_parameters()):
            raise CopierError("Copier LoRA cannot train a UNet compiled by --torch-compile; restart reForge without it")
        latents = type(getattr(kmodel, "latent_format", None)).__name__
        if latents not in ("SD15", "SDXL"):
            raise CopierError(
                f"the loaded model's latents are not SD's or SDXL's ({latents}); Copier LoRA trains SD1, SD2 and SDXL"
            )
        super().__init__(host, load)

    def _prediction(self, kmodel: nn.Module) -> str:
        names = {cls.__name__ for cls in type(kmodel.model_sampling).__mro__}
        if "ModelSamplingDiscrete" in names and not names & _NOT_SD_SAMPLING:
            if "V_PREDICTION" in names:
                return "v"
            if "EPS" in names:
                return "eps"
        kind = ", ".join(sorted(names & _NOT_SD_SAMPLING)) or "neither epsilon nor v"
        raise CopierError(
            f"the loaded model does not sample as SD does ({kind}); Copier LoRA trains epsilon and v-prediction SD1, "
            "SD2 and SDXL models"
        )

    def alphas_cumprod(self) -> torch.Tensor:
        sampling = self._objects.unet.model.model_sampling
        if not getattr(sampling, "zsnr", False):  # the same schedule, without a round trip through fp32 sigmas
            return self._as_sampled(ldm_schedule(self.sd_model))
        return (1 / (1 + sampling.sigmas.detach().to("cpu", torch.float64) ** 2)).float()

    def _unet_loaded(self) -> bool:
        patcher = self._objects.unet
        partly = getattr(patcher.model, "model_lowvram", False) or patcher.loaded_size() < patcher.model_size()
        return super()._unet_loaded() and not partly
