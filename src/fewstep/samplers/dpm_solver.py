"""Single-step DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion
Probabilistic Model Sampling in Around 10 Steps") and its adaptive step-size version.

One step of order k from sigma_s to sigma_t (h = lambda_t - lambda_s, lambda = -log sigma)
evaluates the model at s and at k - 1 intermediate levels lambda_s + r_j h, each reached by
the lower-order step, then combines them (notation of :mod:`._expint`, M = eps for the
paper's noise form, M = D for the data form of DPM-Solver++, Lu et al. 2022b):

    DPM-Solver-1:  y_t = a y_s + w_1 M_s                                  (= DDIM / Euler)
    DPM-Solver-2:  u   = step-1 to lambda_s + r_1 h
                   y_t = a y_s + w_1 M_s + (w_1 / (2 r_1)) (M_u - M_s)      ("midpoint", paper Alg. 1/4)
                      or      ... + (w_2 / r_1)    (M_u - M_s)              ("heun": the Taylor form)
    DPM-Solver-3:  u_1 = step-1 to r_1 h,  u_2 = step-2 (from s, through u_1) to r_2 h
                   y_t = a y_s + w_1 M_s + (w_2 / r_2) (M_{u2} - M_s)        ("midpoint", paper Alg. 2)
                      or      ... + w_2 D_1 + w_3 D_2  with D_1, D_2 the exact quadratic
                                   through (0, M_s), (r_1, M_{u1}), (r_2, M_{u2})   ("heun")

with r_1 = 1/2 for order 2 and r_1 = 1/3, r_2 = 2/3 for order 3 (third order needs
r_2 = 2/3 for the "midpoint" form). The paper's DPM-Solver-3 computes u_2 with the phi_2
("heun") weight; ours computes every order-2 stage with ``solver_type``, as diffusers does
(both forms keep the step third order).

A step to sigma = 0 cannot place levels in lambda (h is infinite) and the data form's
higher terms diverge there, so the last step of a grid ending at 0 is the first-order
step y = D(y, sigma_{N-1}) with one evaluation (diffusers' ``final_sigmas_type="zero"``
does the same). Hence ``cost = k (steps - 1) + 1`` on grids ending at 0 (k steps
otherwise).

diffusers' ``DPMSolverSinglestepScheduler`` instead spends one evaluation per grid level:
``intermediates="grid"`` reproduces it. Consecutive groups of grid intervals form one
order-k step whose inner grid levels are the intermediate levels (r_j from the grid), the
group orders following :func:`singlestep_orders` (diffusers' ``get_order_list``); then
``cost = steps``.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError
from . import register
from ._common import denoise, report
from ._expint import check_choice, form_of, lambdas, model_output, weights

SOLVER_TYPES = ("midpoint", "heun")


# --- one step, as coefficients ------------------------------------------------------------
def single_coeffs(form: str, sigma_s: float, sigma_t: float, rs: Sequence[float], solver_type: str):
    """y_t = a y_s + sum_j c[j] M_j for one single-step update of order len(rs) + 1, where
    M_0 is the model at s and M_j at lambda_s + rs[j-1] h (module docstring)."""
    k = len(rs) + 1
    if sigma_t == 0:
        if k > 1:
            raise UserError("dpm_solver: a step of order > 1 cannot end at sigma = 0")
        a, w, _ = weights(form, sigma_s, sigma_t, 1)
        return a, np.array([w[0]])
    a, w, _ = weights(form, sigma_s, sigma_t, k)
    e = np.eye(k)
    c = w[0] * e[0]
    if k == 2:
        d1 = (e[1] - e[0]) / rs[0]
        c = c + (0.5 * w[0] if solver_type == "midpoint" else w[1]) * d1
    elif k == 3:
        r1, r2 = rs
        if solver_type == "midpoint":
            c = c + w[1] * (e[2] - e[0]) / r2
        else:
            d1_0, d1_1 = (e[1] - e[0]) / r1, (e[2] - e[0]) / r2
            d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
            c = c + w[1] * d1 + w[2] * d2
    elif k > 3:
        raise UserError(f"dpm_solver: order {k} is not available (1, 2 or 3)")
    return a, c


def step_plan(form: str, levels: Sequence[float], solver_type: str):
    """One order-k step through ``levels`` = [s, u_1, .., u_{k-1}, t]:
    (s, [(u_1, a, c), .., (t, a, c)]), every stage written as a step from s."""
    lam = lambdas(levels)
    stages = []
    for j in range(1, len(levels)):
        h = lam[j] - lam[0]
        rs = [(lam[l] - lam[0]) / h for l in range(1, j)]
        stages.append((levels[j], *single_coeffs(form, levels[0], levels[j], rs, solver_type)))
    return levels[0], stages


def lambda_levels(sigma_s: float, sigma_t: float, rs: Sequence[float]) -> list[float]:
    """[s, u_1 .. u_{k-1}, t] with lambda_{u_j} = lambda_s + r_j h (just [s, t] if t = 0)."""
    if sigma_t == 0:
        return [sigma_s, sigma_t]
    h = math.log(sigma_s / sigma_t)
    return [sigma_s] + [sigma_s * math.exp(-r * h) for r in rs] + [sigma_t]


def singlestep_orders(steps: int, solver_order: int, lower_order_final: bool = False,
                      final_zero: bool = True) -> list[int]:
    """diffusers' ``DPMSolverSinglestepScheduler.get_order_list``: one order per grid
    interval, including the scheduler's switch to ``lower_order_final=True`` when
    ``steps`` is not a multiple of the order or the grid ends at 0."""
    k = solver_order
    if lower_order_final or steps % k != 0 or final_zero:
        if k == 3:
            tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
            orders = [1, 2, 3] * (steps // 3 - (steps % 3 == 0)) + tail
        elif k == 2:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        else:
            orders = [1] * steps
    else:
        orders = list(range(1, k + 1)) * (steps // k)
    if final_zero:
        orders[-1] = 1
    return orders


def _groups(orders: Sequence[int]) -> list[int]:
    """[1, 2, 1, 2, 3, 1] -> [2, 3, 1]: each run 1, 2, .., k is one order-k step."""
    groups: list[int] = []
    for o in orders:
        if o == 1:
            groups.append(1)
        elif groups and o == groups[-1] + 1:
            groups[-1] = o
        else:
            raise UserError(f"singlestep order list {list(orders)} is not made of runs 1, 2, .., k")
    return groups


def _combine(x, a: float, c, ms):
    """a x + sum_j c_j ms_j."""
    out = x * a
    for cj, m in zip(c, ms):
        if cj != 0.0:
            out.add_(m, alpha=float(cj))
    return out


def _stage_values(denoiser, x, sigma_s, stages, form, ms, extra_args):
    """Evaluate the intermediate stages of one step; ``ms`` starts with M at s and grows."""
    for level, a, c in stages[:-1]:
        u = _combine(x, a, c, ms)
        ms.append(model_output(form, u, denoise(denoiser, u, level, extra_args), level))
    return ms


def _singlestep(denoiser, x, sigmas, order, *, algorithm_type, solver_type, rs, intermediates,
                lower_order_final, callback, extra_args):
    """Run single-step DPM-Solver of ``order`` (module docstring) on the grid ``sigmas``."""
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("intermediates", intermediates, ("lambda", "grid"))
    if not (all(0 < r < 1 for r in rs) and all(a < b for a, b in zip(rs, rs[1:]))):
        raise UserError(f"dpm_solver_{order}: need 0 < r1 (< r2) < 1, got {list(rs)}")
    form = form_of(algorithm_type)
    sig = sigmas.tolist()
    if intermediates == "grid":
        plans, g = [], 0
        for k in _groups(singlestep_orders(len(sig) - 1, order, lower_order_final, sig[-1] == 0)):
            plans.append(step_plan(form, sig[g:g + k + 1], solver_type))
            g += k
    else:
        plans = [step_plan(form, lambda_levels(s, t, rs), solver_type) for s, t in zip(sig[:-1], sig[1:])]
    for i, (sigma_s, stages) in enumerate(plans):  # coefficients above, evaluations below
        den = denoise(denoiser, x, sigma_s, extra_args)
        report(callback, i, x, sigma_s, stages[-1][0], den)
        ms = _stage_values(denoiser, x, sigma_s, stages, form, [model_output(form, x, den, sigma_s)], extra_args)
        x = _combine(x, *stages[-1][1:], ms)
    return x


def _cost(k: int):
    def cost(steps, intermediates="lambda", final_zero=True, **_):
        if intermediates == "grid" or steps == 0:
            return steps
        return k * (steps - 1) + 1 if final_zero else k * steps
    return cost


@register("dpm_solver_1", order=1)
@torch.no_grad()
def sample_dpm_solver_1(denoiser, x, sigmas, *, algorithm_type="dpmsolver", callback=None, extra_args=None):
    """DPM-Solver-1: y_t = a y_s + w_1 M_s, which in sigma-space is exactly DDIM / Euler,
    y_t = y_s + (sigma_t - sigma_s) (y_s - D) / sigma_s, in either form. One evaluation per step."""
    return _singlestep(denoiser, x, sigmas, 1, algorithm_type=algorithm_type, solver_type="midpoint", rs=[],
                       intermediates="lambda", lower_order_final=False, callback=callback, extra_args=extra_args)


@register("dpm_solver_2", order=2, cost=_cost(2))
@torch.no_grad()
def sample_dpm_solver_2(denoiser, x, sigmas, *, r1=0.5, algorithm_type="dpmsolver", solver_type="midpoint",
                        intermediates="lambda", lower_order_final=False, callback=None, extra_args=None):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1 and 4): u = y_s step-1 to lambda_s + r1 h, then
    y_t = a y_s + w_1 M_s + (w_1 / (2 r1)) (M_u - M_s)   (``solver_type="heun"``: w_2 / r1).

    ``algorithm_type``: "dpmsolver" (the paper's noise prediction, default) or "dpmsolver++"
    (data prediction: this is DPM-Solver++(2S)). ``intermediates="grid"`` with
    ``algorithm_type="dpmsolver++"`` reproduces diffusers' ``DPMSolverSinglestepScheduler``
    (``solver_order=2``; ``lower_order_final`` as its option). Cost 2 (steps - 1) + 1 on
    grids ending at 0 (the step to 0 is y = D), ``steps`` with ``intermediates="grid"``.
    """
    return _singlestep(denoiser, x, sigmas, 2, algorithm_type=algorithm_type, solver_type=solver_type, rs=[r1],
                       intermediates=intermediates, lower_order_final=lower_order_final, callback=callback,
                       extra_args=extra_args)


@register("dpm_solver_3", order=3, cost=_cost(3))
@torch.no_grad()
def sample_dpm_solver_3(denoiser, x, sigmas, *, r1=1 / 3, r2=2 / 3, algorithm_type="dpmsolver",
                        solver_type="midpoint", intermediates="lambda", lower_order_final=False,
                        callback=None, extra_args=None):
    """DPM-Solver-3 (Lu et al. 2022, Alg. 2): u_1 at lambda_s + r1 h (step-1), u_2 at
    lambda_s + r2 h (step-2 from s through u_1), then
    y_t = a y_s + w_1 M_s + (w_2 / r2) (M_{u2} - M_s)   ("midpoint"; third order for r2 = 2/3)
    or the exact quadratic through the three values ("heun", w_2 D_1 + w_3 D_2).

    Options as :func:`sample_dpm_solver_2`; ``intermediates="grid"`` reproduces diffusers'
    ``DPMSolverSinglestepScheduler`` with ``solver_order=3``. Cost 3 (steps - 1) + 1 on
    grids ending at 0, ``steps`` with ``intermediates="grid"``.
    """
    return _singlestep(denoiser, x, sigmas, 3, algorithm_type=algorithm_type, solver_type=solver_type,
                       rs=[r1, r2], intermediates=intermediates, lower_order_final=lower_order_final,
                       callback=callback, extra_args=extra_args)


def _finish_plan(sigma_s: float, sigma_end: float, avail: int, max_order: int):
    """Fixed steps spending ``avail`` model evaluations (the one at sigma_s included) to go
    from sigma_s to sigma_end: DPM-Solver-2 steps (r1 = 1/2; DPM-Solver-1 if
    ``max_order`` is 1) uniform in lambda, and one DPM-Solver-1 step when ``avail`` is odd
    (last, as DPM-Solver's "fast" order lists put the lower orders last).
    [(sigma_from, sigma_to, order), ..]; empty when ``avail`` is 0."""
    q = min(2, max_order)
    orders = [q] * (avail // q) + [1] * (avail % q)
    lam = np.linspace(-math.log(sigma_s), -math.log(sigma_end), len(orders) + 1)
    levels = [sigma_s] + [math.exp(-v) for v in lam[1:-1]] + [sigma_end]
    return [(levels[j], levels[j + 1], k) for j, k in enumerate(orders)]


@register("dpm_solver_adaptive", order=3, adaptive=True, cost=lambda steps, **_: steps)
@torch.no_grad()
def sample_dpm_solver_adaptive(denoiser, x, sigmas, *, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                               theta=0.9, max_nfe=None, algorithm_type="dpmsolver", solver_type="midpoint",
                               callback=None, extra_args=None):
    """Adaptive step size DPM-Solver (Lu et al. 2022, Sec. 3.4 and Alg. 5), DPM-Solver-23.

    From sigmas[0] to the smallest positive level of the grid (then y = D if it ends at 0),
    each trial step of size h in lambda computes the lower-order result y_l (DPM-Solver-2,
    r1 = 1/3) and the higher y_h (DPM-Solver-3, r1 = 1/3, r2 = 2/3) from the same three
    evaluations (``order=2``: DPM-Solver-1 and -2, r1 = 1/2, two evaluations), and

        E = max_batch RMS((y_h - y_l) / delta),  delta = max(atol, rtol max(|y_l|, |y_prev|));
        accept y_h if E <= 1;   h <- min(theta h E^(-1/order), lambda_end - lambda_s).

    Tolerances apply to sigma-space values y (the paper's x-space values are alpha y).
    The evaluation at s is reused when a trial is rejected (the paper recomputes it).

    ``max_nfe`` is never exceeded and every sample reaches the end of the grid: a trial
    that does not end the run is taken only if ``order + 1`` evaluations are left after it
    (one more trial and a step on; a last lonely trial would spend them on a short step
    and leave one DPM-Solver-1 step for the rest); when none fits, the evaluations left
    (the one at s included, if known) finish the way
    from the current level to the end with fixed DPM-Solver-2 steps uniform in lambda (a
    DPM-Solver-1 step for an odd one; :func:`_finish_plan`), with a warning that the
    tolerance was not met. The finishing steps are DPM-Solver++(2S) steps (data form,
    whatever ``algorithm_type``): the noise form's second-order step diverges for the
    large h a small budget leaves (one step from sigma 80 to 0.002 multiplies the error
    by ~100 on the exact Gaussian-mixture flow). With no evaluation left for the loop
    (``max_nfe=1`` on a grid ending at 0) the result is the one-step y = D(y, sigmas[0]);
    on a grid ending at a positive level that case is refused. Below the evaluations the
    tolerance needs, the error is not monotone in the budget (the adaptive steps spent
    before the finish are small ones at high sigma): for a fixed small budget, a
    fixed-step sampler is the better choice. A budget of at least the evaluations the
    tolerance needs plus ``order + 1`` gives the unbudgeted result exactly.
    """
    check_choice("dpm_solver_adaptive order", order, (2, 3))
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    form = form_of(algorithm_type)
    sig = sigmas.tolist()
    pos = [s for s in sig if s > 0]
    sigma_s, sigma_end, to_zero = pos[0], pos[-1], sig[-1] == 0
    lam_s, lam_end = -math.log(sigma_s), -math.log(sigma_end)
    rs_of = {1: [], 2: [0.5], 3: [1 / 3, 2 / 3]}
    budget = math.inf if max_nfe is None else max_nfe - int(to_zero)
    if budget < 1 and not (to_zero and budget == 0) and sigma_s > sigma_end:
        raise UserError(f"dpm_solver_adaptive needs at least {1 + int(to_zero)} evaluations, got max_nfe={max_nfe}")
    used, h, x_prev, cached, i = 0, float(h_init), x, None, 0

    def evaluate_s():
        nonlocal used
        used += 1
        den = denoise(denoiser, x, sigma_s, extra_args)
        return den, model_output(form, x, den, sigma_s)

    while sigma_s > sigma_end:
        h = min(h, lam_end - lam_s)
        last = h >= lam_end - lam_s
        if used + order - (cached is not None) + (0 if last else order + 1) > budget:
            avail = int(budget - used) + (cached is not None)
            warnings.warn(f"dpm_solver_adaptive: max_nfe={max_nfe} reached at sigma={sigma_s:.4g} before the "
                          f"tolerance was met; {avail} evaluation(s) finish with fixed steps to "
                          f"sigma={sigma_end:.4g}", stacklevel=3)
            for s_from, s_to, k in _finish_plan(sigma_s, sigma_end, avail, order):
                _, stages = step_plan("data", lambda_levels(s_from, s_to, rs_of[k]), solver_type)
                den, _ = cached if cached is not None else evaluate_s()
                report(callback, i, x, s_from, s_to, den)
                ms = _stage_values(denoiser, x, s_from, stages, "data", [den], extra_args)
                used += k - 1
                x, sigma_s, cached, i = _combine(x, *stages[-1][1:], ms), s_to, None, i + 1
            break
        sigma_t = sigma_end if last else math.exp(-(lam_s + h))
        _, stages = step_plan(form, lambda_levels(sigma_s, sigma_t, rs_of[order]), solver_type)
        a_lo, c_lo = single_coeffs(form, sigma_s, sigma_t, rs_of[order][:-1], solver_type)
        den, m = cached = cached if cached is not None else evaluate_s()
        ms = _stage_values(denoiser, x, sigma_s, stages, form, [m], extra_args)
        used += order - 1
        x_hi, x_lo = _combine(x, *stages[-1][1:], ms), _combine(x, a_lo, c_lo, ms)
        delta = torch.clamp(rtol * torch.maximum(x_lo.abs(), x_prev.abs()), min=atol)
        err = float(((x_hi - x_lo) / delta).reshape(x.shape[0], -1).pow(2).mean(1).sqrt().max())
        if err <= 1.0:
            report(callback, i, x, sigma_s, sigma_t, den)
            x, x_prev, sigma_s, lam_s, cached, i = x_hi, x_lo, sigma_t, lam_s + h, None, i + 1
        h = min(theta * h * err ** (-1.0 / order) if err > 0 else math.inf, lam_end - lam_s)
        if 0 < h < 1e-12:
            raise UserError(f"dpm_solver_adaptive: step size underflow at sigma={sigma_s:.4g}; loosen rtol/atol")
    if to_zero:
        x = denoise(denoiser, x, sigma_s, extra_args)
    return x
