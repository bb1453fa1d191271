"""Drive diffusers' schedulers with the exact Gaussian-mixture teacher (parity harness).

The harness lives in :mod:`fewstep.interop.diffusers_schedulers` (shared with
``bench/samplers.py``); this file re-exports it for the parity tests and adds
:func:`rel_diff`. Usage (see /work/shared/notes/diffusers-as-oracle.md for the pitfalls)::

    s = DPMSolverMultistepScheduler(beta_schedule="linear", solver_order=2)   # fresh instance
    y_end, sigmas, nfe = run_diffusers(s, gmm, x_T, 10)
    ours = sample_dpmpp_2m(gmm, x_T * sqrt(1 + sigmas[0]**2), sigmas)      # start in sigma-space
    rel_diff(ours, y_end) < 1e-5
"""
from __future__ import annotations

import torch

from fewstep.interop.diffusers_schedulers import run_diffusers, scheduler_sigma  # noqa: F401

_default_sigma = scheduler_sigma  # the historical name


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm())
