"""Teacher-training configuration: defaults, merging, validation (JSON in, JSON out)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..process import PROCESS_ALIASES  # noqa: F401  (defined in fewstep.process)
from .options import loop_defaults, validate_loop

# the loop options are declared once, in fewstep.train.options (shared with fewstep distill);
# teachers keep their own learning rate, so existing teachers train as they always have
TRAIN_LOOP_OVERRIDES: dict[str, Any] = {"lr": 2e-3}

TRAIN_DEFAULTS: dict[str, Any] = {
    "family": "diffusion",   # diffusion | arm | ebm | sm | ncsn (fewstep.families)
    "data": "moons",
    "n_data": None,          # None: the dataset's default size
    "process": "edm",        # vp | vp_cosine | vp_discrete | ve | edm | flow, or a process config dict
    "prediction": "edm",     # eps | x0 | v | score | flow | edm (EDM preconditioning)
    "weighting": "simple",   # see fewstep.train.losses.WEIGHTINGS
    "sigma_data": 0.5,
    "net": None,             # None: a default for the data, or {"kind": ..., **options}
    "conditional": False,    # class-conditional (when the data has labels)
    "label_dropout": 0.1,    # classifier-free guidance: null-label probability (conditional only)
    **loop_defaults(TRAIN_LOOP_OVERRIDES),  # steps, batch_size, lr, ... (fewstep.train.options)
    "eval_samples": 2000,    # samples for the final quality number (points); images use 256
    "eval_nfe": 100,
}


def read_config_file(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config file {p} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"config file {p} must hold a JSON object")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}  # "_about" etc. are comments


# options of the diffusion teacher only: refused beside another --family (they would be ignored)
DIFFUSION_ONLY = ("process", "prediction", "weighting", "sigma_data", "conditional", "label_dropout")


def resolve(overrides: Optional[dict] = None, file: Optional[str] = None) -> dict:
    """Defaults <- config file <- explicit overrides (None values are ignored), validated.

    A ``family`` other than ``diffusion`` adds its module's ``DEFAULTS`` (its own options)
    and refuses the diffusion teacher's (:data:`DIFFUSION_ONLY`); its evaluation NFE
    defaults to the family's own sampling cost (``eval_nfe`` None)."""
    from ..families import FAMILIES, get

    cfg = dict(TRAIN_DEFAULTS)
    from_file = read_config_file(file) if file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    chosen = {**from_file, **given}
    family = chosen.get("family", "diffusion")
    if not isinstance(family, str) or family not in FAMILIES:
        raise UserError(f"--family {family!r}: choose one of {', '.join(FAMILIES)}")
    valid = dict(TRAIN_DEFAULTS)
    if family != "diffusion":
        valid.update(get(family).DEFAULTS)
        cfg.update(get(family).DEFAULTS)
        cfg["eval_nfe"] = None
        wrong = [k for k in DIFFUSION_ONLY if k in chosen]
        if wrong:
            raise UserError(f"--{wrong[0].replace('_', '-')} is an option of the diffusion teacher, not of "
                            f"--family {family}; drop it (or train --family diffusion)")
    cfg.update(from_file)
    cfg.update(given)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        others = [f for f in FAMILIES if f not in ("diffusion", family)
                  and any(k in get(f).DEFAULTS for k in unknown)]
        hint = f" (an option of --family {others[0]})" if others else ""
        raise UserError(f"unknown training option(s) {', '.join(unknown)}{hint}; valid: {', '.join(valid)}")
    return validate_loop(cfg, file, set(from_file) - set(given))
