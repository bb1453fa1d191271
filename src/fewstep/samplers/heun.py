"""Heun's second-order method and EDM's stochastic sampler (Karras et al. 2022, Alg. 1, 2).

Both integrate the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma with the
trapezoidal (Heun) correction; the last step to sigma = 0 has no correction (the slope at
sigma = 0 does not exist), so a grid of n steps ending at 0 costs 2n - 1 evaluations
(2n when it ends at a positive sigma). diffusers' ``HeunDiscreteScheduler`` is the same
solver on its own grid.
"""
from __future__ import annotations

import torch

from . import register
from ._common import denoise, noise_like, report, to_d


def _heun_cost(steps, final_zero=True, **_):
    """2 evaluations per step, one fewer when the last step lands on sigma = 0."""
    return max(0, 2 * steps - int(bool(final_zero)))


def heun_step(denoiser, x, sigma, sigma_next, denoised, extra_args=None):
    """EDM Alg. 1 lines 5-8 from level ``sigma`` whose denoised value is known: an Euler step
    to ``sigma_next``, then (unless sigma_next = 0) the trapezoidal correction
    x_next = x + (sigma_next - sigma) (d + d') / 2 with d' the slope at the Euler point."""
    d = to_d(x, sigma, denoised)
    x_euler = x.add(d, alpha=sigma_next - sigma)
    if sigma_next == 0:
        return x_euler
    d_next = to_d(x_euler, sigma_next, denoise(denoiser, x_euler, sigma_next, extra_args))
    return x.add(d.add_(d_next), alpha=(sigma_next - sigma) * 0.5)


@register("heun", order=2, cost=_heun_cost)
@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, callback=None, extra_args=None):
    """Heun's 2nd-order ODE sampler (Karras et al. 2022, Alg. 1; diffusers' HeunDiscrete)."""
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        x = heun_step(denoiser, x, s, s_next, den, extra_args)
    return x


@register("edm_stochastic", stochastic=True, cost=_heun_cost)
@torch.no_grad()
def sample_edm_stochastic(denoiser, x, sigmas, *, s_churn=80.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.007,
                          generator=None, callback=None, extra_args=None):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2).

    At each level sigma_i in [S_tmin, S_tmax] noise is added to raise the level to
    sigma_hat = (1 + gamma) sigma_i, gamma = min(S_churn / N, sqrt(2) - 1) (N steps):
        x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise z,
    then one Heun step from sigma_hat to sigma_{i+1} (Euler when sigma_{i+1} = 0).
    Defaults are those of diffusers' KarrasVeScheduler (EDM Alg. 2 there): S_churn = 80,
    S_tmin = 0.05, S_tmax = 50, S_noise = 1.007 (EDM Table 5 tunes them per model; they are
    in the data's units, e.g. data std 0.5). S_churn = 0 gives :func:`sample_heun` exactly.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    gamma_max = min(s_churn / n, 2**0.5 - 1) if n > 0 else 0.0
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        gamma = gamma_max if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + s_noise * (s_hat**2 - s**2) ** 0.5 * noise_like(x, generator)
        den = denoise(denoiser, x, s_hat, extra_args)
        report(callback, i, x, s_hat, s_next, den)
        x = heun_step(denoiser, x, s_hat, s_next, den, extra_args)
    return x
