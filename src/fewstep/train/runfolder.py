"""The run folder: one folder per job holding config, metrics and checkpoints.

    <out>/config.json        the resolved configuration
    <out>/metrics.jsonl      one JSON object per line: {"step": ..., name: value, ...}
    <out>/checkpoints/       see :mod:`fewstep.train.checkpoint`

A new run that fails before its first checkpoint leaves nothing behind: use the folder
as a context manager (or call :meth:`RunFolder.abort`) and it removes itself on any
exception, KeyboardInterrupt included, until :meth:`RunFolder.commit` (done by
:meth:`RunFolder.save`). After that the folder stays and can be resumed. Only the main
process of a multi-process job should create and write the run folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from fewstep.errors import UserError
from fewstep.io import atomic_write_text, json_default, read_json, write_json
from fewstep.train.checkpoint import latest_checkpoint, load_state, save_state
from fewstep.train.ema import EMA

CONFIG = "config.json"
METRICS = "metrics.jsonl"


def _scalar(v: Any) -> Any:
    """A logged value as a JSON value (tensors and numpy values -> numbers or lists)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    return v


def _first_missing_ancestor(path: Path) -> Path | None:
    """The top-most folder that ``mkdir(parents=True)`` on ``path`` would create."""
    top = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        top = p
    return top


def run_kind(config: dict) -> str:
    """What made a run folder, from its config: ``"teacher"`` (fewstep train) or the method."""
    method = config.get("method") if isinstance(config, dict) else None
    return str(method) if method else "teacher"


def _kind_text(kind: str) -> str:
    if kind == "autoencoder":
        return "autoencoder run (fewstep train-autoencoder)"
    return "teacher run (fewstep train)" if kind == "teacher" else f"'{kind}' distillation run"


def _writable(folder: Path) -> bool:
    """Can files be created in ``folder``? (Tried: permissions, read-only mounts and immutable
    folders all refuse, even for root; the probe is removed at once.)"""
    import os
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fewstep-probe-", dir=folder))
    except OSError:
        return False
    return True


def check_output(out: str | Path, flag: str = "--out", file: bool = False, kind: str | None = None,
                 allow=None) -> Path:
    """Refuse, before any work starts, an output path that cannot be written, one UserError
    line each: a file where a folder is needed (or, ``file``, a folder where a file is); a
    parent that is a file; a folder that cannot be written (permissions, a read-only mount,
    an immutable folder); and for a folder that is not empty: unless ``allow(path)`` accepts
    it, refused, naming the run it holds (``kind``: the run being started, ``"teacher"`` or a
    method, says whether ``--resume`` would continue it). Returns ``Path(out)``.

    Every command that writes calls it first (train, distill, sample, bench, schedule,
    export, demo); :meth:`RunFolder.create` calls it for a new run."""
    root = Path(out)
    if file:
        if root.is_dir():
            raise UserError(f"{flag} {root} is a folder; give a file path for {flag}")
    elif root.exists() and not root.is_dir():
        raise UserError(f"{flag} {root} is a file; choose a folder path for {flag}")
    elif root.is_dir() and any(root.iterdir()) and not (allow is not None and allow(root)):
        from .lock import check_free

        check_free(root)  # a folder another process writes: that first, not "exists and is not empty"
        stored = None
        if (root / CONFIG).is_file():
            try:
                stored = run_kind(read_json(root / CONFIG))
            except UserError:
                stored = None
        if stored is None:
            why = "; choose another --out (or empty it)"
        elif kind is None:  # not a command that runs in a run folder (bench, export)
            why = f": it holds a {_kind_text(stored)}; choose another {flag}"
        elif stored != kind:
            why = f": it holds a {_kind_text(stored)}, not a {_kind_text(kind)}; choose another {flag}"
        else:
            why = "; pass --resume to continue it or choose another --out"
        raise UserError(f"output folder {root} exists and is not empty{why}")
    anchor = root.parent if file else root
    for p in [anchor, *anchor.parents]:
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{flag} {root}: {p} is a file, not a folder; choose another {flag}")
            if not _writable(p):
                raise UserError(f"{flag} {root}: the folder {p} is not writable (permissions, a read-only file "
                                f"system or an immutable folder); choose another {flag}")
            break
    return root


class RunFolder:
    """A run folder; make one with :meth:`create` or :meth:`open`."""

    def __init__(self, root: Path, config: dict, committed: bool,
                 remove_on_abort: Path | None = None):
        self.root = Path(root)
        self.config = config
        self._committed = committed
        self._remove_on_abort = remove_on_abort

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(cls, out: str | Path, config: dict, resume: bool = False) -> "RunFolder":
        """Start a new run in ``out`` (must be absent or empty) or, with ``resume``,
        reopen the run there (its stored config is kept)."""
        root = Path(out)
        if resume:
            if not (root / CONFIG).is_file():
                raise UserError(f"cannot resume: {root} has no {CONFIG}, so it is not a "
                                "fewstep run folder; run without --resume to start one")
            return cls.open(root)
        check_output(root, kind=run_kind(config))
        top = _first_missing_ancestor(root)
        root.mkdir(parents=True, exist_ok=True)
        run = cls(root, dict(config), committed=False, remove_on_abort=top)
        try:
            write_json(root / CONFIG, run.config)
        except BaseException:
            run.abort()
            raise
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        """Open an existing run folder (reads ``config.json``)."""
        root = Path(path)
        if not (root / CONFIG).is_file():
            raise UserError(f"{root} is not a fewstep run folder (no {CONFIG}); pass the "
                            "--out folder of a run")
        config = read_json(root / CONFIG)
        if not isinstance(config, dict):
            raise UserError(f"{root / CONFIG} does not hold a JSON object; restore it")
        return cls(root, config, committed=True)

    # --------------------------------------------------------------------- lifetime
    @property
    def committed(self) -> bool:
        """True once the run holds a checkpoint (or was opened): abort keeps it."""
        return self._committed

    def commit(self) -> None:
        """Mark the run as worth keeping (call after the first checkpoint)."""
        self._committed = True

    def abort(self) -> None:
        """Remove what this new, uncommitted run created; no-op once committed."""
        if self._committed:
            return
        if self._remove_on_abort is not None:
            shutil.rmtree(self._remove_on_abort, ignore_errors=True)
        elif self.root.is_dir():  # the folder existed (empty): empty it again
            for p in self.root.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        return False

    # ------------------------------------------------------------------ contents
    def path(self, name: str) -> Path:
        """``root / name``, with its parent folders created."""
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, step: int, **values: Any) -> None:
        """Append ``{"step": step, **values}`` as one line to ``metrics.jsonl``."""
        row = {"step": int(step), **{k: _scalar(v) for k, v in values.items()}}
        with open(self.root / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=json_default) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        """All rows of ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
        path = self.root / METRICS
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` (they are logged again when resuming)."""
        rows = [r for r in self.metrics() if int(r.get("step", 0)) <= step]
        text = "".join(json.dumps(r, default=json_default) + "\n" for r in rows)
        atomic_write_text(self.root / METRICS, text)

    # --------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint folder of this run, or None."""
        return latest_checkpoint(self.root)

    def save(self, step: int, modules: Mapping[str, nn.Module | EMA],
             optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
             extra: dict | None = None, keep: int | None = None) -> Path:
        """:func:`~fewstep.train.checkpoint.save_state` into this run, then commit."""
        ck = save_state(self.root, step, modules, optimizers, extra, keep)
        self.commit()
        return ck

    def load(self, modules: Mapping[str, nn.Module | EMA],
             optimizers: Mapping[str, torch.optim.Optimizer] | None = None
             ) -> dict | None:
        """Restore the latest checkpoint (see ``load_state``); None if there is none.

        Metrics rows logged after the checkpoint's step are dropped.
        """
        if self.latest_checkpoint() is None:
            return None
        extra = load_state(self.root, modules, optimizers)
        self._truncate_metrics(extra["step"])
        return extra

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r}, committed={self._committed})"


def open_run(acc, out: str | Path, config: dict, resume: bool = False, cls: type = RunFolder) -> RunFolder:
    """The run folder of a job under ``accelerate`` (any number of processes): the main
    process creates (or reopens) it, the others open it once it exists.

    Only the main process may remove a new folder on failure, so the others get an
    already-committed handle (``cls`` may be a subclass, e.g. a method's StudentRun).
    Every process must see the folder: one machine, or a shared file system across nodes
    (the others read it, e.g. knowledge distillation's pairs, progressive rounds)."""
    run = cls.create(out, config, resume=resume) if acc.is_main_process else None
    acc.wait_for_everyone()
    return run if run is not None else cls.open(out)


__all__ = ["RunFolder", "CONFIG", "METRICS", "open_run", "check_output", "run_kind"]
