"""The layer map, enforced: no module of src/fewstep imports a higher layer.

Every .py file is parsed with ``ast`` (nothing is imported), and every import counts,
module-level or inside a function (a lazy upward import is still upward): ``import
fewstep.x``, ``from fewstep.x import y``, relative ``from .x``/``from ..x`` resolved to the
module path, ``from pkg import submodule`` resolved to the submodule, and
``importlib.import_module("fewstep.x")`` with a constant name. Importing ``a.b.c`` also
runs the package ``a.b``'s ``__init__``, so that is judged too (``fewstep/__init__.py``
itself excepted: every import of the package runs it).

A module may import its own layer or a lower one. The map is by path: the longest entry
of ``LAYERS`` that names the module or one of its packages decides. docs/ARCHITECTURE.md
describes the layers; this file is what holds them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "fewstep"

# Lowest first. Entries are module paths under fewstep ("" is fewstep/__init__.py).
LAYERS = [
    ("base", ["errors", "io", "checks"]),
    ("nets", ["nets"]),
    ("core", ["process", "denoiser", "students", "grids", "levels"]),
    # above core, not beside nets: data/gmm.py's GMMModel presents the exact teacher as a
    # network of any process, with denoiser.py's converters (Coefficients, from_x0, edm_precond)
    ("data", ["data"]),
    ("samplers", ["samplers"]),
    ("metrics", ["metrics", "plots"]),
    # one layer: model.py dispatches diffusers: specs to interop/diffusers_teacher, which
    # builds a Model; interop/diffusers_export reads a Model
    # families/ (models before diffusion) build Models and are loaded by model.py
    ("model", ["model", "interop", "families", "tts"]),
    # above model: the stage runner (train/job.py) reloads finished stages as teachers
    ("train", ["train"]),
    ("methods", ["schedules", "methods"]),
    # fewstep/__init__.py re-exports load (fewstep.model) and sample, so it sits at the top
    ("top", ["report", "commands", "cli", "demo", "__main__", ""]),
]

# Known upward imports, each with its reason: (file under src/fewstep, imported module) -> why.
# None are left; a new upward import fails the test, and so does an entry that no longer matches.
ALLOWED: dict = {}
TRANSITIONAL: set = set()

# methods/: shared modules; every other module of the package is one method
METHODS_SHARED = {"__init__", "common", "pairs"}
METHOD_FORBIDDEN = ("accelerate", "fewstep.train.runfolder", "fewstep.train.loop")


def _modname(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


FILES = sorted(PKG.rglob("*.py"))
MODULES = {_modname(f) for f in FILES}


def _submodule(base: str, name: str) -> str:
    """``from base import name``: the module base.name when it is one, else base."""
    full = f"{base}.{name}" if base else name
    return full if full in MODULES else base


def imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path`` (or in ``text`` read as that
    file), wherever it sits."""
    mod = _modname(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8") if text is None else text, filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the package")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            out += [(node.lineno, _submodule(base, a.name)) for a in node.names if a.name != "*"]
            if any(a.name == "*" for a in node.names):
                out.append((node.lineno, base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) == "import_module")):
            out.append((node.lineno, node.args[0].value))
    return out


def layer_of(module: str):
    """(rank, name) of a fewstep module's layer, or None when no entry covers it."""
    rel = module[len("fewstep."):] if module.startswith("fewstep.") else ("" if module == "fewstep" else None)
    if rel is None:
        return None
    best = None
    for rank, (name, entries) in enumerate(LAYERS):
        for e in entries:
            if rel == e or (e and rel.startswith(e + ".")):
                if best is None or len(e) > best[0]:
                    best = (len(e), rank, name)
    return None if best is None else best[1:]


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def upward_imports(sources: dict | None = None) -> list[tuple[str, int, str, str, str]]:
    """(file, line, imported module, importer's layer, imported layer) of every upward
    import; ``sources`` ({file: text}) reads some files from text instead of disk."""
    found = []
    for f in FILES:
        own = layer_of(_modname(f))
        if own is None:  # test_every_module_has_a_layer reports it
            continue
        for line, target in imports(f, (sources or {}).get(f)):
            if not (target == "fewstep" or target.startswith("fewstep.")):
                continue
            # the module itself, then the packages it runs on the way (not fewstep/__init__)
            # where those sit higher still
            parts, top = target.split("."), own[0]
            for k in range(len(parts), 1, -1):
                t = ".".join(parts[:k])
                lay = layer_of(t)
                if lay is not None and lay[0] > top:
                    hit = (_rel(f), line, t, own[1], lay[1])
                    if hit not in found:
                        found.append(hit)
                    top = lay[0]
    return found


def test_every_module_has_a_layer():
    missing = [_rel(f) for f in FILES if layer_of(_modname(f)) is None]
    assert not missing, f"modules outside the layer map (add them to LAYERS): {missing}"


def test_imports_resolve_to_modules():
    """Every fewstep import names a module that exists (a typo would escape the map)."""
    bad = [f"{_rel(f)}:{line}: {t}" for f in FILES for line, t in imports(f)
           if (t == "fewstep" or t.startswith("fewstep.")) and t not in MODULES]
    assert not bad, "imports of no fewstep module:\n  " + "\n  ".join(bad)


def test_no_upward_imports():
    bad = [f"{f}:{line}: {t} ({own} imports {lay})"
           for f, line, t, own, lay in upward_imports() if (f, t) not in ALLOWED]
    assert not bad, ("upward imports (a module may import its own layer or lower; "
                     "see LAYERS in tests/test_layers.py):\n  " + "\n  ".join(bad))


def test_allowed_entries_are_still_needed():
    found = {(f, t) for f, _, t, _, _ in upward_imports()}
    stale = sorted(set(ALLOWED) - found - TRANSITIONAL)
    assert not stale, f"ALLOWED entries that no longer match an import (delete them): {stale}"


def _method_files() -> list[Path]:
    return [f for f in sorted((PKG / "methods").glob("*.py")) if f.stem not in METHODS_SHARED]


def test_methods_leave_the_loop_to_the_stage_runner():
    """open_run/fit/make_accelerator belong to fewstep.train.job, not to a method."""
    assert _method_files(), "no method modules found"
    bad = [f"{_rel(f)}:{line}: {t}" for f in _method_files() for line, t in imports(f)
           if any(t == m or t.startswith(m + ".") for m in METHOD_FORBIDDEN)]
    assert not bad, "method modules importing the loop, run folders or accelerate:\n  " + "\n  ".join(bad)


def test_methods_do_not_import_each_other():
    methods = {f"fewstep.methods.{f.stem}" for f in _method_files()}
    bad = [f"{_rel(f)}:{line}: {t}" for f in _method_files() for line, t in imports(f)
           if any(t == m or t.startswith(m + ".") for m in methods)]
    assert not bad, ("method modules importing another method (share code in methods/common.py "
                     "or pairs.py, or reach a method through fewstep.methods.get):\n  " + "\n  ".join(bad))


@pytest.mark.parametrize("src, expect", [
    ("from . import euler\nfrom .x import y\n", ["fewstep.samplers.euler", "fewstep.samplers.x"]),
    ("from .. import grids as G\nimport fewstep.model\n", ["fewstep.grids", "fewstep.model"]),
    ("def f():\n    from ..train.checkpoint import read_json\n", ["fewstep.train.checkpoint"]),
    ("from fewstep.samplers import sample, euler\n", ["fewstep.samplers", "fewstep.samplers.euler"]),
])
def test_the_collector(src, expect):
    """Lazy, relative and from-package imports resolve as the layer check assumes (the
    source read as if it were samplers/__init__.py)."""
    assert [t for _, t in imports(PKG / "samplers" / "__init__.py", src)] == expect


def test_an_upward_import_is_caught():
    """A lazy import of a higher layer, and a package __init__ above the module it holds."""
    text = ("from .errors import UserError\n"
            "def f():\n    from .samplers import get\n    import fewstep.schedules.dp\n")
    hits = upward_imports({PKG / "grids.py": text})
    assert ("grids.py", 3, "fewstep.samplers", "core", "samplers") in hits
    assert ("grids.py", 4, "fewstep.schedules.dp", "core", "methods") in hits
    assert not [h for h in hits if h[0] == "grids.py" and h[1] == 1]
