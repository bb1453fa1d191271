"""A static report.html: opens from disk with no server; every image is embedded (base64).

Sections: what was compared (teacher, data, n, command, machine), the summary table
(primary metric per method and NFE, Pareto-front cells marked), the Pareto plot, for a
class-conditional benchmark the per-class tables (primary metric and flow error per
method, each method's class rows under its overall row), the full table of every metric
(class rows under their overall row), and the samples of each method. A small inline script checks on
load that every image decoded and writes the count into ``<body data-images-loaded>``
(the headless-browser test reads it).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

from fewstep.report.results import METRICS, Results, _finite

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } p.lead { font-size: 1.1em; max-width: 60em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; }
td.front { font-weight: bold; background: #e8f4e8; }
tr.ref td { color: #666; font-style: italic; }
tr.sub td { color: #444; font-size: 0.92em; } tr.sub td.name { padding-left: 2em; }
tr.all td { border-top: 2px solid #bbb; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 3px; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
"""


def _fmt(v, metric: str = "") -> str:
    if not _finite(v):
        return "&ndash;"
    if metric in ("precision", "recall"):
        return f"{v:.3f}"
    if metric == "seconds":
        return f"{v:.2f}"
    return f"{v:.4g}"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _summary_table(res: Results) -> str:
    metric = res.primary
    nfes = sorted({r["nfe"] for r in res.rows if r["kind"] in ("sampler", "student")})
    front = {(r["method"], r["nfe"]) for r in res.pareto(metric)}
    label = METRICS[metric].label if metric in METRICS else metric
    head = "".join(f"<th>NFE {k}</th>" for k in nfes)
    lines = [f'<table id="summary"><tr><th class="name">method</th><th>kind</th>{head}</tr>']
    for method in res.methods():
        cells = []
        for k in nfes:
            r = res.row(method, k)
            if r is None:
                cells.append("<td>&ndash;</td>")
                continue
            used = f" <small>({r['nfe_used']})</small>" if r.get("nfe_used") not in (None, k) else ""
            cls = ' class="front"' if (method, k) in front else ""
            cells.append(f"<td{cls}>{_fmt(r.get(metric), metric)}{used}</td>")
        kind = next(r["kind"] for r in res.rows if r["method"] == method)
        lines.append(f'<tr><td class="name">{html.escape(method)}</td><td>{kind}</td>{"".join(cells)}</tr>')
    for r in res.rows:
        if r["kind"] in ("data", "reference") and r.get("class") is None:
            span = f'<td colspan="{len(nfes)}">{_fmt(r.get(metric), metric)}'
            span += f" (NFE {r['nfe_used']})</td>" if r.get("nfe_used") else "</td>"
            lines.append(f'<tr class="ref"><td class="name">{html.escape(r["method"])}</td><td>{r["kind"]}</td>'
                         f"{span}</tr>")
    lines.append("</table>")
    return (f"<p>{html.escape(label)} ({METRICS[metric].better if metric in METRICS else ''} is better); "
            "bold green cells are on the Pareto front (no method is better with as few evaluations); "
            "a number in brackets is the NFE actually spent when a sampler's step cost did not fit "
            "the budget.</p>" + "\n".join(lines))


def _class_tables(res: Results) -> str:
    """Per class: the primary metric (and the flow error) per method and NFE, each
    method's overall row followed by its class rows; data and reference rows last."""
    classes = res.classes()
    if not classes:
        return ""
    nfes = sorted({r["nfe"] for r in res.rows if r["kind"] in ("sampler", "student")})
    refs = [r["method"] for r in res.rows if r["kind"] in ("data", "reference") and r.get("class") is None]
    out = []
    for metric in [m for m in dict.fromkeys([res.primary, "flow_error"]) if m in res.metric_names()]:
        label = METRICS[metric].label if metric in METRICS else metric
        head = "".join(f"<th>NFE {k}</th>" for k in nfes)
        lines = [f'<table class="classes" id="classes-{metric}"><tr><th class="name">method</th><th>class</th>'
                 f"{head}</tr>"]
        for method in res.methods() + refs:
            for c in [None, *classes]:
                if method in refs:
                    r = res.row(method, None, c)
                    if r is None or not _finite(r.get(metric)):
                        continue
                    cells = f'<td colspan="{max(1, len(nfes))}">{_fmt(r.get(metric), metric)}</td>'
                else:
                    rs = [res.row(method, k, c) for k in nfes]
                    if all(r is None for r in rs):
                        continue
                    cells = "".join(f"<td>{_fmt(r.get(metric), metric) if r else '&ndash;'}</td>" for r in rs)
                tr = ("all" if c is None else "sub") + (" ref" if method in refs else "")
                name = html.escape(method) if c is None else "&#8627;"
                lines.append(f'<tr class="{tr}"><td class="name">{name}</td><td>{"all" if c is None else c}</td>'
                             f"{cells}</tr>")
        lines.append("</table>")
        out.append(f"<h3>{html.escape(label)} per class</h3>" + "\n".join(lines))
    return ("<h2>Per class</h2><p class='note'>Every method sampled the same labels; each class row is the "
            "metric on that class's samples against that class's data (and reference); &ldquo;all&rdquo; is the "
            "overall row.</p>" + "\n".join(out))


def _full_table(res: Results) -> str:
    metrics = res.metric_names()
    by_class = bool(res.classes())
    head = "".join(f'<th title="{html.escape(METRICS[m].about) if m in METRICS else ""}">'
                   f"{html.escape(METRICS[m].label if m in METRICS else m)}</th>" for m in metrics)
    lines = [f'<table id="all"><tr><th class="name">method</th>{"<th>class</th>" if by_class else ""}<th>kind</th>'
             f"<th>NFE</th><th>used</th>{head}</tr>"]
    for r in res.rows:
        c = r.get("class")
        kinds = (["ref"] if r["kind"] in ("data", "reference") else []) + (
            [] if not by_class else ["all"] if c is None else ["sub"])
        cls = f' class="{" ".join(kinds)}"' if kinds else ""
        name = html.escape(r["method"]) if c is None else f"&#8627; {html.escape(r['method'])}"
        ccell = f"<td>{'all' if c is None else c}</td>" if by_class else ""
        cells = "".join(f"<td>{_fmt(r.get(m), m)}</td>" for m in metrics)
        lines.append(f'<tr{cls}><td class="name">{name}</td>{ccell}<td>{r["kind"]}</td>'
                     f"<td>{r['nfe'] if r['nfe'] is not None else ''}</td>"
                     f"<td>{r['nfe_used'] if r.get('nfe_used') is not None else ''}</td>{cells}</tr>")
    lines.append("</table>")
    about = "".join(f"<li><b>{html.escape(METRICS[m].label)}</b>: {html.escape(METRICS[m].about)} "
                    f"({METRICS[m].better} is better)</li>" for m in metrics if m in METRICS)
    return "\n".join(lines) + f'<ul class="note">{about}</ul>'


def write_html(res: Results, out, pareto_png: Path, sample_pngs: Sequence[tuple[str, Path]]) -> Path:
    """Write ``out/report.html`` from the results and the already written PNGs."""
    from fewstep.io import atomic_write_text

    m = res.meta
    facts = [("teacher", m.get("teacher")), ("data", m.get("data")), ("samples per method", m.get("n")),
             ("seed", m.get("seed")), ("command", m.get("command")), ("machine", m.get("machine")),
             ("date", m.get("date")), ("total time", f"{m['seconds']:.0f} s" if _finite(m.get("seconds")) else None)]
    cl = m.get("classes") or {}
    if cl:
        facts.append(("classes", f"{cl.get('num_classes')}; labels {cl.get('labels')}; samples per class "
                                 f"{', '.join(map(str, cl.get('counts', [])))}"))
        facts.append(("guidance", "none (conditional)" if m.get("guidance") is None else f"{m['guidance']:g}"))
    for spec, cmd in (m.get("made_by") or {}).items():
        facts.append((f"made {spec} with", cmd))
    for k, v in (m.get("summary") or {}).items():
        facts.append((k.replace("_", " "), _fmt(v) if isinstance(v, float) else v))
    facts_html = "".join(f"<tr><th class='name'>{html.escape(str(k))}</th><td class='name'>"
                         f"{'<code>' + html.escape(str(v)) + '</code>' if str(k).startswith(('command', 'made ')) else html.escape(str(v))}"
                         f"</td></tr>" for k, v in facts if v is not None)
    skipped = "".join(f"<li>{html.escape(s['method'])}{'' if s.get('nfe') is None else ' at NFE ' + str(s['nfe'])}: "
                      f"{html.escape(s['reason'])}</li>" for s in res.skipped)
    notes = "".join(f"<p class='note'>{html.escape(t)}</p>" for t in m.get("notes", []))
    samples = "".join(f"<h3>{html.escape(name)}</h3>{_img(p, name)}" for name, p in sample_pngs)
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fewstep bench: {html.escape(str(m.get('teacher', '')))}</title>
<style>{_CSS}</style></head>
<body data-images-loaded="pending">
<h1>fewstep bench report</h1>
{"<p class='lead'>" + html.escape(m["headline"]) + "</p>" if m.get("headline") else ""}
<table id="facts">{facts_html}</table>
{notes}
<h2>Quality against NFE</h2>
{_summary_table(res)}
{_img(pareto_png, 'quality against NFE')}
{_class_tables(res)}
<h2>All metrics</h2>
{_full_table(res)}
{'<h2>Not run</h2><ul>' + skipped + '</ul>' if skipped else ''}
<h2>Samples</h2>
<p class="note">All methods start from the same noise.</p>
{samples}
<script>{_SCRIPT}</script>
</body></html>
"""
    path = Path(out) / "report.html"
    atomic_write_text(path, body)
    return path
