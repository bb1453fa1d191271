"""Teacher-training configuration: defaults, merging, validation (JSON in, JSON out)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..process import PROCESS_ALIASES  # noqa: F401  (defined in fewstep.process)
from .options import LOOP_OPTIONS, Option, check_net, loop_defaults, validate

# the loop options are declared once, in fewstep.train.options (shared with fewstep distill);
# teachers keep their own learning rate, so existing teachers train as they always have
TRAIN_LOOP_OVERRIDES: dict[str, Any] = {"lr": 2e-3}

# the teacher's own options (the loop's are LOOP_OPTIONS): type, range, default and help, once
TRAIN_OPTIONS: tuple[Option, ...] = (
    Option("family", str, "diffusion", "model family: diffusion, arm, ebm, sm or ncsn (fewstep.families)"),
    Option("data", str, "moons", "dataset spec (a name, mnist:DIR, a .npy/.npz file, ...) or gmm:FILE.npz"),
    Option("n_data", int, None, "number of training samples", low=1, none="the dataset's default size"),
    Option("process", (str, dict), "edm", "noise process: vp, vp_cosine, vp_discrete, ve, edm, flow, or a process "
           "config object", must="a process name (vp, vp_cosine, vp_discrete, ve, edm, flow) or a process config "
           "object"),
    Option("prediction", str, "edm", "network parametrization: eps, x0, v, score, flow or edm (EDM preconditioning)"),
    Option("weighting", str, "simple", "loss weighting (fewstep.train.losses.WEIGHTINGS)"),
    Option("sigma_data", float, 0.5, "standard deviation of the data (EDM preconditioning)", low=0.0, above=True,
           cli=False),
    Option("net", dict, None, "network config {\"kind\": ..., **options}", none="a default for the data", cli=False,
           must="a JSON object such as {\"kind\": \"mlp\", \"hidden\": 128}, or null"),
    Option("conditional", bool, False, "class-conditional (when the data has labels)"),
    Option("label_dropout", float, 0.1, "classifier-free guidance: null-label probability (conditional only)",
           low=0.0, high=1.0),
    Option("eval_samples", int, 2000, "samples for the final quality number (points); images use 256", low=1,
           cli=False),
    Option("eval_nfe", int, 100, "evaluations of the final quality number's Euler sampler", low=1,
           none="the family's own sampling cost", cli=False),
)

TRAIN_DEFAULTS: dict[str, Any] = {
    **{o.name: o.default for o in TRAIN_OPTIONS[:10]},
    **loop_defaults(TRAIN_LOOP_OVERRIDES),  # steps, batch_size, lr, ... (fewstep.train.options)
    **{o.name: o.default for o in TRAIN_OPTIONS[10:]},
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
        where = f'config file {file}: "family"' if "family" in from_file and "family" not in given else "--family"
        raise UserError(f"{where} {family!r}: choose one of {', '.join(FAMILIES)}")
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
    file_keys = set(from_file) - set(given)
    validate(cfg, TRAIN_OPTIONS + LOOP_OPTIONS, file, file_keys)
    text = str(cfg.get("data", "")).startswith("captions:")  # captioned images drop their prompts
    if "label_dropout" in chosen and not cfg.get("conditional") and not text and float(cfg["label_dropout"]) != 0.0:
        where = f'config file {file}: "label_dropout"' if "label_dropout" in file_keys else "--label-dropout"
        raise UserError(f"{where} {cfg['label_dropout']}: the teacher is unconditional (no --conditional), so it has "
                        f"no labels to drop; add --conditional or leave it out")
    if cfg.get("net") is not None:
        check_net(cfg["net"], f'config file {file}: "net"' if "net" in file_keys else '"net"')
    return cfg
