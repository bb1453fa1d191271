"""Langevin samplers: MCMC on the score (survey section 1.3, eq. 14).

Langevin dynamics dX_t = (1/2) grad log p(X_t) dt + dW_t (survey eq. 14; Roberts &
Tweedie 1996) has p as its stationary law. Its Euler-Maruyama step of length h = 2 eps is
the unadjusted Langevin algorithm (ULA)

    x_{k+1} = x_k + eps grad log p(x_k) + sqrt(2 eps) z_k,    z_k ~ N(0, I),

whose stationary law is p only as eps -> 0 (for a Gaussian N(mu, C) it is exactly
N(mu, C (I - eps C^-1 / 2)^-1)). The score comes from any sigma-space denoiser by Tweedie's
formula, s(x, sigma) = grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2, so the target at
level sigma is the noised data law p_sigma = p_data * N(0, sigma^2 I).

- ``langevin``: ULA at ONE level, the grid's smallest positive sigma, for len(sigmas) - 1
  steps (one evaluation each).
- ``annealed_langevin``: Song & Ermon 2019, Algorithm 1 ("Generative modeling by
  estimating gradients of the data distribution"): T steps at each positive level of the
  grid in decreasing order, with the paper's step rule alpha_i = eps sigma_i^2 / sigma_L^2
  and the paper's update x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z (ULA with
  step alpha_i / 2), then optionally the final Tweedie denoising step.
- ``mala``: the Metropolis-adjusted Langevin algorithm (Roberts & Tweedie 1996): the ULA
  step as a proposal, accepted or rejected with the Metropolis-Hastings ratio built from
  the model's log-density, so the chain's stationary law is exactly p_sigma at any step.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Callable

import torch

from ..errors import UserError
from . import register
from ._common import batch_sigma, denoise, noise_like, report

# ULA's default step relative to the level's variance: 0.1 sigma^2 (see sample_langevin)
ULA_STEP = 0.1
# Song & Ermon 2019: eps = 2e-5 with a last level sigma_L = 0.01 (alpha_i / sigma_i^2 = 0.2)
PAPER_EPS, PAPER_SIGMA_L = 2e-5, 0.01
# Roberts & Rosenthal 1998: optimal MALA proposal variance 2 eps = l^2 d^(-1/3), l = 1.65
MALA_SCALE = 1.65


def _score(denoiser, x, sigma: float, extra):
    """(D(x, sigma), s(x, sigma) = (D - x) / sigma^2): one network evaluation (Tweedie)."""
    den = denoise(denoiser, x, sigma, extra)
    return den, (den - x) / sigma**2


def _level(sigmas) -> float:
    """The grid's smallest positive level: sigmas[-1] if > 0, else sigmas[-2]."""
    sig = sigmas.tolist()
    s = sig[-1] if sig[-1] > 0 else (sig[-2] if len(sig) > 1 else 0.0)
    if not s > 0:
        raise UserError("a Langevin sampler needs a grid with a positive level; give at least one sigma > 0")
    return float(s)


def _positive(value, name: str, sampler: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"sampler '{sampler}': {name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise UserError(f"sampler '{sampler}': {name} must be a positive finite number, got {value!r}")
    return v


def _steps_per_level(value) -> int:
    try:
        v = operator.index(value)  # ints, numpy integers
    except TypeError:
        v = int(value) if isinstance(value, float) and value.is_integer() else None
    if isinstance(value, bool) or v is None or v < 1:
        raise UserError(f"sampler 'annealed_langevin': steps_per_level must be an integer >= 1, got {value!r}")
    return v


def _with(callback, extra: dict):
    """``callback`` seeing the standard step info plus ``extra`` (None stays None)."""
    return None if callback is None else (lambda info: callback({**info, **extra}))


def _ula_step(x, score, eps: float, generator):
    """x + eps s + sqrt(2 eps) z (ULA; Euler-Maruyama of survey eq. 14 with dt = 2 eps)."""
    return x + eps * score + math.sqrt(2.0 * eps) * noise_like(x, generator)


# ---------------------------------------------------------------------------- ULA
@register("langevin", stochastic=True)
@torch.no_grad()
def sample_langevin(denoiser, x, sigmas, *, step_size=None, generator=None, callback=None, extra_args=None):
    """Unadjusted Langevin dynamics at one level (survey eq. 14, discretised as ULA).

    Runs len(sigmas) - 1 steps x <- x + eps s(x, sigma) + sqrt(2 eps) z at the grid's
    smallest positive level sigma (the other levels only set the number of steps), with
    s = (D(x, sigma) - x) / sigma^2: one evaluation per step; no final denoising, so the
    output follows (approximately) the noised law p_sigma.

    ``step_size`` eps defaults to 0.1 sigma^2. Why: Tweedie's second-order identity gives
    -Hess log p_sigma = (I - Cov[x0 | x] / sigma^2) / sigma^2 <= I / sigma^2, so sigma^2 is
    the smallest variance any direction of p_sigma can have. ULA is stable for eps < 2 v
    in a direction of variance v and inflates that variance by 1 / (1 - eps / (2 v)), so
    eps = 0.1 sigma^2 is stable everywhere and biases no variance by more than ~5%. It is
    also the step Song & Ermon 2019 use at their last level (alpha_L / 2 = 1e-5 with
    sigma_L = 0.01). The callback info has ``step_size``.
    """
    s = _level(sigmas)
    eps = ULA_STEP * s**2 if step_size is None else _positive(step_size, "step_size", "langevin")
    for i in range(len(sigmas) - 1):
        den, score = _score(denoiser, x, s, extra_args)
        report(_with(callback, {"step_size": eps}), i, x, s, s, den)
        x = _ula_step(x, score, eps, generator)
    return x


# ---------------------------------------------------------------- annealed Langevin
def _annealed_cost(steps, steps_per_level=10, denoise_last=True, final_zero=True, **_):
    """T evaluations per positive level, plus one for the final denoising step. An n-step
    grid has n positive levels before a final 0, n + 1 when it ends at sigma_min."""
    levels = steps + (0 if final_zero else 1)
    return levels * _steps_per_level(steps_per_level) + int(bool(denoise_last))


@register("annealed_langevin", stochastic=True, cost=_annealed_cost)
@torch.no_grad()
def sample_annealed_langevin(denoiser, x, sigmas, *, steps_per_level=10, eps=None, denoise_last=True,
                             generator=None, callback=None, extra_args=None):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

    For each positive level sigma_1 > ... > sigma_L of the grid (a final 0 is skipped):
    alpha_i = eps sigma_i^2 / sigma_L^2, then T = ``steps_per_level`` times

        x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z,   s = (D(x, sigma_i) - x) / sigma_i^2,

    exactly the paper's convention (alpha / 2 on the score, sqrt(alpha) on the noise: ULA
    with step alpha_i / 2; eq. 14 with dt = alpha_i). ``eps`` = 2e-5 and T = 10 are the
    paper's eps and a tenth of its T = 100 (its levels run from 1 to sigma_L = 0.01; eps
    is relative to sigma_L, so alpha_i / sigma_i^2 = eps / sigma_L^2 is the same at every
    level). ``eps=None`` (default) keeps that ratio on any grid: eps = 2e-5 (sigma_L / 0.01)^2,
    so alpha_i / sigma_i^2 = 0.2 as in the paper; the paper's eps = 2e-5 taken literally on a
    grid ending at sigma_L = 0.002 (a diffusion teacher's) would make alpha_1 / (2 sigma_1^2)
    = 2.5 > 1, and the chain diverges at the top level. With ``denoise_last`` (default) one more evaluation returns the Tweedie
    denoised mean x + sigma_L^2 s(x, sigma_L) = D(x, sigma_L), as Song & Ermon 2020 and
    Jolicoeur-Martineau et al. 2021 recommend (the paper's Alg. 1 returns x itself).

    Cost: T per level, + 1 with ``denoise_last``. The callback sees each evaluation with
    ``alpha``, ``level`` (index i) and ``t`` (step in the level); the final denoising step
    has ``final=True`` and sigma_next = 0.
    """
    T = _steps_per_level(steps_per_level)
    levels = [s for s in sigmas.tolist() if s > 0]
    if not levels:
        raise UserError("sampler 'annealed_langevin' needs a grid with a positive level; give at least one sigma > 0")
    s_last = levels[-1]
    eps = PAPER_EPS * (s_last / PAPER_SIGMA_L) ** 2 if eps is None else _positive(eps, "eps", "annealed_langevin")
    k = 0
    for li, s in enumerate(levels):
        alpha = eps * s**2 / s_last**2
        for t in range(T):
            den, score = _score(denoiser, x, s, extra_args)
            if t < T - 1:
                s_next = s
            else:
                s_next = levels[li + 1] if li + 1 < len(levels) else (s if denoise_last else 0.0)
            report(_with(callback, {"alpha": alpha, "level": li, "t": t}), k, x, s, s_next, den)
            x = _ula_step(x, score, alpha / 2, generator)
            k += 1
    if denoise_last:
        den = denoise(denoiser, x, s_last, extra_args)
        report(_with(callback, {"final": True}), k, x, s_last, 0.0, den)
        x = den
    return x


# ---------------------------------------------------------------------------- MALA
def _log_prob_of(denoiser) -> Callable:
    """``log_prob(x, sigma, **cond)`` of the denoiser or of a wrapper's ``.inner`` (e.g.
    :class:`~fewstep.denoiser.NFECounter`); UserError when there is none."""
    obj, seen = denoiser, set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        fn = getattr(obj, "log_prob", None)
        if callable(fn) and getattr(obj, "has_log_prob", True):
            return fn
        obj = getattr(obj, "inner", None)
    raise UserError("sampler 'mala' needs an energy (log p up to a constant) and this model has none: "
                    "use an EBM run folder or gmm:FILE.npz, or sample with 'langevin'")


def _check_accepts(log_prob: Callable, extra: dict) -> None:
    """UserError if ``log_prob`` cannot take the conditioning (e.g. labels) the score gets:
    the chain would then target another law than the proposal's."""
    try:
        params = inspect.signature(log_prob).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = {p.name for p in params}
    missing = sorted(k for k in extra if k not in names)
    if missing:
        raise UserError(f"sampler 'mala': this model's log_prob takes no {', '.join(missing)}; "
                        f"sample it unconditionally or with 'langevin'")


def _mala_cost(steps, **_):
    """One evaluation per step plus one at the start (score and log p of the initial x)."""
    return steps + 1


@register("mala", stochastic=True, cost=_mala_cost)
@torch.no_grad()
def sample_mala(denoiser, x, sigmas, *, step_size=None, generator=None, callback=None, extra_args=None):
    """Metropolis-adjusted Langevin at one level (Roberts & Tweedie 1996).

    At the grid's smallest positive level sigma (as :func:`sample_langevin`), len(sigmas) - 1
    steps: propose x' = x + eps s(x) + sqrt(2 eps) z and accept it (per sample) with
    probability min(1, p(x') q(x | x') / (p(x) q(x' | x))), q(b | a) = N(b; a + eps s(a),
    2 eps I), log p from ``denoiser.log_prob(x, sigma)`` (per sample, up to a constant;
    found on the denoiser or through wrappers' ``.inner``). The chain leaves p_sigma
    exactly invariant at any step size, so unlike ULA it has no O(eps) bias.

    Evaluations: a step needs the score and the log-density at the proposal only (those
    of the current state are kept from when it was accepted), counted as one evaluation;
    the start costs one more, so ``cost(steps) = steps + 1``.

    ``step_size`` eps defaults to (1.65^2 / 2) d^(-1/3) sigma^2: Roberts & Rosenthal 1998's
    optimal scaling (proposal variance 2 eps = 1.65^2 d^(-1/3) v, acceptance ~0.574, for a
    product target of variance v) with v = sigma^2, the smallest variance of p_sigma (see
    :func:`sample_langevin`). ``extra_args`` (labels) go to both the denoiser and
    ``log_prob``; around a guided denoiser (``CFGDenoiser``, whose ``.inner`` has the
    log-density) the guided score only shapes the proposal and the chain targets the
    conditional p_sigma(x | c). The callback info has ``step_size``, ``proposal``,
    ``accept`` (bool [batch]: which chains moved) and ``accept_rate`` (their mean).
    """
    log_prob = _log_prob_of(denoiser)
    extra = extra_args or {}
    _check_accepts(log_prob, extra)
    s = _level(sigmas)
    d = x[0].numel()
    eps = (MALA_SCALE**2 / 2) * d ** (-1 / 3) * s**2 if step_size is None else \
        _positive(step_size, "step_size", "mala")

    def energy(y):
        lp = log_prob(y, batch_sigma(s, y), **extra).to(torch.float64).reshape(-1)
        if lp.shape[0] != y.shape[0]:
            raise UserError(f"sampler 'mala': log_prob must give one value per sample ({y.shape[0]}), "
                            f"got shape {list(lp.shape)}")
        return lp

    def sq(v):
        return v.to(torch.float64).reshape(v.shape[0], -1).square().sum(1)

    den, score = _score(denoiser, x, s, extra_args)
    lp = energy(x)
    view = (-1,) + (1,) * (x.ndim - 1)
    for i in range(len(sigmas) - 1):
        z = noise_like(x, generator)
        prop = x + eps * score + math.sqrt(2.0 * eps) * z
        den_p, score_p = _score(denoiser, prop, s, extra_args)
        lp_p = energy(prop)
        # log q(x | x') - log q(x' | x) = (|x' - x - eps s(x)|^2 - |x - x' - eps s(x')|^2) / (4 eps)
        log_ratio = lp_p - lp + (2.0 * eps * sq(z) - sq(x - prop - eps * score_p)) / (4.0 * eps)
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else x.device).to(x.device)
        acc = torch.log(u) < log_ratio  # NaN ratios are rejected
        if callback is not None:
            report(_with(callback, {"step_size": eps, "proposal": prop, "accept": acc,
                                    "accept_rate": float(acc.double().mean())}), i, x, s, s, den)
        a = acc.view(view)
        x, den, score = torch.where(a, prop, x), torch.where(a, den_p, den), torch.where(a, score_p, score)
        lp = torch.where(acc, lp_p, lp)
    return x
