"""The ``fewstep`` command line: the entry point (parser and error handling).

The commands themselves live in :mod:`fewstep.commands`, one module each (train, sample,
demo, samplers, distill, bench, schedule, export, ...). Every user mistake ends in one line
on stderr (what, where, what to do) and exit code 2; an interruption ends with exit code
130 and leaves a resumable run folder.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import add_all

    ap = argparse.ArgumentParser(prog="fewstep", description="Fast diffusion sampling: train or load a teacher, "
                                 "sample it with training-free solvers, distil it into few-step students.")
    ap.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    add_all(sub)
    return ap


def main(argv=None) -> int:
    import warnings

    warnings.formatwarning = lambda msg, cat, *rest, **kw: f"fewstep: note: {msg}\n"
    ap = build_parser()
    a = ap.parse_args(argv)
    if not getattr(a, "func", None):
        ap.print_help()
        return 2
    try:
        return int(a.func(a) or 0)
    except UserError as e:
        print(f"fewstep {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fewstep {a.command}: interrupted; a run folder with a checkpoint continues with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
