"""The ``fewstep`` command line: the entry point (parser and error handling).

The commands themselves live in :mod:`fewstep.commands`, one module each (train, sample,
demo, samplers, distill, bench, schedule, export, ...). Every user mistake ends in one line
on stderr (what, where, what to do) and exit code 2; an interruption ends with exit code
130 and one line saying what was kept: a run folder of ``train``/``distill`` continues with the
same command plus ``--resume``; the other commands say what they wrote, if anything.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with its refusals (an unknown flag, a missing one, a bad choice) as one line
    on stderr, ``PROG: error: MESSAGE (see PROG --help)``, and exit code 2; sub-command
    parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import add_all

    ap = Parser(prog="fewstep", description="Fast diffusion sampling: train or load a teacher, "
                                 "sample it with training-free solvers, distil it into few-step students.")
    ap.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    add_all(sub)
    return ap


def main(argv=None) -> int:
    import warnings

    warnings.formatwarning = lambda msg, cat, *rest, **kw: f"fewstep: note: {msg}\n"
    ap = build_parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a refused argument (2, its one line printed)
        if e.code == 2:
            return 2
        raise
    if not getattr(a, "func", None):
        ap.print_help()
        return 2
    before = _snapshot(_outputs(a))
    try:
        return int(a.func(a) or 0)
    except UserError as e:
        print(f"fewstep {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fewstep {a.command}: {_interrupted(a, before)}", file=sys.stderr)
        return 130


def _outputs(a) -> list:
    """The paths a command writes: its --out (and the PNG beside an output file)."""
    from pathlib import Path

    out = getattr(a, "out", None)
    if not isinstance(out, str) or hasattr(a, "resume"):
        return []
    p = Path(out)
    return [p, p.with_suffix(".png")] if p.suffix else [p]


def _snapshot(paths: list) -> dict:
    """{file: (size, mtime)} of the files at or under ``paths`` (the first 10,000)."""
    import itertools

    state = {}
    for p in paths:
        try:
            files = [p] if p.is_file() else itertools.islice(p.rglob("*"), 10_000) if p.is_dir() else []
            for f in files:
                if f.is_file():
                    st = f.stat()
                    state[str(f)] = (st.st_size, st.st_mtime_ns)
        except OSError:
            continue
    return state


def _interrupted(a, before: dict) -> str:
    """The line after Ctrl-C: what was kept, and how to go on (--resume only where it exists)."""
    from pathlib import Path

    if hasattr(a, "resume"):  # train, distill: run folders with checkpoints
        from .train.checkpoint import latest_checkpoint
        from .train.job import worth_resuming

        out = Path(a.out)
        try:
            ck = latest_checkpoint(out)
        except UserError:
            ck = None
        if out.is_dir() and worth_resuming(out):
            at = f" (latest checkpoint: step {int(ck.name.split('_')[1])})" if ck is not None else ""
            return f"interrupted; {out} keeps the work done so far{at}: continue with the same command plus --resume"
        if out.is_dir() and any(out.iterdir()):
            return f"interrupted before the first checkpoint; the same command plus --resume starts {out} again"
        return "interrupted before the first checkpoint; nothing was kept"
    if a.command == "demo":
        return "interrupted; run the same command again to continue where it stopped"
    changed = sorted(f for f, sig in _snapshot(_outputs(a)).items() if before.get(f) != sig)
    if not changed:
        return "interrupted; nothing was written (run the command again to redo it)"
    more = f" and {len(changed) - 3} more files" if len(changed) > 3 else ""
    return (f"interrupted after writing {', '.join(changed[:3])}{more}; the rest was not written (run the command "
            "again to redo it)")


if __name__ == "__main__":
    sys.exit(main())
