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
"""
from __future__ import annotations

import torch

from ..errors import unknown_name
from . import register
from ._common import ancestral_levels, ddim_step, denoise, report
from .euler import sample_euler


def _ancestral(denoiser, x, sigmas, levels, *, clip_denoised, eps_from_clipped, generator, callback,
               extra_args):
    """The DDIM-family loop: ``levels(s, s_next) -> (sigma_down, sigma_up)`` per step."""
    sig = sigmas.tolist()
    plan = [levels(sig[i], sig[i + 1]) for i in range(len(sig) - 1)]
    for i, (down, up) in enumerate(plan):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        den_c = den if clip_denoised is None else den.clamp(-clip_denoised, clip_denoised)
        eps = (x - (den_c if eps_from_clipped else den)) / s
        x = ddim_step(den_c, eps, down, up, generator)
    return x


@register("ddim", stochastic=True)
@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, eta=0.0, clip_denoised=None, generator=None, callback=None,
                extra_args=None):
    """DDIM (Song et al. 2021, eq. 12) with stochasticity ``eta`` (module docstring).

    eta = 0 (the default, as diffusers' ``DDIMScheduler.step``) is exactly :func:`sample_euler`.
    ``clip_denoised=c`` clamps D to [-c, c] before the step as diffusers' ``clip_sample=True``
    does (its default, with c = 1; we do not clip by default: samplers here are
    data-agnostic). As there, eps keeps the unclipped D (``use_clipped_model_output=False``).
    """
    if eta == 0 and clip_denoised is None:
        return sample_euler(denoiser, x, sigmas, callback=callback, extra_args=extra_args)
    return _ancestral(denoiser, x, sigmas, lambda s, sn: ancestral_levels(s, sn, eta),
                      clip_denoised=clip_denoised, eps_from_clipped=False, generator=generator,
                      callback=callback, extra_args=extra_args)


def _ddpm_levels(variance: str):
    if variance == "small":
        return lambda s, sn: ancestral_levels(s, sn, 1.0)
    if variance == "large":
        # beta_t / a_prev with beta_t = 1 - a_t / a_prev, a = 1 / (1 + s^2): a VP (DDPM) process
        return lambda s, sn: (sn**2 / s, ((s**2 - sn**2) * (1 + sn**2) / (1 + s**2)) ** 0.5 if sn > 0 else 0.0)
    raise unknown_name("variance", variance, ["small", "large"])


@register("ddpm", stochastic=True)
@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, variance="small", clip_denoised=None, generator=None, callback=None,
                extra_args=None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2; survey eq. 48) on any sigma grid.

    Each step samples the posterior q(y_next | y, x0 = D): ``variance="small"`` is the
    posterior variance beta_tilde (diffusers' default ``fixed_small``; = DDIM with eta = 1);
    ``"large"`` uses beta_t instead (``fixed_large``, which assumes a VP process), same mean.
    No noise is added on the step to sigma = 0. ``clip_denoised`` as diffusers'
    ``clip_sample`` (default there: True with range 1; off here), with the posterior mean
    built from the clipped x0 as DDPMScheduler does.
    """
    return _ancestral(denoiser, x, sigmas, _ddpm_levels(variance), clip_denoised=clip_denoised,
                      eps_from_clipped=True, generator=generator, callback=callback, extra_args=extra_args)
