"""Adaptive probability-flow ODE solver (Song et al. 2021, their RK45 baseline).

Integrates the probability-flow ODE in u = log sigma, dx/du = x - D(x, e^u) (the same ODE
as dx/dsigma = (x - D) / sigma, but with steps that stay well scaled near small sigma),
with torchdiffeq's Dormand-Prince 5(4) from sigmas[0] to the last positive level, then (if the grid ends at 0) takes the final
denoising D(x, sigma_last). torchdiffeq is used because it is the standard, tested
implementation; the number of evaluations is set by the tolerances, and ``max_nfe``
stops it with an error rather than spending more than a budget.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from . import register
from ._common import batch_sigma, denoise


class _Budget(Exception):
    pass


@register("rk45", adaptive=True, cost=lambda steps, **_: steps)
@torch.no_grad()
def sample_rk45(denoiser, x, sigmas, *, rtol=1e-5, atol=1e-5, max_nfe=None, method="dopri5",
                callback=None, extra_args=None):
    """Adaptive RK45 between sigmas[0] and the smallest positive level of the grid."""
    from torchdiffeq import odeint

    pos = sigmas[sigmas > 0]
    s_hi, s_lo = pos[0], pos[-1]
    calls = [0]

    def f(u, xx):
        calls[0] += 1
        if max_nfe is not None and calls[0] > max_nfe - int(sigmas[-1] == 0):
            raise _Budget
        return xx - denoiser(xx, batch_sigma(u.exp(), xx), **(extra_args or {}))

    u = torch.stack([s_hi, s_lo]).log().to(x.dtype)
    try:
        x = odeint(f, x, u, rtol=rtol, atol=atol, method=method)[-1]
    except _Budget:
        raise UserError(f"rk45 needs more than {max_nfe} evaluations at rtol={rtol}; raise the budget "
                        f"or loosen rtol/atol") from None
    except AssertionError as e:  # torchdiffeq's step-size underflow
        raise UserError(f"rk45 failed ({e}); loosen rtol/atol (now {rtol}/{atol}) or use a fixed-step sampler") from None
    if sigmas[-1] == 0:
        x = denoise(denoiser, x, s_lo, extra_args)
    return x
