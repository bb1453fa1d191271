"""What a learned schedule is fitted to: a teacher, a sampler, a budget, training noise and
the teacher's own accurate ODE solution from that noise.

The reference is the map the sampler approximates, the probability-flow ODE
dy/dsigma = (y - D(y, sigma)) / sigma of the same teacher, solved accurately:

- an exact teacher (a :class:`~fewstep.data.gmm.GaussianMixture`) gives it through its
  ``flow`` (adaptive Dormand-Prince to ``rtol``), chained level to level;
- a network teacher through Heun's method (Karras et al. 2022, Alg. 1) on a fine grid
  through the requested levels, refined until consecutive levels are at most
  ``max_log_step`` apart in log sigma, down to sigma_min before a step to 0 (about
  2 * 10.6 / 0.03 ~ 700 evaluations for sigma 80 -> 0.002 -> 0).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import samplers as S
from ..errors import UserError
from ..levels import EvalLevels


def candidates(m: int, sigma_min: float, sigma_max: float, final_zero: bool = True) -> Tensor:
    """``m`` log-spaced levels from sigma_max down to sigma_min (float64), then 0 if
    ``final_zero``: the levels a schedule is chosen from (Watson et al. 2022 use the
    teacher's own discrete levels; a continuous teacher has as many as we like)."""
    if m < 2:
        raise UserError(f"a candidate set needs at least 2 levels, got {m}")
    lv = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), m, dtype=torch.float64))
    lv[0], lv[-1] = sigma_max, sigma_min
    return torch.cat([lv, lv.new_zeros(1)]) if final_zero else lv


class Problem:
    """A teacher ``denoiser`` + ``sampler`` (registry name, ``options``) + budget ``nfe``
    on levels in [sigma_min, sigma_max] (then 0 when ``final_zero``), with training starts
    ``x_T`` at sigma_max.

    ``exact_flow(x, sigma_from, sigma_to)`` (optional) is the exact ODE map; ``x0``
    (optional) data samples for the ELBO cost; ``steps`` the number of steps the budget
    buys, from the registry's cost function, so a learned grid never spends more than
    ``nfe`` evaluations. ``target`` (optional) is the reference end point from ``x_T`` when
    it is already known (it is shared by every sampler and budget on the same starts).
    """

    def __init__(self, denoiser: Callable, sampler: str, nfe: int, sigma_min: float, sigma_max: float,
                 x_T: Tensor, *, options: Optional[dict] = None, exact_flow: Optional[Callable] = None,
                 x0: Optional[Tensor] = None, final_zero: bool = True, extra_args: Optional[dict] = None,
                 rtol: float = 1e-7, max_log_step: float = 0.03, seed: int = 0, target: Optional[Tensor] = None,
                 afs=False):
        si = S.info(sampler)
        if si.adaptive:
            raise UserError(f"sampler '{sampler}' chooses its own steps (adaptive): a schedule cannot be learned for it")
        if not 0 < sigma_min < sigma_max:
            raise UserError(f"a schedule needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if int(nfe) < 1:
            raise UserError(f"--nfe {nfe}: give at least 1 evaluation")
        self.denoiser, self.sampler, self.info, self.nfe = denoiser, sampler, si, int(nfe)
        self.sigma_min, self.sigma_max, self.final_zero = float(sigma_min), float(sigma_max), final_zero
        self.options = {**si.defaults, **(options or {})}
        self.exact_flow, self.x0, self.x_T, self.extra_args = exact_flow, x0, x_T, extra_args
        self.rtol, self.max_log_step, self.seed = rtol, max_log_step, seed
        self.afs = S._afs_mode(afs, sampler)  # the first evaluation answered analytically: one more step
        cost_opts = {**self.options, "final_zero": bool(final_zero)}
        self.steps = S.steps_for_nfe(sampler, self.nfe, afs=self.afs, **cost_opts)
        if self.steps == 0:
            raise UserError(f"sampler '{sampler}' needs more than {nfe} evaluations for one step; raise --nfe")
        self._cost_opts = cost_opts
        self._target = target  # the reference end point from x_T, if already known

    # ------------------------------------------------------------------ budget
    def cost(self, sigmas: Tensor) -> int:
        """Evaluations the sampler spends on ``sigmas`` (the registry's cost function)."""
        return S.spent(self.sampler, len(sigmas) - 1, afs=self.afs, **self._cost_opts)

    @property
    def end(self) -> float:
        return 0.0 if self.final_zero else self.sigma_min

    # ------------------------------------------------------------------ sampler
    def run(self, sigmas: Tensor, x: Optional[Tensor] = None, grad: bool = False,
            levels: Optional[Tensor] = None) -> Tensor:
        """The sampler on ``sigmas`` from ``x`` (default: the training starts). With
        ``grad`` the function runs without its ``no_grad`` wrapper, so autograd reaches the
        levels wherever the sampler computes with them as tensors (:func:`differentiable`).
        ``levels``: decoupled evaluation levels, one per positive level of ``sigmas``
        (:class:`~fewstep.levels.EvalLevels`)."""
        fn = self.info.fn
        den = self.denoiser if levels is None else EvalLevels(self.denoiser, sigmas, levels)
        if self.afs and abs(float(sigmas[0]) - self.sigma_max) <= 1e-12 * self.sigma_max:  # from the top only
            den = S.AnalyticFirst(den, float(sigmas[0]), self.afs)
        opts = dict(self.options)
        if self.info.stochastic:
            opts.setdefault("generator", torch.Generator().manual_seed(self.seed + 7))
        if grad:
            fn = getattr(fn, "__wrapped__", fn)
        x = self.x_T if x is None else x
        return fn(den, x, sigmas, extra_args=self.extra_args, **opts)

    # ------------------------------------------------------------------ reference
    def path(self, levels: Tensor, x: Optional[Tensor] = None) -> Tensor:
        """The reference solution at every level of ``levels`` (decreasing; levels[0] is the
        level of ``x``, default the training starts at sigma_max): a tensor [L, B, ...]."""
        x = self.x_T if x is None else x
        lv = [float(v) for v in levels]
        out = [x.clone()]
        with torch.no_grad():
            if self.exact_flow is not None:
                for a, b in zip(lv[:-1], lv[1:]):
                    out.append(self.exact_flow(out[-1], a, b, rtol=self.rtol).to(x.dtype))
                return torch.stack(out)
            fine, keep = _refine(lv, self.max_log_step, self.sigma_min)
            seen = {}

            def grab(info):
                seen[info["i"]] = info["x"]

            heun = S.get("heun")
            last = heun(self.denoiser, x, torch.tensor(fine, dtype=torch.float64), callback=grab,
                        extra_args=self.extra_args)
            seen[len(fine) - 1] = last
            return torch.stack([seen[k] for k in keep])

    @property
    def target(self) -> Tensor:
        """The reference solution at the end level (0 or sigma_min), computed once."""
        if self._target is None:
            self._target = self.path(torch.tensor([self.sigma_max, self.end], dtype=torch.float64))[-1]
        return self._target

    def on(self, x_T: Tensor, target: Optional[Tensor] = None) -> "Problem":
        """The same teacher, sampler, budget and reference on other starts ``x_T`` (held-out
        starts for stopping and reporting)."""
        other = Problem.__new__(Problem)
        other.__dict__.update(self.__dict__)
        other.x_T, other._target = x_T, target
        return other

    def error(self, sigmas: Tensor, x: Optional[Tensor] = None, target: Optional[Tensor] = None,
              levels: Optional[Tensor] = None) -> float:
        """RMS error of the sampler on ``sigmas`` (evaluation ``levels``, if given) against the
        reference end point."""
        with torch.no_grad():
            out = self.run(sigmas, x, levels=levels)
        target = self.target if target is None else target
        return float((out.to(torch.float64) - target.to(torch.float64)).pow(2).mean().sqrt())


def _refine(levels: list, max_log_step: float, sigma_floor: float):
    """A fine grid through ``levels`` (log-spaced in between, at most ``max_log_step`` apart)
    and the indices of the original levels in it. A step to 0 first descends log-spaced to
    ``sigma_floor`` (the teacher's sigma_min), then takes one step to 0."""
    fine, keep = [levels[0]], [0]

    def descend(a, b):
        n = max(1, math.ceil(abs(math.log(a / b)) / max_log_step))
        fine.extend(a * (b / a) ** (k / n) for k in range(1, n + 1))

    for a, b in zip(levels[:-1], levels[1:]):
        if b > 0:
            descend(a, b)
        else:
            if a > sigma_floor:
                descend(a, sigma_floor)
            fine.append(0.0)
        keep.append(len(fine) - 1)
    return fine, keep
