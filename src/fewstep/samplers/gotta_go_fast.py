"""Gotta Go Fast (Jolicoeur-Martineau et al. 2021, Alg. 1): adaptive reverse-SDE solver.

In sigma-space the reverse SDE is the VE one. It is integrated in VE time t in [0, 1],
sigma(t) = sigma_lo (sigma_hi / sigma_lo)^t, from t = 1 (sigmas[0]) to t = 0 (the smallest
positive level of the grid), so g(t)^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_hi / sigma_lo)
and the reverse drift is g^2 score = g^2 (D - y) / sigma^2. One proposal of size h, with
one shared z ~ N(0, I):

    x'  = x + h g(t)^2 score(x, t) + sqrt(h) g(t) z                  (Euler-Maruyama)
    x~  = x + h g(t-h)^2 score(x', t-h) + sqrt(h) g(t-h) z
    x'' = (x' + x~) / 2                                               (improved Euler)
    delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|))   (elementwise, mixed tolerance)
    E = || (x' - x'') / delta ||_2 / sqrt(n)            (scaled L2 norm; or max norm)

accepted when E <= 1 (then x = x'' with extrapolation, else x'; x'_prev = x'), and in
every case h = min(t, theta h E^-r). Each sample has its own t and h, as in the paper's
code; a proposal evaluates the denoiser once for all still-running samples (2 evaluations
per proposal). The last level is followed by the denoising step x = D(x, sigma_lo) when
the grid ends at 0 (the paper's final denoising).

``max_nfe`` is never exceeded, and it never changes the steps: the tolerance alone
decides them, and a run that would need more than the budget stops with a ``UserError``
(as :mod:`.rk45` does). Forcing larger steps to fit a small budget is not an option:
the Euler-Maruyama proposal's deterministic part multiplies x by 1 - 2 h log(sigma_hi /
sigma_lo), which leaves [-1, 1] (the step diverges) once h > 1 / log(sigma_hi / sigma_lo),
and accepting a proposal whatever its error returns garbage. Without ``max_nfe`` the
solver stops only at ``max_iters`` proposals.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError, unknown_name
from . import register
from ._common import noise_like, report


def _ggf_cost(steps, max_nfe=None, **_):
    """An upper bound: the budget (the actual count depends on the tolerances)."""
    return int(max_nfe) if max_nfe is not None else 0


def _bcast(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


@register("gotta_go_fast", stochastic=True, adaptive=True, cost=_ggf_cost)
@torch.no_grad()
def sample_gotta_go_fast(denoiser, x, sigmas, *, eps_rel=0.05, eps_abs=0.0078, h_init=0.01, safety=0.9,
                         r=0.9, extrapolate=True, norm="l2", max_nfe=None, max_iters=100000, generator=None,
                         callback=None, extra_args=None):
    """Adaptive Euler-Maruyama / improved-Euler pair on the reverse SDE (module docstring).

    Defaults are the paper's (eps_abs = 0.0078, eps_rel = 0.05, h_init = 0.01, theta = 0.9,
    r = 0.9, extrapolation, scaled L2 norm; ``norm="linf"`` for the max norm). Tolerances
    apply in sigma-space y = x / alpha (the paper applies them to x in [-1, 1]; for VP
    models y is larger by 1 / alpha at high noise, where the relative part dominates).
    """
    if norm not in ("l2", "linf"):
        raise unknown_name("norm", norm, ["l2", "linf"])
    extra = extra_args or {}
    pos = sigmas[sigmas > 0]
    s_hi, s_lo = float(pos[0]), float(pos[-1])
    final = int(float(sigmas[-1]) == 0)
    if max_nfe is not None and max_nfe < 2 + final:
        raise UserError(f"gotta_go_fast needs at least {2 + final} evaluations, got max_nfe={max_nfe}")
    log_ratio = math.log(s_hi / s_lo) if s_hi > s_lo else 0.0
    b = x.shape[0]
    kw = dict(dtype=torch.float64, device=x.device)
    t = torch.ones(b, **kw) if log_ratio > 0 else torch.zeros(b, **kw)
    h = torch.full((b,), float(h_init), **kw)
    x = x.clone()
    x_prev = x.clone()
    calls, it = 0, 0

    def sigma_of(tt):
        return s_lo * torch.exp(tt * log_ratio)

    def drift(xx, tt, den):  # g(t)^2 score and g(t), as [active] tensors shaped like x
        s = _bcast(sigma_of(tt), xx).to(xx.dtype)
        g2 = 2 * log_ratio * s**2
        return g2 * (den - xx) / s**2, g2.sqrt()

    while bool((t > 0).any()):
        act = (t > 0).nonzero().flatten()
        it += 1
        if max_nfe is not None and calls + 2 > max_nfe - final:
            raise UserError(f"gotta_go_fast needs more than max_nfe={max_nfe} evaluations at eps_rel={eps_rel}, "
                            f"eps_abs={eps_abs} ({len(act)} of {b} samples unfinished, at sigma up to "
                            f"{float(sigma_of(t[act]).max()):.3g}); raise the budget or loosen the tolerances")
        if it > max_iters:
            raise UserError(f"gotta_go_fast: the step-size control did not finish within max_iters={max_iters} "
                            f"proposals ({calls} evaluations); loosen eps_rel/eps_abs")
        ta, xa = t[act], x[act]
        ha = torch.minimum(h[act], ta)
        z = noise_like(xa, generator)
        den1 = denoiser(xa, sigma_of(ta).to(x.dtype), **extra)
        f1, g1 = drift(xa, ta, den1)
        hb = _bcast(ha, xa).to(x.dtype)
        x1 = xa + hb * f1 + hb.sqrt() * g1 * z
        t2 = (ta - ha).clamp_min(0)
        den2 = denoiser(x1, sigma_of(t2).to(x.dtype), **extra)
        f2, g2 = drift(x1, t2, den2)
        x2 = 0.5 * (x1 + (xa + hb * f2 + hb.sqrt() * g2 * z))
        calls += 2
        tol = torch.maximum(torch.full_like(x1, eps_abs), eps_rel * torch.maximum(x1.abs(), x_prev[act].abs()))
        ratio = ((x1 - x2) / tol).reshape(len(act), -1).to(torch.float64)
        err = ratio.abs().amax(1) if norm == "linf" else ratio.square().mean(1).sqrt()
        if not bool(torch.isfinite(err).all()):
            raise UserError("gotta_go_fast: the solution is not finite; check the denoiser")
        accept = err <= 1
        report(callback, it - 1, xa, sigma_of(ta), sigma_of(t2), den1)
        acc = act[accept]
        x[acc] = (x2 if extrapolate else x1)[accept]
        x_prev[acc] = x1[accept]
        t[acc] = t2[accept]
        h[act] = torch.minimum(t[act], safety * ha * err.clamp_min(1e-10) ** (-r))
    if final:
        x = denoiser(x, torch.full((b,), s_lo, dtype=x.dtype, device=x.device), **extra)
    return x
