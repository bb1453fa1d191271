"""Pieces shared by the samplers (one place for each formula)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def batch_sigma(sigma, x: Tensor) -> Tensor:
    """A scalar level as a [batch] tensor in x's dtype and device."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])


def denoise(denoiser, x: Tensor, sigma, extra: Optional[dict] = None) -> Tensor:
    """One network evaluation at a scalar level."""
    return denoiser(x, batch_sigma(sigma, x), **(extra or {}))


def to_d(x: Tensor, sigma, denoised: Tensor) -> Tensor:
    """Probability-flow ODE slope in sigma-space: dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def ancestral_levels(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step sigma_from -> sigma_to into a deterministic part to ``sigma_down`` and
    fresh noise of std ``sigma_up`` with sigma_down^2 + sigma_up^2 = sigma_to^2.

    sigma_up = eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2): eta = 1 is
    the DDPM posterior (Ho et al. 2020), eta = 0 the deterministic DDIM step.
    """
    sigma_from, sigma_to = float(sigma_from), float(sigma_to)
    if sigma_to == 0 or eta == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def noise_like(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def report(callback, i: int, x: Tensor, sigma, sigma_next, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
