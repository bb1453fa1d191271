"""Analytic-DPM (Bao, Li, Zhu, Zhang 2022; survey eq. 50-52): the optimal reverse variance.

For the DDIM family q_lambda(x_{n-1} | x_n, x0) = N(mu_tilde(x_n, x0), lambda_n^2 I)
(DDPM: lambda_n^2 = beta_tilde_n; DDIM: lambda_n = 0) the KL-optimal Gaussian reverse
step has the mean mu_tilde(x_n, x0 = D) and the variance (Bao et al. 2022, Thm. 1)

    sigma*_n^2 = lambda_n^2 + (sqrt(beta_bar_n / alpha_n) - sqrt(beta_bar_{n-1} - lambda_n^2))^2 (1 - Gamma_n),
    Gamma_n = E_{q_n} |eps(x_n, n)|^2 / d        (|eps|^2 = beta_bar_n |score|^2),

estimated by Monte Carlo over data samples once per model. In sigma-space
(y = x / sqrt(alpha_bar), s^2 = beta_bar / alpha_bar) and divided by alpha_bar_{n-1} this is

    y_next = D + sigma_down eps + sqrt(var) z,     eps = (y - D) / s,
    var = lambda^2 + (s - sigma_down)^2 (1 - Gamma(s)),  sigma_down = sqrt(s_next^2 - lambda^2),

with lambda = sigma_up of :func:`~fewstep.samplers._common.ancestral_levels` (eta = 1: the
posterior, Analytic-DDPM; eta = 0: Analytic-DDIM); Gamma is a property of the data and the
level only, so the formula holds for every process. Bounds (Thm. 2): Gamma is clipped to
[0, 1], i.e. lambda^2 <= var <= lambda^2 + (s - sigma_down)^2, and for data in [a, b]^d
(``data_range=(a, b)``) var <= lambda^2 + (1 - sigma_down / s)^2 ((b - a) / 2)^2.

The last step to sigma = 0 returns the mean D (``final_noise=True`` adds the optimal
noise s^2 (1 - Gamma) there too).
"""
from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import torch

from ..errors import UserError
from . import register
from ._common import ancestral_levels, ddim_step, denoise, report

__all__ = ["analytic_dpm_stats", "save_analytic_dpm_stats", "load_analytic_dpm_stats", "sample_analytic_dpm"]

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CACHE_BY_ID: dict = {}


def _cache_for(denoiser) -> dict:
    try:
        return _CACHE.setdefault(denoiser, {})
    except TypeError:  # not weak-referenceable / not hashable: keyed by id for the session
        return _CACHE_BY_ID.setdefault(id(denoiser), {})


def _draw_data(data, n: int, generator) -> torch.Tensor:
    if callable(data):
        x0 = data(n)
    else:
        x0 = torch.as_tensor(data)
        if x0.ndim == 0 or x0.shape[0] < 1:
            raise UserError("analytic_dpm_stats: data must be a batch [N, ...] of samples or a callable n -> samples")
        idx = torch.randint(0, x0.shape[0], (n,), generator=generator) if x0.shape[0] != n else torch.arange(n)
        x0 = x0[idx.to(x0.device)]
    if x0.shape[0] != n:
        raise UserError(f"analytic_dpm_stats: the data sampler returned {x0.shape[0]} samples, wanted {n}")
    return x0


@torch.no_grad()
def analytic_dpm_stats(denoiser, data, sigmas, n_mc: int = 1024, *, batch_size=None, generator=None,
                       extra_args=None, cache: bool = True) -> torch.Tensor:
    """Gamma(sigma) = E_{x0 ~ data, z} |eps(x0 + sigma z, sigma)|^2 / d for each level.

    ``data`` is a batch of data samples [N, ...] (drawn with replacement) or a callable
    ``n -> samples``; ``n_mc`` samples per level (the same x0 at every level, fresh noise),
    evaluated ``batch_size`` at a time. The result (float64 [len(sigmas)]) is cached in
    memory per denoiser object, levels and n_mc; save it with :func:`save_analytic_dpm_stats`.
    Costs len(sigmas) * ceil(n_mc / batch_size) denoiser evaluations (none when cached).
    """
    levels = [float(s) for s in torch.as_tensor(sigmas).flatten().tolist()]
    if not levels or min(levels) <= 0 or int(n_mc) < 1:
        raise UserError("analytic_dpm_stats: need positive levels and n_mc >= 1")
    key = (tuple(levels), int(n_mc))
    store = _cache_for(denoiser) if cache else {}
    if key in store:
        return store[key].clone()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x0 = _draw_data(data, int(n_mc), g)
    bs = int(batch_size or n_mc)
    gam = []
    for s in levels:
        total = 0.0
        for i0 in range(0, x0.shape[0], bs):
            xb = x0[i0:i0 + bs]
            z = torch.randn(xb.shape, generator=g, dtype=xb.dtype, device=g.device).to(xb.device)
            y = xb + s * z
            eps = (y - denoise(denoiser, y, s, extra_args)) / s
            total += float(eps.reshape(eps.shape[0], -1).to(torch.float64).square().sum())
        gam.append(total / (x0.shape[0] * x0[0].numel()))
    out = torch.tensor(gam, dtype=torch.float64)
    store[key] = out
    return out.clone()


def save_analytic_dpm_stats(path, sigmas, gamma) -> None:
    """Write {"sigmas": [...], "gamma": [...]} as JSON."""
    s = [float(v) for v in torch.as_tensor(sigmas).flatten().tolist()]
    g = [float(v) for v in torch.as_tensor(gamma).flatten().tolist()]
    if len(s) != len(g):
        raise UserError(f"analytic-DPM stats: {len(s)} levels but {len(g)} Gamma values")
    Path(path).write_text(json.dumps({"kind": "analytic_dpm_stats", "sigmas": s, "gamma": g}, indent=1))


def load_analytic_dpm_stats(path) -> dict:
    """Read a file written by :func:`save_analytic_dpm_stats`: {"sigmas", "gamma"}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"analytic-DPM stats file {path} not found")
    try:
        d = json.loads(path.read_text())
        return {"sigmas": [float(v) for v in d["sigmas"]], "gamma": [float(v) for v in d["gamma"]]}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not an analytic-DPM stats file (JSON with 'sigmas' and 'gamma')") from None


def _gamma_at(stats, levels: list) -> list:
    """Gamma at ``levels`` from a per-step sequence or a {"sigmas", "gamma"} table
    (linear interpolation in log sigma, constant beyond its ends)."""
    if isinstance(stats, dict):
        import numpy as np

        s = np.log(np.asarray(stats["sigmas"], dtype=np.float64))
        g = np.asarray(stats["gamma"], dtype=np.float64)
        order = np.argsort(s)
        return [float(v) for v in np.interp(np.log(levels), s[order], g[order])]
    vals = [float(v) for v in torch.as_tensor(stats).flatten().tolist()]
    if len(vals) != len(levels):
        raise UserError(f"analytic_dpm: stats has {len(vals)} values for {len(levels)} steps; pass one per "
                        f"step, a {{'sigmas', 'gamma'}} table, or data= to estimate them")
    return vals


def _variances(sig, gam, eta, data_range, final_noise):
    """(sigma_down, std) of each step: the optimal variance clipped to Thm. 2's bounds."""
    half = None if data_range is None else 0.5 * (float(data_range[1]) - float(data_range[0]))
    plan = []
    for s, s_next, g in zip(sig[:-1], sig[1:], gam):
        down, lam = ancestral_levels(s, s_next, eta)
        if s_next == 0 and not final_noise:
            plan.append((0.0, 0.0))
            continue
        g = min(max(g, 0.0), 1.0)
        var = lam**2 + (s - down) ** 2 * (1.0 - g)
        if half is not None:
            var = min(var, lam**2 + (1.0 - down / s) ** 2 * half**2)
        plan.append((down, math.sqrt(var)))
    return plan


@register("analytic_dpm", stochastic=True)
@torch.no_grad()
def sample_analytic_dpm(denoiser, x, sigmas, *, stats=None, data=None, n_mc=1024, eta=1.0, data_range=None,
                        final_noise=False, covariance=None, generator=None, callback=None, extra_args=None):
    """Analytic-DPM sampling (module docstring): one evaluation per step.

    ``stats``: Gamma per step (a sequence aligned with sigmas[:-1]) or a {"sigmas", "gamma"}
    table; without it, ``data`` (samples or a sampler) is used to estimate Gamma with
    :func:`analytic_dpm_stats` (cached; those evaluations are not part of the step cost).
    ``eta`` = 1 is Analytic-DDPM, 0 Analytic-DDIM. ``covariance``: a per-dimension
    diag Cov[x0 | y] (SN-/NPR-DPM, Bao et al. 2022a) in place of the scalar Gamma: the same
    optimal-variance step per coordinate (:mod:`fewstep.samplers.ancestral`).
    """
    if covariance is not None:
        if stats is not None or data is not None or final_noise:
            raise UserError("analytic_dpm: covariance= replaces the scalar statistics; drop stats=, data= and "
                            "final_noise=")
        from .ancestral import sample_ddim

        return sample_ddim(denoiser, x, sigmas, eta=eta, covariance=covariance, data_range=data_range,
                           generator=generator, callback=callback, extra_args=extra_args)
    sig = sigmas.tolist()
    if stats is None:
        if data is None:
            raise UserError("analytic_dpm needs stats= (Gamma per level) or data= to estimate them")
        stats = analytic_dpm_stats(denoiser, data, sigmas[:-1], n_mc, extra_args=extra_args)
    plan = _variances(sig, _gamma_at(stats, sig[:-1]), eta, data_range, final_noise)
    for i, (down, std) in enumerate(plan):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        x = ddim_step(den, (x - den) / s, down, std, generator)
    return x
