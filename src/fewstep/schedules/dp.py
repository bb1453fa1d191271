"""Choosing the levels by dynamic programming (Watson et al. 2022, "Learning to Efficiently
Sample from Diffusion Probabilistic Models", section 3).

Given candidate levels c_0 = sigma_max > c_1 > ... > c_{M-1} (then c_M = 0 when the grid
ends at 0) and a cost C[i, j] >= 0 of one sampler step from c_i to c_j (i < j), the best
grid with K steps from c_0 to c_last is the cheapest path with exactly K edges:

    V_0(0) = 0,  V_k(j) = min_{i < j} V_{k-1}(i) + C[i, j],   answer V_K(last),

O(K M^2) with the matrix given (a vectorised min per (k, j)). The costs offered:

- ``local`` (:func:`local_costs`): the per-step local error of the sampler, the mean
  squared distance after one step from c_i to c_j *started on the reference trajectory*,
  C[i, j] = E ||step(x*(c_i); c_i -> c_j) - x*(c_j)||^2 / d. The sum is a proxy for the
  final error (errors made early are carried and damped or amplified by the flow, which
  the sum ignores). For **multistep** samplers (dpmpp_2m/3m, deis, unipc, ipndm, plms, era)
  a one-step run is their first-order warm-up step (DDIM / the exponential Euler step):
  the pairwise cost is that of the single-step counterpart, an approximation (a
  history state would make the DP cubic in M per step and the cost tensor M^3 runs);
  ``dp+optimize`` then corrects the grid with the true sampler (:mod:`.optimize`).
- ``elbo`` (:func:`elbo_costs`): the terms of the variational bound for ancestral
  (DDPM) sampling, Watson et al. eq. 5-7 in sigma-space. With y = x0 + sigma eps the
  forward posterior q(y_s | y_t, x0) = N(x0 + (s^2/t^2)(y_t - x0), s^2 (t^2 - s^2)/t^2 I)
  and the model step replaces x0 by D(y_t, t), so
      KL(q || p) = ||x0 - D(y_t, t)||^2 (1 - s^2/t^2)^2 / (2 s^2 (t^2 - s^2) / t^2)
                 = (1/s^2 - 1/t^2) / 2 * ||x0 - D(y_t, t)||^2,
  i.e. C[i, j] = (SNR(c_j) - SNR(c_i)) / 2 * mse(c_i), SNR = 1/sigma^2, with
  mse(t) = E ||x0 - D(x0 + t eps, t)||^2 estimated by Monte Carlo on data samples. The
  last step (to 0) is the decoder -log N(x0; D(y_c, c), c^2 I):
  mse(c) / (2 c^2) + d/2 log(2 pi c^2). The prior term at sigma_max is fixed.

**Where it becomes slow.** The DP itself is instant at M = 1000 (K M^2 = 10^7). The cost
matrix is the expensive part: M (M + 1) / 2 one-step sampler runs on the batch (M = 1000:
500k runs, hours with a network teacher on a CPU). :func:`dp_grid` therefore works coarse
to fine: an all-pairs DP on ``m`` candidates (default 100: 5k runs), then a second DP on
a ``refine``-times finer log grid restricted to a window of +-``window`` coarse spacings
around each chosen level, with edges only between consecutive windows (K (2 window
refine)^2 runs, about 4k for K = 10).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import UserError
from .problem import Problem, candidates


def shortest_path(C: Tensor, steps: int, last: Optional[int] = None) -> tuple[list, float]:
    """Indices 0 = p_0 < p_1 < ... < p_steps = ``last`` (default M - 1 for C [M, M])
    minimising sum_k C[p_{k-1}, p_k], and that minimum. Entries C[i, j] with j <= i or
    not finite are edges that do not exist."""
    C = torch.as_tensor(C, dtype=torch.float64)
    M = C.shape[0]
    last = M - 1 if last is None else last
    if steps < 1 or steps > last:
        raise UserError(f"no path of {steps} steps through {M} candidate levels: use 1..{last} steps")
    allowed = torch.triu(torch.ones(M, M, dtype=torch.bool), 1) & torch.isfinite(C)
    W = torch.where(allowed, C, torch.full_like(C, math.inf))
    V = torch.full((M,), math.inf, dtype=torch.float64)
    V[0] = 0.0
    back = []
    for _ in range(steps):
        tot = V[:, None] + W  # [i, j]
        V, arg = tot.min(0)
        back.append(arg)
    if not math.isfinite(float(V[last])):
        raise UserError(f"no finite-cost path of {steps} steps to candidate {last}")
    path = [last]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1], float(V[last])


class _FirstCall:
    """The denoiser with its value at one (x, sigma) given: a one-step run from x*(c_i)
    starts with D(x*(c_i), c_i), the same for every target c_j, so it is computed once."""

    def __init__(self, inner, x: Tensor, sigma: float, value: Tensor):
        self.inner, self.x, self.sigma, self.value = inner, x, sigma, value

    def __call__(self, y, sigma, **cond):
        if y.shape == self.x.shape and float(sigma.reshape(-1)[0]) == self.sigma and torch.equal(y, self.x):
            return self.value
        return self.inner(y, sigma, **cond)


def local_costs(problem: Problem, levels: Tensor, ref: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
    """C[i, j] = E ||sampler(x*(c_i), [c_i, c_j]) - x*(c_j)||^2 / d for the allowed pairs
    (default all i < j); ``ref`` [L, B, ...] is the reference at ``levels``."""
    L = len(levels)
    C = torch.full((L, L), math.inf, dtype=torch.float64)
    allowed = torch.triu(torch.ones(L, L, dtype=torch.bool), 1) if allowed is None else allowed
    inner = problem.denoiser
    lv = [float(v) for v in levels]
    try:
        for i in range(L - 1):
            js = torch.nonzero(allowed[i]).flatten().tolist()
            if not js:
                continue
            xi = ref[i]
            with torch.no_grad():
                from ..samplers._common import denoise

                problem.denoiser = _FirstCall(inner, xi, lv[i], denoise(inner, xi, lv[i], problem.extra_args))
                for j in js:
                    out = problem.run(levels[[i, j]], xi)
                    err = (out.to(torch.float64) - ref[j].to(torch.float64)).pow(2).mean()
                    C[i, j] = float(err) if torch.isfinite(err) else math.inf
    finally:
        problem.denoiser = inner
    return C


def mse_curve(problem: Problem, levels: Tensor, seed: int = 0) -> Tensor:
    """mse(c) = E ||x0 - D(x0 + c eps, c)||^2 (summed over coordinates) at each level > 0,
    Monte Carlo over the problem's data samples ``x0`` with one shared eps (common random
    numbers keep the curve smooth in c)."""
    if problem.x0 is None:
        raise UserError("the ELBO cost needs data samples of the teacher (an exact GMM or a run folder whose "
                        "dataset can be loaded)")
    from ..samplers._common import denoise

    x0 = problem.x0
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype)
    out = []
    with torch.no_grad():
        for c in [float(v) for v in levels]:
            if c <= 0:
                out.append(0.0)
                continue
            den = denoise(problem.denoiser, x0 + c * eps, c, problem.extra_args)
            out.append(float((x0 - den).to(torch.float64).reshape(len(x0), -1).pow(2).sum(1).mean()))
    return torch.tensor(out, dtype=torch.float64)


def elbo_costs(problem: Problem, levels: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
    """The per-step ELBO terms of the module docstring, C[i, j] in nats per sample."""
    lv = torch.as_tensor(levels, dtype=torch.float64)
    L = len(lv)
    mse = mse_curve(problem, lv, problem.seed)
    d = problem.x0[0].numel()
    snr = torch.where(lv > 0, 1.0 / lv.clamp_min(1e-300) ** 2, torch.full_like(lv, math.inf))
    C = 0.5 * (snr[None, :] - snr[:, None]) * mse[:, None]
    if float(lv[-1]) == 0:  # the decoder term of the last step
        c = lv[:-1]
        C[:-1, -1] = mse[:-1] / (2 * c**2) + 0.5 * d * torch.log(2 * math.pi * c**2)
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    if allowed is not None:
        mask &= allowed
    return torch.where(mask, C, torch.full_like(C, math.inf))


def _costs(problem: Problem, levels: Tensor, cost: str, allowed: Optional[Tensor]) -> Tensor:
    if cost == "local":
        return local_costs(problem, levels, problem.path(levels), allowed)
    if cost == "elbo":
        return elbo_costs(problem, levels, allowed)
    raise UserError(f"unknown cost '{cost}'; valid: local, elbo")


def dp_grid(problem: Problem, cost: str = "local", m: int = 100, refine: int = 5, window: int = 2,
            log=None) -> tuple[Tensor, dict]:
    """The DP grid of ``problem.steps`` steps, coarse to fine (module docstring). Returns
    (sigmas, info) with the DP's total cost of each round."""
    say = log or (lambda *_: None)
    steps = problem.steps
    if m < steps + 1:
        m = steps + 1
    lv = candidates(m, problem.sigma_min, problem.sigma_max, problem.final_zero)
    C = _costs(problem, lv, cost, None)
    path, total = shortest_path(C, steps)
    info = {"candidates": m, "dp_cost_coarse": total}
    say(f"[schedule] DP on {m} candidates: cost {total:.4g}")
    if refine > 1:
        fine = candidates(refine * (m - 1) + 1, problem.sigma_min, problem.sigma_max, problem.final_zero)
        # the window of each chosen level in the fine grid (the final 0 stays itself)
        groups = []
        for p in path:
            if problem.final_zero and p == len(lv) - 1:
                groups.append([len(fine) - 1])
            else:
                k = p * refine
                lo, hi = max(0, k - window * refine), min(len(fine) - 1 - int(problem.final_zero), k + window * refine)
                groups.append(list(range(lo, hi + 1)) if p != 0 else [0])
        if not problem.final_zero:
            groups[-1] = [len(fine) - 1]
        keep = sorted({g for grp in groups for g in grp})
        pos = {g: n for n, g in enumerate(keep)}
        sub = fine[keep]
        allowed = torch.zeros(len(keep), len(keep), dtype=torch.bool)
        for a, b in zip(groups[:-1], groups[1:]):
            for i in a:
                for j in b:
                    if j > i:
                        allowed[pos[i], pos[j]] = True
        C2 = _costs(problem, sub, cost, allowed)
        path2, total2 = shortest_path(C2, steps)
        if total2 <= total:
            lv, path, total = sub, path2, total2
        info.update(refined_candidates=len(keep), dp_cost=total2)
        say(f"[schedule] DP refined on {len(keep)} candidates: cost {total2:.4g}")
    info["dp_cost"] = total
    return lv[path].clone(), info
