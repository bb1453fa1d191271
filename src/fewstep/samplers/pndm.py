"""Pseudo numerical methods: PNDM, PLMS (Liu et al. 2022) and iPNDM (Zhang & Chen 2022).

PNDM's transfer part phi(x_t, eps, t, t - delta) (Liu et al. 2022, eq. 11) is the DDIM step;
in sigma-space it is exactly y_next = y + (s_next - s) eps with eps = (y - D) / s, so the
"pseudo" methods are classical solvers of dy/ds = eps(y, s) whose gradient part combines
several eps estimates (Liu et al. 2022, eq. 12-13):

- pseudo Runge-Kutta (PRK, eq. 13): e1 = eps(y, s); e2 = eps(y + (m - s) e1, m);
  e3 = eps(y + (m - s) e2, m); e4 = eps(y + (s' - s) e3, s');
  y' = y + (s' - s)(e1 + 2 e2 + 2 e3 + e4) / 6, with m the level half-way between s and s'.
- pseudo linear multistep (PLMS, eq. 12): e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24,
  y' = y + (s' - s) e'. The constant Adams-Bashforth coefficients assume equal steps: the
  method is 4th order on a grid uniform in sigma and 2nd order on other smooth grids.

PRK in the data form (``prk_form``): the eps form above feeds e4, an eps evaluated at s'
at a point reached with e3, into y' with weight (s' - s) / 6; an error delta in that point
changes e4 by (I - dD/dy) delta / s', so y' by (s - s') / (6 s') times it: for s / s' > 7
the stage errors are amplified (one PRK step from sigma 80 to 0.002 multiplies them by
~7000, the PNDM blow-ups at 5-10 NFE on Karras grids). The same ODE written for
w = y / sigma in tau = 1 / sigma is dw/dtau = D(sigma w, sigma) (its Euler step is again
the DDIM step), and classical RK4 on it averages x0 predictions instead:
  D1 = D(y, s); D2 = D(m (w + (tm - ts) D1), m); D3 = D(m (w + (tm - ts) D2), m);
  D4 = D(s' (w + (ts' - ts) D3), s');  y' = s' (w + (ts' - ts)(D1 + 2 D2 + 2 D3 + D4) / 6),
with w = y / s, ts = 1 / s, tm = (ts + ts') / 2, m = 1 / tm: fourth order, and D values
enter y' with weight (1 - s'/s) / 6 < 1/6, whatever the step. ``prk_form="auto"`` (the
default) takes the eps form with ``process=`` (diffusers' PNDMScheduler: midpoints in
its time, its numbers on its grids) for steps with s / s' <= 7, and the data form
otherwise (no process to copy, or a step where the eps form amplifies errors).

Warm starts: PNDM takes its first 3 steps with PRK (4 evaluations each); PLMS (diffusers'
``skip_prk_steps=True``, after crowsonkb's PLMS) takes a Heun step, then Adams-Bashforth of
orders 2, 3, 4; iPNDM (DEIS paper, Zhang & Chen 2022, App.) takes Adams-Bashforth of orders
1, 2, 3, 4 (no extra evaluation). A low-order warm start bounds the asymptotic order
(Euler first step: 2, Heun: 3), although at sigma_max its error is damped by the flow.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from . import register
from ._common import denoise, lagrange_integral_weights, lincomb, report, to_d
from ._expint import check_choice

# Adams-Bashforth coefficients for equal steps, newest first (Liu et al. 2022 eq. 12; DEIS App.)
AB_COEFFS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def adams_bashforth(history, coeffs=None):
    """sum_j c_j e_{i-j} over the newest len(coeffs) slopes (``history`` oldest first);
    ``coeffs`` default to the equal-step Adams-Bashforth ones of the available order."""
    coeffs = coeffs if coeffs is not None else AB_COEFFS[min(4, len(history))]
    return lincomb(coeffs, history[::-1][:len(coeffs)])


PRK_FORMS = ("auto", "eps", "data")
EPS_FORM_MAX_RATIO = 7.0  # s / s' beyond which the eps form amplifies stage errors


def _prk_form(prk_form: str, s: float, s_next: float, process) -> str:
    if prk_form != "auto":
        return prk_form
    return "eps" if process is not None and s <= EPS_FORM_MAX_RATIO * s_next else "data"


def _prk_step(denoiser, x, s, s_mid, s_next, den1, e1, form, extra_args):
    """PNDM's pseudo Runge-Kutta step (module docstring) in ``form`` "eps" (midpoint
    ``s_mid``) or "data" (midpoint half-way in 1 / sigma); 3 evaluations after the one at s."""
    w4 = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
    if form == "eps":
        def slope(x_at, level):
            return to_d(x_at, level, denoise(denoiser, x_at, level, extra_args))

        e2 = slope(x + (s_mid - s) * e1, s_mid)
        e3 = slope(x + (s_mid - s) * e2, s_mid)
        e4 = slope(x + (s_next - s) * e3, s_next)
        return x.add(lincomb(w4, [e1, e2, e3, e4]), alpha=s_next - s)
    ts, tn = 1 / s, 1 / s_next
    tm = 0.5 * (ts + tn)
    m = 1 / tm
    w = x / s
    d2 = denoise(denoiser, m * (w + (tm - ts) * den1), m, extra_args)
    d3 = denoise(denoiser, m * (w + (tm - ts) * d2), m, extra_args)
    d4 = denoise(denoiser, s_next * (w + (tn - ts) * d3), s_next, extra_args)
    return s_next * (w + (tn - ts) * lincomb(w4, [den1, d2, d3, d4]))


def _n_prk(steps, final_zero, prk_steps=3):
    """PRK warm-start steps: the first ``prk_steps``, but never the step that lands on 0."""
    return max(0, min(prk_steps, steps - int(bool(final_zero))))


def _pndm_cost(steps, final_zero=True, skip_prk_steps=False, **_):
    if skip_prk_steps:
        return _plms_cost(steps, final_zero)
    return steps + 3 * _n_prk(steps, final_zero)


def _plms_cost(steps, final_zero=True, **_):
    """One evaluation per step plus the Heun warm start's second (absent when the first
    step already lands on sigma = 0)."""
    if steps <= 0:
        return 0
    return steps + (0 if (final_zero and steps == 1) else 1)


def _midpoints(sig, process):
    """Half-way levels of each step of ``sig`` (all > 0): in sigma (PRK is then classical
    RK4), or in the process's time t (diffusers' PNDMScheduler evaluates at t - stride / 2)."""
    if process is None:
        return [0.5 * (a + b) for a, b in zip(sig[:-1], sig[1:])]
    t = process.t_of_sigma(torch.tensor(sig, dtype=torch.float64))
    return process.sigma(0.5 * (t[:-1] + t[1:])).tolist()


@register("pndm", order=4, cost=_pndm_cost)
@torch.no_grad()
def sample_pndm(denoiser, x, sigmas, *, skip_prk_steps=False, prk_form="auto", process=None, callback=None,
                extra_args=None):
    """PNDM (Liu et al. 2022, Alg. 2): 3 pseudo Runge-Kutta steps, then pseudo linear
    multistep (PLMS). Defaults as diffusers' ``PNDMScheduler`` (``skip_prk_steps=False``);
    ``skip_prk_steps=True`` is :func:`sample_plms`. The eps-form PRK midpoints are half-way
    in sigma, or, with ``process=``, half-way in the process's time (as diffusers on its
    timesteps). ``prk_form``: "eps" (the paper's, diffusers'), "data" (RK4 on
    dw/dtau = D, stable for any step) or "auto" (eps with ``process=`` where s / s' <= 7,
    else data; module docstring). A step that lands on sigma = 0 is never a PRK step (it would evaluate at 0)."""
    check_choice("prk_form", prk_form, PRK_FORMS)
    if skip_prk_steps:
        return sample_plms(denoiser, x, sigmas, callback=callback, extra_args=extra_args)
    sig = sigmas.tolist()
    n = len(sig) - 1
    n_prk = _n_prk(n, sig[-1] == 0)
    mids = _midpoints(sig[: n_prk + 1], process) if n_prk else []
    hist = []
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        hist = (hist + [to_d(x, s, den)])[-4:]
        if i < n_prk:
            x = _prk_step(denoiser, x, s, mids[i], s_next, den, hist[-1], _prk_form(prk_form, s, s_next, process),
                          extra_args)
        else:
            x = x.add(adams_bashforth(hist), alpha=s_next - s)
    return x


@register("plms", order=4, cost=_plms_cost)
@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, callback=None, extra_args=None):
    """PLMS as diffusers' ``PNDMScheduler(skip_prk_steps=True)``: a Heun warm-start step
    (the second evaluation's eps is averaged with the first, and not kept), then the
    equal-step Adams-Bashforth combinations of orders 2, 3, 4 (Liu et al. 2022, eq. 12)."""
    sig = sigmas.tolist()
    hist = []
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        hist = (hist + [to_d(x, s, den)])[-4:]
        if i == 0 and s_next > 0:  # Heun warm start
            x_pred = x.add(hist[0], alpha=s_next - s)
            e_pred = to_d(x_pred, s_next, denoise(denoiser, x_pred, s_next, extra_args))
            x = x.add(e_pred.add_(hist[0]), alpha=(s_next - s) * 0.5)
        else:
            x = x.add(adams_bashforth(hist), alpha=s_next - s)
    return x


def _ab_plan(sig, max_order, variable_step):
    """Adams-Bashforth coefficients of each step (newest first), precomputed per grid."""
    plan = []
    for i in range(len(sig) - 1):
        k = min(max_order, i + 1)
        if variable_step:
            nodes = [sig[i - j] for j in range(k)]
            plan.append(tuple(lagrange_integral_weights(nodes, sig[i], sig[i + 1])))
        else:
            plan.append(AB_COEFFS[k])
    return plan


@register("ipndm", order=4)
@torch.no_grad()
def sample_ipndm(denoiser, x, sigmas, *, max_order=4, variable_step=False, callback=None, extra_args=None):
    """Improved PNDM (Zhang & Chen 2022, DEIS paper, App.; k-diffusion's ``sample_ipndm``):
    Adams-Bashforth on dy/ds = eps with the lower-order warm start 1, 2, 3, ``max_order``
    (<= 4); one evaluation per step. ``variable_step=True`` uses the Adams-Bashforth
    coefficients of the actual (non-uniform) grid instead of the equal-step ones
    (k-diffusion's ``sample_ipndm_v``)."""
    if not 1 <= int(max_order) <= 4:
        raise UserError(f"ipndm: max_order={max_order}; choose 1, 2, 3 or 4")
    sig = sigmas.tolist()
    plan = _ab_plan(sig, int(max_order), variable_step)
    hist = []
    for i, coeffs in enumerate(plan):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        hist = (hist + [to_d(x, s, den)])[-4:]
        x = x.add(adams_bashforth(hist, coeffs), alpha=s_next - s)
    return x
