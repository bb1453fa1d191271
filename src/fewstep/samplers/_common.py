"""Pieces shared by the samplers (one place for each formula)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


_LEVELS: dict = {}


def batch_sigma(sigma, x: Tensor) -> Tensor:
    """A scalar level as a [batch] tensor in x's dtype and device.

    For a python number the tensor is made once per (level, dtype, device, batch) and
    handed out again (no per-step tensor creation or host-to-device copy), so a denoiser
    may cache what it derives from a level by the tensor's identity (``ModelDenoiser``
    does). A tensor changed in place (its version moved) is replaced.
    """
    if isinstance(sigma, Tensor):
        return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    key = (float(sigma), x.dtype, x.device, x.shape[0])
    t = _LEVELS.get(key)
    if t is None or t._version != 0:
        if len(_LEVELS) >= 1024:
            _LEVELS.clear()
        t = _LEVELS[key] = torch.full((), float(sigma), dtype=x.dtype, device=x.device).expand(x.shape[0])
    return t


def denoise(denoiser, x: Tensor, sigma, extra: Optional[dict] = None) -> Tensor:
    """One network evaluation at a scalar level."""
    return denoiser(x, batch_sigma(sigma, x), **(extra or {}))


def to_d(x: Tensor, sigma, denoised: Tensor) -> Tensor:
    """Probability-flow ODE slope in sigma-space: dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised).div_(sigma)


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


def ddim_step(denoised: Tensor, eps: Tensor, sigma_down, sigma_up=0.0,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """The DDIM-family reverse step in sigma-space (Song et al. 2021, DDIM eq. 12 divided by
    sqrt(alpha_bar_prev)):  x_next = D + sigma_down * eps + sigma_up * z.

    With (sigma_down, sigma_up) from :func:`ancestral_levels` it is DDIM(eta) / DDPM; with a
    larger sigma_up it is Analytic-DPM's optimal-variance step or the reverse-diffusion
    (Euler-Maruyama) predictor. ``eps`` is the noise estimate (x - D) / sigma.
    """
    x = denoised + sigma_down * eps if sigma_down != 0 else denoised.clone()
    if sigma_up != 0:
        x = x + sigma_up * noise_like(denoised, generator)
    return x


def lagrange_weights(nodes, at: float) -> list:
    """Values l_j(at) of the Lagrange basis polynomials on ``nodes`` (python floats): the
    interpolating polynomial through (nodes[j], f_j) is sum_j l_j(at) f_j."""
    out = []
    for j, tj in enumerate(nodes):
        w = 1.0
        for m, tm in enumerate(nodes):
            if m != j:
                w *= (at - tm) / (tj - tm)
        out.append(w)
    return out


def lagrange_integral_weights(nodes, a: float, b: float) -> list:
    """Integrals over [a, b] of the Lagrange basis polynomials on ``nodes``, divided by
    (b - a): sum_j w_j f_j is the mean over [a, b] of the polynomial through (nodes[j], f_j).
    These are the variable-step Adams weights (Adams-Bashforth when a, b lie outside the
    nodes' hull on one side, Adams-Moulton when b is a node). Gauss-Legendre quadrature,
    exact for the degree len(nodes) - 1."""
    import numpy as np

    u, wq = np.polynomial.legendre.leggauss(max(1, (len(nodes) + 1) // 2))
    pts = [0.5 * (a + b) + 0.5 * (b - a) * float(v) for v in u]
    out = [0.0] * len(nodes)
    for p, w in zip(pts, wq):
        for j, lj in enumerate(lagrange_weights(nodes, p)):
            out[j] += 0.5 * float(w) * lj
    return out


def lincomb(coeffs, tensors) -> Tensor:
    """sum_j coeffs[j] * tensors[j] with python-float coefficients (fused multiply-adds)."""
    out = tensors[0] * coeffs[0]
    for c, t in zip(coeffs[1:], tensors[1:]):
        out.add_(t, alpha=c)
    return out
