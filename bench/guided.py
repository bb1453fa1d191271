"""Guided (classifier-free) sampling on exact class-conditional Gaussian mixtures, by part.

    .venv/bin/python bench/guided.py --part splitting                 # about 20 s on 2 cores
    .venv/bin/python bench/guided.py --part splitting --quick         # fewer starts, w = 8 only
    .venv/bin/python bench/guided.py --part splitting --doc docs/BENCHMARKS.md
    .venv/bin/python bench/guided.py --part splitting --from-json bench/out/guided_splitting.json --doc docs/BENCHMARKS.md

Results go to ``bench/out/guided_<part>.json``; the markdown tables are printed, and with
``--doc`` they replace the part's own section of that file (appended at the end if absent).

Part ``splitting`` (issue 13): the splitting samplers LTSP / STSP (Wizadwongsa &
Suwajanakorn 2023; :mod:`fewstep.samplers.splitting`) against PLMS, Euler (DDIM) and
DPM-Solver++(2M) run on the guided denoiser D_w = D_null + w (D_c - D_null)
(``CFGDenoiser``), on two exact teachers: ``ring2`` (``GaussianMixture.labelled_ring()``,
d = 2, 3 classes) and ``mix8`` (``GaussianMixture.random(k=6, dim=8, seed=0)`` with labels
[0, 0, 1, 2, 2, 3], 4 classes), at w = 4 and 8. From the same starts y = x0 + 80 eps
(balanced labels), the RMS error against the accurate guided flow ``gmm.flow(y, 80, 0,
rtol=1e-8, labels, guidance=w)`` at NFE 10, 20, 30, 40, 50 (``fewstep.samplers.sample``,
Karras grid 80 -> 0.002 -> 0, the steps the registered cost allows), the median per-sample
error (robust to the few starts near a separatrix between two modes, which dominate the
RMS once the rest is accurate), the calls and network passes actually spent (counted at
the inner denoiser: a batched CFG call is 1 NFE and 2 passes per sample), and the observed
order log2(e_20 / e_40). Extra rows: ipndm (Adams-Bashforth on D_w with the split's own
warm start: what the split is at w = 1), STSP as the paper's code (``fsal=False``) and
with the grid's own Adams coefficients (``variable_step=True``). A second table compares
at equal *steps* (the paper's axis): STSP with k steps (2k NFE) against PLMS and Euler
with k steps.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, replace_section  # noqa: E402

from fewstep import samplers as S  # noqa: E402
from fewstep.data.gmm import GaussianMixture  # noqa: E402
from fewstep.denoiser import CFGDenoiser  # noqa: E402

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
NFES = [10, 20, 30, 40, 50]
ASYMPTOTIC = [100, 200]  # NFE pair for the asymptotic order (not in the error table)
STEPS = [5, 10, 15, 20, 25]
SPLITTING_HEADING = "## Splitting samplers for guided sampling (issue 13)"
# (row label, registry name, options); the first five are the comparison asked for
SPLIT_SAMPLERS = [
    ("stsp", "stsp", {}),
    ("ltsp", "ltsp", {}),
    ("plms", "plms", {}),
    ("euler (DDIM)", "euler", {}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("ipndm (split at w=1)", "ipndm", {}),
    ("stsp, paper code (fsal=False)", "stsp", {"fsal": False}),
    ("stsp, variable_step", "stsp", {"variable_step": True}),
]


def teachers() -> dict:
    r = GaussianMixture.random(k=6, dim=8, seed=0)
    return {
        "ring2": (GaussianMixture.labelled_ring(), "GaussianMixture.labelled_ring(): d = 2, 8 anisotropic modes, "
                                                   "3 classes of 3, 2, 3 modes"),
        "mix8": (GaussianMixture(r.weights, r.means, r.covs, labels=[0, 0, 1, 2, 2, 3]),
                 "GaussianMixture.random(k=6, dim=8, seed=0), labels [0, 0, 1, 2, 2, 3]: d = 8, 4 classes"),
    }


class Passes:
    """Counts calls and network passes per sample at the inner denoiser."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls, self.passes = inner, n, 0, 0.0

    def __call__(self, y, sigma, **cond):
        self.calls += 1
        self.passes += y.shape[0] / self.n
        return self.inner(y, sigma, **cond)


def _err(out, ref) -> tuple:
    d = (out - ref).reshape(len(ref), -1)
    return float(d.pow(2).mean().sqrt()), float(d.norm(dim=1).median())


def _run(gmm, x, lab, w, name, opts, nfe):
    counter = Passes(gmm, len(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = S.sample(CFGDenoiser(counter, w), x.clone(), name, nfe=nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                       extra_args={"labels": lab}, **opts)
        wall = time.perf_counter() - t0
    return out, {"nfe": nfe, "steps": S.steps_for_nfe(name, nfe, **{**S.info(name).defaults, **opts}),
                 "calls": counter.calls, "passes": counter.passes, "seconds": wall,
                 "finite": bool(torch.isfinite(out).all()), "warnings": sorted({str(c.message) for c in caught})}


def run_splitting(quick: bool) -> dict:
    n = 128 if quick else 512
    ws = [8.0] if quick else [4.0, 8.0]
    res = {"part": "splitting", "n": n, "guidance": ws, "nfes": NFES, "asymptotic_nfes": ASYMPTOTIC, "steps": STEPS,
           "teachers": {}, "cases": []}
    for tname, (gmm, desc) in teachers().items():
        res["teachers"][tname] = desc
        g = torch.Generator().manual_seed(0)
        x0 = gmm.sample(n, generator=g)
        x = x0 + SIGMA_MAX * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        lab = torch.arange(n) % gmm.num_classes
        for w in ws:
            t0 = time.perf_counter()
            ref = gmm.flow(x, SIGMA_MAX, 0.0, rtol=1e-8, labels=lab, guidance=w)
            case = {"teacher": tname, "w": w, "reference_seconds": time.perf_counter() - t0, "rows": [],
                    "equal_steps": []}
            for label, name, opts in SPLIT_SAMPLERS:
                row = {"label": label, "sampler": name, "options": opts, "runs": [], "asymptotic": []}
                for nfe in NFES + ASYMPTOTIC:
                    out, info = _run(gmm, x, lab, w, name, opts, nfe)
                    info["rms"], info["median"] = _err(out, ref)
                    row["runs" if nfe in NFES else "asymptotic"].append(info)
                print(json.dumps({"teacher": tname, "w": w, "sampler": label,
                                  "rms": [f"{r['rms']:.3e}" for r in row["runs"]]}), flush=True)
                case["rows"].append(row)
            for k in STEPS:  # equal steps: the paper's axis
                ent = {"steps": k}
                for name in ("stsp", "plms", "euler"):
                    nfe = S.info(name).cost(k)
                    out, info = _run(gmm, x, lab, w, name, {}, nfe)
                    assert info["steps"] == k, (name, k, info)
                    info["rms"], info["median"] = _err(out, ref)
                    ent[name] = info
                case["equal_steps"].append(ent)
            res["cases"].append(case)
    return res


# ------------------------------------------------------------------------------ tables
def _order(runs, key, a=20, b=40):
    e = {r["nfe"]: r[key] for r in runs}
    if a in e and b in e and e[a] > 0 and e[b] > 0:
        return math.log2(e[a] / e[b])
    return float("nan")


def _f(v) -> str:
    return "diverged" if not math.isfinite(v) else f"{v:.2e}"


def splitting_tables(res: dict) -> str:
    out = []
    nfes = res["nfes"]
    for case in res["cases"]:
        out.append(f"### {case['teacher']}, w = {case['w']:g}: RMS error against the guided flow "
                   f"(median per-sample error in brackets)\n")
        out.append("| sampler | " + " | ".join(f"NFE {k}" for k in nfes)
                   + " | steps at NFE 10 / 50 | passes per sample at NFE 50 | order 20->40 (RMS / median) "
                   + "| order 100->200 (RMS / median) |")
        out.append("|---|" + "---|" * (len(nfes) + 4))
        for row in case["rows"]:
            runs = row["runs"]
            cells = [f"{_f(r['rms'])} ({_f(r['median'])})" for r in runs]
            cells.append(f"{runs[0]['steps']} / {runs[-1]['steps']}")
            cells.append(f"{runs[-1]['passes']:g}")
            cells.append(f"{_order(runs, 'rms'):.2f} / {_order(runs, 'median'):.2f}")
            asy = row.get("asymptotic", [])
            cells.append(f"{_order(asy, 'rms', 100, 200):.2f} / {_order(asy, 'median', 100, 200):.2f}")
            out.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        by = {r["label"]: r["runs"] for r in case["rows"]}
        ratio = [a["rms"] / b["rms"] for a, b in zip(by["stsp"], by["plms"])]
        out.append("| *stsp / plms (RMS)* | " + " | ".join(f"*{v:.2f}*" for v in ratio) + " | | | | |")
        out.append("")
        out.append(f"Equal steps (the paper's axis): RMS error (median) with k steps; NFE spent in brackets "
                   f"after the sampler.\n")
        out.append("| steps k | stsp (2k NFE) | plms (k+1 NFE) | euler (k NFE) | stsp / plms |")
        out.append("|---|---|---|---|---|")
        for ent in case["equal_steps"]:
            s, p, e = ent["stsp"], ent["plms"], ent["euler"]
            out.append(f"| {ent['steps']} | {_f(s['rms'])} ({_f(s['median'])}) [{s['calls']}] | "
                       f"{_f(p['rms'])} ({_f(p['median'])}) [{p['calls']}] | "
                       f"{_f(e['rms'])} ({_f(e['median'])}) [{e['calls']}] | {s['rms'] / p['rms']:.2f} |")
        out.append("")
    return "\n".join(out)


def _span(vals) -> str:
    vals = [v for v in vals if math.isfinite(v)]
    return f"{min(vals):.2g}-{max(vals):.2g}" if vals else "n/a"


def splitting_summary(res: dict) -> str:
    """The measured facts the section's text rests on, over all (teacher, w) cases."""
    cases = res["cases"]
    by = [{r["label"]: r for r in c["rows"]} for c in cases]
    nfes = res["nfes"]
    lines = ["Measured over the %d cases (teacher x w); ratios are RMS errors:" % len(cases)]
    lines.append("- equal NFE, stsp / plms: " + "; ".join(
        f"NFE {k}: {_span([b['stsp']['runs'][j]['rms'] / b['plms']['runs'][j]['rms'] for b in by])}"
        for j, k in enumerate(nfes)))
    lines.append("- equal NFE, stsp / ltsp: " + "; ".join(
        f"NFE {k}: {_span([b['stsp']['runs'][j]['rms'] / b['ltsp']['runs'][j]['rms'] for b in by])}"
        for j, k in enumerate(nfes)))
    best = [min(c["rows"], key=lambda r: r["runs"][0]["rms"]) for c in cases]
    lines.append("- most accurate at NFE 10: " + ", ".join(
        f"{c['teacher']} w={c['w']:g}: {b['label']} ({_f(b['runs'][0]['rms'])})" for c, b in zip(cases, best)))
    steps = [e["steps"] for e in cases[0]["equal_steps"]]
    lines.append("- equal steps, stsp (2k NFE) / plms (k+1 NFE): " + "; ".join(
        f"k = {k}: {_span([c['equal_steps'][j]['stsp']['rms'] / c['equal_steps'][j]['plms']['rms'] for c in cases])}"
        for j, k in enumerate(steps)))
    lines.append("- equal steps, the same with median errors: " + "; ".join(
        f"k = {k}: " + _span([c["equal_steps"][j]["stsp"]["median"] / c["equal_steps"][j]["plms"]["median"]
                              for c in cases])
        for j, k in enumerate(steps)))
    if all(b["stsp"].get("asymptotic") for b in by):
        lines.append("- order 100->200 NFE (median error): " + "; ".join(
            f"{lab}: {_span([_order(b[lab]['asymptotic'], 'median', 100, 200) for b in by])}"
            for lab in ("stsp", "ltsp", "plms", "euler (DDIM)", "dpmpp_2m")))
    return "\n".join(lines)


def splitting_section(res: dict) -> str:
    m = res["machine"]
    text = f"""{SPLITTING_HEADING}

`{res['command']}` ({res['seconds']:.0f} s; {m['nproc']} cores ({m['cpu']}), torch {m['torch']}, \
{m['torch_threads']} thread(s), {m['date']}, commit {m['commit']}). Raw numbers: `bench/out/guided_splitting.json`.

LTSP / STSP (Wizadwongsa & Suwajanakorn 2023, `fewstep.samplers.splitting`): the guided ODE
dy/dsigma = (y - D_w) / sigma is split into the diffusion part f = (y - D_c) / sigma (Adams-Bashforth
orders 1..4, the paper's PLMS4) and the guidance part g = (w - 1)(D_null - D_c) / sigma (one Euler step);
Lie-Trotter does G_h then F_h, Strang G_h/2 F_h G_h/2 (the closing half step merged with the next
opening one, `fsal=True`; the paper's code, `fsal=False`, evaluates g twice per step). Each step needs a
batched CFG call (g) and a conditional call (f): 2 NFE and 3 network passes per sample, where PLMS on
D_w is 1 NFE and 2 passes. Teachers: {'; '.join(f'`{k}` {v}' for k, v in res['teachers'].items())}.
{res['n']} starts y = x0 + 80 eps, balanced labels; truth `gmm.flow(y, 80, 0, rtol=1e-8, labels,
guidance=w)`; Karras grid 80 -> 0.002 -> 0 with the steps the registered cost allows (so at equal NFE
STSP takes half of PLMS's and Euler's steps). Orders are log2(e_20 / e_40) and log2(e_100 / e_200) per
doubling of NFE (for STSP, doubling the steps); the median per-sample error is robust to the few starts
near a separatrix between two modes of a class, which dominate the RMS once the rest is accurate.

{splitting_summary(res)}

**Does STSP beat PLMS at high guidance and few steps?** Not at equal NFE, the budget this project counts
(one batched CFG call = 1 NFE): STSP is less accurate than PLMS at every NFE from 10 to 50 in every case
(ratios above), for three reasons. (1) A split step needs two calls (g at one point, f at another), so at
equal NFE STSP takes half of PLMS's steps (at equal network passes, 3 per step against 2, two thirds).
(2) The guidance sub-problem is solved by Euler, so STSP and LTSP are first order (Strang's second order
needs second-order sub-solvers: one Strang step leaves (h^2/4) g_y g, Euler's own error on the guidance
flow), while PLMS on D_w converges at about 2 on Karras grids (orders above; 4 only on grids uniform in
sigma): the gap widens with NFE. (3) At NFE 10 (5 steps) the equal-step Adams-Bashforth coefficients on
the Karras grid's large first steps make STSP diverge as PLMS and ipndm do (`variable_step=True`, the
grid's own Adams weights, removes most of that, not the first-order error). Euler (DDIM) is the most
accurate of all at NFE 10, since every multistep method is still unstable there.

At equal *steps* (the paper's axis: its classifier gradient is cheap next to the diffusion network)
STSP does beat PLMS at 10 steps in every case (RMS and median), and at 15 steps by RMS in three of the
four, where PLMS still has a few diverging starts (its median error is already the smaller one): the
multistep extrapolation of the whole guided slope is what blows up, and taking the guidance term out of
it damps that. At 5 steps both diverge; from 20 steps on PLMS is more accurate again (the median ratios above).
So the paper's mechanism is visible, but only in the few-step window and only when a guidance
evaluation is free. Why it does not carry over further: the paper's guidance term is a classifier
gradient, whose high derivatives are large (the reason it keeps it out of the high-order method) and
which costs less than the diffusion network; here g = (w - 1)(eps_c - eps_null) comes from the same smooth
exact denoiser (no harder for Adams-Bashforth than eps itself) and costs a full network call. Whether
learned denoisers at high guidance have rougher guidance terms is not measured here. Against LTSP, STSP
is the more accurate from NFE 30 on at the same cost (the splitting error cancels; same order 1), while
at NFE 10-20 LTSP, whose guidance Euler step is evaluated at the larger level of each step, diverges less.

{splitting_tables(res)}"""
    return text.rstrip() + "\n"


PARTS = {"splitting": (run_splitting, splitting_tables, splitting_section, SPLITTING_HEADING)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--quick", action="store_true", help="fewer starts, one guidance scale")
    ap.add_argument("--out", default=None, help="result JSON (default bench/out/guided_<part>.json)")
    ap.add_argument("--from-json", default=None, help="rebuild tables / the docs section from a saved run")
    ap.add_argument("--doc", default=None, help="markdown file whose section of this part is rewritten")
    a = ap.parse_args()
    run, tables, section, heading = PARTS[a.part]
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
    else:
        torch.set_num_threads(1)
        t0 = time.time()
        res = run(a.quick)
        res.update({"command": "python bench/guided.py " + " ".join(sys.argv[1:]), "machine": machine(),
                    "seconds": time.time() - t0})
        out = Path(a.out or f"bench/out/guided_{a.part}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")
    print(tables(res))
    if a.doc:
        replace_section(a.doc, heading, section(res))
        print(f"updated {a.doc}: {heading}")


if __name__ == "__main__":
    main()
