"""Denoising score matching losses for teachers (survey eq. 27-28 and 33).

Weighted denoising score matching (Vincent 2011; Song et al. 2021):

    L = E_{t, x0, eps} lambda(t) || s_theta(x_t, t) - grad log p(x_t | x0) ||^2,

and, since every parametrization is an affine function of the x0 estimate D, it is one
loss on x0 with a level-dependent weight: || out - target ||^2 = || D - x0 ||^2 / k^2,
where k = d x0 / d out is the parametrization's scale (sigma for eps, c_out for EDM ...).
So a weighting is written once, as a weight ``w(sigma)`` on the x0 error, and applied to
the network's own output error as ``lambda = w * k^2``:

    simple          lambda = 1 on the network's own output (eq. 33 for eps nets: the
                    DDPM "simple" loss; for EDM preconditioning the EDM weighting)
    x0              w = 1
    snr             w = 1 / sigma^2               (= eps-MSE, score matching with std^2)
    truncated_snr   w = max(1 / sigma^2, 1)       (Salimans & Ho 2022)
    min_snr         w = min(1 / sigma^2, gamma)   (Hang et al. 2023, gamma = 5)
    v               w = 1 / sigma^2 + 1           (v-MSE of a VP process)
    edm             w = (sigma^2 + sd^2) / (sigma sd)^2   (Karras et al. 2022)
    likelihood      w = g(t)^2 / (alpha^2 sigma^4)   (lambda = g^2 on the x-space score,
                    Song et al. 2021b: the ELBO weighting)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..denoiser import ModelDenoiser, to_x0
from ..errors import unknown_name
from ..process import _bcast

def per_sample_mean(values: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """The mean of each sample's values [B, ...]; with ``mask`` [B, N] (N the second axis of
    padded sequences) only over the real positions (:func:`fewstep.nets.prodiff.masked_mean`)."""
    if mask is None:
        return values.flatten(1).mean(1)
    from ..nets.prodiff import masked_mean

    return masked_mean(values, mask)


WEIGHTINGS = ("simple", "x0", "snr", "truncated_snr", "min_snr", "v", "edm", "likelihood")


def x0_weight(weighting: str, sigma: Tensor, process=None, sigma_data: float = 0.5, gamma: float = 5.0) -> Tensor:
    """w(sigma): the weight of || D - x0 ||^2 for a named weighting (module docstring)."""
    snr = sigma**-2
    if weighting == "x0":
        return torch.ones_like(sigma)
    if weighting == "snr":
        return snr
    if weighting == "truncated_snr":
        return snr.clamp_min(1.0)
    if weighting == "min_snr":
        return snr.clamp_max(gamma)
    if weighting == "v":
        return snr + 1
    if weighting == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if weighting == "likelihood":
        t = process.t_of_sigma(sigma)
        return process.diffusion(t) ** 2 / (process.scale(t) ** 2 * sigma**4)
    raise unknown_name("loss weighting", weighting, WEIGHTINGS)


class DenoisingLoss:
    """Per-sample weighted DSM loss of a :class:`ModelDenoiser` (one value per sample)."""

    def __init__(self, weighting: str = "simple", sigma_data: float = 0.5, gamma: float = 5.0):
        if weighting not in WEIGHTINGS:
            raise unknown_name("loss weighting", weighting, WEIGHTINGS)
        self.weighting, self.sigma_data, self.gamma = weighting, sigma_data, gamma

    def __call__(self, D: ModelDenoiser, x0: Tensor, t: Tensor, eps: Tensor, net=None, mask: Optional[Tensor] = None,
                 auxiliary: bool = False, **cond) -> Tensor:
        """Per-sample loss; ``net`` (e.g. the accelerate-wrapped copy of ``D.net``) is
        what is called, ``D`` supplies the parametrization. ``mask`` [B, N] (padded
        sequences): the mean runs over the real positions only, so padding changes nothing;
        ``auxiliary``: the net is called with ``variance_loss=True``, returns (out, its own
        per-sample loss), and that loss is added unweighted (ProDiff's adaptor terms)."""
        process = D.process
        sigma = process.sigma(t).to(x0.dtype)
        y = x0 + _bcast(sigma, x0) * eps
        x_in, c_noise, c = D.net_input(y, sigma)
        out = (net or D.net)(x_in, c_noise.to(x0.dtype), **cond, **({"variance_loss": True} if auxiliary else {}))
        out, extra = out if auxiliary else (out, None)
        err = per_sample_mean((out - D.target(x0, y, sigma)) ** 2, mask)
        if self.weighting != "simple":
            err = err * self.lam(D, sigma, y, x_in, c)
        return err if extra is None else err + extra

    def lam(self, D: ModelDenoiser, sigma: Tensor, y: Tensor, x_in: Tensor, c) -> Tensor:
        """lambda = w(sigma) k(sigma)^2 with k = d x0 / d out (affine, so a unit difference)."""
        one = torch.ones_like(y[:1]).expand_as(y)
        k = (D.output_to_x0(one, y * 0, sigma, x_in * 0, c) - D.output_to_x0(one * 0, y * 0, sigma, x_in * 0, c))
        k = k.flatten(1)[:, 0]
        w = x0_weight(self.weighting, sigma, D.process, self.sigma_data, self.gamma)
        return (w * k**2).detach()
