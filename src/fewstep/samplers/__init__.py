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
from pathlib import Path
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..checks import finite, whole
from ..errors import UserError, unknown_name

__all__ = ["register", "names", "get", "info", "SamplerInfo", "sample", "steps_for_nfe", "spent", "recommend",
           "Choice", "AnalyticFirst"]


@dataclass
class SamplerInfo:
    """A registered sampler: the function and what the budget logic needs to know.

    ``cost(steps, **options)`` is the number of denoiser calls for ``steps`` steps on a
    grid ending at 0; ``order`` the ODE convergence order (None for stochastic samplers);
    ``adaptive`` samplers choose their own steps (the grid gives only its end points);
    ``afs``: whether the analytical first step may replace its first evaluation (not for
    samplers that need the denoiser itself, e.g. the splitting samplers' guided split).
    """

    name: str
    fn: Callable
    cost: Callable[..., int]
    order: Optional[float] = None
    stochastic: bool = False
    adaptive: bool = False
    defaults: dict = field(default_factory=dict)
    afs: bool = True


_REGISTRY: dict[str, SamplerInfo] = {}
MAX_STEPS = 100000  # steps_for_nfe stops here (one step past it)
HUGE_NFE = 10000    # fewstep.sample warns, with the cost, above this many evaluations
AUTO = "auto"       # the sampler name of the measured default (the same as giving none)


def register(name: str, *, cost: Optional[Callable[..., int]] = None, order=None,
             stochastic: bool = False, adaptive: bool = False, afs: bool = True, **defaults):
    """Decorator: ``@register("euler", order=1)`` adds a sampler to the registry."""

    def deco(fn):
        _REGISTRY[name] = SamplerInfo(name, fn, cost or (lambda steps, **_: steps), order, stochastic,
                                      adaptive, defaults, afs=afs and not (stochastic or adaptive))
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
    if name == AUTO:
        raise UserError(f"'{AUTO}' is the measured default, not a sampler of its own; "
                        f"see fewstep.samplers.recommend(nfe)")
    if name not in _REGISTRY:
        raise unknown_name("sampler", name, names())
    return _REGISTRY[name]


def get(name: str) -> Callable:
    """The sampler function registered as ``name``."""
    return info(name).fn


def steps_for_nfe(name: str, nfe: int, final_zero: bool = True, afs: bool = False, **options) -> int:
    """The largest number of steps whose cost is at most ``nfe`` evaluations (0 if none), on
    a grid ending at 0 (``final_zero``) or at a positive sigma, with the first evaluation
    answered analytically (``afs``: one evaluation fewer) or not."""
    steps = 0
    while spent(name, steps + 1, final_zero, afs, **options) <= nfe:
        steps += 1
        if steps > MAX_STEPS:
            break
    return steps


def spent(name: str, steps: int, final_zero: bool = True, afs: bool = False, **options) -> int:
    """Denoiser evaluations of ``steps`` steps of sampler ``name``: its cost on a grid ending at
    0 or not, one fewer with the analytical first step."""
    c = info(name).cost(steps, **{**options, "final_zero": bool(final_zero)})
    return max(0, c - int(bool(afs) and steps > 0))


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


class AnalyticFirst:
    """A denoiser whose first call, at the grid's first level ``sigma0``, is answered without
    the network: the analytical first step (AFS; Dockhorn et al. 2022, GENIE sec. 3.2, and
    diff-sampler). At sigma_max the data are nearly invisible, so their posterior mean is
    what a simple prior says it is:

    ``"prior"`` (True): a Gaussian prior N(0, s^2 I), s the denoiser's ``sigma_data`` (else 1),
        D = x s^2 / (s^2 + sigma^2), the exact posterior mean under that prior;
    ``"unit"``: diff-sampler's rule eps = x / sqrt(1 + sigma^2), D = x - sigma eps.

    Every later call goes to the network. Attributes are the wrapped denoiser's."""

    MODES = ("prior", "unit")

    def __init__(self, denoiser, sigma0: float, mode="prior"):
        self.inner, self.sigma0 = denoiser, float(sigma0)
        self.mode = "prior" if mode is True else mode
        self.used = False

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __call__(self, x, sigma, **kw):
        if not self.used:
            self.used = True
            s = float(torch.as_tensor(sigma).flatten()[0])
            if abs(s - self.sigma0) > 1e-5 * self.sigma0:  # float32 levels round at 6e-8
                raise UserError(f"afs: the sampler's first evaluation is at sigma={s:g}, not at the grid's first "
                                f"level {self.sigma0:g}; use afs with a deterministic grid sampler")
            if self.mode == "unit":
                return x - x * (s / (1 + s * s) ** 0.5)
            sd = float(getattr(self.inner, "sigma_data", 1.0) or 1.0)
            return x * (sd * sd / (sd * sd + s * s))
        return self.inner(x, sigma, **kw)


def _file_afs(path):
    """The ``afs`` a grid file records (``fewstep schedule`` writes it), else None."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # grids.load says what is wrong with the file
    return data.get("afs") if isinstance(data, dict) and data.get("afs") else None


def _afs_mode(afs, sampler: str):
    """``afs`` as False, "prior" or "unit", checked against the sampler (one UserError line)."""
    if afs is None or afs is False:
        return False
    if afs is True:
        afs = "prior"
    if afs not in AnalyticFirst.MODES:
        raise UserError(f"afs must be True, False, 'prior' or 'unit', got {afs!r}")
    si = info(sampler)
    if not si.afs:
        kind = "stochastic" if si.stochastic else "adaptive" if si.adaptive else "it needs the denoiser itself"
        raise UserError(f"afs (the analytical first step) applies to deterministic grid samplers, not to "
                        f"'{sampler}' ({kind}); drop afs")
    return afs


def sample(denoiser, x: torch.Tensor, sampler: Optional[str] = None, nfe: int = 10, grid=None,
           sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, process=None,
           grid_options: Optional[dict] = None, afs=None, **options) -> torch.Tensor:
    """Run ``sampler`` with as many steps as ``nfe`` network evaluations allow.

    With neither ``sampler`` nor ``grid`` it runs the configuration recommended for ``nfe``
    (:func:`fewstep.samplers.recommend`: sampler, grid, grid options and analytical first
    step that measure best at that budget on the project's exact teachers); with a
    ``sampler`` and no ``grid``, that sampler's best grid for ``nfe`` (a sampler that cannot
    be made stable at that budget refuses with one line naming what to use). What was run
    is the returned tensor's ``choice`` attribute (a :class:`Choice`).

    ``grid`` is a grid name of :mod:`fewstep.grids`, a path to a grid JSON file (with
    its decoupled evaluation levels, if it has them: :mod:`fewstep.levels`), or a
    tensor of sigmas (then ``nfe`` only checks the budget). ``x`` is at the grid's first
    level. The sigma range of a named grid is ``sigma_min``/``sigma_max``, else that of
    ``process=``, else the denoiser's (its ``sigma_min``/``sigma_max`` attributes, else
    its ``process``'s); the time grids (``time``,
    ``time-leading``, ``time-trailing``) need only the process. ``grid_options`` go to the
    grid function (e.g. ``{"steps_offset": 1}`` for ``time-leading``, ``{"rho": 5}``,
    ``{"final_zero": False}`` to end at sigma_min without a step to 0).
    ``afs=True`` answers the first evaluation analytically (:class:`AnalyticFirst`), one
    evaluation fewer. ``process=`` is also handed to samplers that take it. Spends exactly
    ``nfe`` evaluations where the sampler's cost allows, else fewer, with a warning; never
    more. Adaptive samplers get ``max_nfe=nfe``.

    Arguments that cannot be meant (``nfe`` not a whole number >= 1, ``x`` not a tensor, an
    option the sampler does not take, a non-finite sigma range or sigma_min >= sigma_max)
    raise one :class:`~fewstep.errors.UserError` line naming them; an ``nfe`` above
    :data:`HUGE_NFE` runs, with a warning stating its cost.
    """
    from .. import grids as G
    from ._choice import Choice, resolve

    nfe = whole(nfe, "nfe")
    if not isinstance(x, torch.Tensor):
        raise UserError(f"x must be a torch.Tensor of starting points at the grid's first level, got "
                        f"{type(x).__name__}; convert it with torch.as_tensor(x)")
    if sampler == AUTO:
        sampler = None
    if sampler is not None:  # what the caller named is checked before a default is looked up
        _check_options(sampler, info(sampler).fn, options)
    if grid_options is not None and not isinstance(grid_options, dict):
        raise UserError(f"grid_options must be a dict of the grid's keywords, got {type(grid_options).__name__}")
    if afs is None and isinstance(grid, (str, Path)) and str(grid).endswith(".json"):
        afs = _file_afs(grid)  # a learned schedule says whether it was learned with the analytical first step
    tuned = sampler is not None and info(sampler).adaptive and bool(set(options) - {"callback", "extra_args",
                                                                                       "generator"})
    choice = resolve(nfe, sampler, grid, grid_options, afs, tuned)
    sampler, grid, grid_options, afs = choice.sampler, choice.grid, choice.grid_options, choice.afs
    si = info(sampler)
    _check_options(sampler, si.fn, options)
    opts = {**si.defaults, **choice.options, **options}
    afs = _afs_mode(afs, sampler)
    if process is None:  # else make_grid takes the range of the process given
        sigma_min = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", None)
        sigma_max = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", None)
    _check_range(sigma_min, sigma_max, grid)
    _check_grid_options(grid, grid_options)
    grid_process = process if process is not None else getattr(denoiser, "process", None)
    user_grid = isinstance(grid, (torch.Tensor, list, tuple)) or str(grid).endswith(".json")
    cost_opts = {k: v for k, v in opts.items() if k not in ("callback", "extra_args", "generator")}
    if user_grid:  # the grid fixes the steps; nfe is only a budget check
        sigmas = G.make_grid(grid, 0, 0, 0)
        if not isinstance(grid, (torch.Tensor, list, tuple)):  # a file's evaluation levels (fewstep.levels)
            from ..levels import load_schedule

            denoiser = load_schedule(grid)[1](denoiser)
        steps = len(sigmas) - 1
        used = spent(sampler, steps, bool(sigmas[-1] == 0), afs, **cost_opts)
        if not si.adaptive and used > nfe:
            raise UserError(f"the grid has {steps} steps: sampler '{sampler}' would spend "
                            f"{used} > {nfe} evaluations")
        if si.adaptive:
            opts.setdefault("max_nfe", nfe)
    else:
        final_zero = bool((grid_options or {}).get("final_zero", True))
        if si.adaptive:
            opts.setdefault("max_nfe", nfe)
            steps = 2  # the grid gives only the end points sigma_max, sigma_min (then 0)
            used = nfe
        else:
            steps = steps_for_nfe(sampler, nfe, final_zero, afs, **cost_opts)
            if steps == 0:
                raise UserError(f"sampler '{sampler}' needs more than {nfe} evaluations for one step; raise --nfe")
            used = spent(sampler, steps, final_zero, afs, **cost_opts)
        sigmas = G.make_grid(grid, steps, sigma_min, sigma_max, process=grid_process, **(grid_options or {}))
        if not si.adaptive and nfe > HUGE_NFE:
            most = f", the most steps a sampler takes ({MAX_STEPS:,})" if steps > MAX_STEPS else ""
            warnings.warn(f"nfe={nfe:,} is very large: sampler '{sampler}' will make {used:,} denoiser evaluations "
                          f"({steps:,} steps{most}) on a batch of {x.shape[0] if x.ndim else 1}; few-step samplers "
                          f"converge far below {HUGE_NFE:,}: lower nfe unless you mean it", stacklevel=2)
        elif not si.adaptive and used < nfe:
            step_cost = spent(sampler, steps + 1, final_zero, afs, **cost_opts) - used
            warnings.warn(f"sampler '{sampler}' spends {used} evaluations ({steps} steps), not {nfe}: "
                          f"its steps cost {step_cost} each", stacklevel=2)
    choice.warn_if_diverges(nfe)
    sigmas = sigmas.to(device=x.device)
    if process is not None and "process" in inspect.signature(si.fn).parameters:
        opts.setdefault("process", process)
    if afs:
        denoiser = AnalyticFirst(denoiser, float(sigmas[0]), afs)
    out = si.fn(denoiser, x, sigmas, **opts)
    out.choice = Choice(sampler, grid if not isinstance(grid, torch.Tensor) else "given", grid_options or {},
                        afs, choice.options, choice.source, nfe=nfe, spent=used, steps=steps, row=choice.row)
    return out


_load_all()
from ._choice import Choice, recommend  # noqa: E402
