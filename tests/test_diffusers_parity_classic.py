"""Parity with diffusers' classic schedulers on the exact Gaussian-mixture teacher.

Each scheduler is driven by the exact teacher keyed on the sigma it believes (harness in
``tests/_diffusers_oracle.py``); our sampler runs from the same start on the same sigma grid
(the scheduler's float32 levels, converted exactly). The number of model calls diffusers
makes equals our NFE count.

Error budget (derivation in ``_diffusers_oracle.parity``). As shipped, DDIM, DDPM and PNDM
compute every coefficient from their float32 ``alphas_cumprod`` (0-dim float32 tensors:
sqrt(abar), sqrt(1 - abar), ...), Heun and Euler from their float32 ``sigmas``, and Euler
also rounds its sample to float32 in ``step``: as-shipped differences 5e-9 .. 1.1e-6 here.
The reference is the same scheduler with those tables cast to float64 (same values) and its
casts turned off, compared at the float64 budget 1000 u64 (nfe + kappa), kappa =
(as-shipped difference) / u32 from the test's own run: 6e-13 .. 4.4e-12 here, against
observed differences of 2e-16 .. 8e-15 (largest rel / budget 0.008). PNDM's ``process=``
is a VPDiscrete rebuilt in float64 from the scheduler's float32 ``alphas_cumprod``; its
cumulative product reproduces them to float64 rounding, inside the same budget.

A coefficient of ours off by 1e-3 relative (the ODE slope of Euler / DDIM / Heun / PNDM,
also only below sigma 1; PNDM's weight of its oldest slope; DDIM(eta)'s sigma_down or
sigma_up) moves the result by >= 1.7e-4, at least 1e7 times the budget.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       PNDMScheduler)

from _diffusers_oracle import parity, run_diffusers
from _exact import gmm2, gmm16
from fewstep import samplers as S
from fewstep.denoiser import NFECounter
from fewstep.process import VPDiscrete

TEACHERS = {"d2": gmm2, "d16": gmm16}
STEPS = [5, 10, 20]


def x_T(gmm, n=64, seed=0):
    """A VP-scale start x_T ~ N(0, I), as pipelines draw it."""
    return torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ours(name, gmm, y0, sigmas, **options):
    counter = NFECounter(gmm)
    out = S.get(name)(counter, y0.clone(), sigmas, **options)
    return out, counter.nfe


def vp_start(x, sigmas):
    return x * math.sqrt(1 + float(sigmas[0]) ** 2)


@pytest.mark.parametrize("d", TEACHERS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_eta0(d, steps, spacing):
    gmm, x = TEACHERS[d](), x_T(TEACHERS[d]())
    make = lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)  # noqa: E731
    ref, sigmas, nfe = run_diffusers(make(), gmm, x, steps)
    assert float(sigmas[-1]) == 0.0
    out, our_nfe = ours("ddim", gmm, vp_start(x, sigmas), sigmas)
    rel, tol, why = parity(make, lambda s: run_diffusers(s, gmm, x, steps)[0], out, nfe, ref32=ref)
    assert rel < tol, why
    assert nfe == our_nfe == S.info("ddim").cost(steps) == steps


def _stochastic_vp_loop(sch, gmm, x, steps, seed, **step_kw):
    """diffusers loop for DDIM(eta) / DDPM with a seeded generator (same draws as ours)."""
    sch.set_timesteps(steps)
    abar = sch.alphas_cumprod.to(torch.float64)
    levels, g = [], torch.Generator().manual_seed(seed)
    for t in sch.timesteps:
        a = float(abar[int(t)])
        s = math.sqrt((1 - a) / a)
        y = x / math.sqrt(a)
        x = sch.step((y - gmm(y, s)) / s, t, x, generator=g, **step_kw).prev_sample
        levels.append(s)
    return x, torch.tensor(levels + [0.0], dtype=torch.float64)


@pytest.mark.parametrize("d", TEACHERS)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_eta1_and_ddpm_same_noise(d, steps):
    """eta = 1 (DDIM) and fixed_small (DDPM) with the same generator draw the same noise."""
    gmm, x = TEACHERS[d](), x_T(TEACHERS[d]())
    make = lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=True)  # noqa: E731
    run = lambda s: _stochastic_vp_loop(s, gmm, x, steps, seed=5, eta=1.0)[0]  # noqa: E731
    ref, sigmas = _stochastic_vp_loop(make(), gmm, x, steps, seed=5, eta=1.0)
    out, nfe = ours("ddim", gmm, vp_start(x, sigmas), sigmas, eta=1.0, generator=torch.Generator().manual_seed(5))
    rel, tol, why = parity(make, run, out, nfe, ref32=ref)
    assert rel < tol, why
    make = lambda: DDPMScheduler(clip_sample=False)  # noqa: E731
    run = lambda s: _stochastic_vp_loop(s, gmm, x, steps, seed=6)[0]  # noqa: E731
    ref, sigmas = _stochastic_vp_loop(make(), gmm, x, steps, seed=6)
    out, nfe = ours("ddpm", gmm, vp_start(x, sigmas), sigmas, generator=torch.Generator().manual_seed(6))
    rel, tol, why = parity(make, run, out, nfe, ref32=ref)
    assert rel < tol and nfe == steps, why


def _scheduler_process(sch) -> VPDiscrete:
    """A VPDiscrete whose alphas_cumprod equal the scheduler's (float32 values, exactly)."""
    a = sch.alphas_cumprod.to(torch.float64)
    return VPDiscrete(1 - a / torch.cat([a.new_ones(1), a[:-1]]))


def _pndm_grid(sch):
    """The step levels of a PNDMScheduler run: the starts of its PRK steps (every 4th PRK
    timestep), its distinct PLMS timesteps, then its final level."""
    a = sch.alphas_cumprod.to(torch.float64)
    ts = sorted({int(t) for t in list(sch.prk_timesteps[::4]) + list(sch.plms_timesteps)}, reverse=True)
    lev = [math.sqrt((1 - float(a[t])) / float(a[t])) for t in ts]
    a_end = float(sch.final_alpha_cumprod)
    end = math.sqrt((1 - a_end) / a_end)
    return torch.tensor(lev + ([end] if end < lev[-1] else []), dtype=torch.float64)


@pytest.mark.parametrize("d", TEACHERS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("skip_prk", [False, True])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_pndm(d, steps, skip_prk, alpha_to_one):
    """PRK midpoints are diffusers' t - stride/2 (our ``process=`` option). With
    set_alpha_to_one=False diffusers' last step goes from t = 0 to alpha_bar[0] itself (a
    no-op after one wasted call): our grid ends at that positive level instead."""
    gmm, x = TEACHERS[d](), x_T(TEACHERS[d]())
    make = lambda: PNDMScheduler(skip_prk_steps=skip_prk, set_alpha_to_one=alpha_to_one)  # noqa: E731
    sch = make()
    ref, _, nfe = run_diffusers(sch, gmm, x, steps)
    sigmas = _pndm_grid(sch)
    assert (float(sigmas[-1]) == 0) == alpha_to_one
    out, our_nfe = ours("pndm", gmm, vp_start(x, sigmas), sigmas, skip_prk_steps=skip_prk,
                        process=_scheduler_process(sch))
    rel, tol, why = parity(make, lambda s: run_diffusers(s, gmm, x, steps)[0], out, nfe, ref32=ref)
    assert rel < tol, why
    assert our_nfe == S.info("pndm").cost(len(sigmas) - 1, final_zero=alpha_to_one, skip_prk_steps=skip_prk)
    assert nfe == our_nfe + (0 if alpha_to_one else 1)


@pytest.mark.parametrize("d", TEACHERS)
@pytest.mark.parametrize("steps", STEPS)
def test_plms_is_pndm_skip_prk(d, steps):
    gmm, x = TEACHERS[d](), x_T(TEACHERS[d]())
    make = lambda: PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=True)  # noqa: E731
    sch = make()
    ref, _, nfe = run_diffusers(sch, gmm, x, steps)
    sigmas = _pndm_grid(sch)
    out, our_nfe = ours("plms", gmm, vp_start(x, sigmas), sigmas)
    rel, tol, why = parity(make, lambda s: run_diffusers(s, gmm, x, steps)[0], out, nfe, ref32=ref)
    assert rel < tol and nfe == our_nfe == steps + 1, why


@pytest.mark.parametrize("d", TEACHERS)
@pytest.mark.parametrize("steps", STEPS)
def test_heun(d, steps):
    gmm, x = TEACHERS[d](), x_T(TEACHERS[d]())
    ref, sig2, nfe = run_diffusers(HeunDiscreteScheduler(), gmm, x, steps)
    sigmas = torch.cat([sig2[0:-1:2], sig2[-1:]])  # [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0] -> grid
    assert len(sigmas) == steps + 1 and float(sigmas[-1]) == 0
    out, our_nfe = ours("heun", gmm, vp_start(x, sigmas), sigmas)
    rel, tol, why = parity(HeunDiscreteScheduler, lambda s: run_diffusers(s, gmm, x, steps)[0], out, nfe, ref32=ref)
    assert rel < tol, why
    assert nfe == our_nfe == S.info("heun").cost(steps) == 2 * steps - 1


@pytest.mark.parametrize("d", TEACHERS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler(d, steps):
    gmm, x = TEACHERS[d](), x_T(TEACHERS[d]())
    ref, sigmas, nfe = run_diffusers(EulerDiscreteScheduler(), gmm, x, steps)
    out, our_nfe = ours("euler", gmm, vp_start(x, sigmas), sigmas)
    rel, tol, why = parity(EulerDiscreteScheduler, lambda s: run_diffusers(s, gmm, x, steps)[0], out, nfe, ref32=ref)
    assert rel < tol and nfe == our_nfe == steps, why
