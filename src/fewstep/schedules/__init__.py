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
import time
from typing import Optional

import torch
from torch import Tensor

from .. import grids as G
from ..errors import UserError, unknown_name
from ..levels import EvalLevels, load_schedule, save_schedule
from .dp import dp_grid, elbo_costs, local_costs, shortest_path
from .optimize import differentiable, from_sigmas, optimize_grid, optimize_levels, to_sigmas
from .problem import Problem, candidates

__all__ = ["Problem", "learn", "fixed_grids", "best_fixed", "dp_grid", "optimize_grid", "shortest_path",
           "local_costs", "elbo_costs", "candidates", "to_sigmas", "from_sigmas", "differentiable", "METHODS", "COSTS",
           "EvalLevels", "load_schedule", "save_schedule", "optimize_levels", "warm_start"]

METHODS = ("dp", "optimize", "dp+optimize")
COSTS = ("local", "elbo")


def fixed_grids(problem: Problem, process=None) -> dict:
    """The training-free grids of :mod:`fewstep.grids` with the problem's steps and range
    (Karras rho 7 and 3, log-SNR, polyexponential rho 2, VP-time rho 1, 2 and 3, and the
    process time grids if given)."""
    n, lo, hi, fz = problem.steps, problem.sigma_min, problem.sigma_max, problem.final_zero
    out = {"karras": G.karras(n, lo, hi, final_zero=fz), "karras3": G.karras(n, lo, hi, rho=3.0, final_zero=fz),
           "logsnr": G.logsnr_uniform(n, lo, hi, final_zero=fz),
           "poly2": G.polyexponential(n, lo, hi, rho=2.0, final_zero=fz)}
    for rho in (1.0, 2.0, 3.0):
        out[f"vp-time{rho:g}"] = G.vp_time(n, lo, hi, rho=rho, final_zero=fz)
    if process is not None:
        for sp in ("trailing", "linspace"):
            g = G.time_uniform(process, n, sp, final_zero=fz)
            if abs(float(g[0]) / hi - 1) < 1e-6:  # same start level only
                out[f"time-{sp}"] = g
    return out


def warm_start(sigmas: Tensor, steps: int) -> Tensor:
    """A grid of ``steps`` steps from a learned grid with fewer: the widest steps (in log
    sigma; a step to 0 is never split) halved at their geometric midpoints until the count
    is reached. A larger budget warm-started here begins where the smaller one ended, so
    the learned errors fall with NFE instead of wandering (issue 21)."""
    lv = [float(v) for v in G.as_sigmas(sigmas)]
    if steps < len(lv) - 1:
        raise UserError(f"a warm start adds levels: {len(lv) - 1} steps cannot become {steps}")
    while len(lv) - 1 < steps:
        widths = [(math.log(a / b), i) for i, (a, b) in enumerate(zip(lv[:-1], lv[1:])) if b > 0]
        if not widths:
            raise UserError("a warm start needs a step between two positive levels to split")
        _, i = max(widths)
        lv.insert(i + 1, math.sqrt(lv[i] * lv[i + 1]))
    return torch.tensor(lv, dtype=torch.float64)


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
          levels: bool = False, val: Optional[Problem] = None, patience: Optional[int] = None,
          seconds: Optional[float] = None, inits: Optional[dict] = None) -> tuple[Tensor, dict]:
    """The learned grid and what it took (module docstring). ``info`` holds the training
    RMS of the grid (``rms_train``), of the best fixed grid and the evaluations spent.

    ``val`` (the problem on held-out starts, :meth:`Problem.on`) chooses among iterates and
    stops the optimisation after ``patience`` steps without held-out improvement; then the
    result is never worse on those starts than the grid it started from (else that grid is
    returned). ``seconds`` bounds the optimisation time; ``inits`` are more starting grids
    (name -> sigmas with ``problem.steps`` steps, e.g. a smaller budget's learned grid with a
    level added: :func:`warm_start`), tried beside the fixed grids and the DP grid."""
    if method not in METHODS:
        raise unknown_name("method", method, METHODS)
    if cost not in COSTS:
        raise unknown_name("cost", cost, COSTS)
    if cost == "elbo" and method == "optimize":
        raise UserError("--cost elbo is a DP cost; use --method dp or dp+optimize (optimize minimises the final error)")
    fixed_name, fixed, fixed_rms = best_fixed(problem, process)
    info = {"method": method, "cost": cost, "steps": problem.steps, "best_fixed_grid": fixed_name,
            "rms_train_best_fixed": fixed_rms}
    for name, g in (inits or {}).items():  # more starting points: kept where they train better
        g = G.as_sigmas(g, where=f"starting grid {name}")
        if len(g) - 1 != problem.steps:
            raise UserError(f"starting grid {name} has {len(g) - 1} steps, the budget buys {problem.steps}")
        e = problem.error(g)
        if math.isfinite(e) and e < fixed_rms:
            fixed_name, fixed, fixed_rms = name, g, e
            info.update(best_start=name, rms_train_best_start=e)
    deadline = None if seconds is None else time.monotonic() + float(seconds)
    stop = {"val": val, "patience": patience, "deadline": deadline}
    if method in ("dp", "dp+optimize"):
        sig, dpi = dp_grid(problem, cost, m=m, refine=refine, log=log)
        info.update(dpi, rms_train_dp=problem.error(sig))
    if method == "optimize":
        start = fixed
        sig, oi = optimize_grid(problem, fixed, iters=iters, lr=lr, grad=grad, log=log, **stop)
        info.update(oi)
    elif method == "dp+optimize":
        start = sig if info["rms_train_dp"] <= fixed_rms else fixed
        info["optimize_from"] = "dp" if start is sig else fixed_name
        sig, oi = optimize_grid(problem, start, iters=iters, lr=lr, grad=grad, log=log, **stop)
        info.update(oi)
    else:
        start = sig if info["rms_train_dp"] <= fixed_rms else fixed
    ev = None
    if levels:
        info["rms_train_grid_only"] = problem.error(sig)
        sig, ev, li = optimize_levels(problem, sig, iters=iters, lr=lr, log=log, **stop)
        info.update(rms_train_levels_init=li["rms_init"])
    if val is not None:  # never worse on held-out starts than where it started
        e_new, e_start = val.error(sig, levels=ev), val.error(start)
        info.update(rms_val=e_new, rms_val_start=e_start)
        if not e_new <= e_start:
            log and log(f"[schedule] the learned grid is worse on held-out starts ({e_new:.4g}) than its start "
                        f"({e_start:.4g}): keeping the start")
            sig, ev = start, None
            info.update(kept_start=True, rms_val=e_start)
    if ev is not None:
        info["eval_sigmas"] = ev.tolist()
    info["rms_train"] = problem.error(sig, levels=ev)
    info["nfe_spent"] = problem.cost(sig)
    if info["nfe_spent"] > problem.nfe:  # the parametrisation keeps the step count; this never happens
        raise RuntimeError(f"learned grid spends {info['nfe_spent']} > {problem.nfe} evaluations")
    return G.as_sigmas(sig), info
