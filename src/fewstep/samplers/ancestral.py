"""DDIM with eta and DDPM ancestral sampling, in sigma-space.

DDIM (Song et al. 2021, eq. 12) with sigma_t(eta) = eta sqrt((1 - a_prev)/(1 - a_t))
sqrt(1 - a_t/a_prev) (a = alpha_bar), divided by sqrt(a_prev), becomes for y = x / sqrt(a),
s = sqrt((1 - a)/a):

    y_next = D + sigma_down * eps + sigma_up * z,    eps = (y - D) / s,
    sigma_up = eta * sqrt(s_next^2 (s^2 - s_next^2) / s^2),  sigma_down^2 = s_next^2 - sigma_up^2

(:func:`~fewstep.samplers._common.ancestral_levels`). eta = 0 is the deterministic DDIM
step, i.e. Euler on the probability-flow ODE; eta = 1 is the DDPM posterior
q(x_{t-1} | x_t, x0 = D) of Ho et al. 2020 (survey eq. 48): mean
D + (s_next^2 / s^2)(y - D), variance s_next^2 (s^2 - s_next^2) / s^2 = beta_tilde / a_prev.

Learned per-dimension covariance (Bao et al. 2022a, "Estimating the optimal covariance with
imperfect mean", Thm. 1 / eq. 8-9 for SN-DPM and NPR-DPM): with ``covariance=`` a callable
``(y, sigma, D, **cond) -> diag Cov[x0 | y]`` (shaped like y; :func:`fewstep.model.load_covariance`
makes one from a ``fewstep distill covariance`` run, the exact mixture's is
``GaussianMixture.posterior_variance``) the step keeps the mean and takes the KL-optimal
diagonal variance of the DDIM family,

    var = sigma_up^2 + (1 - sigma_down / s)^2 Cov[x0 | y]     (per dimension),

(1 - sigma_down / s) being the coefficient of x0 in the step's mean. Cov is clipped to >= 0
and, for data in [a, b] (``data_range``), to ((b - a) / 2)^2, as the paper's code clips
Cov[x0 | x_t] to [0, 1] for data in [-1, 1]. The last step to 0 returns the mean D.
"""
from __future__ import annotations

import torch

from ..errors import UserError, unknown_name
from . import register
from ._common import ancestral_levels, batch_sigma, ddim_step, denoise, noise_like, report
from .euler import sample_euler


def _ancestral(denoiser, x, sigmas, levels, *, clip_denoised, eps_from_clipped, generator, callback,
               extra_args, covariance=None, data_range=None):
    """The DDIM-family loop: ``levels(s, s_next) -> (sigma_down, sigma_up)`` per step; with
    ``covariance`` the per-dimension optimal variance of the module docstring."""
    sig = sigmas.tolist()
    plan = [levels(sig[i], sig[i + 1]) for i in range(len(sig) - 1)]
    for i, (down, up) in enumerate(plan):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        den_c = den if clip_denoised is None else den.clamp(-clip_denoised, clip_denoised)
        eps = (x - (den_c if eps_from_clipped else den)) / s
        if covariance is None or s_next == 0:
            x = ddim_step(den_c, eps, down, up, generator)
        else:
            std = optimal_std(covariance, x, s, den, down, up, data_range, extra_args)
            x = ddim_step(den_c, eps, down, 0.0, generator) + std * noise_like(den, generator)
    return x


def optimal_std(covariance, y, s: float, den, down: float, up: float, data_range=None, extra_args=None):
    """sqrt(sigma_up^2 + (1 - sigma_down / s)^2 Cov[x0 | y]) per dimension (module docstring),
    Cov clipped to [0, ((b - a) / 2)^2] for data in ``data_range`` = (a, b)."""
    cov = covariance(y, batch_sigma(s, y), den, **(extra_args or {}))
    if tuple(cov.shape) != tuple(y.shape):
        raise UserError(f"covariance: the head returned shape {list(cov.shape)} for samples {list(y.shape)}; "
                        f"it must give one variance per coordinate")
    hi = None if data_range is None else (0.5 * (float(data_range[1]) - float(data_range[0]))) ** 2
    cov = cov.to(y.dtype).clamp(0.0, hi)
    return (up**2 + (1.0 - down / s) ** 2 * cov).sqrt()


@register("ddim", stochastic=True)
@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, eta=0.0, clip_denoised=None, covariance=None, data_range=None,
                generator=None, callback=None, extra_args=None):
    """DDIM (Song et al. 2021, eq. 12) with stochasticity ``eta`` (module docstring).

    eta = 0 (the default, as diffusers' ``DDIMScheduler.step``) is exactly :func:`sample_euler`.
    ``clip_denoised=c`` clamps D to [-c, c] before the step as diffusers' ``clip_sample=True``
    does (its default, with c = 1; we do not clip by default: samplers here are
    data-agnostic). As there, eps keeps the unclipped D (``use_clipped_model_output=False``).
    ``covariance``: a learned (or exact) diag Cov[x0 | y], the optimal per-dimension variance
    of the step (module docstring; with eta = 0 it adds the noise DDIM's mean leaves out).
    """
    if eta == 0 and clip_denoised is None and covariance is None:
        return sample_euler(denoiser, x, sigmas, callback=callback, extra_args=extra_args)
    return _ancestral(denoiser, x, sigmas, lambda s, sn: ancestral_levels(s, sn, eta),
                      clip_denoised=clip_denoised, eps_from_clipped=False, generator=generator,
                      callback=callback, extra_args=extra_args, covariance=covariance, data_range=data_range)


def _ddpm_levels(variance: str):
    if variance == "small":
        return lambda s, sn: ancestral_levels(s, sn, 1.0)
    if variance == "large":
        # beta_t / a_prev with beta_t = 1 - a_t / a_prev, a = 1 / (1 + s^2): a VP (DDPM) process
        return lambda s, sn: (sn**2 / s, ((s**2 - sn**2) * (1 + sn**2) / (1 + s**2)) ** 0.5 if sn > 0 else 0.0)
    raise unknown_name("variance", variance, ["small", "large"])


@register("ddpm", stochastic=True)
@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, variance="small", clip_denoised=None, covariance=None, data_range=None,
                generator=None, callback=None, extra_args=None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2; survey eq. 48) on any sigma grid.

    Each step samples the posterior q(y_next | y, x0 = D): ``variance="small"`` is the
    posterior variance beta_tilde (diffusers' default ``fixed_small``; = DDIM with eta = 1);
    ``"large"`` uses beta_t instead (``fixed_large``, which assumes a VP process), same mean.
    No noise is added on the step to sigma = 0. ``clip_denoised`` as diffusers'
    ``clip_sample`` (default there: True with range 1; off here), with the posterior mean
    built from the clipped x0 as DDPMScheduler does. ``covariance``: the learned per-dimension
    optimal variance (SN-/NPR-DPM; module docstring) in place of beta_tilde alone.
    """
    if covariance is not None and variance != "small":
        raise UserError(f"ddpm: --covariance gives the optimal variance on top of the posterior's "
                        f"(variance small); drop variance={variance!r}")
    return _ancestral(denoiser, x, sigmas, _ddpm_levels(variance), clip_denoised=clip_denoised,
                      eps_from_clipped=True, generator=generator, callback=callback, extra_args=extra_args,
                      covariance=covariance, data_range=data_range)
