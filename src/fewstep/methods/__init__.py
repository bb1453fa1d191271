"""Distillation methods, one module each, registered by name.

A method module defines ``DEFAULTS`` (its own options, on top of
:data:`fewstep.methods.common.COMMON_DEFAULTS`), ``HELP`` (one line per option) and
``stages(job)``: the paper's stages, run by the stage runner (:mod:`fewstep.train.job`, which
owns the run folders, the loop, devices and checkpoints). Adding a method is a file: every
public module of this package that defines ``stages`` is discovered by name.

    knowledge    Luhman & Luhman 2021: one-step student on (x_T, teacher sampler(x_T)) pairs
    progressive  Salimans & Ho 2022: rounds N -> N/2 -> ... -> 1 of two-step DDIM targets
    consistency  Song et al. 2023: consistency distillation / training (CM, iCT schedules)
    reflow       Liu et al. 2022: rectified flow, k reflow rounds (each a flow model), one-step student
    pointcloud   Wu et al. 2022 (PSF): reflow's stages on clouds, a one-step student with Chamfer / EMD
    guided       Meng et al. 2022: a w-input student of the guided teacher, then progressive rounds with w
"""
from __future__ import annotations

import importlib
from typing import Optional

from ..errors import UserError, unknown_name


def _discover() -> dict:
    """``{name: module path}`` of the public modules here that define ``stages`` (found by
    reading the source, so listing the methods imports none of them)."""
    import pkgutil
    from pathlib import Path

    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.ispkg:
            continue
        src = Path(__path__[0], info.name + ".py")
        if src.is_file() and "\ndef stages(" in src.read_text(encoding="utf-8"):
            found[info.name] = f"{__name__}.{info.name}"
    return dict(sorted(found.items()))


METHODS = _discover()


def names() -> list[str]:
    return sorted(METHODS)


def get(name: str):
    """The module of method ``name``."""
    if name not in METHODS:
        raise unknown_name("distillation method", name, METHODS)
    return importlib.import_module(METHODS[name])


def defaults(name: str) -> dict:
    from .common import COMMON_DEFAULTS

    mod = get(name)
    return {**COMMON_DEFAULTS, **getattr(mod, "COMMON_OVERRIDES", {}), **mod.DEFAULTS}


def resolve(name: str, overrides: Optional[dict] = None, file: Optional[str] = None) -> dict:
    """Defaults <- config file <- explicit overrides (None values ignored), validated (the
    loop options by :func:`fewstep.train.options.validate_loop`, as for ``fewstep train``)."""
    from ..train.config import read_config_file
    from ..train.options import validate_loop

    cfg = defaults(name)
    from_file = read_config_file(file) if file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg.update(from_file)
    cfg.update(given)
    unknown = sorted(set(cfg) - set(defaults(name)) - {"method"})
    if unknown:
        raise UserError(f"unknown option(s) for '{name}': {', '.join(unknown)}; valid: {', '.join(defaults(name))}")
    validate_loop(cfg, file, set(from_file) - set(given))
    cfg["method"] = name
    return cfg


def distill(name: str, overrides: Optional[dict] = None, out: str = "runs/student", config_file: Optional[str] = None,
            resume: bool = False, progress: bool = True) -> str:
    """``fewstep distill NAME``: train a student into run folder ``out``; returns its path.

    With ``resume`` the stored config of ``out`` is used (``steps`` may be raised)."""
    from ..train.runfolder import RunFolder

    if resume:
        cfg = RunFolder.open(out).config
        if cfg.get("method") != name:
            raise UserError(f"{out} is a '{cfg.get('method')}' run, not '{name}'")
        if overrides and overrides.get("steps"):
            cfg["steps"] = int(overrides["steps"])
    else:
        cfg = resolve(name, overrides, config_file)
    from ..train.job import run_job

    return run_job(get(name), cfg, out, resume=resume, progress=progress)
