"""Which sampler and grid to run at a budget: the measured defaults.

``assets/sampling_defaults.json`` is written by ``bench/defaults.py``: every registered
grid sampler on every grid family (Karras, log-SNR, polyexponential, VP-time with two
exponents; ending at 0 or at sigma_min; with and without the analytical first step), at
every NFE from 1 to 50, on the project's exact Gaussian-mixture teachers, its RMS error
against the exact flow map from sigma_max = 80. From it:

- ``by_nfe[K]``: the configuration whose worst ratio to the best error on each teacher at
  K evaluations is smallest (the recommended default, :func:`recommend`);
- ``by_sampler[name][K]``: that sampler's best grid at K, or a refusal where even its best
  grid is more than twice Euler's error (Euler on its own best grid) on some teacher;
- ``diverges[name][grid]``: the NFE at which that named grid, as given, is more than twice
  Euler's error (a warning when a user asks for it).

Budgets above the table's largest NFE use its largest entry.
"""
from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

from ..errors import UserError

TABLE = "sampling_defaults.json"
FALLBACK_GRID = "karras"  # samplers the table does not cover (adaptive, some stochastic)


@dataclass
class Choice:
    """What a :func:`fewstep.sample` call runs: sampler, grid, grid options, analytical
    first step (``afs``), sampler options, and where that came from (``source``:
    "recommended", "sampler default", "as asked", or "not measured")."""

    sampler: str
    grid: object
    grid_options: dict = field(default_factory=dict)
    afs: object = False
    options: dict = field(default_factory=dict)
    source: str = "as asked"
    nfe: Optional[int] = None
    spent: Optional[int] = None
    steps: Optional[int] = None
    row: Optional[int] = None  # the table's NFE row this came from

    def describe(self) -> str:
        """One line: e.g. ``unipc (order=3) on vp-time (rho=1, final_zero=False) with AFS, 6
        evaluations: recommended for NFE 6 on the exact teachers``."""
        opts = f" ({', '.join(f'{k}={v}' for k, v in self.options.items())})" if self.options else ""
        gopts = f" ({', '.join(f'{k}={v}' for k, v in self.grid_options.items())})" if self.grid_options else ""
        afs = " with AFS" if self.afs else ""
        cost = f", {self.spent} evaluations in {self.steps} steps" if self.spent is not None else ""
        why = {"recommended": f"recommended for NFE {self.row} on the exact teachers",
               "sampler default": f"the sampler's best grid for NFE {self.row} on the exact teachers",
               "not measured": "no measured default for this sampler: Karras grid"}.get(self.source, self.source)
        return f"{self.sampler}{opts} on {self.grid}{gopts}{afs}{cost}: {why}"

    def warn_if_diverges(self, nfe: int) -> None:
        """A warning when a grid the user named is one the exact teachers show unstable for
        this sampler at this budget (more than twice Euler's error)."""
        if self.source != "as asked" or not isinstance(self.grid, str) or self.grid_options or self.afs:
            return
        bad = table().get("diverges", {}).get(self.sampler, {}).get(self.grid, [])
        if int(nfe) in bad:
            try:
                best = f"its best grid there: {recommend(nfe, self.sampler).describe()}"
            except UserError:  # no grid makes it stable at this budget
                best = f"no grid makes it stable there; the default: {recommend(nfe).describe()}"
            warnings.warn(f"sampler '{self.sampler}' on grid '{self.grid}' at {nfe} evaluations is more than twice "
                          f"Euler's error on the exact teachers; {best}", stacklevel=3)


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The measured defaults (``assets/sampling_defaults.json``); empty when missing."""
    try:
        text = resources.files("fewstep").joinpath("assets", TABLE).read_text()
    except (FileNotFoundError, OSError):
        return {}
    return json.loads(text)


def _row(rows: dict, nfe: int) -> Optional[int]:
    """The table row for ``nfe``: itself, else the largest row below it (budgets above the
    table), else None."""
    keys = sorted(int(k) for k in rows)
    below = [k for k in keys if k <= nfe]
    return below[-1] if below else None


def _config(entry: dict, source: str, row: int) -> Choice:
    return Choice(entry["sampler"], entry["grid"], dict(entry.get("grid_options") or {}), entry.get("afs", False),
                  dict(entry.get("options") or {}), source, row=row)


def recommend(nfe: int, sampler: Optional[str] = None) -> Choice:
    """The measured default for ``nfe`` evaluations: the best configuration overall, or, with
    ``sampler``, that sampler's best grid (a :class:`UserError` naming what to use where it
    cannot be made stable at that budget). Samplers the table does not cover (adaptive
    ones, and any sampler when the table is missing) get the Karras grid."""
    from . import info

    t = table()
    if sampler is None:
        rows = t.get("by_nfe", {})
        k = _row(rows, int(nfe))
        if k is None:
            return Choice("euler", FALLBACK_GRID, source="not measured")
        return _config(rows[str(k)], "recommended", k)
    si = info(sampler)
    rows = t.get("by_sampler", {}).get(sampler)
    k = _row(rows, int(nfe)) if rows else None
    if k is not None and si.adaptive and int(nfe) > max(map(int, rows)):
        k = None  # an adaptive sampler's own budget logic decides beyond the measured budgets
    if k is None:
        return Choice(sampler, FALLBACK_GRID, source="not measured")
    entry = rows[str(k)]
    if entry.get("refuse"):
        ok = sorted(int(j) for j, e in rows.items() if not e.get("refuse") and int(j) > int(nfe))
        raise UserError(f"sampler '{sampler}' is unstable at {nfe} evaluations: on its best grid its error is "
                        f"{entry['refuse']} on the exact teachers; use {recommend(nfe).describe().split(':')[0]} "
                        f"(the default: give no sampler)"
                        + (f", or {ok[0]} evaluations" if ok else ""))
    return _config(entry, "sampler default", k)


def resolve(nfe: int, sampler: Optional[str], grid, grid_options: Optional[dict], afs, tuned: bool = False) -> Choice:
    """What :func:`fewstep.sample` runs for its arguments: the recommended configuration when
    neither ``sampler`` nor ``grid`` is given, the sampler's best grid when only the sampler
    is, Euler when only the grid is, else as asked. ``grid_options`` and ``afs``, when given,
    override the table's. ``tuned``: the caller set an adaptive sampler's tolerances, so the
    table (measured at its default tolerances) does not speak for it: Karras end points."""
    if grid is None and tuned:
        return Choice(sampler, FALLBACK_GRID, dict(grid_options or {}), afs if afs is not None else False,
                      source="as asked")
    if grid is None:
        c = recommend(nfe, sampler)
        if grid_options:
            c.grid_options = {**c.grid_options, **grid_options}
        if afs is not None:
            c.afs = afs
        return c
    return Choice(sampler or "euler", grid, dict(grid_options or {}), bool(afs) if afs is None else afs,
                  source="as asked")
