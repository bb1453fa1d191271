"""The run-folder lock: one process at a time writes a run folder.

While a training or distillation job runs, its run folder holds ``.lock``: JSON with the
owner's ``pid``, ``host``, start time (``since``, ``started``) and command line. The owner
also holds an exclusive ``flock`` on that file for as long as it lives, so the kernel frees
the lock of a process that dies (SIGKILL, power cut on a local disk) and a second process
on the same ``--out`` is refused with one line, before it reads or writes anything::

    run folder R is in use by pid P on host H since T; wait for it or choose another --out

A lock left by a process that is gone (its pid is not alive on this host, or the pid was
reused by a later process) is stale: the next job takes it over with a note. A lock file
naming a live process of this host is respected even where ``flock`` is not (a file system
without it, a lock written by hand); one from another host is respected, since its pid
cannot be checked from here, and the line says which file to remove once that run is gone.

Under ``accelerate`` only the main process takes the lock (:func:`locked_run`); the other
processes write nothing but what the main process coordinates.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError
from .checkpoint import _pid_alive, checkpoint_steps, latest_checkpoint
from .runfolder import CONFIG, RunFolder, open_run

LOCK = ".lock"

try:  # POSIX; elsewhere the pid check alone decides
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _host() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> Optional[float]:
    """Wall-clock start time of process ``pid`` (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(info: dict) -> bool:
    """Does the process a lock file names still run? Another host's: assumed so (cannot check)."""
    pid = info.get("pid")
    if info.get("host") != _host():
        return True
    if not isinstance(pid, int) or not _pid_alive(pid):
        return False
    started, since = _process_start(pid), info.get("since")
    # a pid reused by a process that started after the lock was taken is not the owner
    return not (started is not None and isinstance(since, (int, float)) and started > float(since) + 2.0)


def _read(path: Path) -> dict:
    """The lock file's JSON ({} when empty or unreadable)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def in_use(root: str | Path, info: dict) -> UserError:
    """The one line for a run folder locked by the process ``info`` names."""
    root = Path(root)
    pid, host, when = info.get("pid", "?"), info.get("host", "?"), info.get("started", "?")
    hint = "" if host == _host() or host == "?" else \
        f" (if nothing runs it on {host} any more, delete {root / LOCK})"
    return UserError(f"run folder {root} is in use by pid {pid} on host {host} since {when}; wait for it or "
                     f"choose another --out{hint}")


def check_free(root: str | Path) -> None:
    """Raise the in-use line when a live process holds ``root``'s lock (a cheap early probe:
    reads the lock file only, takes nothing)."""
    path = Path(root) / LOCK
    info = _read(path) if path.is_file() else {}
    if not info or not _owner_alive(info):
        return
    if _mine(info) and not _held_here(path):
        return  # names this very process, which does not hold it: left over, stale
    raise in_use(root, info)


def _mine(info: dict) -> bool:
    return info.get("pid") == os.getpid() and info.get("host") == _host()


_HELD: set = set()  # lock files this process holds (by real path)


def _held_here(path: Path) -> bool:
    return os.path.realpath(path) in _HELD


class RunLock:
    """The lock of one run folder, held by this process (see the module docstring)."""

    def __init__(self, root: Path, fd: int):
        self.root, self.path, self.fd = Path(root), Path(root) / LOCK, fd
        self._real = os.path.realpath(self.path)
        _HELD.add(self._real)

    @classmethod
    def acquire(cls, root: str | Path) -> "RunLock":
        """Take the lock of existing folder ``root``, or raise the in-use line; a stale lock
        is taken over with a note (a warning)."""
        root = Path(root)
        path = root / LOCK
        for _ in range(20):  # a lock released (unlinked) between our open and flock: open again
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot create the lock file {path}: {e.strerror}; --out must be a folder "
                                "this user can write") from None
            kernel = fcntl is not None
            if kernel:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise in_use(root, _read(path)) from None
                except OSError:  # no flock on this file system: the pid check alone decides
                    kernel = False
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        else:  # pragma: no cover - a lock released and retaken 20 times in a row
            raise UserError(f"run folder {root} is being locked and released by other processes; try again")
        info = _read(path)
        if info and ((not _mine(info) and _owner_alive(info)) or (not kernel and _held_here(path))):
            os.close(fd)  # a live owner that holds no flock (hand-written, a file system without flock)
            raise in_use(root, info)
        if info:
            warnings.warn(f"run folder {root}: took over the stale lock of pid {info.get('pid', '?')} on host "
                          f"{info.get('host', '?')} (since {info.get('started', '?')}), a process that is gone")
        now = time.time()
        mine = {"pid": os.getpid(), "host": _host(), "since": now,
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                "command": " ".join(sys.argv)[:500]}
        data = (json.dumps(mine) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise UserError(f"cannot write the lock file {path}: {e.strerror}; free some space or choose "
                            "another --out") from None
        return cls(root, fd)

    def release(self) -> None:
        """Remove the lock file (when it is still ours) and free the lock."""
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass  # the folder is gone (a failed new run removed itself)
        finally:
            os.close(self.fd)
            self.fd = None
            _HELD.discard(self._real)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


@contextmanager
def locked_run(acc, out: str | Path, config: dict, resume: bool = False, cls: type = RunFolder
               ) -> Iterator[RunFolder]:
    """:func:`~fewstep.train.runfolder.open_run` with the run folder locked by the main process
    for the whole job; released at the end, on error and on KeyboardInterrupt (after a failed new
    run has removed itself). A resumed folder is locked before anything in it is read for the job;
    its ``config.json`` is rewritten when the resume changed options that may change (the new
    ``--lr`` etc., see :mod:`fewstep.train.resume`)."""
    from ..io import json_default, read_json, write_json

    main = acc.is_main_process
    lock = None
    try:
        if main and Path(out).is_dir():
            if resume and (Path(out) / CONFIG).is_file():
                lock = RunLock.acquire(out)
            else:
                check_free(out)  # a new run in a folder someone writes: say so, not "not empty"
        if lock is not None:
            latest_checkpoint(out)  # a pointer out of the folder: one line before anything is changed
        with open_run(acc, out, config, resume, cls) as run:
            if main and lock is None:
                try:
                    lock = RunLock.acquire(run.root)
                except UserError:
                    run.commit()  # another process created the folder at the same moment: it is theirs
                    raise
            if main and resume and read_json(run.root / CONFIG) != json.loads(json.dumps(config,
                                                                                        default=json_default)):
                write_json(run.root / CONFIG, config)
                run.config = dict(config)
            try:
                yield run
            except BaseException:
                if main and checkpoint_steps(run.root):
                    run.commit()  # a checkpoint was complete just before the error or Ctrl-C came
                run.abort()  # before the lock goes: nobody sees a half-removed folder unlocked
                raise
    finally:
        if lock is not None:
            lock.release()


__all__ = ["LOCK", "RunLock", "check_free", "in_use", "locked_run"]
