"""Learned step schedules: the sigma grid chosen for one teacher, sampler and budget.

    from fewstep.schedules import Problem, learn
    prob = Problem(gmm, "dpmpp_2m", nfe=6, sigma_min=0.002, sigma_max=80.0,
                   x_T=80.0 * torch.randn(256, 2, dtype=torch.float64), exact_flow=gmm.flow)
    sigmas, info = learn(prob, method="dp+optimize")

Methods: ``dp`` (Watson et al. 2022: dynamic programming over candidate levels with a cost
that decomposes over steps, :mod:`.dp`), ``optimize`` (the levels as parameters, the
final error as the loss, Adam, :mod:`.optimize`; from the best fixed grid) and
``dp+optimize`` (from the better of the DP grid and the best fixed grid). With
``levels=True`` the grid and decoupled evaluation levels (:mod:`fewstep.levels`, LD3-style: the
teacher at step i asked at a learned sigma'_i) are then optimised jointly from the learned
grid (:func:`optimize_levels`); ``info["eval_sigmas"]`` holds them. The grid has
``problem.steps`` steps, the most the registry's cost function allows in ``nfe``
evaluations, so it never spends more. Learn on one batch of noise, measure on another.
"""
from __future__ import annotations

import math

from torch import Tensor

from .. import grids as G
from ..errors import UserError, unknown_name
from ..levels import EvalLevels, load_schedule, save_schedule
from .dp import dp_grid, elbo_costs, local_costs, shortest_path
from .optimize import differentiable, from_sigmas, optimize_grid, optimize_levels, to_sigmas
from .problem import Problem, candidates

__all__ = ["Problem", "learn", "fixed_grids", "best_fixed", "dp_grid", "optimize_grid", "shortest_path",
           "local_costs", "elbo_costs", "candidates", "to_sigmas", "from_sigmas", "differentiable", "METHODS", "COSTS",
           "EvalLevels", "load_schedule", "save_schedule", "optimize_levels"]

METHODS = ("dp", "optimize", "dp+optimize")
COSTS = ("local", "elbo")


def fixed_grids(problem: Problem, process=None) -> dict:
    """The training-free grids of :mod:`fewstep.grids` with the problem's steps and range
    (Karras rho 7, log-SNR, polyexponential rho 2, and the process time grids if given)."""
    n, lo, hi, fz = problem.steps, problem.sigma_min, problem.sigma_max, problem.final_zero
    out = {"karras": G.karras(n, lo, hi, final_zero=fz), "logsnr": G.logsnr_uniform(n, lo, hi, final_zero=fz),
           "poly2": G.polyexponential(n, lo, hi, rho=2.0, final_zero=fz)}
    if process is not None:
        for sp in ("trailing", "linspace"):
            g = G.time_uniform(process, n, sp, final_zero=fz)
            if abs(float(g[0]) / hi - 1) < 1e-6:  # same start level only
                out[f"time-{sp}"] = g
    return out


def best_fixed(problem: Problem, process=None) -> tuple[str, Tensor, float]:
    """(name, sigmas, training RMS) of the fixed grid with the lowest training error."""
    scored = []
    for name, g in fixed_grids(problem, process).items():
        e = problem.error(g)
        scored.append((e if math.isfinite(e) else math.inf, name, g))
    e, name, g = min(scored, key=lambda t: t[0])
    return name, g, e


def learn(problem: Problem, method: str = "dp+optimize", cost: str = "local", m: int = 100, refine: int = 5,
          iters: int = 150, lr: float = 0.05, grad: str = "auto", process=None, log=None,
          levels: bool = False) -> tuple[Tensor, dict]:
    """The learned grid and what it took (module docstring). ``info`` holds the training
    RMS of the grid (``rms_train``), of the best fixed grid and the evaluations spent."""
    if method not in METHODS:
        raise unknown_name("method", method, METHODS)
    if cost not in COSTS:
        raise unknown_name("cost", cost, COSTS)
    if cost == "elbo" and method == "optimize":
        raise UserError("--cost elbo is a DP cost; use --method dp or dp+optimize (optimize minimises the final error)")
    fixed_name, fixed, fixed_rms = best_fixed(problem, process)
    info = {"method": method, "cost": cost, "steps": problem.steps, "best_fixed_grid": fixed_name,
            "rms_train_best_fixed": fixed_rms}
    if method in ("dp", "dp+optimize"):
        sig, dpi = dp_grid(problem, cost, m=m, refine=refine, log=log)
        info.update(dpi, rms_train_dp=problem.error(sig))
    if method == "optimize":
        sig, oi = optimize_grid(problem, fixed, iters=iters, lr=lr, grad=grad, log=log)
        info.update(oi)
    elif method == "dp+optimize":
        start = sig if info["rms_train_dp"] <= fixed_rms else fixed
        info["optimize_from"] = "dp" if start is sig else fixed_name
        sig, oi = optimize_grid(problem, start, iters=iters, lr=lr, grad=grad, log=log)
        info.update(oi)
    if levels:
        info["rms_train_grid_only"] = problem.error(sig)
        sig, ev, li = optimize_levels(problem, sig, iters=iters, lr=lr, log=log)
        info.update(eval_sigmas=ev.tolist(), rms_train_levels_init=li["rms_init"])
    info["rms_train"] = problem.error(sig, levels=ev if levels else None)
    info["nfe_spent"] = problem.cost(sig)
    if info["nfe_spent"] > problem.nfe:  # the parametrisation keeps the step count; this never happens
        raise RuntimeError(f"learned grid spends {info['nfe_spent']} > {problem.nfe} evaluations")
    return G.as_sigmas(sig), info
