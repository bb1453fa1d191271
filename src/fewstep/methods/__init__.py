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
    shortcut     Frans et al. 2024: one flow net s(x, t, d) also given the step d (flow matching + self-consistency)
    meanflow     Geng et al. 2025: average velocity u(z, r, t) by the MeanFlow identity (JVP); 1- and k-step rule
    dmd2         Yin et al. 2024: a generator by distribution matching against an online fake score (TTUR, GAN head)
    sid          Zhou et al. 2024: a data-free one-step generator by the score-identity loss, fake score alternately
    ctm          Kim et al. 2023: the anytime-to-anytime jump G(x_t, t, s) by soft consistency matching + DSM; gamma-sampling
    scm          Lu & Song 2024: TrigFlow continuous-time consistency (sCD / sCT), JVP tangent, adaptive weighting
    flow_matching Albergo & Vanden-Eijnden 2022 / Lipman et al. 2023 / Tong et al. 2023: interpolant paths, OT / SB couplings
    min_curvature Lee, Kim & Ye 2023: a learned noise encoder q(z|x0) trained with the flow for low-curvature couplings
    operator     Zheng et al. 2022 (DFNO): x_T -> the teacher's trajectory at K levels in one pass (temporal Fourier layers)
    mmd_ddm      Aiello et al. 2023: the teacher fine-tuned for a fixed few-step sampler by MMD to data
    sft          Fan & Lee 2023: a few-step stochastic sampler fine-tuned against an IPM critic (policy gradient)
    covariance   Bao et al. 2022a: SN-/NPR-DPM heads of diag Cov[x0|y] beside the teacher, for DDPM/DDIM's optimal variance
    discriminator Kim et al. 2022: a time-dependent discriminator (data vs the teacher's samples) for discriminator guidance
    cfd          Sun et al. 2022: progressive rounds whose loss aligns classifier features of student and two-step teacher
    lcm          Luo et al. 2023: latent consistency distillation, w as the student's input, skipping-step DDIM; LCM-LoRA
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


def options(name: str) -> tuple:
    """Every option of method ``name`` (:class:`fewstep.train.options.Option`): the shared ones
    (:data:`fewstep.methods.common.COMMON_OPTIONS`), the loop's (with the method's
    ``COMMON_OVERRIDES`` as defaults) and the method's own ``OPTIONS``."""
    import dataclasses

    from ..train.options import LOOP_OPTIONS
    from .common import COMMON_OPTIONS

    mod = get(name)
    over = getattr(mod, "COMMON_OVERRIDES", {})
    loop = tuple(dataclasses.replace(o, default=over[o.name]) if o.name in over else o for o in LOOP_OPTIONS)
    return COMMON_OPTIONS + loop + tuple(getattr(mod, "OPTIONS", ()))


def resolve(name: str, overrides: Optional[dict] = None, file: Optional[str] = None) -> dict:
    """Defaults <- config file <- explicit overrides (None values ignored), validated before
    anything is written: every value by its option's rule (:func:`options`, one line naming
    the option, and the file for a config file's value), the student's ``net`` config, then
    the rules between options (the method module's ``check_options``)."""
    from ..train.config import read_config_file
    from ..train.options import check_net, validate

    cfg = defaults(name)
    from_file = read_config_file(file) if file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg.update(from_file)
    cfg.update(given)
    unknown = sorted(set(cfg) - set(defaults(name)) - {"method"})
    if unknown:
        raise UserError(f"unknown option(s) for '{name}': {', '.join(unknown)}; valid: {', '.join(defaults(name))}")
    file_keys = set(from_file) - set(given)
    validate(cfg, options(name), file, file_keys)
    if cfg.get("net") is not None:
        check_net(cfg["net"], f'config file {file}: "net"' if "net" in file_keys else "--net")
    check = getattr(get(name), "check_options", None)
    if check is not None:
        check(cfg)
    cfg["method"] = name
    return cfg


def distill(name: str, overrides: Optional[dict] = None, out: str = "runs/student", config_file: Optional[str] = None,
            resume: bool = False, progress: bool = True) -> str:
    """``fewstep distill NAME``: train a student into run folder ``out``; returns its path.

    With ``resume`` the stored config of ``out`` is used: the options given may repeat it (the
    same command plus ``--resume``); those that differ must be ones that may change on resume
    (``--steps``, ``--lr``, ...: :mod:`fewstep.train.resume`), others are refused."""
    if resume:
        cfg = _resume_config(name, overrides, out, config_file)
    else:
        from ..train.lock import check_free

        check_free(out)  # a folder another process writes: that first, not "exists and is not empty"
        cfg = resolve(name, overrides, config_file)
    from ..train.job import run_job

    return run_job(get(name), cfg, out, resume=resume, progress=progress)


def _resume_config(name: str, overrides: Optional[dict], out: str, config_file: Optional[str]) -> dict:
    """The stored config of run ``out`` with the given options merged
    (:func:`fewstep.train.resume.merge`); the given ones are validated first, as for a new run."""
    from ..train.lock import check_free
    from ..train.resume import given_options, merge, stored_config

    given, from_file = given_options(overrides, config_file)
    fresh = resolve(name, overrides, config_file)  # one line per mistake, as for a new run
    stored = stored_config(out)
    if stored.get("method") != name:
        what = f"a '{stored['method']}' run" if stored.get("method") else "not a distillation run"
        hint = f"fewstep distill {stored['method']} --resume" if stored.get("method") else "fewstep train --resume"
        raise UserError(f"{out} is {what}, not '{name}'; continue it with {hint}")
    check_free(out)
    keys = list(dict.fromkeys([*from_file, *given]))
    return merge(out, stored, fresh, keys, defaults(name), config_file, set(from_file) - set(given))
