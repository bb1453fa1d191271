"""Predictor-corrector sampling (Song et al. 2021, Alg. 2 (VE) and 4 / 5).

In sigma-space every process is the VE one, so the sampler is Alg. 2 of the score-SDE
paper on the grid's levels:

- corrector: ``n_corrector`` steps of Langevin MCMC at the current level sigma_i,
      x <- x + e score(x, sigma_i) + sqrt(2 e) z,   e = 2 (snr |z| / |score|)^2
  (Alg. 4; score = (D - x) / sigma^2);
- predictor: one reverse-diffusion step (= Euler-Maruyama on the reverse SDE),
      x <- x + (sigma_i^2 - sigma_{i+1}^2) score + sqrt(sigma_i^2 - sigma_{i+1}^2) z,
  and on the step to sigma = 0 its mean D (the paper's code returns x_mean).

Per level the corrector runs first and the predictor second, as in the paper's code
(``pc_sampler``), so each step costs 1 + n_corrector evaluations whatever the grid's end.
"""
from __future__ import annotations

import torch

from ..errors import unknown_name
from . import register
from ._common import ddim_step, denoise, noise_like, report


def _flat_norm(v):
    return v.reshape(v.shape[0], -1).norm(dim=1)


def langevin_step(denoiser, x, sigma, snr, norm="batch", generator=None, extra_args=None):
    """One Langevin corrector step at level sigma (Song et al. 2021, Alg. 4)."""
    score = (denoise(denoiser, x, sigma, extra_args) - x) / sigma**2
    z = noise_like(x, generator)
    nz, ns = _flat_norm(z), _flat_norm(score)
    ratio = nz.mean() / ns.mean().clamp_min(1e-30) if norm == "batch" else nz / ns.clamp_min(1e-30)
    e = 2 * (snr * ratio) ** 2
    e = e.reshape(e.shape + (1,) * (x.ndim - e.ndim)) if e.ndim else e
    return x + e * score + (2 * e).sqrt() * z


@register("pc", stochastic=True, cost=lambda steps, n_corrector=1, **_: steps * (1 + int(n_corrector)))
@torch.no_grad()
def sample_pc(denoiser, x, sigmas, *, snr=0.16, n_corrector=1, norm="batch", generator=None, callback=None,
              extra_args=None):
    """Reverse-diffusion predictor + Langevin corrector (Song et al. 2021; module docstring).

    ``snr`` (0.16: the paper's CIFAR-10 VE setting; diffusers' ScoreSdeVeScheduler uses
    0.15) sets the Langevin step e = 2 (snr |z| / |score|)^2. As in the paper's code and
    diffusers, |z| and |score| are batch means of the per-sample norms (``norm="batch"``);
    ``norm="sample"`` uses each sample's own norms as the algorithm box writes it (batch
    independent, but in low dimension |score| ~ 0 near a mode gives huge, biased steps).
    """
    if norm not in ("sample", "batch"):
        raise unknown_name("norm", norm, ["sample", "batch"])
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        for _ in range(int(n_corrector)):
            x = langevin_step(denoiser, x, s, snr, norm, generator, extra_args)
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        # reverse diffusion: mean D + (s_next^2 / s)(x - D)/s, std sqrt(s^2 - s_next^2)
        x = ddim_step(den, (x - den) / s, s_next**2 / s, (s**2 - s_next**2) ** 0.5 if s_next > 0 else 0.0,
                      generator)
    return x
