"""Exponential-integrator pieces shared by DPM-Solver, DPM-Solver++, DEIS and UniPC.

In sigma-space (y = x0 + sigma * eps) with lambda = -log sigma (half the log-SNR) the
probability-flow ODE has two exactly solvable linear parts (Lu et al. 2022, eq. 3.4;
Lu et al. 2022b, eq. 8), so a step sigma_s -> sigma_t with h = lambda_t - lambda_s is

    data form  (model M = D, the x0 prediction):
        y_t = e^{-h} y_s + int_{lambda_s}^{lambda_t} e^{lambda - lambda_t} D dlambda
    noise form (model M = eps = (y - D) / sigma):
        y_t = y_s - int_{lambda_s}^{lambda_t} e^{-lambda} eps dlambda.

Expanding M in lambda around lambda_s, M(lambda_s + tau) = sum_k M^(k) tau^k / k!, each
integral is a phi function, phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1} / (k-1)! du, and

    y_t = a * y_s + sum_{k>=1} w_k * h^{k-1} M^(k-1)

with the weights of :func:`weights`:
    data:  a = e^{-h},   w_k =  h phi_k(-h)                     (w_1 = 1 - e^{-h})
    noise: a = 1,        w_k = -sigma_t h phi_k(h)              (w_1 = sigma_t - sigma_s)
    sde:   a = e^{-2h},  w_k =  2h phi_k(-2h),  plus noise sigma_t sqrt(1 - e^{-2h}) z
           (the data-prediction SDE solver of the DPM-Solver++ authors;
           diffusers' "sde-dpmsolver++").
The solvers differ only in how they estimate the scaled derivatives h^k M^(k) from
earlier or intermediate evaluations. Coefficients are python floats (float64) computed
once per grid, outside the sampling loops.
"""
from __future__ import annotations

import math
from typing import Sequence

FORMS = ("data", "noise", "sde")


def lambdas(sigmas: Sequence[float]) -> list[float]:
    """lambda_i = -log sigma_i (+inf at sigma = 0)."""
    return [math.inf if s == 0 else -math.log(s) for s in sigmas]


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j + k)!  (phi_0 = e^z, phi_{k+1} = (phi_k - 1/k!) / z).

    The recurrence loses digits for small |z|; there the power series is summed instead.
    """
    if abs(z) < 0.25:
        term, total, j = 1.0 / math.factorial(k), 0.0, 0
        while True:
            total += term
            j += 1
            term *= z / (j + k)
            if abs(term) < 1e-18 * abs(total) or j > 40:
                return total
    if k == 0:
        return math.exp(z)
    p = math.expm1(z) / z  # phi_1
    for j in range(1, k):
        p = (p - 1.0 / math.factorial(j)) / z
    return p


def weights(form: str, sigma_s: float, sigma_t: float, order: int):
    """(a, [w_1 .. w_order], noise_std) of one exponential-integrator step sigma_s -> sigma_t
    (module docstring); noise_std is 0 except for ``form='sde'``."""
    if sigma_t == 0:  # h = inf: only the first-order step exists, and it is y_t = D
        if order != 1:
            raise ValueError("an exponential-integrator step to sigma = 0 is first order only")
        return (1.0, [-sigma_s], 0.0) if form == "noise" else (0.0, [1.0], 0.0)
    h = math.log(sigma_s / sigma_t)
    if form == "data":
        return math.exp(-h), [h * phi(k, -h) for k in range(1, order + 1)], 0.0
    if form == "noise":
        return 1.0, [-sigma_t * h * phi(k, h) for k in range(1, order + 1)], 0.0
    if form == "sde":
        return math.exp(-2 * h), [2 * h * phi(k, -2 * h) for k in range(1, order + 1)], \
            sigma_t * math.sqrt(-math.expm1(-2 * h))
    raise ValueError(form)


def model_output(form: str, x, denoised, sigma):
    """The quantity the solver extrapolates: D for the data/sde forms, eps for the noise form."""
    return (x - denoised) / sigma if form == "noise" else denoised


def form_of(algorithm_type: str) -> str:
    """diffusers' algorithm_type names -> our forms."""
    from ..errors import unknown_name

    table = {"dpmsolver++": "data", "dpmsolver": "noise", "sde-dpmsolver++": "sde"}
    if algorithm_type not in table:
        raise unknown_name("algorithm_type", algorithm_type, table)
    return table[algorithm_type]


def check_choice(kind: str, value, valid) -> None:
    from ..errors import unknown_name

    if value not in valid:
        raise unknown_name(kind, value, valid)
