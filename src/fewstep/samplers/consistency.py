"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

A consistency function f(x, sigma) maps any point of a probability-flow trajectory to its
end at the boundary level epsilon (sigma_min). Sampling alternates denoising and fresh
noise on a decreasing sequence tau_0 = sigma_max > tau_1 > ... > tau_{k-1} > 0:

    x <- f(x_{tau_0}, tau_0)
    for n = 1 .. k-1:   x_{tau_n} = x + sqrt(tau_n^2 - epsilon^2) z,   x <- f(x_{tau_n}, tau_n)

In the sampler contract the grid is ``[tau_0, ..., tau_{k-1}, 0]`` and ``denoiser`` is f;
k levels cost k evaluations. A grid ending at a positive level re-noises to it at the end
(x then is at that level, as for every sampler). Given an ordinary denoiser D instead of a
consistency function, the same loop is a (crude) denoise/re-noise sampler.
"""
from __future__ import annotations

import torch

from . import register
from ._common import denoise, noise_like, report


@register("consistency", stochastic=True)
@torch.no_grad()
def sample_consistency(denoiser, x, sigmas, *, epsilon=0.002, generator=None, callback=None, extra_args=None):
    """Algorithm 1 of Song et al. 2023 on the levels ``sigmas[:-1]`` (module docstring);
    ``epsilon`` is the boundary level of the consistency function (its sigma_min)."""
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        x = den
        if s_next > 0:  # x_{tau} = x + sqrt(tau^2 - eps^2) z
            x = den + max(s_next**2 - epsilon**2, 0.0) ** 0.5 * noise_like(den, generator)
    return x
