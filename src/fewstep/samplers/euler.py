"""First-order samplers: Euler on the probability-flow ODE (= DDIM, eta = 0).

Song et al. 2021 (DDIM) and Karras et al. 2022 (Alg. 1 without the Heun correction): in
sigma-space x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i, sigma_i)) / sigma_i,
which is exactly the DDIM update written for any process (x / alpha = y).
"""
from __future__ import annotations

import torch

from . import register
from ._common import denoise, report, to_d


@register("euler", order=1)
@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, callback=None, extra_args=None):
    """Euler / DDIM(eta=0): one evaluation per step."""
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        x = x.add(to_d(x, s, den), alpha=s_next - s)
    return x
