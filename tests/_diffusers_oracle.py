"""Drive diffusers' schedulers with the exact Gaussian-mixture teacher (parity harness).

Usage (see /work/shared/notes/diffusers-as-oracle.md for the pitfalls)::

    s = DPMSolverMultistepScheduler(beta_schedule="linear", solver_order=2)   # fresh instance
    y_end, sigmas, nfe = run_diffusers(s, gmm, x_T, 10)
    ours = sample_dpmpp_2m(gmm, x_T * sqrt(1 + sigmas[0]**2), sigmas)      # start in sigma-space
    rel_diff(ours, y_end) < 1e-5

* ``x_T`` is the start in the scheduler's VP scale (x = alpha * y). VP-scale schedulers
  (DDIM, PNDM, DPM-Solver, UniPC, DEIS) step on x; Euler/Heun/LMS/KDPM2-type schedulers
  (``init_noise_sigma > 1``) step on y = x * sqrt(1 + sigma^2) and the start is
  multiplied by sqrt(1 + sigmas[0]^2) here (not by ``init_noise_sigma``).
* The teacher is keyed on the sigma the scheduler believes at each call: ``s.sigmas[
  s.step_index]`` (index 0 before the first ``step``), or sqrt((1 - abar_t) / abar_t) for
  schedulers without ``sigmas`` (DDIM, PNDM). KDPM2's second stage uses
  ``sigmas_interpol``: pass ``sigma_of`` for such schedulers.
* The model output is eps = (y - D(y, sigma)) / sigma (``prediction_type="epsilon"``),
  with y = scale_model_input(x) * sqrt(1 + sigma^2).
* The result is returned in sigma-space, y_end = x_end / alpha(sigma_end), with the grid
  (float64 copy of ``s.sigmas`` including its last level, or the called levels plus the
  end level for schedulers without ``sigmas``) and the number of model calls.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Optional, Sequence

import torch


def _default_sigma(s, i: int, t) -> float:
    if hasattr(s, "sigmas"):
        idx = s.step_index if getattr(s, "step_index", None) is not None else 0
        return float(s.sigmas[idx])
    abar = float(s.alphas_cumprod[int(t)])
    return math.sqrt((1 - abar) / abar)


def run_diffusers(scheduler, gmm, x_T_vp: torch.Tensor, nsteps: int, *, noises: Optional[Sequence] = None,
                  sigma_of: Optional[Callable] = None, float64_sigmas: bool = False):
    """Run ``scheduler`` for ``nsteps`` with the exact teacher ``gmm`` from ``x_T_vp``.

    ``noises``: optional per-``step`` standard-normal tensors passed as ``variance_noise``
    (SDE schedulers that accept it; ``None`` entries pass zeros). ``sigma_of(s, i, t)``
    overrides the level the teacher is keyed on. ``float64_sigmas`` casts ``s.sigmas`` to
    float64 after ``set_timesteps`` (the float32 values, exactly): schedulers that do not cast
    the sample to float32 (UniPC, DEIS, DPMSolverSinglestep) then compute in float64, which
    separates formula differences from their float32 rounding. Returns (y_end, sigmas, nfe).
    """
    s = scheduler
    s.set_timesteps(nsteps)
    if float64_sigmas:
        s.sigmas = s.sigmas.to(torch.float64)
    sigma_of = sigma_of or _default_sigma
    sigma_space = float(getattr(s, "init_noise_sigma", 1.0)) > 1.0
    has_noise_arg = "variance_noise" in inspect.signature(s.step).parameters
    x = x_T_vp.clone()
    if sigma_space:
        x = x * math.sqrt(1 + float(s.sigmas[0]) ** 2)
    called, nfe = [], 0
    for i, t in enumerate(s.timesteps):
        x_in = s.scale_model_input(x, t)
        sigma = sigma_of(s, i, t)
        y = x_in * math.sqrt(1 + sigma**2)
        eps = (y - gmm(y, sigma)) / sigma
        nfe += 1
        called.append(sigma)
        kw = {}
        if noises is not None and has_noise_arg:
            kw["variance_noise"] = noises[i] if noises[i] is not None else torch.zeros_like(x)
        x = s.step(eps, t, x, **kw).prev_sample
    if hasattr(s, "sigmas"):
        sigmas = s.sigmas.to(torch.float64).clone()
        sigma_end = float(sigmas[-1])
    else:
        abar = float(getattr(s, "final_alpha_cumprod", s.alphas_cumprod[0]))
        sigma_end = math.sqrt((1 - abar) / abar)
        sigmas = torch.tensor(called + [sigma_end], dtype=torch.float64)
    y_end = x if sigma_space else x * math.sqrt(1 + sigma_end**2)
    return y_end.to(torch.float64), sigmas, nfe


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm())
