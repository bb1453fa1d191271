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
    sig = sigmas.tolist()
    coeffs = _x_space_coeffs(process, sigmas) if process is not None else None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        if s_next == 0:
            x = den
        elif coeffs is None:
            score = (den - x) / s**2
            x = x + (s**2 - s_next**2) * score + (s**2 - s_next**2) ** 0.5 * noise_like(x, generator)
        else:
            x = _x_space_step(coeffs[i], x, s, den, generator)
    return x


def _x_space_coeffs(process, sigmas):
    """Per step (a, a_next, f, g, dt) of the process's reverse SDE as python floats,
    computed once per grid (one vectorised t_of_sigma / scale / drift / diffusion call):
    a = scale(t_i), f = d log scale / dt at t_i, g = g(t_i), dt = t_i - t_{i+1}. Steps that
    land on sigma = 0 get None (they return D)."""
    pos = sigmas[sigmas > 0].to(torch.float64)
    t = process.t_of_sigma(pos)
    a = process.scale(t)
    f = process.drift(torch.ones_like(t), t)  # f(t) * 1
    g = process.diffusion(t)
    rows = list(zip(a.tolist(), f.tolist(), g.tolist(), t.tolist()))
    out = []
    for i in range(len(sigmas) - 1):
        if i + 1 >= len(rows):
            out.append(None)
            continue
        (a_i, f_i, g_i, t_i), (a_n, _, _, t_n) = rows[i], rows[i + 1]
        out.append((a_i, a_n, f_i, g_i, t_i - t_n))
    return out


def _x_space_step(coeff, y, s, den, generator):
    """One Euler-Maruyama step of the process's reverse SDE in x-space, mapped back:
    x = a y,  x' = x - (f x - g^2 score_x) dt + g sqrt(dt) z,  score_x = (a D - x) / (a s)^2,
    y' = x' / a_next."""
    a, a_next, f, g, dt = coeff
    x = a * y
    score_x = (a * den - x) / (a * s) ** 2
    x = x - (f * x - g**2 * score_x) * dt + g * dt**0.5 * noise_like(x, generator)
    return x / a_next
