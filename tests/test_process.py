"""Noise processes: closed-form marginals, inverses, SDE coefficients, diffusers' schedule."""
import math

import pytest
import torch

from fewstep.errors import UserError
from fewstep.process import PROCESS_ALIASES, EDM, VE, VP, LinearFlow, VPDiscrete, make_process, process_from_config

ALL = [VP.linear(), VP.cosine(), VPDiscrete.diffusers(), VE(), EDM(), LinearFlow()]


@pytest.mark.parametrize("p", ALL, ids=lambda p: p.name + getattr(p, "schedule", ""))
def test_t_of_sigma_inverts_sigma(p):
    t = torch.linspace(p.t_min, p.t_max, 101, dtype=torch.float64)
    assert torch.allclose(p.t_of_sigma(p.sigma(t)), t, atol=1e-9 * max(1, p.t_max))
    s = torch.logspace(math.log10(p.sigma_min * 1.01), math.log10(p.sigma_max * 0.99), 50, dtype=torch.float64)
    assert torch.allclose(p.sigma(p.t_of_sigma(s)), s, rtol=1e-9)


@pytest.mark.parametrize("p", ALL, ids=lambda p: p.name + getattr(p, "schedule", ""))
def test_marginal_matches_closed_form(p):
    """x_t = scale (x0 + sigma eps): sampled mean and std match alpha x0 and alpha sigma."""
    g = torch.Generator().manual_seed(0)
    t = torch.full((200000,), 0.5 * (p.t_min + p.t_max), dtype=torch.float64)
    x0 = torch.full((200000, 1), 0.7, dtype=torch.float64)
    x = p.marginal(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    a, sd = float(p.scale(t[0])), float(p.std(t[0]))
    assert abs(float(x.mean()) - 0.7 * a) < 5 * sd / math.sqrt(len(x))
    assert abs(float(x.std()) / sd - 1) < 0.01
    assert float(p.log_snr(t[0])) == pytest.approx(math.log(a**2 / sd**2), rel=1e-9)


@pytest.mark.parametrize("p", ALL, ids=lambda p: p.name + getattr(p, "schedule", ""))
def test_sde_coefficients_reproduce_marginal_variance(p):
    """For dx = f x dt + g dw: d(std^2)/dt = 2 f std^2 + g^2 and d log alpha/dt = f."""
    t = torch.linspace(p.t_min + 0.1 * (p.t_max - p.t_min), p.t_max * 0.9, 7, dtype=torch.float64)
    f = p.drift(torch.ones(7, dtype=torch.float64), t)
    g = p.diffusion(t)
    h = 1e-6 * (p.t_max - p.t_min)
    dvar = (p.std(t + h) ** 2 - p.std(t - h) ** 2) / (2 * h)
    dlog_a = (torch.log(p.scale(t + h)) - torch.log(p.scale(t - h))) / (2 * h)
    assert torch.allclose(dvar, 2 * f * p.std(t) ** 2 + g**2, rtol=1e-5, atol=1e-8)
    assert torch.allclose(dlog_a, f, rtol=1e-5, atol=1e-8)


def test_vp_linear_closed_form():
    p = VP.linear(0.1, 20.0)
    t = torch.tensor([0.3], dtype=torch.float64)
    log_abar = -(0.1 * 0.3 + 0.5 * 19.9 * 0.09)
    assert float(p.scale(t) ** 2) == pytest.approx(math.exp(log_abar))
    assert float(p.diffusion(t)) == pytest.approx(math.sqrt(0.1 + 0.3 * 19.9))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_discrete_vp_equals_diffusers_alphas_cumprod(schedule):
    from diffusers import DDPMScheduler

    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    ref = DDPMScheduler(beta_schedule=schedule, **kw).alphas_cumprod.double()
    p = VPDiscrete.diffusers(beta_schedule=schedule, **kw)
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(p.scale(t) ** 2, ref, rtol=1e-6)
    assert torch.allclose(VP.from_betas(DDPMScheduler(beta_schedule=schedule, **kw).betas).scale(t) ** 2, ref, rtol=1e-6)
    mid = p.sigma(torch.tensor([10.5], dtype=torch.float64))  # log-sigma interpolation in between
    lo, hi = p.sigma(torch.tensor([10.0, 11.0], dtype=torch.float64))
    assert float(mid) == pytest.approx(math.sqrt(float(lo * hi)))


def test_prior_and_config_round_trip():
    for p in ALL:
        q = make_process(**p.config())
        t = torch.linspace(p.t_min, p.t_max, 5, dtype=torch.float64)
        assert torch.allclose(q.sigma(t), p.sigma(t))
        x = p.prior((20000, 1), generator=torch.Generator().manual_seed(1))
        assert float(x.std()) == pytest.approx(float(p.std(torch.tensor(p.t_max))) if p.name != "flow" else 1.0, rel=0.03)


def test_process_from_config_names_and_dicts():
    """A config's process: an alias ("ddpm" is diffusers' discrete VP) or a config() dict."""
    for name, kind in PROCESS_ALIASES.items():
        assert process_from_config(name).config() == make_process(kind).config()
    assert isinstance(process_from_config("ddpm"), VPDiscrete)
    assert process_from_config(VE(sigma_max=20.0).config()).config() == VE(sigma_max=20.0).config()
    with pytest.raises(UserError, match="process"):
        process_from_config("vpp")
    from fewstep.train import config, teacher  # still importable where they were
    assert teacher.process_from_config is process_from_config and config.PROCESS_ALIASES is PROCESS_ALIASES
