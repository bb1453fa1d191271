"""Small file helpers for every layer: atomic writes, JSON, plain safetensors model files.

Every file is written atomically (temp file in the same folder, fsync, ``os.replace``):
readers see the old file or the new one, never a partial one. Model files are a
``<name>.safetensors`` (tensors only, never pickle) next to a ``<name>.json`` (meta).
Training states (checkpoint folders, RNG, optimizers) build on these in
:mod:`fewstep.train.checkpoint`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from .errors import UserError

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "json_default", "write_json", "read_json",
           "save_checkpoint", "load_weights"]


# ------------------------------------------------------------------ atomic file writes
def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, fsync it, rename onto ``path``.

    Readers see the old file or the new one, never a partial one; on any error
    (KeyboardInterrupt included) the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: paths, numpy scalars/arrays, torch dtypes/devices."""
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or unreadable file raises UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}; check the path or the run folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read JSON file {path} ({e}); it is corrupt or "
                        "truncated: restore it or use another checkpoint") from None


# ------------------------------------------------------------- tensors <-> safetensors
def _plain_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors with no shared storage (safetensors needs that)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint entry '{key}' is {type(t).__name__}, not a Tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_checkpoint(path_dir: str | Path, tensors: Mapping[str, Tensor], meta: dict,
                    name: str = "weights") -> Path:
    """Write ``<path_dir>/<name>.safetensors`` and ``<name>.json`` atomically.

    Returns the path of the ``.safetensors`` file.
    """
    folder = Path(path_dir)
    folder.mkdir(parents=True, exist_ok=True)
    plain = _plain_tensors(tensors)
    target = folder / f"{name}.safetensors"
    atomic_write(target, lambda tmp: safetensors.torch.save_file(plain, str(tmp)))
    write_json(folder / f"{name}.json", meta)
    return target


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file into a dict of CPU tensors.

    A missing, truncated or corrupt file raises UserError naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}; check the path (a checkpoint "
                        "folder holds <name>.safetensors files)")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError...
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"cannot read weights file {path} ({type(e).__name__}: {msg}); "
                        "it is corrupt or truncated: restore it or use another "
                        "checkpoint") from None


def cache_dir() -> Path:
    """Where derived files are cached (trained feature classifiers, synthesised speech):
    ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``."""
    return Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep")
