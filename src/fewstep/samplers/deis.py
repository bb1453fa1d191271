"""DEIS, the time-Adams-Bashforth exponential integrator (Zhang & Chen 2022, "Fast Sampling
of Diffusion Models with Exponential Integrator"), in its log-rho form (tAB-DEIS).

In sigma-space the probability-flow ODE is dy/dsigma = eps(y, sigma) (rho = sigma in the
paper's notation), so with eps interpolated by the Lagrange polynomial through the last
k values in log sigma and integrated exactly,

    y_{i+1} = y_i + sum_{j<k} C_ij eps_{i-j},
    C_ij    = int_{sigma_i}^{sigma_{i+1}} prod_{l != j} (log s - log sigma_{i-l})
                                               / (log sigma_{i-j} - log sigma_{i-l}) ds.

Since lambda = -log sigma, this is exactly the noise-form multistep exponential
integrator of :mod:`.dpmpp` with the polynomial integrated exactly (``solver_type="heun"``,
``third_order="exact"``: y = y_i + w_1 eps_i + w_2 D_1 + 2 w_3 D_2), which is how it is
computed here. Step orders follow diffusers' ``DEISMultistepScheduler`` (warm-up, and
``lower_order_final`` below 15 steps); a step to sigma = 0 is y = D (the scheduler itself
always ends at sigma_min).
"""
from __future__ import annotations

import torch

from . import register
from .dpmpp import multistep


@register("deis", order=2, cost=lambda steps, **_: steps)
@torch.no_grad()
def sample_deis(denoiser, x, sigmas, *, order=2, lower_order_final=True, callback=None, extra_args=None):
    """tAB-DEIS of ``order`` 1, 2 (default, as diffusers) or 3; one evaluation per step."""
    return multistep(denoiser, x, sigmas, order=order, form="noise", solver_type="heun", third_order="exact",
                     lower_order_final=lower_order_final, callback=callback, extra_args=extra_args)
