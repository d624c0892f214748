"""Noise schedule and the two samplers we need: Euler (k-diffusion style, as A1111's "Euler") and DDIM (eta 0).

The denoiser is any `predict(x, t) -> model output` over *noisy latents at DDPM timestep t* (fractional t is
allowed); `prediction` says whether that output is eps or v. Classifier-free guidance is applied by the caller's
`predict`, so the samplers stay about time stepping only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]
SAMPLERS = ("euler", "ddim")
WEBUI_NAMES = {"euler": "Euler", "ddim": "DDIM"}  # what A1111 and Forge call them


def scaled_linear_alphas_cumprod(
    timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> torch.Tensor:
    """SD's schedule: betas linear in sqrt space (LDM's "linear" schedule), in float64 like LDM computes it."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64, device="cpu") ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def zero_terminal_snr(alphas_cumprod: torch.Tensor, terminal: float = 4.8973451890853435e-08) -> torch.Tensor:
    """A schedule rescaled to (almost) zero signal at its last timestep (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"): sqrt(alpha_bar) shifted so its last value is 0 and scaled so its first is
    unchanged. The last value is then `terminal` rather than 0, as the WebUIs keep it, so that sigma stays finite."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = ((root - last) * (first / (first - last))) ** 2
    rescaled[-1] = terminal
    return rescaled.to(alphas_cumprod.dtype)


def to_x0_and_eps(
    out: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a model output at a noise level into (predicted clean latent, predicted noise)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "v":
        return a * x - s * out, s * x + a * out
    if prediction == "eps":
        return (x - s * out) / a, out
    raise ValueError(f"unknown prediction type {prediction!r}; expected 'eps' or 'v'")


class Schedule:
    """alphas_cumprod and its sigma view, with the log-sigma interpolation k-diffusion uses for fractional t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.float().cpu()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clamp(0, len(self.sigmas) - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=len(self.sigmas) - 1)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def t_at(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma[:, None] - self.log_sigmas[None, :]
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=len(self.log_sigmas) - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * high

    def euler_sigmas(self, steps: int) -> torch.Tensor:
        """`steps` sigmas evenly spaced in t from the noisiest to the cleanest, then 0 (k-diffusion's default)."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps)
        return torch.cat([self.sigma_at(t), torch.zeros(1)])


def sample_euler(
    predict: Predict,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int,
    prediction: str,
    progress: Progress | None = None,
) -> torch.Tensor:
    sigmas = schedule.euler_sigmas(steps).to(noise.device)
    x = noise * sigmas[0]
    for i in range(steps):
        sigma = sigmas[i]
        t = schedule.t_at(sigma.cpu().view(1)).to(noise.device)
        alpha_bar = 1.0 / (1.0 + sigma**2)
        # The UNet sees the variance-preserving latent x*sqrt(alpha_bar); Euler steps in the sigma parameterisation.
        x_vp = x * alpha_bar.sqrt()
        x0, _ = to_x0_and_eps(predict(x_vp, t.expand(x.shape[0])), x_vp, alpha_bar, prediction)
        d = (x - x0) / sigma
        x = x + d * (sigmas[i + 1] - sigma)
        if progress:
            progress(i + 1, steps)
    return x


def ddim_timesteps(steps: int, total: int = 1000) -> torch.Tensor:
    """LDM's "uniform" DDIM discretisation: every (total // steps)-th step, shifted by one."""
    stride = max(total // steps, 1)
    return torch.arange(0, total, stride)[:steps] + 1


def sample_ddim(
    predict: Predict,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int,
    prediction: str,
    progress: Progress | None = None,
) -> torch.Tensor:
    acp = schedule.alphas_cumprod.to(noise.device)
    ts = ddim_timesteps(steps, len(acp)).clamp(max=len(acp) - 1).tolist()
    x = noise
    for i, t in enumerate(reversed(ts)):
        prev = ts[len(ts) - 2 - i] if i < len(ts) - 1 else None
        a_t = acp[t]
        # LDM's last step lands on alphas_cumprod[0], not on 1: kept so images match the reference sampler.
        a_prev = acp[prev] if prev is not None else acp[0]
        x0, eps = to_x0_and_eps(predict(x, torch.full((x.shape[0],), float(t), device=x.device)), x, a_t, prediction)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if progress:
            progress(i + 1, steps)
    return x


def sample(
    sampler: str,
    predict: Predict,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int,
    prediction: str,
    progress: Progress | None = None,
) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if sampler == "euler":
        return sample_euler(predict, noise, schedule, steps, prediction, progress)
    if sampler == "ddim":
        return sample_ddim(predict, noise, schedule, steps, prediction, progress)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
