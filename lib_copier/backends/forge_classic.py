"""The Backend over the model Forge Classic has loaded: Forge's first design (`ldm_patched`, ComfyUI's model
patchers and memory manager), kept alive by Forge Classic (Haoming02/sd-webui-forge-classic).

It holds the same `forge_objects` as Forge (a UNet patcher whose model has `.diffusion_model` under LDM names, a
CLIP whose `cond_stage_model` has `clip_l` / `clip_g` / `clip_h` in the Hugging Face layout, a VAE with a patcher),
so `ForgeBackend` reads and trains it; what differs is read where Forge Classic keeps it:
- the model family from the flags, except SD2, which Classic flags as SD1: its `clip_h` encoder tells;
- `shared.sd_model` is still A1111's LDM/SGM object, and A1111's samplers sample it: the prediction is its
  `parameterization` and the schedule its `alphas_cumprod(_original)`, as for A1111 (`KModel.predictor` does not
  exist; the UNet's `model_sampling` has sigmas only), rescaled to zero terminal SNR where the checkpoint says so;
- the UNet computes in `manual_cast_dtype` where one is set (fp16 weights on a card without fp16 compute), else in
  its weights' dtype;
- the VAE has no `process_in`: latents are scaled by the UNet's `latent_format`;
- its LoRAs live in patcher clones that stay loaded until the memory manager unloads them (`forget_loras`);
- with the `sageattention` package installed it computes SDXL's attention with SageAttention, which has no backward
  pass (gradients would stop at every attention): while training, the host's `differentiable_attention()`.
The host side (its memory manager, prompt encoding, LoRA clones, attention) is `ClassicHost` in
`lib_copier.webui.forge_host`.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from lib_copier.backends.forge import ForgeBackend, forge_family
from lib_copier.backends.webui import ldm_prediction, ldm_schedule
from lib_copier.models.sampling import zero_terminal_snr


class ClassicBackend(ForgeBackend):
    _LOW_BITS_ADVICE = (
        "turn off Settings → Optimizations → 'Store UNet Weights in fp8', or start Forge without "
        "--unet-in-fp8-e4m3fn / --unet-in-fp8-e5m2 / --clip-in-fp8-…"
    )

    def _family(self, sd_model) -> str:
        # Its `is_sd2` looks for OpenCLIP's `.model` on A1111's prompt wrapper, which does not show it: every SD2
        # model is flagged SD1 (seen live). The text encoders tell.
        if hasattr(self._objects.clip.cond_stage_model, "clip_h") and not getattr(sd_model, "is_sdxl", False):
            return "sd2"
        return forge_family(sd_model)

    def _prediction(self, kmodel: nn.Module) -> str:
        return ldm_prediction(self.sd_model)

    def _computation_dtype(self, kmodel: nn.Module) -> torch.dtype:
        return getattr(kmodel, "manual_cast_dtype", None) or kmodel.get_dtype()

    def alphas_cumprod(self) -> torch.Tensor:
        schedule = ldm_schedule(self.sd_model)
        # A v checkpoint with a `ztsnr` key (NoobAI's v-prediction SDXL) was trained on a zero-terminal-SNR schedule,
        # and Classic samples it so (it leaves an eps model's schedule as it is).
        ztsnr = getattr(self.sd_model, "ztsnr", False) and self.prediction == "v"
        return zero_terminal_snr(schedule) if ztsnr else schedule

    def _scaled_latents(self, mean: torch.Tensor) -> torch.Tensor:
        return self._objects.unet.model.latent_format.process_in(mean)

    def _while_training(self, stack: ExitStack, text_encoders: bool) -> None:
        super()._while_training(stack, text_encoders)
        stack.enter_context(self.host.differentiable_attention())
