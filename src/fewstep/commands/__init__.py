"""The ``fewstep`` sub-commands, one module each (``train``, ``sample``, ``distill``, ...).

Each module defines ``add_parser(subparsers)``, which adds its subparser and sets
``func`` (called with the parsed arguments, returns an exit code). The command line
(:mod:`fewstep.cli`) discovers the modules of this package, so a new command is a new file
here; ``fewstep --help`` lists the :data:`FIRST` ones first, then the others by name.
"""
from __future__ import annotations

import importlib
import pkgutil

FIRST = ("train", "sample", "demo", "samplers")  # the order of `fewstep --help`, then the rest by name


def add_all(sub) -> None:
    mods = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    order = [n for n in FIRST if n in mods] + sorted(n for n in mods if n not in FIRST)
    for name in order:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
