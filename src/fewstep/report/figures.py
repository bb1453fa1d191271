"""Figures of a benchmark: quality against NFE with the Pareto front, and samples per method."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from fewstep.plots import _plt, draw_samples
from fewstep.report.results import METRICS, Results, _finite


def slug(name: str) -> str:
    """A file-name-safe form of a method name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "method"


def pareto_plot(results: Results, path, metrics: Optional[list[str]] = None) -> Path:
    """One panel per metric (default: the primary metric and the flow error): metric
    against NFE spent, one line per method (dashed for students), floors as grey lines,
    and the Pareto front (best value at that NFE or fewer) as a black step line."""
    plt = _plt()
    names = results.metric_names()
    metrics = [m for m in (metrics or [results.primary, "flow_error"]) if m in names]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5.6 * max(1, len(metrics)), 4.2), dpi=110,
                             squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, metric in zip(axes[0], metrics):
        info = METRICS.get(metric)
        for i, method in enumerate(results.methods()):
            rows = [r for r in results.rows if r["method"] == method and _finite(r.get(metric))]
            rows.sort(key=lambda r: r["nfe_used"])
            if not rows:
                continue
            student = rows[0]["kind"] == "student"
            ax.plot([r["nfe_used"] for r in rows], [r[metric] for r in rows], "s--" if student else "o-",
                    color=colours(i % 20), label=method, ms=4, lw=1.3)
        front = results.pareto(metric)
        if front:
            xs = [r["nfe_used"] for r in front]
            ax.step(xs + [xs[-1] * 1.4], [r[metric] for r in front] + [front[-1][metric]], where="post",
                    color="black", lw=2.2, alpha=0.35, label="Pareto front", zorder=0)
        for r in results.rows:
            if r["kind"] in ("data", "reference") and _finite(r.get(metric)) and r[metric] > 0:
                ax.axhline(r[metric], color="grey", ls=":" if r["kind"] == "data" else "-.", lw=1,
                           label=r["method"])
        ax.set_xscale("log", base=2)
        positive = [r[metric] for r in results.rows if _finite(r.get(metric))]
        if positive and min(positive) > 0 and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
        label = info.label if info else metric
        better = f" ({info.better} is better)" if info else ""
        ax.set(xlabel="NFE (network evaluations spent)", ylabel=label + better, title=f"{label} against NFE")
        ax.grid(alpha=0.25, which="both")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def samples_plot(title: str, panels: Mapping[str, torch.Tensor], path, lim: Optional[float] = None,
                 max_images: int = 36) -> Path:
    """A row of panels (scatter for points, grid for images), one per NFE or reference."""
    plt = _plt()
    k = max(1, len(panels))
    fig, axes = plt.subplots(1, k, figsize=(2.5 * k, 2.8), dpi=100, squeeze=False)
    for ax, (label, x) in zip(axes[0], panels.items()):
        x = x[:max_images] if x.ndim == 4 else x[:2000]
        draw_samples(ax, x, title=label, lim=lim)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
