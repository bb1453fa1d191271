"""ERA-Solver: error-robust Adams solver (Li, Liu, Li, Tan 2023, arXiv:2301.12935).

The probability-flow ODE in sigma-space, dy/ds = eps(y, s) (the paper's diffusion ODE in
x / sqrt(alpha_bar) and sigma = sqrt(1 - alpha_bar) / sqrt(alpha_bar)), is solved with an
implicit Adams (Adams-Moulton) corrector whose implicit term, the eps at the *next* level,
is not evaluated but predicted:

1. predictor (Lagrange interpolation, the paper's eq. for eps_tilde): the polynomial
   through k (sigma, eps) bases chosen from the buffer of all earlier evaluations is
   evaluated at s_{i+1};
2. error-robust selection of the bases: the error measure
   Delta_i = |eps(y_i, s_i) - eps_tilde_i| / |eps(y_i, s_i)| (network vs. its prediction
   made at the previous step; relative RMS over the batch) sets how far back the bases
   reach. With span S = min(i, (k-1)(1 + lam Delta_i)), base j (j = 0 .. k-1) sits
   round(S (j / (k-1))^power) steps back (a power function: dense near the newest
   evaluation, reaching back to older, better-estimated ones as the error grows); when
   Delta is small the bases are the k newest, as in classical Adams;
3. corrector (Adams-Moulton of order up to 4 with the predicted eps_tilde_{i+1}):
   y_{i+1} = y_i + (s_{i+1} - s_i)(9 eps_tilde_{i+1} + 19 eps_i - 5 eps_{i-1} + eps_{i-2}) / 24
   (lower orders while the buffer fills). One evaluation per step.

With the paper's equal-step coefficients the method has third-order local error and is
second-order convergent on smooth non-uniform grids (the paper's statement); with
``variable_step=True`` the Adams-Moulton weights are integrated on the actual grid.

Caveat: the official code could not be consulted here; the base-selection rule above
(span and power function driven by Delta) is our reading of the paper's error-robust
selection, written so that it reduces to the classical predictor for an exact model.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from . import register
from ._common import denoise, lagrange_integral_weights, lagrange_weights, lincomb, report, to_d

# Adams-Moulton coefficients for equal steps, implicit (newest) term first
AM_COEFFS = {1: (1.0,), 2: (0.5, 0.5), 3: (5 / 12, 8 / 12, -1 / 12), 4: (9 / 24, 19 / 24, -5 / 24, 1 / 24)}


def select_bases(i: int, k: int, delta: float, lam: float, power: float) -> list:
    """Buffer indices (newest first) of the predictor's Lagrange bases at step i."""
    m = min(k, i + 1)
    if m == 1:
        return [i]
    span = min(float(i), (m - 1) * (1.0 + lam * delta))
    offs = [round(span * (j / (m - 1)) ** power) for j in range(m)]
    for j in range(1, m):  # strictly increasing offsets ...
        offs[j] = max(offs[j], offs[j - 1] + 1)
    for j in range(m - 1, -1, -1):  # ... that stay inside the buffer
        offs[j] = min(offs[j], i - (m - 1 - j))
    return [i - o for o in offs]


def _relative_error(eps, pred) -> float:
    num = (eps - pred).square().sum()
    den = eps.square().sum().clamp_min(1e-300)
    return float((num / den).sqrt())


@register("era", order=2)
@torch.no_grad()
def sample_era(denoiser, x, sigmas, *, k=4, lam=1.0, power=2.0, corrector_order=4, variable_step=False,
               callback=None, extra_args=None):
    """ERA-Solver (module docstring): ``k`` Lagrange bases for the predictor, ``lam`` the
    sensitivity of their span to the error measure, ``power`` the exponent of the
    power-function spacing, ``corrector_order`` <= 4 the Adams-Moulton order."""
    if not 1 <= int(corrector_order) <= 4 or int(k) < 1:
        raise UserError(f"era: need k >= 1 and corrector_order in 1..4, got k={k}, "
                        f"corrector_order={corrector_order}")
    sig = sigmas.tolist()
    buf, pred, delta = [], None, 0.0
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = denoise(denoiser, x, s, extra_args)
        report(callback, i, x, s, s_next, den)
        eps = to_d(x, s, den)
        if pred is not None and lam:
            delta = _relative_error(eps, pred)
        buf.append(eps)
        # predictor: Lagrange polynomial through the selected bases, at s_next
        idx = select_bases(i, int(k), delta, lam, power)
        pred = lincomb(lagrange_weights([sig[j] for j in idx], s_next), [buf[j] for j in idx])
        # corrector: Adams-Moulton with the predicted eps at s_next as its implicit term
        q = min(int(corrector_order), i + 2)
        if variable_step:
            c = lagrange_integral_weights([s_next] + [sig[i - j] for j in range(q - 1)], s, s_next)
        else:
            c = AM_COEFFS[q]
        slope = lincomb(c, [pred] + buf[::-1][:q - 1])
        x = x + (s_next - s) * slope
    return x
