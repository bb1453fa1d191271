"""Benchmark results and the report: results.json/.csv, a quality-vs-NFE Pareto plot,
samples per method and a static report.html (``fewstep bench``, ``fewstep demo``)."""
from fewstep.report.bench import run_bench, write_report
from fewstep.report.results import METRICS, Results

__all__ = ["run_bench", "write_report", "Results", "METRICS"]
