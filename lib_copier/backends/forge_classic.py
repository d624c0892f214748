"""The Backend over the model Forge Classic has loaded: Forge's first design (`ldm_patched`, ComfyUI's model
patchers and memory manager), kept alive by Forge Classic (Haoming02/sd-webui-forge-classic).

It holds the same `forge_objects` as Forge (a UNet patcher whose model has `.diffusion_model` under LDM names, a
CLIP whose `cond_stage_model` has `clip_l` / `clip_g` / `clip_h` in the Hugging Face layout, a VAE with a patcher),
so `ForgeBackend` reads and trains it; what differs is read where Forge Classic keeps it:
- `shared.sd_model` is still A1111's LDM/SGM object, and A1111's samplers sample it: the prediction is its
  `parameterization` and the schedule its `alphas_cumprod(_original)`, as for A1111 (`KModel.predictor` does not
  exist; the UNet's `model_sampling` has sigmas only).
- the UNet computes in `manual_cast_dtype` where one is set (fp16 weights on a card without fp16 compute), else in
  its weights' dtype;
- the VAE has no `process_in`: latents are scaled by the UNet's `latent_format`;
- its LoRAs live in patcher clones that stay loaded until the memory manager unloads them (`forget_loras`).
The host side (its memory manager, prompt encoding, LoRA clones) is `lib_copier.webui.forge_host.ClassicHost`.
"""

from __future__ import annotations

import torch
from torch import nn

from lib_copier.backends.forge import ForgeBackend
from lib_copier.backends.webui import ldm_prediction, ldm_schedule


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
        return ldm_schedule(self.sd_model)

    def _scaled_latents(self, mean: torch.Tensor) -> torch.Tensor:
        return self._objects.unet.model.latent_format.process_in(mean)
