"""Extra ``fewstep`` subcommands, one module each (e.g. ``distill``, ``bench``).

Each module defines ``add_parser(subparsers)``, which adds its subparser and sets
``func`` (called with the parsed arguments, returns an exit code). The command line
discovers the modules of this package, so a new command is a new file here.
"""
from __future__ import annotations

import importlib
import pkgutil


def add_all(sub) -> None:
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}").add_parser(sub)
