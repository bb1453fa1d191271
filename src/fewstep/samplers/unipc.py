"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models"): the predictor UniP-p and the corrector UniC-p.

Notation of :mod:`._expint`; data form (``predict_x0=True``, M = D, hh = -h) or noise
form (M = eps, hh = h); c = 1 (data) or sigma_{i+1} (noise); B(h) = hh ("bh1") or
e^{hh} - 1 ("bh2"). With r_k = (lambda_{i-k} - lambda_i) / h and D_k = (M_{i-k} - M_i) / r_k:

    UniP-p:  y_{i+1} = a y_i + w_1 M_i - c B(h) sum_{k<p} rho_k D_k
    UniC-p:  y^c_{i+1} = a y_i + w_1 M_i - c B(h) [sum_{k<p} rho_k D_k + rho_p (M_{i+1} - M_i)]

where M_{i+1} is the model at the predicted y_{i+1} (the evaluation the next step needs
anyway, so the corrector costs nothing) and the rho solve R rho = g with
R_jk = r_k^(j-1) (r_p = 1) and g_j = hh phi_{j+1}(hh) j! / B(h) (paper Alg. 2/3):
the predictor uses the first p - 1 equations (for p = 2 simply rho = 1/2, as in the
paper's code and diffusers), the corrector all p (rho = 1/2 for p = 1). UniPC-p with the
corrector is of order p + 1.

Step orders follow diffusers' ``UniPCMultistepScheduler``: warm-up, and with
``lower_order_final`` the order of step i is at most N - i. A step to sigma = 0 is always
first order, y = D (diffusers' "bh1" returns NaN there: it multiplies B(h) = -inf by 0).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError
from . import register
from ._common import denoise, report
from ._expint import check_choice, lambdas, model_output, phi, weights
from .dpm_solver import _combine


def _rhos(rks: Sequence[float], hh: float, bh: float, p: int, corrector: bool) -> np.ndarray:
    """The rho of UniP-p (corrector=False) or UniC-p (corrector=True)."""
    if p == 1:
        return np.array([0.5]) if corrector else np.zeros(0)
    if p == 2 and not corrector:
        return np.array([0.5])
    r = np.array(list(rks) + [1.0])
    R = np.stack([r**j for j in range(p)])
    g = np.array([hh * phi(j + 1, hh) * math.factorial(j) / bh for j in range(1, p + 1)])
    return np.linalg.solve(R, g) if corrector else np.linalg.solve(R[:-1, :-1], g[:-1])


def unipc_coeffs(sig: Sequence[float], orders: Sequence[int], form: str, variant: str):
    """Per step i: (a, c_pred, c_corr). y_{i+1} = a y_i + c_pred . [M_i, M_{i-1}, ..];
    the corrected y_{i+1} = a y_i + c_corr . [M_{i+1}, M_i, M_{i-1}, ..]."""
    lam = lambdas(sig)
    out = []
    for i, p in enumerate(orders):
        a, w, _ = weights(form, sig[i], sig[i + 1], 1)
        c_pred = np.zeros(p)
        c_pred[0] = w[0]
        c_corr = np.concatenate([[0.0], c_pred])
        if sig[i + 1] > 0:
            h = lam[i + 1] - lam[i]
            hh = -h if form == "data" else h
            bh = hh if variant == "bh1" else math.expm1(hh)
            scale = 1.0 if form == "data" else sig[i + 1]
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
            for k, (rk, rho) in enumerate(zip(rks, _rhos(rks, hh, bh, p, False)), start=1):
                c_pred[k] -= scale * bh * rho / rk  # D_k = (M_{i-k} - M_i) / r_k
                c_pred[0] += scale * bh * rho / rk
            rho_c = _rhos(rks, hh, bh, p, True)
            for k, rk in enumerate(rks, start=1):
                c_corr[k + 1] -= scale * bh * rho_c[k - 1] / rk
                c_corr[1] += scale * bh * rho_c[k - 1] / rk
            c_corr[0] -= scale * bh * rho_c[-1]  # rho_p (M_{i+1} - M_i)
            c_corr[1] += scale * bh * rho_c[-1]
        out.append((a, c_pred, c_corr))
    return out


@register("unipc", order=3, cost=lambda steps, **_: steps)
@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, order=2, solver_type="bh2", predict_x0=True, use_corrector=True,
                 disable_corrector: Sequence[int] = (), lower_order_final=True, callback=None, extra_args=None):
    """UniPC: UniP-``order`` predictor, UniC corrector on every step but the last (one
    evaluation per step; the corrector reuses the next step's evaluation).

    ``solver_type`` "bh2" (default, as diffusers) or "bh1"; ``predict_x0`` data (default)
    or noise form; ``use_corrector=False`` gives UniP alone, ``disable_corrector`` lists
    steps whose result is not corrected (diffusers' option). Defaults equal diffusers'
    ``UniPCMultistepScheduler``; order 3 is UniP-2 + UniC-2 (the registered order).
    """
    check_choice("solver_type", solver_type, ("bh1", "bh2"))
    if order < 1:
        raise UserError(f"unipc: order must be >= 1, got {order}")
    form = "data" if predict_x0 else "noise"
    sig = sigmas.tolist()
    n = len(sig) - 1
    orders = [min(order, n - i if lower_order_final else order, i + 1) for i in range(n)]
    orders = [1 if sig[i + 1] == 0 else p for i, p in enumerate(orders)]
    plan = unipc_coeffs(sig, orders, form, solver_type)
    skip = set(disable_corrector)
    hist: list = []  # model outputs, newest first
    x_last = None
    for i, (a, c_pred, _) in enumerate(plan):
        den = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, x, sig[i], sig[i + 1], den)
        m = model_output(form, x, den, sig[i])
        if i > 0 and use_corrector and (i - 1) not in skip:  # UniC on the previous step
            a_prev, _, c_corr = plan[i - 1]
            x = _combine(x_last, a_prev, c_corr, [m] + hist)
        hist = [m] + hist[:max(order, 1) - 1]
        x_last = x
        x = _combine(x, a, c_pred, hist)
    return x
