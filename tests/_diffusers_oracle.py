"""Drive diffusers' schedulers with the exact Gaussian-mixture teacher (parity harness).

The harness lives in :mod:`fewstep.interop.diffusers_schedulers` (shared with
``bench/samplers.py``); this file re-exports it for the parity tests and adds
:func:`rel_diff` and :func:`parity`, the comparison with its error budget. Usage (see
/work/shared/notes/diffusers-as-oracle.md for the pitfalls)::

    make = lambda: DPMSolverMultistepScheduler(beta_schedule="linear", solver_order=2)  # fresh each run
    run = lambda s: run_diffusers(s, gmm, x_T, 10)[0]
    y_ref, sigmas, nfe = run_diffusers(make(), gmm, x_T, 10)
    ours = sample_dpmpp_2m(gmm, x_T * sqrt(1 + sigmas[0]**2), sigmas)    # start in sigma-space
    rel, tol, why = parity(make, run, ours, nfe, ref32=y_ref)
    assert rel < tol, why

Where the difference comes from
-------------------------------
Our samplers and the teacher run in float64, on the scheduler's own grid converted exactly
(the float32 values of ``s.sigmas`` / ``alphas_cumprod``), so the grid itself is not a
source of difference. What differs as shipped is diffusers' float32 *arithmetic*: it keeps
its tables (``sigmas``, ``alphas_cumprod``, ``final_alpha_cumprod``, ...) in float32 and
computes alpha, sigma, lambda and every step coefficient from them in float32 (0-dim
tensors), and DPMSolverMultistep and EulerDiscrete also round the sample (and the SDE
noise) to float32 inside ``step``. The formulas amplify that rounding very differently: on
the same teacher the as-shipped difference runs from 1e-8 (data-prediction forms) to 6e-4
(noise-prediction forms, which cancel, at NFE 5), and it depends on the CPU's float32
``log``/``exp`` (DEIS order 3, d = 16, NFE 20: 7.9e-6 on one machine, 1.009e-5 on another).
A fixed tolerance on the as-shipped result only restates what one machine printed.

The comparison (:func:`parity`)
-------------------------------
1. Reference ``ref64``: the same scheduler, same code, same grid, computing in float64:
   :func:`float64_tables` casts every float32 tensor it holds to float64 after
   ``set_timesteps`` (the float32 values exactly, so the grid is unchanged) and
   :func:`keep_float64` makes its float32 casts of the sample and noise no-ops.
2. Budget: every model call adds O(u64) relative rounding (u64 = 2^-53 = 1.1e-16) in our
   sampler, the teacher and diffusers' float64 run, and diffusers' formulas amplify
   rounding by a factor kappa that the as-shipped run measures in the test itself:
   kappa = rel(ref32, ref64) / u32 (u32 = 2^-24 = 6.0e-8), i.e. the as-shipped difference
   expressed in float32 roundings. Budget = FLOAT64_SAFETY * u64 * (nfe + kappa), with
   FLOAT64_SAFETY = 1000 covering the conditioning of the teacher's Gaussian solves and of
   our own step (observed rel / (u64 (nfe + kappa)) <= 13, in every parity test).
   This gives 6e-13 .. 1e-9; observed differences are 2e-16 .. 1.6e-12.
3. Check: rel(ours, ref64) < budget. By the triangle inequality ours is then within
   budget + rel(ref32, ref64) of diffusers as shipped (``why`` reports both).

A real formula difference is far outside: one coefficient of ours off by 1e-3 relative
moves the result by 1.5e-5 .. 4e-4 in the parity tests (checked by injecting such errors),
at least 1e6 times these budgets.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch

from fewstep.interop.diffusers_schedulers import run_diffusers, scheduler_sigma  # noqa: F401

_default_sigma = scheduler_sigma  # the historical name

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff
FLOAT64_SAFETY = 1000.0


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm())


def float64_tables(s):
    """``s`` with every float32 tensor it holds (sigmas, alphas_cumprod, final_alpha_cumprod,
    ...; not ``timesteps``, which are keys) cast to float64 after each ``set_timesteps``:
    the same values, so the same grid, but float64 arithmetic in ``step``."""
    orig = s.set_timesteps

    @functools.wraps(orig)
    def set_timesteps(*args, **kwargs):
        out = orig(*args, **kwargs)
        for name, value in list(vars(s).items()):
            if name != "timesteps" and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                setattr(s, name, value.to(torch.float64))
        return out

    s.set_timesteps = set_timesteps
    return s


class _KeepFloat64(torch.Tensor):
    """A float64 tensor on which ``.to(torch.float32)`` (and ``.to(..., dtype=torch.float32)``)
    is a no-op: handed to ``step``, it turns a scheduler's internal float32 casts of the
    sample and the noise off without touching its code."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and (torch.float32 in args[1:] or kwargs.get("dtype") is torch.float32):
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def keep_float64(s):
    """``s`` whose ``step`` gets the sample and ``variance_noise`` as :class:`_KeepFloat64`,
    so its float32 casts of them are no-ops; ``prev_sample`` comes back a plain tensor."""
    orig = s.step

    @functools.wraps(orig)
    def step(model_output, timestep, sample, *args, **kwargs):
        sample = sample.as_subclass(_KeepFloat64)
        if kwargs.get("variance_noise") is not None:
            kwargs["variance_noise"] = kwargs["variance_noise"].as_subclass(_KeepFloat64)
        out = orig(model_output, timestep, sample, *args, **kwargs)
        out.prev_sample = out.prev_sample.as_subclass(torch.Tensor)
        return out

    s.step = step
    return s


def parity(make: Callable[[], object], run: Callable[[object], torch.Tensor], ours: torch.Tensor,
           nfe: int, ref32: Optional[torch.Tensor] = None) -> Tuple[float, float, str]:
    """(rel(ours, ref64), its error budget, a line saying how it was made) for the scheduler
    ``make()`` driven by ``run(scheduler) -> y_end`` with ``nfe`` model calls (``ref32``: the
    as-shipped result if already computed); see the module docstring."""
    if ref32 is None:
        ref32 = run(make())
    ref64 = run(keep_float64(float64_tables(make())))
    kappa = rel_diff(ref32, ref64) / U32
    tol = FLOAT64_SAFETY * U64 * (nfe + kappa)
    rel = rel_diff(ours, ref64)
    return rel, tol, (f"rel {rel:.3e} vs float64 budget {tol:.2e} (nfe {nfe}, kappa {kappa:.1f}); "
                      f"as shipped rel {rel_diff(ours, ref32):.3e}")
