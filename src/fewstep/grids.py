"""Time grids: functions returning decreasing sigma levels for the samplers.

Every grid returns ``n + 1`` levels (``n`` steps), decreasing, the last one 0 unless
``final_zero=False`` (then the n + 1 levels run from ``sigma_max`` down to ``sigma_min``). A sampler with ``n`` steps spends
its evaluations at the first ``n`` levels (and, for some, in between).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import UserError, unknown_name

__all__ = ["karras", "logsnr_uniform", "time_uniform", "polyexponential", "vp_time", "as_sigmas", "GRIDS",
           "make_grid", "load", "save"]


def _finish(sig: Tensor, final_zero: bool) -> Tensor:
    sig = sig.to(torch.float64)
    return torch.cat([sig, sig.new_zeros(1)]) if final_zero else sig


def _levels(n: int, final_zero: bool) -> int:
    """Positive levels in an n-step grid: n before a final 0, else n + 1 down to sigma_min."""
    return n if final_zero else n + 1


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, final_zero: bool = True) -> Tensor:
    """EDM eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    _check(n, sigma_min, sigma_max)
    m = _levels(n, final_zero)
    ramp = torch.linspace(0, 1, m, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = (a + ramp * (b - a)) ** rho if m > 1 else torch.tensor([sigma_max], dtype=torch.float64)
    return _finish(sig, final_zero)


def logsnr_uniform(n: int, sigma_min: float, sigma_max: float, final_zero: bool = True) -> Tensor:
    """Uniform in lambda = -log sigma (DPM-Solver's 'logSNR' spacing)."""
    _check(n, sigma_min, sigma_max)
    m = _levels(n, final_zero)
    sig = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), m, dtype=torch.float64))
    return _finish(sig, final_zero)


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, final_zero: bool = True) -> Tensor:
    """k-diffusion's polyexponential: log sigma = log smin + (1 - i/(n-1))^rho (log smax - log smin)."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, _levels(n, final_zero), dtype=torch.float64) ** rho
    sig = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return _finish(sig, final_zero)


VP_T_MIN = 1e-3  # the VP time at sigma_min of :func:`vp_time` (DPM-Solver's and diff-sampler's epsilon)


def vp_time(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, t_min: float = VP_T_MIN,
            final_zero: bool = True) -> Tensor:
    """Uniform (rho = 1) or polynomial (rho > 1) in the time of a linear-beta VP process
    fitted to the range: the "time uniform" schedule of DPM-Solver, DEIS and diff-sampler.

    The VP process sigma(t) = sqrt(exp(beta_min t + beta_d t^2 / 2) - 1) on t in [t_min, 1]
    is the one with sigma(1) = sigma_max and sigma(t_min) = sigma_min (two equations, two
    unknowns: beta_d = 2 (log(1 + smin^2) / t_min - log(1 + smax^2)) / (t_min - 1),
    beta_min = log(1 + smax^2) - beta_d / 2), and the levels are sigma(t_i) at
    t_i = (1 + i/(m-1) (t_min^(1/rho) - 1))^rho, i = 0..m-1. rho > 1 crowds the levels
    towards t_min (small sigma), as Karras' rho does in sigma. It places far fewer levels at
    large sigma than a Karras or log-SNR grid (a VP time step near t = 1 spans a large
    sigma range), which is what wins at few steps on many teachers.
    """
    _check(n, sigma_min, sigma_max)
    rho, t_min = float(rho), float(t_min)
    if not (math.isfinite(rho) and rho > 0):
        raise UserError(f"grid 'vp-time': rho must be a positive number, got {rho}")
    if not 0 < t_min < 1:
        raise UserError(f"grid 'vp-time': t_min must lie in (0, 1), got {t_min}")
    m = _levels(n, final_zero)
    a_max, a_min = math.log1p(sigma_max**2), math.log1p(sigma_min**2)
    beta_d = 2 * (a_min / t_min - a_max) / (t_min - 1)
    beta_min = a_max - 0.5 * beta_d
    ramp = torch.linspace(0, 1, m, dtype=torch.float64) if m > 1 else torch.zeros(1, dtype=torch.float64)
    t = (1 + ramp * (t_min ** (1 / rho) - 1)) ** rho
    sig = torch.expm1(beta_min * t + 0.5 * beta_d * t**2).sqrt()
    sig[0] = sigma_max  # exactly the ends (the formula gives them to rounding)
    if m > 1:
        sig[-1] = sigma_min
    return _finish(sig, final_zero)


def time_uniform(process, n: int, spacing: str = "linspace", steps_offset: int = 0,
                 final_zero: bool = True, t_min: Optional[float] = None, t_max: Optional[float] = None) -> Tensor:
    """Uniform in the process's own time t, then mapped to sigma.

    For a discrete process (t = diffusers' timestep index 0..N-1) the spacings follow
    diffusers' DDIM / Euler schedulers (their ``timesteps``, tested against diffusers):
      ``linspace``: t_i = round(linspace(0, N-1, n))[::-1] (numpy's linspace, half to even);
      ``leading``:  t_i = (n-1-i) * (N // n) + steps_offset;
      ``trailing``: t_i = round(N - i N / n) - 1.
    Deliberate differences: n = 1 with ``linspace`` gives t = N-1 (diffusers: t = 0, a
    one-step grid at the end of the trajectory), and a ``leading`` grid whose first step
    would lie beyond t = N-1 (n = N with steps_offset = 1; diffusers indexes past its
    table) is refused.
    For continuous processes ``linspace`` gives t_i = linspace(t_max, t_min, n) and
    ``trailing`` t_i = t_max - i (t_max - t_min)/n (the grid without its t_min end).
    """
    if spacing not in ("linspace", "leading", "trailing"):
        raise unknown_name("spacing", spacing, ["linspace", "leading", "trailing"])
    lo = process.t_min if t_min is None else t_min
    hi = process.t_max if t_max is None else t_max
    discrete = getattr(process, "name", "") == "vp_discrete"
    if not final_zero:  # n steps down to the process's t_min: n + 1 levels, linspace in t
        return process.sigma(torch.linspace(hi, lo, n + 1, dtype=torch.float64)).to(torch.float64)
    if discrete:
        N = int(round(hi)) + 1
        i = torch.arange(n, dtype=torch.float64)
        if spacing == "linspace":  # numpy's linspace: i * step, the last point exactly N - 1
            t = i * ((N - 1) / (n - 1)) if n > 1 else torch.full((1,), float(N - 1), dtype=torch.float64)
            t[-1] = N - 1
            t = t.round().flip(0)
        elif spacing == "leading":
            t = (n - 1 - i) * (N // n) + steps_offset
            if float(t[0]) > N - 1:
                raise UserError(f"time-leading grid: {n} steps with steps_offset={steps_offset} start at t={int(t[0])}, "
                                f"beyond the process's last timestep {N - 1}; use fewer steps or steps_offset=0")
        else:
            t = torch.round(N - i * N / n) - 1
    else:
        if spacing == "trailing":
            t = hi - torch.arange(n, dtype=torch.float64) * (hi - lo) / n
        else:
            t = torch.linspace(hi, lo, n, dtype=torch.float64)
    return _finish(process.sigma(t), final_zero)


def as_sigmas(sigmas, where: str = "a sigma grid") -> Tensor:
    """Validate a user grid: 1-D, finite, non-negative, strictly decreasing; else one
    UserError line starting with ``where`` that says which entry is wrong."""
    need = "a 1-D, finite, non-negative, strictly decreasing list of >= 2 levels"
    if isinstance(sigmas, (str, bytes, dict)) or (isinstance(sigmas, (list, tuple)) and any(
            isinstance(v, (str, bytes, bool, dict, type(None))) for v in sigmas)):
        raise UserError(f"{where} must be {need} (numbers), got {_shown(sigmas)}")
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{where} must be {need} (numbers), got {_shown(sigmas)}") from None
    if s.numel() < 2:
        raise UserError(f"{where} must be {need}, got {s.numel()} level(s)")
    bad = ~torch.isfinite(s) | (s < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise UserError(f"{where} must be {need}: level {i} is {float(s[i])}")
    up = s[1:] >= s[:-1]
    if bool(up.any()):
        i = int(up.nonzero()[0])
        raise UserError(f"{where} must be {need}: level {i + 1} ({float(s[i + 1]):g}) is not below level {i} "
                        f"({float(s[i]):g})")
    return s


def _shown(value) -> str:
    """``value`` for an error line: one line, short."""
    text = " ".join(str(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if int(n) < 1:
        raise UserError(f"a grid needs at least 1 step, got n={n}")
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise UserError(f"a grid needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


GRIDS = {
    "karras": karras,
    "logsnr": logsnr_uniform,
    "polyexponential": polyexponential,
    "vp-time": vp_time,
}


def make_grid(name, n: int, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, process=None,
              **kw) -> Tensor:
    """A grid by name: ``karras``, ``logsnr``, ``polyexponential``, ``vp-time``, ``time`` (process time,
    linspace), ``time-leading``/``time-trailing``, a path to a grid JSON file, or a tensor.

    The sigma-range grids take ``sigma_min``/``sigma_max``, by default the process's range
    (``process.sigma_min``, ``process.sigma_max``); the time grids need only the process
    (``kw`` go to the grid function, e.g. ``steps_offset`` of ``time-leading``)."""
    if isinstance(name, (Tensor, list, tuple)):
        return as_sigmas(name)
    if name in GRIDS:
        if process is not None:
            sigma_min = process.sigma_min if sigma_min is None else sigma_min
            sigma_max = process.sigma_max if sigma_max is None else sigma_max
        if sigma_min is None or sigma_max is None:
            raise UserError(f"grid '{name}' needs sigma_min and sigma_max (or a process that sets them)")
        return GRIDS[name](n, sigma_min, sigma_max, **kw)
    if name in ("time", "time-linspace", "time-leading", "time-trailing"):
        if process is None:
            raise UserError(f"grid '{name}' needs a process (the teacher's)")
        spacing = name.split("-", 1)[1] if "-" in name else "linspace"
        return time_uniform(process, n, spacing, **kw)
    if str(name).endswith(".json"):
        return load(name)
    raise unknown_name("grid", name, list(GRIDS) + ["time", "time-leading", "time-trailing", "FILE.json"])


def save(path, sigmas: Tensor, **meta) -> None:
    """Write a grid as JSON: {"sigmas": [...], ...meta}."""
    Path(path).write_text(json.dumps({"sigmas": as_sigmas(sigmas).tolist(), **meta}, indent=1))


def load(path) -> Tensor:
    """Read a grid written by :func:`save` (or any JSON list / {"sigmas": list})."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"grid file {p} not found")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"grid file {p} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if isinstance(data, dict) and "sigmas" not in data:
        raise UserError(f"grid file {p} has no \"sigmas\" (keys: {', '.join(map(str, data))[:80] or 'none'}); "
                        f"write it with fewstep.grids.save or 'fewstep schedule'")
    if not isinstance(data, (dict, list)):
        raise UserError(f"grid file {p} must hold a list of sigmas or {{\"sigmas\": [...]}}, got {type(data).__name__}")
    return as_sigmas(data["sigmas"] if isinstance(data, dict) else data, where=f"grid file {p}: sigmas")
