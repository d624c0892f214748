"""Noise schedule and samplers: the reference's numbers, and convergence to the data under an exact denoiser."""

import pytest
import torch

from lib_copier.models.sampling import (
    Schedule,
    ddim_timesteps,
    sample,
    scaled_linear_alphas_cumprod,
    to_x0_and_eps,
)


def test_schedule_matches_ldm():
    util = pytest.importorskip("ldm.modules.diffusionmodules.util")
    betas = util.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    expected = torch.tensor(betas).double().neg().add(1).cumprod(0).float()
    torch.testing.assert_close(scaled_linear_alphas_cumprod(), expected)


def test_ddim_timesteps_match_ldm():
    util = pytest.importorskip("ldm.modules.diffusionmodules.util")
    for steps in (10, 20, 50):
        expected = util.make_ddim_timesteps("uniform", steps, 1000, verbose=False)
        assert ddim_timesteps(steps).tolist() == list(expected)


def test_euler_sigmas_span_the_schedule():
    schedule = Schedule(scaled_linear_alphas_cumprod())
    sigmas = schedule.euler_sigmas(20)
    assert len(sigmas) == 21 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(14.6146, abs=1e-3)  # SD's sigma_max
    assert sigmas[-2].item() == pytest.approx(0.0292, abs=1e-3)  # SD's sigma_min
    assert bool((sigmas[:-1].diff() < 0).all())
    t = torch.tensor([0.0, 10.5, 500.25, 999.0])
    torch.testing.assert_close(schedule.t_at(schedule.sigma_at(t)), t, atol=1e-3, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_sampler_reaches_the_data_under_an_exact_denoiser(sampler, prediction):
    """With one data point x0, the ideal model output is known in closed form; sampling must land on x0."""
    schedule = Schedule(scaled_linear_alphas_cumprod())
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)

    def exact(x, t):
        alpha_bar = torch.exp(-schedule.sigma_at(t.cpu()).pow(2).log1p()).view(-1, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        eps = (x - a * x0) / s
        return eps if prediction == "eps" else (a * eps - s * x0)

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sample(sampler, exact, noise, schedule, 20, prediction)
    if sampler == "ddim":
        # LDM's DDIM stops at alphas_cumprod[0], not at 1, and an exact denoiser keeps its first eps throughout.
        first, last = schedule.alphas_cumprod[ddim_timesteps(20)[-1]], schedule.alphas_cumprod[0]
        eps = (noise - first.sqrt() * x0) / (1 - first).sqrt()
        expected = last.sqrt() * x0 + (1 - last).sqrt() * eps
    else:
        expected = x0
    assert (out - expected).abs().max().item() < 1e-3


def test_x0_eps_conversions_are_inverse():
    ab = torch.tensor(0.3)
    x0, eps = torch.randn(5), torch.randn(5)
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    for out, prediction in ((eps, "eps"), (v, "v")):
        got_x0, got_eps = to_x0_and_eps(out, x, ab, prediction)
        torch.testing.assert_close(got_x0, x0)
        torch.testing.assert_close(got_eps, eps)


def test_bad_sampler_and_steps_are_named():
    schedule = Schedule(scaled_linear_alphas_cumprod())
    noise = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sample("heun", lambda x, t: x, noise, schedule, 5, "eps")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        sample("euler", lambda x, t: x, noise, schedule, 0, "eps")
