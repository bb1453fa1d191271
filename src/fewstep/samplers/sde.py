"""Euler-Maruyama on the reverse-time SDE (Song et al. 2021; survey eq. 47).

In sigma-space every process is the VE SDE dy = sqrt(d sigma^2) dw; its reverse is
dy = -d(sigma^2) score(y, sigma) + sqrt(d sigma^2) dw_bar, with score = (D - y) / sigma^2.
One Euler-Maruyama step from sigma_i to sigma_{i+1}:

    y_{i+1} = y_i + (sigma_i^2 - sigma_{i+1}^2) score(y_i, sigma_i)
              + sqrt(sigma_i^2 - sigma_{i+1}^2) z.

With ``process=`` the step is taken in the process's own x-space instead, as the papers
write it for VP: x_{i+1} = x_i - [f(t) x_i - g(t)^2 score_x] dt + g(t) sqrt(dt) z
(dt = t_i - t_{i+1} > 0). Both converge to the same reverse SDE; the last step to
sigma = 0 returns the denoised mean, with no noise.
"""
from __future__ import annotations

import torch

from . import register
from ._common import denoise, noise_like, report


@register("euler_maruyama", stochastic=True)
@torch.no_grad()
def sample_euler_maruyama(denoiser, x, sigmas, *, generator=None, process=None, callback=None, extra_args=None):
    """Reverse-SDE Euler-Maruyama: one evaluation per step."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        if s_next == 0:
            x = den
        elif process is None:
            score = (den - x) / s**2
            x = x + (s**2 - s_next**2) * score + (s**2 - s_next**2).sqrt() * noise_like(x, generator)
        else:
            x = _x_space_step(process, x, s, s_next, den, generator)
    return x


def _x_space_step(process, y, s, s_next, den, generator):
    """One Euler-Maruyama step of the process's reverse SDE in x-space, mapped back."""
    t, t_next = process.t_of_sigma(s), process.t_of_sigma(s_next)
    a, a_next = process.scale(t), process.scale(t_next)
    x = a * y
    score_x = (a * den - x) / (a * s) ** 2
    g, dt = process.diffusion(t), t - t_next
    x = x - (process.drift(x, t) - g**2 * score_x) * dt + g * dt.sqrt() * noise_like(x, generator)
    return x / a_next
