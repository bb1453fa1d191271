"""Checkpoints: tensors in safetensors, everything else in JSON; never pickle.

A training state is one folder ``<run>/checkpoints/step_<step:08d>/``::

    <module>.safetensors  <module>.json      weights of each nn.Module (or EMA shadow)
    <opt>.optimizer.safetensors  .json       optimizer tensors + the rest of its state_dict
    state.safetensors  state.json            step, RNG states, ``extra``

It is built in a hidden temporary folder and renamed into place, then the ``latest``
pointer file is replaced atomically, so a crash never leaves a half-written checkpoint.
Every single file is also written atomically (temp file in the same folder, fsync,
``os.replace``). Non-tensor structure (an optimizer's state_dict, ``extra``) is stored as
a JSON tree in which each tensor is replaced by ``{"__tensor__": key}``, ints-keyed dicts
by ``{"__dict__": [[k, v], ...]}`` and tuples by ``{"__tuple__": [...]}``.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from fewstep.errors import UserError
from fewstep.train.ema import EMA

# the file helpers live in fewstep.io; re-exported here for importers not yet moved
from ..io import (atomic_write, atomic_write_text, fsync_dir, json_default, load_weights,  # noqa: F401
                  read_json, save_checkpoint, write_json)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state"
_STEP_DIR = re.compile(r"step_(\d{8,})")
_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_MARKERS = {"__tensor__", "__tuple__", "__dict__"}


# -------------------------------------------------------- JSON trees holding tensors
def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def encode_tree(obj: Any, tensors: dict[str, Tensor], path: str = "") -> Any:
    """Make ``obj`` JSON-friendly: tensors go into ``tensors`` (key = their path) and
    are replaced by ``{"__tensor__": key}``; non-str-keyed dicts and tuples are tagged.
    Anything else that is not JSON (an arbitrary object) raises TypeError: no pickle."""
    if isinstance(obj, Tensor):
        key = path or "tensor"
        if key in tensors:
            key = f"{key}#{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not _MARKERS & obj.keys():
            return {k: encode_tree(v, tensors, _join(path, k)) for k, v in obj.items()}
        for k in obj:
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise TypeError(f"cannot store dict key {k!r} at '{path}' in a checkpoint")
        return {"__dict__": [[k, encode_tree(v, tensors, _join(path, k))]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, _join(path, i))
                              for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, _join(path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{path or '<root>'}' in a "
                    "checkpoint (only tensors and JSON values; fewstep never pickles)")


def decode_tree(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: decode_tree(v, tensors) for k, v in obj["__dict__"]}
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


# ------------------------------------------------------------------------ RNG states
def _rng_state(tensors: dict[str, Tensor]) -> dict:
    """Torch CPU (and CUDA) generator states into ``tensors``; numpy/python as JSON."""
    tensors["rng.torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
            n_cuda += 1
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    return {"cuda_devices": n_cuda,
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}


def _set_rng_state(meta: dict, tensors: Mapping[str, Tensor]) -> None:
    """Restore what :func:`_rng_state` saved (CUDA only where devices are present)."""
    torch.set_rng_state(tensors["rng.torch"])
    n_cuda = int(meta.get("cuda_devices", 0))
    if n_cuda and torch.cuda.is_available():
        for i in range(min(n_cuda, torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------- training state
def _check_names(names: list[str]) -> None:
    for n in names:
        if not _NAME.fullmatch(n) or n == STATE:
            raise ValueError(f"checkpoint part name {n!r}: use letters, digits, _ or - "
                             f"(not '{STATE}')")
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint part names repeat: {names}")


def _save_module(folder: Path, name: str, obj: nn.Module | EMA) -> None:
    if isinstance(obj, EMA):
        meta = {"kind": "ema", "class": type(obj.module).__name__,
                "num_updates": obj.num_updates}
        save_checkpoint(folder, obj.module.state_dict(), meta, name)
    else:
        save_checkpoint(folder, obj.state_dict(),
                        {"kind": "module", "class": type(obj).__name__}, name)


def _save_optimizer(folder: Path, name: str, opt: torch.optim.Optimizer) -> None:
    tensors: dict[str, Tensor] = {}
    tree = encode_tree(opt.state_dict(), tensors)
    meta = {"kind": "optimizer", "class": type(opt).__name__, "state_dict": tree}
    save_checkpoint(folder, tensors, meta, f"{name}.optimizer")


def _write_state(folder: Path, step: int, modules: Mapping, optimizers: Mapping,
                 extra: dict) -> None:
    for name, obj in modules.items():
        _save_module(folder, name, obj)
    for name, opt in optimizers.items():
        _save_optimizer(folder, name, opt)
    tensors: dict[str, Tensor] = {}
    meta = {"kind": STATE, "step": int(step), "modules": list(modules),
            "optimizers": list(optimizers), "rng": _rng_state(tensors),
            "extra": encode_tree(extra, tensors, "extra")}
    save_checkpoint(folder, tensors, meta, STATE)


def _pid_alive(pid: int) -> bool:
    """True while process ``pid`` of this machine exists (signal 0 probes, sends nothing)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # 0 and negative pids name process groups, not a process
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except (PermissionError, OSError):
        return True
    return True


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename folder ``src`` to ``dst``, replacing an existing ``dst``."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


def _step_dirs(ckdir: Path) -> list[Path]:
    """Complete checkpoint folders in ``ckdir``, by increasing step."""
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / f"{STATE}.json").is_file()]
    return [p for _, p in sorted(found)]


def _prune(ckdir: Path, keep: int | None, current: Path) -> None:
    """Keep the newest ``keep`` checkpoints (and ``current``); drop stale temp folders."""
    for p in ckdir.iterdir():
        m = re.fullmatch(r"\..*\.(?:tmp|old)-(\d+)", p.name)
        if m and p.is_dir() and int(m.group(1)) != os.getpid() and not _pid_alive(
                int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
    if keep is None:
        return
    for p in _step_dirs(ckdir)[:-max(int(keep), 1)]:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)


def save_state(folder: str | Path, step: int, modules: Mapping[str, nn.Module | EMA],
               optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
               extra: dict | None = None, keep: int | None = None) -> Path:
    """Save a resumable training state to ``folder/checkpoints/step_{step:08d}/``.

    ``modules``: name -> nn.Module or :class:`EMA` (its shadow weights + num_updates);
    ``optimizers``: name -> optimizer; ``extra``: JSON values and tensors (e.g. a data
    iterator position). RNG states (torch CPU/CUDA, numpy, python) are saved too. The
    folder is built under a temp name, renamed into place, then ``latest`` is updated
    atomically; ``keep`` keeps only the newest ``keep`` checkpoints. Returns the folder.
    """
    modules, optimizers = dict(modules), dict(optimizers or {})
    _check_names(list(modules) + list(optimizers))
    ckdir = Path(folder) / CHECKPOINTS
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{int(step):08d}"
    tmp = ckdir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_state(tmp, step, modules, optimizers, dict(extra or {}))
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckdir / LATEST, final.name + "\n")
    _prune(ckdir, keep, final)
    return final


def _inside(path: Path, root: Path) -> bool:
    """True when ``path`` (symlinks followed) lies inside folder ``root``."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top and real != top


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint folder of run ``folder``, or None.

    Follows the ``latest`` pointer; if it is missing or stale, takes the highest step. A
    pointer (or a step folder) that leads outside ``folder/checkpoints/`` (``../../other/...``,
    a symlink into another run) is refused with one line, never used: resuming from another
    run's state would silently train the wrong thing.
    """
    ckdir = Path(folder) / CHECKPOINTS
    pointer = ckdir / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if name and (not _STEP_DIR.fullmatch(name) or not _inside(ckdir / name, ckdir)):
            raise UserError(f"{pointer} points outside its run folder ({name[:120]!r} is not a step_* folder of "
                            f"{ckdir}), so it is not used: delete it (the newest step_* folder there is then "
                            "used) or restore it")
        if name and (ckdir / name / f"{STATE}.json").is_file():
            return ckdir / name
    steps = _step_dirs(ckdir)
    if steps and not _inside(steps[-1], ckdir):
        raise UserError(f"checkpoint {steps[-1]} leads outside its run folder (a link to "
                        f"{os.path.realpath(steps[-1])}); remove it or copy the checkpoint into {ckdir}")
    return steps[-1] if steps else None


def checkpoint_steps(folder: str | Path) -> list[int]:
    """The steps of the complete checkpoints of run ``folder``, increasing."""
    return [int(_STEP_DIR.fullmatch(p.name).group(1)) for p in _step_dirs(Path(folder) / CHECKPOINTS)]


def prune(folder: str | Path, keep: int | None) -> None:
    """Keep only the newest ``keep`` checkpoints of run ``folder`` (None: all)."""
    ckdir = Path(folder) / CHECKPOINTS
    if keep is not None and ckdir.is_dir():
        steps = _step_dirs(ckdir)
        _prune(ckdir, keep, steps[-1] if steps else ckdir)


def drop_from(folder: str | Path, step: int) -> int | None:
    """Remove the checkpoints of run ``folder`` at ``step`` and later (a diverged run's: their
    weights gave a NaN loss), point ``latest`` at the newest one left; return its step or None."""
    ckdir = Path(folder) / CHECKPOINTS
    left = None
    for p in _step_dirs(ckdir):
        s = int(_STEP_DIR.fullmatch(p.name).group(1))
        if s >= int(step):
            shutil.rmtree(p, ignore_errors=True)
        else:
            left = (s, p)
    if left is not None:
        atomic_write_text(ckdir / LATEST, left[1].name + "\n")
        return left[0]
    if ckdir.is_dir():  # none left: no checkpoints/ at all (a run that holds nothing worth resuming)
        (ckdir / LATEST).unlink(missing_ok=True)
        try:
            ckdir.rmdir()
        except OSError:
            pass
    return None


def _resolve(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest checkpoint of a run folder."""
    path = Path(path)
    if (path / f"{STATE}.json").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(f"no checkpoint found in {path}; pass a run folder with a "
                        f"'{CHECKPOINTS}/' subfolder or a checkpoint step_* folder")
    return found


def _brief(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _load_module(ck: Path, name: str, obj: nn.Module | EMA) -> None:
    path = ck / f"{name}.safetensors"
    if not path.is_file():
        raise UserError(f"checkpoint {ck} has no weights '{name}' ({path.name} missing); "
                        "it was saved with other module names")
    weights = load_weights(path)
    try:
        if isinstance(obj, EMA):
            meta = read_json(ck / f"{name}.json")
            obj.load_state_dict({"module": weights,
                                 "num_updates": meta.get("num_updates", 0)})
        else:
            obj.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"weights {path} do not fit module '{name}': {_brief(e)}; use "
                        "the configuration the run was saved with") from None


def _load_optimizer(ck: Path, name: str, opt: torch.optim.Optimizer) -> None:
    path = ck / f"{name}.optimizer.safetensors"
    meta = read_json(ck / f"{name}.optimizer.json")
    state = decode_tree(meta["state_dict"], load_weights(path))
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"optimizer state {path} does not fit optimizer '{name}': "
                        f"{_brief(e)}; use the configuration the run was saved with"
                        ) from None


def load_state(folder: str | Path, modules: Mapping[str, nn.Module | EMA],
               optimizers: Mapping[str, torch.optim.Optimizer] | None = None) -> dict:
    """Restore modules, optimizers and RNG states saved by :func:`save_state`.

    ``folder``: a run folder (its latest checkpoint is used) or a ``step_*`` folder.
    Returns the saved ``extra`` dict with ``"step"`` set to the checkpoint's step.
    Continuing after this is bit-identical to never having stopped (on CPU).
    """
    ck = _resolve(folder)
    meta = read_json(ck / f"{STATE}.json")
    if not isinstance(meta, dict) or meta.get("kind") != STATE:
        raise UserError(f"{ck / (STATE + '.json')} is not a fewstep training state")
    try:
        tensors = load_weights(ck / f"{STATE}.safetensors")
        for name, obj in modules.items():
            _load_module(ck, name, obj)
        for name, opt in (optimizers or {}).items():
            _load_optimizer(ck, name, opt)
        _set_rng_state(meta["rng"], tensors)
        extra = decode_tree(meta["extra"], tensors)
        return {**extra, "step": int(meta["step"])}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a field missing or of a wrong type
        what = f"missing {e}" if isinstance(e, KeyError) else _brief(e)
        raise UserError(f"checkpoint {ck} is damaged or incomplete ({what}); delete that folder to resume from "
                        "the checkpoint before it, or start anew with another --out") from None
