"""Decoupled evaluation levels (the idea of LD3, Tong et al. 2024, "Learning to Discretize
Denoising Diffusion ODEs"; related to a "time shift" of the network input): the sampler
steps on its grid sigma_0 > ... > sigma_K, but the teacher at step i is asked at a level
sigma'_i of its own, D(x, sigma'_i) in place of D(x, sigma_i). The step formulas keep
sigma_i; only the denoiser's input level moves, so the sampler, its step count and its
evaluation budget are untouched (one table look-up per call).

The table gives a shift in log sigma at each positive grid level,

    delta_k = log sigma'_k - log sigma_k ,

and a call at any level s > 0 is answered at s' = s * exp(delta(log s)), where delta is the
piecewise-linear interpolation of the delta_k in log sigma between neighbouring grid levels
and constant beyond the ends (delta_0 above sigma_0, the last shift below the last positive
level). So a call exactly at a grid level gets its learned level, and the calls a sampler
makes between levels (batch levels of :func:`~fewstep.samplers._common.batch_sigma`,
single-step solvers' midpoints such as dpm_solver_2's or Heun's corrector at sigma_{i+1})
get the shift interpolated between the two levels around them. s = 0 stays 0. Where the
shift is exactly 0 the caller's sigma tensor itself is passed on, so the identity table
reproduces the plain sampler bit for bit.

Grid files: :func:`save_schedule` writes the levels as ``"eval_sigmas"`` beside
``"sigmas"`` (one per positive level); :func:`load_schedule` returns the grid and a
function wrapping a denoiser in the table (the identity for files without them).
:func:`fewstep.samplers.sample` applies it to a ``grid=FILE.json``, so ``fewstep sample
--grid`` and ``fewstep bench --grids`` use the levels; :func:`fewstep.grids.load` returns
the sigmas only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from . import grids as G
from .errors import UserError

__all__ = ["EvalLevels", "shifts", "load_schedule", "save_schedule", "check_levels"]


def check_levels(sigmas: Tensor, eval_sigmas, where: str = "eval_sigmas") -> Tensor:
    """``eval_sigmas`` validated against the grid: finite, positive, one per positive level."""
    npos = int((sigmas > 0).sum())
    if isinstance(eval_sigmas, (str, bytes, dict)) or (isinstance(eval_sigmas, (list, tuple)) and any(
            isinstance(v, (str, bytes, bool, dict, type(None))) for v in eval_sigmas)):
        raise UserError(f"{where}: give one finite, positive evaluation level (a number) per positive grid level "
                        f"({npos}), got {' '.join(str(eval_sigmas).split())[:60]}")
    try:
        ev = torch.as_tensor(eval_sigmas, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{where}: give one finite, positive evaluation level (a number) per positive grid level "
                        f"({npos}), got {' '.join(str(eval_sigmas).split())[:60]}") from None
    if ev.numel() != npos or not bool(torch.isfinite(ev).all()) or bool((ev <= 0).any()):
        raise UserError(f"{where}: give one finite, positive evaluation level per positive grid level "
                        f"({npos}), got {ev.numel()}")
    return ev


def shifts(sigmas: Tensor, eval_sigmas: Tensor) -> Tensor:
    """delta_k = log sigma'_k - log sigma_k at the positive grid levels (module docstring)."""
    pos = sigmas[sigmas > 0].to(torch.float64)
    return torch.log(eval_sigmas.to(torch.float64)) - torch.log(pos)


class EvalLevels:
    """``denoiser`` asked at the decoupled levels of the table (``sigmas``, ``eval_sigmas``):
    ``EvalLevels(D, sigmas, ev)(x, s) = D(x, s * exp(delta(log s)))`` (module docstring).
    Other attributes (``sigma_min``, ``process``, ...) are the wrapped denoiser's."""

    def __init__(self, denoiser: Callable, sigmas: Tensor, eval_sigmas):
        sig = G.as_sigmas(sigmas)
        ev = check_levels(sig, eval_sigmas)
        self.denoiser = denoiser
        self.sigmas, self.eval_sigmas = sig, ev
        # knots ascending in log sigma for searchsorted
        self._log = torch.log(sig[sig > 0]).flip(0)
        self._delta = shifts(sig, ev).flip(0)
        self.identity = bool((self._delta == 0).all())

    def level(self, s: Tensor) -> Tensor:
        """The evaluation level for each entry of ``s`` (same shape, dtype and device)."""
        if self.identity:
            return s
        if s.dim() == 1 and s.numel() > 1 and s.stride(0) == 0:  # one level for the batch (batch_sigma)
            return self.level(s[:1]).expand(s.shape)
        s64 = s.detach().to(torch.float64)
        u = torch.log(s64.clamp_min(1e-300))
        L, d = self._log.to(s.device), self._delta.to(s.device)
        if len(L) > 1:
            j = torch.searchsorted(L, u.contiguous()).clamp(1, len(L) - 1)
            lo, hi = L[j - 1], L[j]
            w = ((u - lo) / (hi - lo)).clamp(0, 1)
            delta = d[j - 1] + w * (d[j] - d[j - 1])
        else:
            delta = d[0].expand_as(u)
        delta = torch.where(s64 > 0, delta, torch.zeros_like(delta))
        return torch.where(delta != 0, (s64 * torch.exp(delta)).to(s.dtype), s)

    def __call__(self, x: Tensor, sigma, **kw):
        if self.identity:
            return self.denoiser(x, sigma, **kw)
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return self.denoiser(x, self.level(s), **kw)

    def __getattr__(self, name):  # sigma_min, sigma_max, process, ... of the wrapped denoiser
        if name.startswith("__") or name in ("denoiser", "sigmas", "eval_sigmas", "_log", "_delta", "identity"):
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def load_schedule(path) -> tuple[Tensor, Callable]:
    """(sigmas, wrap) of a grid file: ``wrap(denoiser)`` is :class:`EvalLevels` when the file
    has ``"eval_sigmas"``, else the denoiser itself (files without them behave as before)."""
    sigmas = G.load(path)
    data = json.loads(Path(path).read_text())
    ev = data.get("eval_sigmas") if isinstance(data, dict) else None
    if ev is None:
        return sigmas, lambda d: d
    ev = check_levels(sigmas, ev, where=f"grid file {path}: eval_sigmas")
    return sigmas, lambda d: EvalLevels(d, sigmas, ev)


def save_schedule(path, sigmas: Tensor, eval_sigmas: Optional[Tensor] = None, **meta) -> None:
    """:func:`fewstep.grids.save` with the evaluation levels (if any) as ``"eval_sigmas"``."""
    if eval_sigmas is not None:
        meta["eval_sigmas"] = check_levels(G.as_sigmas(sigmas), eval_sigmas).tolist()
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in meta.items()}
    G.save(path, sigmas, **clean)
