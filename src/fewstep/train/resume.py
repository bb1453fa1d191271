"""``--resume`` with the same command: the options given are checked against the stored run.

Users of accelerate, k-diffusion and diffusers' scripts continue an interrupted run by
repeating its command and adding ``--resume``, so ``fewstep train ... --out R --resume`` and
``fewstep distill METHOD ... --out R --resume`` take the same options as the run that made
``R``. Each option given (on the command line or in a ``--config`` file) is validated as for a
new run, then compared with ``R/config.json``:

* equal to the stored value: fine (the same command continues the run);
* different, and one of :data:`SAFE_ON_RESUME`: the new value is used from the resumed step
  on and recorded in ``config.json``;
* different otherwise: refused, one line naming each such option with the given and the
  stored value. Options not given keep their stored values.

What may change on resume, and why (nothing here is restored from a checkpoint or shapes
what the checkpoint holds):

==================  =====================================================================
``steps``           the length of the run: extend it, or stop earlier (not below the step
                    of the latest checkpoint). Consistency curricula that scale with the
                    total steps follow the new total from the resumed step on.
``lr``, ``warmup``  the learning-rate schedule is recomputed every step from these (AdamW's
                    moments do not depend on it): "lower --lr, then --resume" after a
                    diverging loss
``grad_clip``       applied each step, no state
``log_every``,      bookkeeping
``checkpoint_every``,
``keep_checkpoints``
``device``,         where and how the run computes (a run moved to another machine; the
``mixed_precision`` checkpoint holds CPU tensors)
==================  =====================================================================

Everything else is refused when it differs: the data, process, prediction, network, batch
size and seed (the stream of batches), ``weight_decay`` and ``ema_decay`` (AdamW's parameter
groups and the EMA come back from the checkpoint, so a new value would be ignored or mix two
runs), every family and method option (pairs, rounds, curricula, ...).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import UserError
from .checkpoint import checkpoint_steps

SAFE_ON_RESUME: tuple[str, ...] = ("steps", "lr", "warmup", "grad_clip", "log_every", "checkpoint_every",
                                   "keep_checkpoints", "device", "mixed_precision")


def _plain(v: Any) -> Any:
    """A value as JSON sees it (tuples as lists, numpy scalars as numbers)."""
    from ..io import json_default

    try:
        return json.loads(json.dumps(v, default=json_default))
    except (TypeError, ValueError):
        return v


def _as_net(v: Any) -> Optional[dict]:
    """A net option (a dict, JSON text or a .json file) as a dict, or None."""
    if isinstance(v, dict):
        return v
    if isinstance(v, str):
        try:
            return json.loads(Path(v).read_text() if v.endswith(".json") else v)
        except (OSError, ValueError):
            return None
    return None


def _built(cfg: dict) -> Optional[dict]:
    """The config a net built from ``cfg`` reports (every option spelled out, as a run stores
    it), built on the meta device (no memory, no random draws); None if it does not build."""
    import torch

    from ..nets import build_net

    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return getattr(build_net(cfg), "config", None)
    except Exception:  # not a net config this version builds: compared as given
        return None


def _same_net(given: Any, stored: Any) -> bool:
    """Equal net configs: a stored config is the built net's (every option spelled out), a
    given one may leave out options at their defaults."""
    a, b = _as_net(given), _as_net(stored)
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    full_a, full_b = _built(a), _built(b)
    return full_a is not None and _plain(full_a) == _plain(full_b if full_b is not None else b)


def _same_path(given: Any, stored: Any) -> bool:
    """Two specs naming the same existing file or folder (``gmm:a.npz`` and ``gmm:./a.npz``)."""
    if not (isinstance(given, str) and isinstance(stored, str)):
        return False

    def split(s):
        head, sep, tail = s.partition(":")
        return (head, tail) if sep and head.isalpha() and len(head) > 1 else ("", s)

    (ha, pa), (hb, pb) = split(given), split(stored)
    try:
        return ha == hb and os.path.exists(pa) and os.path.exists(pb) and os.path.samefile(pa, pb)
    except OSError:
        return False


def same(key: str, given: Any, stored: Any) -> bool:
    """Is the given value of option ``key`` the one the run was started with?"""
    if _plain(given) == _plain(stored):
        return True
    if key == "net":
        return _same_net(given, stored)
    return _same_path(given, stored)


def _show(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(_plain(v), default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def merge(out: str | Path, stored: dict, fresh: dict, given: Iterable[str], defaults: dict,
          file: Optional[str] = None, file_keys: Iterable[str] = ()) -> dict:
    """The config of a resumed run: ``stored`` with the given options that may change
    (:data:`SAFE_ON_RESUME`) taken from ``fresh`` (the given options, validated and normalised
    as for a new run); a differing option of any other kind is refused, all of them in one line.
    ``defaults`` stands in for options an older run folder does not store."""
    from_file = set(file_keys)
    cfg, conflicts = dict(stored), []
    for key in given:
        if key == "method" or key not in fresh:
            continue
        new, old = fresh[key], stored.get(key, defaults.get(key))
        if same(key, new, old):
            continue
        if key in SAFE_ON_RESUME:
            cfg[key] = new
            continue
        name = f'"{key}" in {file}' if key in from_file and file else "--" + key.replace("_", "-")
        conflicts.append(f"{name} {_show(new)} (stored {_show(old)})")
    done = checkpoint_steps(out)
    if done and int(cfg.get("steps", done[-1])) < done[-1]:  # checked here too, so nothing is changed
        raise UserError(f"--steps {cfg['steps']} is below step {done[-1]} of the latest checkpoint in {out}; "
                        f"give --steps {done[-1]} or more")
    if conflicts:
        safe = ", ".join("--" + k.replace("_", "-") for k in SAFE_ON_RESUME)
        raise UserError(f"cannot --resume {out} with settings other than it was started with: "
                        f"{'; '.join(conflicts)}; leave them out (the stored values are kept) or choose another "
                        f"--out for a new run (what may change on resume: {safe})")
    return cfg


def stored_config(out: str | Path) -> dict:
    """The config.json of run folder ``out`` (one line when it is not a run folder)."""
    from .runfolder import CONFIG, RunFolder

    if not (Path(out) / CONFIG).is_file():
        raise UserError(f"cannot resume: {out} has no {CONFIG}, so it is not a fewstep run folder; run without "
                        "--resume to start one")
    return RunFolder.open(out).config


def given_options(overrides: Optional[dict], file: Optional[str]) -> tuple[dict, dict]:
    """(options given on the command line, those of the ``--config`` file)."""
    from .config import read_config_file

    from_file = read_config_file(file) if file else {}
    return {k: v for k, v in (overrides or {}).items() if v is not None}, from_file


def train_config(overrides: Optional[dict], out: str | Path, file: Optional[str] = None) -> dict:
    """``fewstep train --resume``: the stored config of ``out`` with the given options merged
    (:func:`merge`); the given ones are validated first, as for a new run."""
    from ..families import get
    from .config import TRAIN_DEFAULTS, resolve
    from .lock import check_free

    given, from_file = given_options(overrides, file)
    stored = stored_config(out) if (Path(out) / "config.json").is_file() else None
    family = {**from_file, **given}.get("family", (stored or {}).get("family", "diffusion"))
    fresh = resolve({**given, "family": family}, file)  # validated like a new run (one line per mistake)
    if stored is None:
        stored = stored_config(out)
    check_free(out)
    defaults = dict(TRAIN_DEFAULTS)
    if family != "diffusion":
        defaults.update(get(family).DEFAULTS)
    keys = list(dict.fromkeys([*from_file, *given]))
    return merge(out, stored, fresh, keys, defaults, file, set(from_file) - set(given))


__all__ = ["SAFE_ON_RESUME", "given_options", "merge", "same", "stored_config", "train_config"]
