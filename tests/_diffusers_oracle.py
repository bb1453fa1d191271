"""Drive diffusers' schedulers with the exact Gaussian-mixture teacher (parity harness).

The harness lives in :mod:`fewstep.interop.diffusers_schedulers` (shared with
``bench/samplers.py``); this file re-exports it for the parity tests and adds
:func:`rel_diff` and the error budget of a parity comparison (:func:`parity`). Usage (see
/work/shared/notes/diffusers-as-oracle.md for the pitfalls)::

    make = lambda: DPMSolverMultistepScheduler(beta_schedule="linear", solver_order=2)
    run = lambda s: run_diffusers(s, gmm, x_T, 10)[0]
    _, sigmas, nfe = run_diffusers(make(), gmm, x_T, 10)                  # the grid
    ours = sample_dpmpp_2m(gmm, x_T * sqrt(1 + sigmas[0]**2), sigmas)     # start in sigma-space
    rel, tol, why = parity(make, run, ours, nfe)
    assert rel < tol, why

The error budget
----------------
Our samplers and the teacher run in float64. diffusers keeps its tables (``sigmas``,
``alphas_cumprod``, ``final_alpha_cumprod``, ...) in float32 and computes every step
coefficient from them in float32; DPMSolverMultistep and EulerDiscrete also round the
sample (and the SDE noise) to float32 inside ``step``. Our sampler runs on the float32
*values* of the grid (converted exactly), so the tables themselves do not differ: the whole
as-shipped difference is float32 *arithmetic* in diffusers, and the formulas amplify it
very differently (noise-prediction forms cancel: as-is differences run from 1e-8 to 6e-4 on
the same teacher). A fixed tolerance on the as-is run therefore only restates what one
machine's float32 ``log``/``exp`` printed. Instead :func:`parity` removes the float32 part:

1. ``ref64``: the same scheduler with every float32 tensor it holds cast to float64 after
   ``set_timesteps`` (the float32 values, exactly: :func:`float64_tables`). It then runs
   the same code on the same grid in float64, except for the sample casts above.
2. The float64 budget: each model call adds O(u64) relative rounding in our sampler, the
   teacher and diffusers (u64 = 2^-53 = 1.1e-16), and diffusers' formulas amplify rounding
   by a factor kappa that the as-is run measures directly: kappa = rel(ref32, ref64) / u32
   (u32 = 2^-24 = 6.0e-8). Budget: FLOAT64_SAFETY * u64 * (nfe + kappa), where
   FLOAT64_SAFETY = 1000 covers the conditioning of the teacher's Gaussian solves and of our
   own step (observed error / (u64 * (nfe + kappa)) stays below ~12).
3. The sample casts, where a scheduler makes them (:func:`casts_float32`): each step
   rounds the state to float32, a relative error |e| <= u32 per element (RMS <= u32 / sqrt(3)).
   Their effect is the response of the float64 run to such perturbations, measured by
   finite differences: ``ref_delta`` perturbs the state (and the noise) that the cast
   touches by delta * (random +-1) per element at every step, delta = 1e-5 (linear regime,
   far above the rounding itself); S = rel(ref_delta, ref64) / delta; budget CAST_SAFETY *
   u32 * S with CAST_SAFETY = 2 (a +-u32 perturbation already has >= sqrt(3) times the RMS
   of the rounding; observed ratio <= 0.6).

The comparison is ``rel(ours, ref64) < budget``. By the triangle inequality ours is then
within budget + rel(ref32, ref64) of diffusers as shipped. A real formula difference (one
coefficient off by 1e-3 relative) moves the result by ~1e-6 .. 1e-4, far above budgets of
1e-13 .. 1e-9 (no cast) and ~1e-7 .. 1e-6 (with casts).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Tuple

import torch

from fewstep.interop.diffusers_schedulers import run_diffusers, scheduler_sigma  # noqa: F401

_default_sigma = scheduler_sigma  # the historical name

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff
FLOAT64_SAFETY = 1000.0
CAST_SAFETY = 2.0
CAST_DELTA = 1e-5


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


def casts_float32(s) -> bool:
    """Whether ``s.step`` rounds the sample to float32 (DPMSolverMultistep, EulerDiscrete)."""
    return "sample.to(torch.float32)" in inspect.getsource(type(s).step)


def perturb_float32_casts(s, delta: float, seed: int = 0):
    """``s`` with the tensors its float32 casts round multiplied by (1 + delta * (+-1)) per
    element, at every step: the ``sample`` (and ``noise``) that its ``*_update`` methods get
    after the cast (DPMSolverMultistep casts after converting the model output), or the
    ``sample`` that ``step`` gets where there are none (EulerDiscrete casts first)."""
    g = torch.Generator().manual_seed(seed)

    def perturbed(x):
        if x is None or not torch.is_tensor(x):
            return x
        sign = torch.randint(0, 2, x.shape, generator=g).to(torch.float64) * 2 - 1
        return (x.to(torch.float64) * (1 + delta * sign)).to(x.dtype)

    updates = [n for n in dir(type(s)) if n.endswith("_update") and callable(getattr(type(s), n))]

    def wrap(name, positional_sample):
        orig = getattr(s, name)

        @functools.wraps(orig)
        def call(*args, **kwargs):
            for key in ("sample", "noise"):
                if key in kwargs:
                    kwargs[key] = perturbed(kwargs[key])
            if positional_sample and len(args) >= 3:
                args = (*args[:2], perturbed(args[2]), *args[3:])
            if "variance_noise" in kwargs and not updates:
                kwargs["variance_noise"] = perturbed(kwargs["variance_noise"])
            return orig(*args, **kwargs)

        setattr(s, name, call)

    if updates:
        for name in updates:
            wrap(name, positional_sample=False)
    else:
        wrap("step", positional_sample=True)
    return s


def parity(make: Callable[[], object], run: Callable[[object], torch.Tensor], ours: torch.Tensor,
           nfe: int) -> Tuple[float, float, str]:
    """(rel(ours, ref64), its error budget, a line saying how the budget was made) for the
    scheduler ``make()`` driven by ``run(scheduler) -> y_end``; see the module docstring."""
    ref32 = run(make())
    ref64 = run(float64_tables(make()))
    kappa = rel_diff(ref32, ref64) / U32
    tol = FLOAT64_SAFETY * U64 * (nfe + kappa)
    why = f"float64 budget {tol:.2e} (nfe {nfe}, kappa {kappa:.1f})"
    if casts_float32(make()):
        ref_delta = run(perturb_float32_casts(float64_tables(make()), CAST_DELTA))
        sens = rel_diff(ref_delta, ref64) / CAST_DELTA
        tol += CAST_SAFETY * U32 * sens
        why += f" + float32 casts {CAST_SAFETY * U32 * sens:.2e} (S {sens:.2f})"
    rel = rel_diff(ours, ref64)
    return rel, tol, f"rel {rel:.3e} vs {why}; as shipped rel {rel_diff(ours, ref32):.3e}"
