"""Checks of the values the Python API takes: counts, finite numbers, devices.

Each returns the value normalised (an ``int``, a ``float``, a ``torch.device`` string) or
raises one :class:`~fewstep.errors.UserError` line naming the argument, what it must be and
what it got, so a bad call of ``fewstep.sample``, ``Model.sample`` or ``GaussianMixture``
ends in that line instead of a torch traceback or a silently odd result (NaN samples).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch

from .errors import UserError

__all__ = ["whole", "finite", "available_devices", "resolve_device"]


def _shown(value) -> str:
    """``value`` for an error line: short, one line."""
    text = repr(value) if isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def whole(value, what: str, low: int = 1, high: Optional[int] = None) -> int:
    """``value`` as an int in [``low``, ``high``] (an int, numpy int, 0-d integer tensor or a
    float with no fraction; never a bool or a string), else a UserError naming ``what``."""
    v = None
    if not isinstance(value, (bool, str, bytes)) and type(value).__name__ != "bool_":
        try:
            v = operator.index(value)
        except TypeError:
            if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
                v = int(value)
    rng = f"from {low} to {high}" if high is not None else f"of at least {low}"
    if v is None:
        raise UserError(f"{what} must be a whole number {rng}, got {_shown(value)} ({type(value).__name__})")
    if v < low or (high is not None and v > high):
        raise UserError(f"{what} must be a whole number {rng}, got {v}")
    return v


def finite(value, what: str, low: Optional[float] = None, above: bool = False) -> float:
    """``value`` as a finite float, at least ``low`` (above it with ``above``), else a
    UserError naming ``what``."""
    try:
        ok = not isinstance(value, (bool, str, bytes)) and type(value).__name__ != "bool_"
        v = float(value) if ok else math.nan
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        v = math.nan
    bound = "" if low is None else f" {'above' if above else 'of at least'} {low:g}"
    if not math.isfinite(v) or (low is not None and (v < low or (above and v == low))):
        raise UserError(f"{what} must be a finite number{bound}, got {_shown(value)}")
    return v


def available_devices() -> list[str]:
    """The device names that work here: ``cpu``, then ``cuda:0``.. and ``mps`` where present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device, what: str = "device") -> Optional[str]:
    """``device`` checked against the devices of this machine: None stays None (the caller's
    automatic choice), else the device's name; one that does not exist or is not available
    here (``tpu``, ``cuda`` without CUDA, ``cuda:3`` on a one-GPU machine) is one UserError
    line that names the available devices."""
    if device is None:
        return None
    have = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{what} {_shown(device)} is not a device name; available here: {', '.join(have)}") from None
    name = str(dev)
    if dev.type == "cpu":
        return name
    if dev.type == "cuda" and "cuda" in have and (dev.index is None or dev.index < torch.cuda.device_count()):
        return name
    if dev.type == "mps" and "mps" in have and not dev.index:
        return name
    why = "is not available here" if dev.type in ("cuda", "mps") else "is not supported by fewstep"
    raise UserError(f"{what} {name} {why}; available here: {', '.join(have)}")
