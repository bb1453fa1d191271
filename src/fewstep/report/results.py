"""Benchmark results: one row per (method, NFE), saved as results.json and results.csv.

``results.json``::

    {"format": "fewstep-bench-1", "meta": {teacher, data, kind, n, seed, command, machine,
     date, seconds, primary, summary: {...}}, "rows": [row, ...], "skipped": [...]}

A row is ``{"method", "kind", "nfe", "nfe_used", <metric>: float, ..., "seconds"}`` with
``kind`` one of ``sampler``, ``student``, ``reference`` (the teacher's accurate ODE
solution) and ``data`` (held-out real data: the floor each metric reaches at this n);
``nfe`` is the budget asked for, ``nfe_used`` the evaluations actually spent (a sampler
whose steps cost more than one evaluation may spend fewer than the budget). ``class`` is
None on an overall row; a class-conditional benchmark follows each overall row with one
row per class c (``"class": c``: the metrics on that class's samples against that class's
data). ``row``, ``pareto`` and ``overall`` look at the overall rows only; a row without
``class`` (older files) is an overall row.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fewstep.errors import UserError

FORMAT = "fewstep-bench-1"


@dataclass(frozen=True)
class MetricInfo:
    label: str
    better: str  # "lower" or "higher"
    about: str


METRICS: dict[str, MetricInfo] = {
    "fd": MetricInfo("FD", "lower", "Frechet distance of features (classifier features for images, "
                     "coordinates for points); not CIFAR FID"),
    "fd_check": MetricInfo("FD (check)", "lower", "Frechet distance on a second, differently built classifier's "
                           "features: a cross-check of FD for methods that train against the first"),
    "label_accuracy": MetricInfo("label accuracy", "higher", "share of samples the classifier puts in the class "
                                 "they were asked for (class-conditional teachers)"),
    "class_score": MetricInfo("class score", "higher", "Inception-style score with the set's own classifier"),
    "precision": MetricInfo("precision", "higher", "improved precision, k=3 (Kynkaanniemi et al. 2019)"),
    "recall": MetricInfo("recall", "higher", "improved recall, k=3 (Kynkaanniemi et al. 2019)"),
    "sliced_w2": MetricInfo("sliced W2", "lower", "sliced Wasserstein-2 to held-out data"),
    "mmd": MetricInfo("MMD^2", "lower", "unbiased squared MMD, RBF kernels at median-heuristic bandwidths"),
    "energy": MetricInfo("energy", "lower", "energy distance (Szekely & Rizzo)"),
    "mmd_cd": MetricInfo("MMD-CD", "lower", "point clouds: mean over reference clouds of the Chamfer distance "
                         "to the nearest generated cloud (Yang et al. 2019)"),
    "cov_cd": MetricInfo("COV-CD", "higher", "point clouds: share of reference clouds that are the nearest "
                         "(Chamfer) match of some generated cloud"),
    "nna_cd": MetricInfo("1-NNA-CD", "lower", "point clouds: leave-one-out 1-NN accuracy telling generated from "
                         "reference clouds (Chamfer); 0.5 is ideal"),
    "flow_error": MetricInfo("flow error", "lower", "RMS error against the teacher's accurate ODE solution "
                             "from the same noise (the exact flow map for a GaussianMixture)"),
    "seconds": MetricInfo("seconds", "lower", "wall time of sampling"),
}
ROW_KEYS = ("method", "kind", "nfe", "nfe_used", "class")


@dataclass
class Results:
    """What a benchmark measured (see the module docstring)."""

    meta: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    #: in memory only (not saved): the sample panels of the figures, method -> {label: tensor}
    samples: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def primary(self) -> str:
        """The metric the Pareto plot and the summary table use."""
        return self.meta.get("primary", "sliced_w2")

    def metric_names(self) -> list[str]:
        """Metrics present in the rows, in the order of :data:`METRICS` then others."""
        seen = {k for r in self.rows for k in r if k not in ROW_KEYS}
        return [k for k in METRICS if k in seen] + sorted(seen - set(METRICS))

    def methods(self, kinds=("sampler", "student")) -> list[str]:
        """Method names in first-seen order, for the given row kinds."""
        out: list[str] = []
        for r in self.rows:
            if r["kind"] in kinds and r["method"] not in out:
                out.append(r["method"])
        return out

    def row(self, method: str, nfe: Optional[int], cls: Optional[int] = None) -> Optional[dict]:
        """The row of ``method`` at ``nfe``: the overall one, or class ``cls``'s."""
        for r in self.rows:
            if r["method"] == method and r["nfe"] == nfe and r.get("class") == cls:
                return r
        return None

    def classes(self) -> list[int]:
        """The classes that have per-class rows, sorted ([] for an unconditional benchmark)."""
        return sorted({r["class"] for r in self.rows if r.get("class") is not None})

    def overall(self) -> "Results":
        """The same results with the overall rows only (no per-class rows)."""
        return Results(self.meta, [r for r in self.rows if r.get("class") is None], self.skipped,
                       samples=self.samples)

    # --------------------------------------------------------------------- files
    def to_json(self) -> str:
        obj = {"format": FORMAT, "meta": self.meta, "rows": self.rows, "skipped": self.skipped}
        return json.dumps(_no_nan(obj), indent=1, default=_json_default, allow_nan=False)

    def to_csv(self) -> str:
        cols = [*ROW_KEYS, *self.metric_names()]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _csv_cell(r.get(k)) for k in cols})
        return buf.getvalue()

    def save(self, out) -> tuple[Path, Path]:
        """Write ``out/results.json`` and ``out/results.csv`` (each atomically)."""
        from fewstep.io import atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", self.to_json())
        atomic_write_text(out / "results.csv", self.to_csv())
        return out / "results.json", out / "results.csv"

    @classmethod
    def load(cls, path) -> "Results":
        """Read ``results.json`` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise UserError(f"{path} not found; run 'fewstep bench --out DIR' first")
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not readable JSON ({type(e).__name__}); run 'fewstep bench' again") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise UserError(f"{path} is not a fewstep bench result (format {FORMAT} expected)")
        return cls(obj.get("meta", {}), obj.get("rows", []), obj.get("skipped", []))

    # -------------------------------------------------------------------- analysis
    def pareto(self, metric: Optional[str] = None) -> list[dict]:
        """Overall rows (samplers and students) not dominated in (nfe_used, metric): no
        other row is at least as good on both and better on one (ties at one NFE are all
        kept). Sorted by NFE."""
        metric = metric or self.primary
        sign = 1.0 if METRICS.get(metric, MetricInfo("", "lower", "")).better == "lower" else -1.0
        pts = [r for r in self.rows if r["kind"] in ("sampler", "student") and r.get("class") is None
               and _finite(r.get(metric))]
        front, best = [], math.inf
        for r in sorted(pts, key=lambda r: (r["nfe_used"], sign * r[metric])):
            v = sign * r[metric]
            tie = front and r["nfe_used"] == front[-1]["nfe_used"] and abs(v - best) <= 1e-6 * abs(best)
            if v < best or tie:  # equal values at one NFE (e.g. every sampler's single Euler step) all count
                front.append(r)
                best = min(best, v)
        return front


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _no_nan(obj):
    """NaN and inf become null, so that results.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _csv_cell(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
