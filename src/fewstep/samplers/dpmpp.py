"""DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): the data-prediction exponential integrator, single-step (2S),
multistep (2M, 3M) and its SDE variant; the multistep solver also runs in the noise form
of DPM-Solver (``algorithm_type="dpmsolver"``) and is the engine of DEIS (:mod:`.deis`).

Multistep step i (sigma_i -> sigma_{i+1}, one evaluation M_i; notation of :mod:`._expint`;
r_0 = h_{i-1} / h_i, r_1 = h_{i-2} / h_i):

    order 1:  y_{i+1} = a y_i + w_1 M_i
    order 2:  D_1 = (M_i - M_{i-1}) / r_0
              y_{i+1} = a y_i + w_1 M_i + (w_1 / 2) D_1        ("midpoint", paper Alg. 2)
                                      or   + w_2 D_1            ("heun")
    order 3:  D1_0 = (M_i - M_{i-1}) / r_0,  D1_1 = (M_{i-1} - M_{i-2}) / r_1
              D_1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1),   D_2 = (D1_0 - D1_1) / (r_0 + r_1)
              y_{i+1} = a y_i + w_1 M_i + w_2 D_1 + 2 w_3 D_2

D_1 and 2 D_2 are h M' and h^2 M'' of the quadratic through the last three values, so the
order-3 step integrates that quadratic exactly (the DEIS / Adams-Bashforth step) and is
third order. **Deliberate difference:** the official DPM-Solver code
(``multistep_dpm_solver_third_update``) and diffusers' ``DPMSolverMultistepScheduler`` use
``w_3 D_2`` (half the D_2 term); that step is only second order (measured 2.0 on the exact
Gaussian-mixture flow, where ours measures 3.0; diffusers' own DEIS and single-step
"heun" integrate the quadratic exactly, as we do). ``third_order="diffusers"`` gives
their coefficient and their numbers.

Step orders follow diffusers: warm-up 1, 2, ..; the last step is first order when the grid
ends at 0 (y = D: the data form's higher terms diverge at sigma = 0), or with
``euler_at_final``, or with ``lower_order_final`` when there are fewer than 15 steps (then
the step before it is at most second order).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from . import register
from ._common import denoise, noise_like, report
from ._expint import check_choice, form_of, lambdas, model_output, weights
from .dpm_solver import SOLVER_TYPES, _combine, _cost, _singlestep


def step_orders(n: int, order: int, final_zero: bool, lower_order_final: bool = True,
                euler_at_final: bool = False) -> list[int]:
    """The order of each of ``n`` multistep steps (warm-up, and diffusers' final-step rules)."""
    orders = [min(order, i + 1) for i in range(n)]
    short = lower_order_final and n < 15
    if n >= 2 and short:
        orders[-2] = min(orders[-2], 2)
    if final_zero or euler_at_final or short:
        orders[-1] = 1
    return orders


def multistep_coeffs(form: str, sig, orders, solver_type: str = "midpoint", third_order: str = "exact"):
    """Per step: (a, c, noise_std) with y_{i+1} = a y_i + sum_j c[j] M_{i-j} (+ noise_std z)."""
    lam = lambdas(sig)
    out = []
    for i, k in enumerate(orders):
        a, w, std = weights(form, sig[i], sig[i + 1], k)
        e = np.eye(k)
        c = w[0] * e[0]
        if k >= 2:
            h = lam[i + 1] - lam[i]
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (e[0] - e[1]) / r0
            if k == 2:
                c = c + (0.5 * w[0] if solver_type == "midpoint" else w[1]) * d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = (e[1] - e[2]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                c = c + w[1] * d1 + (2.0 if third_order == "exact" else 1.0) * w[2] * d2
        out.append((a, c, std))
    return out


def multistep(denoiser, x, sigmas, *, order, form, solver_type="midpoint", third_order="exact",
              lower_order_final=True, euler_at_final=False, generator=None, callback=None, extra_args=None):
    """The multistep exponential integrator of the module docstring (orders 1-3)."""
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("third_order", third_order, ("exact", "diffusers"))
    if order not in (1, 2, 3):
        raise UserError(f"multistep DPM-Solver: order must be 1, 2 or 3, got {order}")
    sig = sigmas.tolist()
    orders = step_orders(len(sig) - 1, order, sig[-1] == 0, lower_order_final, euler_at_final)
    plan = multistep_coeffs(form, sig, orders, solver_type, third_order)
    hist: list = []  # model outputs, newest first
    for i, (a, c, std) in enumerate(plan):
        den = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, x, sig[i], sig[i + 1], den)
        hist = [model_output(form, x, den, sig[i])] + hist[:order - 1]
        x = _combine(x, a, c, hist)
        if std > 0:
            x = x + std * noise_like(x, generator)
    return x


@register("dpmpp_2m", order=2)
@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, algorithm_type="dpmsolver++", solver_type="midpoint",
                    lower_order_final=True, euler_at_final=False, callback=None, extra_args=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): with r_0 = h_{i-1} / h_i,
    y_{i+1} = e^{-h} y_i + (1 - e^{-h}) [D_i + (D_i - D_{i-1}) / (2 r_0)].

    ``algorithm_type``: "dpmsolver++" (data prediction, default) or "dpmsolver" (the noise
    prediction of DPM-Solver); ``solver_type``: "midpoint" (default) or "heun" for the
    order-2 steps; ``lower_order_final=True`` and ``euler_at_final=False`` as diffusers
    (module docstring). Defaults equal diffusers' ``DPMSolverMultistepScheduler``; one
    evaluation per step.
    """
    check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "dpmsolver"))
    return multistep(denoiser, x, sigmas, order=2, form=form_of(algorithm_type), solver_type=solver_type,
                     lower_order_final=lower_order_final, euler_at_final=euler_at_final, callback=callback,
                     extra_args=extra_args)


@register("dpmpp_3m", order=3)
@torch.no_grad()
def sample_dpmpp_3m(denoiser, x, sigmas, *, algorithm_type="dpmsolver++", solver_type="midpoint",
                    third_order="exact", lower_order_final=True, euler_at_final=False, callback=None,
                    extra_args=None):
    """DPM-Solver++(3M): y_{i+1} = a y_i + w_1 M_i + w_2 D_1 + 2 w_3 D_2 (module docstring).

    ``third_order="diffusers"`` uses w_3 D_2 as the official code and diffusers do (second
    order only; same numbers as diffusers' ``solver_order=3``). The other options and their
    defaults are those of :func:`sample_dpmpp_2m` (diffusers' ``DPMSolverMultistepScheduler``);
    one evaluation per step.
    """
    check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "dpmsolver"))
    return multistep(denoiser, x, sigmas, order=3, form=form_of(algorithm_type), solver_type=solver_type,
                     third_order=third_order, lower_order_final=lower_order_final, euler_at_final=euler_at_final,
                     callback=callback, extra_args=extra_args)


@register("dpmpp_2m_sde", stochastic=True)
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, solver_type="midpoint", lower_order_final=True,
                        euler_at_final=False, generator=None, callback=None, extra_args=None):
    """SDE-DPM-Solver++(2M), the SDE variant of DPM-Solver++ by its authors (diffusers'
    "sde-dpmsolver++"): the exponential integrator of the reverse SDE in data prediction,

    y_{i+1} = e^{-2h} y_i + (1 - e^{-2h}) [D_i + D_1 / 2] + sigma_{i+1} sqrt(1 - e^{-2h}) z_i,
    D_1 = (D_i - D_{i-1}) / r_0 ("heun": 2h phi_2(-2h) D_1 instead of the midpoint term).

    z_i = noise_like(x, generator) is drawn once per step that ends above sigma = 0, in step
    order (the step to 0 adds no noise), so passing the same z_i as diffusers'
    ``variance_noise`` reproduces its numbers.
    """
    return multistep(denoiser, x, sigmas, order=2, form="sde", solver_type=solver_type,
                     lower_order_final=lower_order_final, euler_at_final=euler_at_final, generator=generator,
                     callback=callback, extra_args=extra_args)


@register("dpmpp_2s", order=2, cost=_cost(2))
@torch.no_grad()
def sample_dpmpp_2s(denoiser, x, sigmas, *, r=0.5, solver_type="midpoint", callback=None, extra_args=None):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1): u = e^{-r h} y_s + (1 - e^{-r h}) D_s at
    lambda_s + r h, then y_t = e^{-h} y_s + (1 - e^{-h}) [(1 - 1/(2r)) D_s + D(u) / (2r)].

    Two evaluations per step; the step to sigma = 0 is y = D (one), so the cost is
    2 (steps - 1) + 1 on grids ending at 0. This is :func:`~.dpm_solver.sample_dpm_solver_2`
    with ``algorithm_type="dpmsolver++"``.
    """
    return _singlestep(denoiser, x, sigmas, 2, algorithm_type="dpmsolver++", solver_type=solver_type, rs=[r],
                       intermediates="lambda", lower_order_final=False, callback=callback, extra_args=extra_args)
