"""Training-free samplers, each a plain function over a sigma grid.

Contract (k-diffusion style): ``sample_<name>(denoiser, x, sigmas, **options) -> x`` where
``denoiser(x, sigma) -> x0`` with sigma of shape [batch], ``x`` is in sigma-space at level
``sigmas[0]`` (``x = x0 + sigmas[0] * eps``), and ``sigmas`` is a decreasing 1-D tensor,
usually ending at 0. Randomness comes in through ``generator=``; ``callback(info)`` sees
each step (``i, x, sigma, sigma_next, denoised``) and never changes it.

Every module in this package registers its samplers with :func:`register`; the package
imports all its modules, so adding a sampler is adding a file.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import UserError, unknown_name

__all__ = ["register", "names", "get", "info", "SamplerInfo", "sample", "steps_for_nfe"]


@dataclass
class SamplerInfo:
    """A registered sampler: the function and what the budget logic needs to know.

    ``cost(steps, **options)`` is the number of denoiser calls for ``steps`` steps on a
    grid ending at 0; ``order`` the ODE convergence order (None for stochastic samplers);
    ``adaptive`` samplers choose their own steps (the grid gives only its end points).
    """

    name: str
    fn: Callable
    cost: Callable[..., int]
    order: Optional[float] = None
    stochastic: bool = False
    adaptive: bool = False
    defaults: dict = field(default_factory=dict)


_REGISTRY: dict[str, SamplerInfo] = {}


def register(name: str, *, cost: Optional[Callable[..., int]] = None, order=None,
             stochastic: bool = False, adaptive: bool = False, **defaults):
    """Decorator: ``@register("euler", order=1)`` adds a sampler to the registry."""

    def deco(fn):
        _REGISTRY[name] = SamplerInfo(name, fn, cost or (lambda steps, **_: steps), order, stochastic,
                                      adaptive, defaults)
        return fn

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def names() -> list[str]:
    """All registered sampler names."""
    return sorted(_REGISTRY)


def info(name: str) -> SamplerInfo:
    if name not in _REGISTRY:
        raise unknown_name("sampler", name, names())
    return _REGISTRY[name]


def get(name: str) -> Callable:
    """The sampler function registered as ``name``."""
    return info(name).fn


def steps_for_nfe(name: str, nfe: int, **options) -> int:
    """The largest number of steps whose cost is at most ``nfe`` evaluations (0 if none)."""
    cost = info(name).cost
    steps = 0
    while cost(steps + 1, **options) <= nfe:
        steps += 1
        if steps > 100000:
            break
    return steps


def sample(denoiser, x: torch.Tensor, sampler: str = "euler", nfe: int = 10, grid="karras",
           sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, process=None,
           grid_options: Optional[dict] = None, **options) -> torch.Tensor:
    """Run ``sampler`` with as many steps as ``nfe`` network evaluations allow.

    ``grid`` is a grid name of :mod:`fewstep.grids`, a path to a grid JSON file (with
    its decoupled evaluation levels, if it has them: :mod:`fewstep.levels`), or a
    tensor of sigmas (then ``nfe`` only checks the budget). ``x`` is at the grid's first
    level. The sigma range of a named grid is ``sigma_min``/``sigma_max``, else that of
    ``process=``, else the denoiser's (its ``sigma_min``/``sigma_max`` attributes, else
    its ``process``'s); the time grids (``time``,
    ``time-leading``, ``time-trailing``) need only the process. ``grid_options`` go to the
    grid function (e.g. ``{"steps_offset": 1}`` for ``time-leading``, ``{"rho": 5}``).
    ``process=`` is also handed to samplers that take it. Spends exactly ``nfe``
    evaluations where the sampler's cost allows, else fewer, with a warning; never more.
    Adaptive samplers get ``max_nfe=nfe``.
    """
    from .. import grids as G

    si = info(sampler)
    opts = {**si.defaults, **options}
    if process is None:  # else make_grid takes the range of the process given
        sigma_min = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", None)
        sigma_max = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", None)
    grid_process = process if process is not None else getattr(denoiser, "process", None)
    user_grid = isinstance(grid, (torch.Tensor, list, tuple)) or str(grid).endswith(".json")
    if user_grid:  # the grid fixes the steps; nfe is only a budget check
        sigmas = G.make_grid(grid, 0, 0, 0)
        if not isinstance(grid, (torch.Tensor, list, tuple)):  # a file's evaluation levels (fewstep.levels)
            from ..levels import load_schedule

            denoiser = load_schedule(grid)[1](denoiser)
        spent = si.cost(len(sigmas) - 1, **opts, **({"final_zero": False} if sigmas[-1] > 0 else {}))
        if not si.adaptive and spent > nfe:
            raise UserError(f"the grid has {len(sigmas) - 1} steps: sampler '{sampler}' would spend "
                            f"{spent} > {nfe} evaluations")
        if si.adaptive:
            opts.setdefault("max_nfe", nfe)
    else:
        if si.adaptive:
            opts.setdefault("max_nfe", nfe)
            steps = 2  # the grid gives only the end points sigma_max, sigma_min (then 0)
        else:
            steps = steps_for_nfe(sampler, nfe, **opts)
            if steps == 0:
                raise UserError(f"sampler '{sampler}' needs more than {nfe} evaluations for one step; raise --nfe")
        sigmas = G.make_grid(grid, steps, sigma_min, sigma_max, process=grid_process, **(grid_options or {}))
        spent = si.cost(steps, **opts)
        if not si.adaptive and spent < nfe:
            warnings.warn(f"sampler '{sampler}' spends {spent} evaluations ({steps} steps), not {nfe}: "
                          f"its steps cost {si.cost(steps + 1, **opts) - spent} each", stacklevel=2)
    sigmas = sigmas.to(device=x.device)
    if process is not None and "process" in inspect.signature(si.fn).parameters:
        opts.setdefault("process", process)
    return si.fn(denoiser, x, sigmas, **opts)


_load_all()
