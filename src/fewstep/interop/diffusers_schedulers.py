"""Drive diffusers' schedulers with a sigma-space denoiser (parity tests, benchmarks).

The loop (see /work/shared/notes/diffusers-as-oracle.md for the pitfalls)::

    s = make_scheduler("DPMSolverMultistepScheduler", solver_order=2)      # fresh instance
    y_end, sigmas, nfe = run_diffusers(s, gmm, x_T, 10)
    ours = sample_dpmpp_2m(gmm, x_T * sqrt(1 + sigmas[0]**2), sigmas)      # start in sigma-space

* ``x_T`` is the start in the scheduler's VP scale (x = alpha * y). VP-scale schedulers
  (DDIM, DDPM, PNDM, DPM-Solver, UniPC, DEIS) step on x; Euler/Heun/LMS/KDPM2-type
  schedulers (``init_noise_sigma > 1``) step on y = x * sqrt(1 + sigma^2) and the start is
  multiplied by sqrt(1 + sigmas[0]^2) here (not by ``init_noise_sigma``).
* The denoiser is keyed on the sigma the scheduler believes at each call: ``s.sigmas[
  s.step_index]`` (index 0 before the first ``step``), or sqrt((1 - abar_t) / abar_t) for
  schedulers without ``sigmas`` (DDIM, DDPM, PNDM). KDPM2's second stage uses
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

from ..errors import UserError

__all__ = ["make_scheduler", "scheduler_sigma", "run_diffusers", "model_calls", "steps_for_nfe"]


def make_scheduler(class_name: str, **config):
    """A fresh diffusers scheduler ``class_name`` on the DDPM linear schedule (1000 steps,
    epsilon prediction) unless ``config`` says otherwise."""
    try:
        import diffusers
    except ImportError:
        raise UserError("diffusers is not installed: pip install 'fewstep[diffusers]'") from None
    cls = getattr(diffusers, class_name, None)
    if cls is None or not class_name.endswith("Scheduler"):
        raise UserError(f"diffusers {diffusers.__version__} has no scheduler '{class_name}'")
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", **config}
    return cls(**config)


def scheduler_sigma(s, i: int, t) -> float:
    """The sigma-space level the scheduler ``s`` believes its ``i``-th model call is at."""
    if hasattr(s, "sigmas"):
        idx = s.step_index if getattr(s, "step_index", None) is not None else 0
        return float(s.sigmas[idx])
    abar = float(s.alphas_cumprod[int(t)])
    return math.sqrt((1 - abar) / abar)


def _end_sigma(s) -> float:
    """The level a scheduler without ``sigmas`` ends at (DDIM/PNDM: ``final_alpha_cumprod``;
    DDPM's last step from t = 0 goes to alpha_bar = 1, sigma 0)."""
    if hasattr(s, "final_alpha_cumprod"):
        abar = float(s.final_alpha_cumprod)
    elif type(s).__name__ == "DDPMScheduler" and int(s.timesteps[-1]) == 0:
        return 0.0
    else:
        abar = float(s.alphas_cumprod[0])
    return math.sqrt((1 - abar) / abar)


def run_diffusers(scheduler, denoiser, x_T_vp: torch.Tensor, nsteps: int, *, noises: Optional[Sequence] = None,
                  sigma_of: Optional[Callable] = None, float64_sigmas: bool = False,
                  generator: Optional[torch.Generator] = None):
    """Run ``scheduler`` for ``nsteps`` with the sigma-space ``denoiser`` from ``x_T_vp``.

    ``noises``: optional per-``step`` standard-normal tensors passed as ``variance_noise``
    (SDE schedulers that accept it; ``None`` entries pass zeros). ``generator`` is passed to
    ``step`` where it accepts one (ancestral / DDPM schedulers). ``sigma_of(s, i, t)``
    overrides the level the denoiser is keyed on. ``float64_sigmas`` casts ``s.sigmas`` to
    float64 after ``set_timesteps`` (the float32 values, exactly): schedulers that do not cast
    the sample to float32 (UniPC, DEIS, DPMSolverSinglestep) then compute in float64, which
    separates formula differences from their float32 rounding. Returns (y_end, sigmas, nfe).
    """
    s = scheduler
    s.set_timesteps(nsteps)
    if float64_sigmas:
        s.sigmas = s.sigmas.to(torch.float64)
    sigma_of = sigma_of or scheduler_sigma
    sigma_space = float(getattr(s, "init_noise_sigma", 1.0)) > 1.0
    step_params = inspect.signature(s.step).parameters
    x = x_T_vp.clone()
    if sigma_space:
        x = x * math.sqrt(1 + float(s.sigmas[0]) ** 2)
    called, nfe = [], 0
    for i, t in enumerate(s.timesteps):
        x_in = s.scale_model_input(x, t)
        sigma = sigma_of(s, i, t)
        y = x_in * math.sqrt(1 + sigma**2)
        eps = (y - denoiser(y, sigma)) / sigma
        nfe += 1
        called.append(sigma)
        kw = {}
        if noises is not None and "variance_noise" in step_params:
            kw["variance_noise"] = noises[i] if noises[i] is not None else torch.zeros_like(x)
        if generator is not None and "generator" in step_params:
            kw["generator"] = generator
        x = s.step(eps, t, x, **kw).prev_sample
    if hasattr(s, "sigmas"):
        sigmas = s.sigmas.to(torch.float64).clone()
        sigma_end = float(sigmas[-1])
    else:
        sigma_end = _end_sigma(s)
        sigmas = torch.tensor(called + [sigma_end], dtype=torch.float64)
    y_end = x if sigma_space else x * math.sqrt(1 + sigma_end**2)
    return y_end.to(torch.float64), sigmas, nfe


def model_calls(make: Callable[[], object], nsteps: int) -> int:
    """Model calls a fresh scheduler ``make()`` makes for ``nsteps`` inference steps (one per
    entry of ``timesteps``: Heun/KDPM2 make 2N-1, PNDM with PRK warm-up more)."""
    s = make()
    s.set_timesteps(nsteps)
    return len(s.timesteps)


def steps_for_nfe(make: Callable[[], object], nfe: int, max_steps: int = 1000) -> int:
    """The largest number of inference steps whose model calls fit in ``nfe`` (0 if none)."""
    best = 0
    for n in range(1, min(int(nfe), max_steps) + 1):
        try:
            calls = model_calls(make, n)
        except Exception:  # a scheduler refusing this step count (too few steps for its order)
            continue
        if calls <= nfe:
            best = n
    return best
