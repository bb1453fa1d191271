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


def resolve(overrides: Optional[dict] = None, file: Optional[str] = None) -> dict:
    """Defaults <- config file <- explicit overrides (None values are ignored), validated."""
    cfg = dict(TRAIN_DEFAULTS)
    from_file = read_config_file(file) if file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg.update(from_file)
    cfg.update(given)
    unknown = sorted(set(cfg) - set(TRAIN_DEFAULTS))
    if unknown:
        raise UserError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(TRAIN_DEFAULTS)}")
    return validate_loop(cfg, file, set(from_file) - set(given))
