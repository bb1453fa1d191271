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

from ..checks import finite, whole
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
MAX_STEPS = 100000  # steps_for_nfe stops here (one step past it)
HUGE_NFE = 10000    # fewstep.sample warns, with the cost, above this many evaluations


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
        if steps > MAX_STEPS:
            break
    return steps


def _check_options(sampler: str, fn: Callable, options: dict) -> None:
    """Every keyword in ``options`` is one the sampler function takes, else one UserError line
    naming it and the sampler's options (instead of Python's TypeError)."""
    from difflib import get_close_matches

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n in list(params)[3:] if params[n].kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in options:
        if key not in valid:
            close = get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"sampler '{sampler}' takes no option '{key}'{hint}; its options: "
                            f"{', '.join(valid) or 'none'}")


def _check_grid_options(grid, grid_options) -> None:
    """``grid_options`` a dict of keywords the named grid's function takes (a UserError line
    naming the first other one, instead of the grid function's TypeError)."""
    from .. import grids as G

    if grid_options is None:
        return
    if not isinstance(grid_options, dict):
        raise UserError(f"grid_options must be a dict of the grid's keywords, got {type(grid_options).__name__}")
    if not isinstance(grid, str) or grid.endswith(".json"):
        if grid_options:
            raise UserError(f"grid_options ({', '.join(map(str, grid_options))}) apply to named grids only, "
                            f"not to a given grid")
        return
    fn = G.GRIDS.get(grid, G.time_uniform if grid.startswith("time") else None)
    if fn is None:  # an unknown grid name: make_grid says so
        return
    skip = {"n", "sigma_min", "sigma_max", "process", "spacing"}
    valid = [k for k in inspect.signature(fn).parameters if k not in skip]
    for key in grid_options:
        if key not in valid:
            raise UserError(f"grid '{grid}' takes no option '{key}'; its options: {', '.join(valid) or 'none'}")


def _check_range(sigma_min, sigma_max, grid) -> None:
    """sigma_min / sigma_max, where given, finite; for a named sigma-range grid (karras,
    logsnr, polyexponential) also 0 < sigma_min < sigma_max, said with the arguments' names."""
    from .. import grids as G

    lo = None if sigma_min is None else finite(sigma_min, "sigma_min", low=0.0)
    hi = None if sigma_max is None else finite(sigma_max, "sigma_max", low=0.0, above=True)
    if isinstance(grid, str) and grid in G.GRIDS and lo is not None and hi is not None:
        if lo <= 0:
            raise UserError(f"sigma_min must be above 0 for grid '{grid}', got {sigma_min}; the grid ends at 0 "
                            f"after its last positive level (e.g. sigma_min=0.002)")
        if lo >= hi:
            raise UserError(f"sigma_min ({sigma_min}) must be below sigma_max ({sigma_max})")


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

    Arguments that cannot be meant (``nfe`` not a whole number >= 1, ``x`` not a tensor, an
    option the sampler does not take, a non-finite sigma range or sigma_min >= sigma_max)
    raise one :class:`~fewstep.errors.UserError` line naming them; an ``nfe`` above
    :data:`HUGE_NFE` runs, with a warning stating its cost.
    """
    from .. import grids as G

    si = info(sampler)
    nfe = whole(nfe, "nfe")
    if not isinstance(x, torch.Tensor):
        raise UserError(f"x must be a torch.Tensor of starting points at the grid's first level, got "
                        f"{type(x).__name__}; convert it with torch.as_tensor(x)")
    _check_options(sampler, si.fn, options)
    opts = {**si.defaults, **options}
    if process is None:  # else make_grid takes the range of the process given
        sigma_min = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", None)
        sigma_max = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", None)
    _check_range(sigma_min, sigma_max, grid)
    _check_grid_options(grid, grid_options)
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
        if not si.adaptive and nfe > HUGE_NFE:
            most = f", the most steps a sampler takes ({MAX_STEPS:,})" if steps > MAX_STEPS else ""
            warnings.warn(f"nfe={nfe:,} is very large: sampler '{sampler}' will make {spent:,} denoiser evaluations "
                          f"({steps:,} steps{most}) on a batch of {x.shape[0] if x.ndim else 1}; few-step samplers "
                          f"converge far below {HUGE_NFE:,}: lower nfe unless you mean it", stacklevel=2)
        elif not si.adaptive and spent < nfe:
            warnings.warn(f"sampler '{sampler}' spends {spent} evaluations ({steps} steps), not {nfe}: "
                          f"its steps cost {si.cost(steps + 1, **opts) - spent} each", stacklevel=2)
    sigmas = sigmas.to(device=x.device)
    if process is not None and "process" in inspect.signature(si.fn).parameters:
        opts.setdefault("process", process)
    return si.fn(denoiser, x, sigmas, **opts)


_load_all()
