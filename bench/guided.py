"""Guided (classifier-free) sampling on exact class-conditional Gaussian mixtures, by part.

    .venv/bin/python bench/guided.py --part splitting                 # about 20 s on 2 cores
    .venv/bin/python bench/guided.py --part splitting --quick         # fewer starts, w = 8 only
    .venv/bin/python bench/guided.py --part splitting --doc docs/BENCHMARKS.md
    .venv/bin/python bench/guided.py --part splitting --from-json bench/out/guided_splitting.json --doc docs/BENCHMARKS.md

    .venv/bin/python bench/guided.py --part student --mixture ring2    # ~4-5 min on 2 cores (one guided student)
    .venv/bin/python bench/guided.py --part student --mixture mix8 --reuse   # evaluate a trained run again
    .venv/bin/python bench/guided.py --part student --from-json bench/out/guided_student_ring2.json \
        bench/out/guided_student_mix8.json --doc docs/BENCHMARKS.md

Results go to ``bench/out/guided_<part>.json`` (part student with ``--mixture M``:
``bench/out/guided_student_M.json``); the markdown tables are printed, and with
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

Part ``student`` (issue 13): ``fewstep distill guided`` (Meng et al. 2022) on the same two
mixtures, one w-input student per mixture (w in [1, 8], stage one then rounds 16 -> 1;
``STUDENT_BUDGET``; run folders under ``bench/out/guided_student_runs/``). For w in 1, 2, 4, 8
and NFE 1, 2, 4, 8: the student's RMS error against the accurate guided flow of the same
start and its per-label energy distance to the guided flow of fresh noise, beside the guided
teacher's Euler (DDIM) and DPM-Solver++(2M) (calls and passes counted) and the paper's
stochastic sampler at NFE 2, 4, 8; the teacher at 16, 32, 64 NFE; the target (the 4-step
student at most the teacher's DPM-Solver++(2M) at 8 NFE, per w); the note a w outside
[w_min, w_max] gets.
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


# ------------------------------------------------------------------------------ part student
STUDENT_HEADING = "## Guided distillation (issue 13)"
STUDENT_WS = [1.0, 2.0, 4.0, 8.0]
STUDENT_NFES = [1, 2, 4, 8]
STOCH_NFES = [2, 4, 8]
TEACHER_MORE_NFES = [16, 32, 64]  # the guided teacher beyond the table: what it needs to match the student
# the CPU budget of one guided student per mixture (recorded in the JSON and the docs)
STUDENT_BUDGET = {"w_min": 1.0, "w_max": 8.0, "stage1_steps": 4000, "steps": 2500, "start_steps": 16,
                  "end_steps": 1, "batch_size": 256, "lr": 1e-3, "warmup": 100, "ema_decay": 0.995,
                  "checkpoint_every": 100000, "device": "cpu", "seed": 0}
STUDENT_QUICK = {"stage1_steps": 150, "steps": 60}
OUTSIDE_W = [0.5, 12.0]  # sampled once each to show the note outside [w_min, w_max]
STUDENT_READING = """How the numbers were made: each run was trained by `python bench/guided.py --part
student --mixture M` (wall 258 s for `ring2`, 273 s for `mix8`, training 214 s / 226 s of it: the budget
above, 4000 + 4 x 2500 steps, finishes in about 4 minutes a mixture on this machine, well inside the 10
minutes asked) and then evaluated again with `--reuse` (no training) once the teacher-at-more-NFE rows
were added; every row present in both evaluations came out bit-identical.

**Reading.** The target is met at every w on both mixtures: the 4-step student's RMS error is 0.72x
(ring2, w = 1) down to 0.02x (mix8, w = 8) that of the guided teacher's DPM-Solver++(2M) at 8 NFE (16
passes). That baseline is weak under guidance: on the Karras grid the multistep extrapolation of the
guided slope degrades as w grows (as in the splitting section), so DPM-Solver++(2M) is worse than Euler
(DDIM) from w = 2 on and even worse at 8 NFE than at 4 NFE on mix8 at w = 8. Against the stronger Euler
at 8 NFE the 4-step student wins too (ring2 0.19-0.21 against 0.34-0.53; mix8 0.05-0.09 against
0.13-0.23). Matching the 4-step student takes the guided teacher 16 NFE (32 passes) at w <= 2 and 32 NFE
(64 passes) at w = 4, 8 with DPM-Solver++(2M), 32-64 NFE with Euler (the extra table): the student saves
8-16x the passes (16-32x against Euler), for about 4 CPU-minutes of training.

What limits it: the student's error is flat in NFE (ring2 0.19-0.22, mix8 0.05-0.09 from 1 to 8 steps),
so it is a training-error floor (the stage-one fit of D_w plus what each round adds at this budget and
net size), not discretisation: more student steps buy nothing, and the teacher passes it from 16-32 NFE
on. The floor is highest at w = 8, the edge of the range where the guided targets are largest (ring2's
energy distance 0.055-0.071 against 0.006-0.012 at w <= 4; mix8's RMS 0.08-0.09 against 0.05-0.07). The
energy distances of the deterministic student are 0.0015-0.012 (0.055-0.07 at ring2 w = 8) against a
floor of about +-0.002 (the estimator's own noise at 1000 / 750 samples per label); the teacher's at 1-4
NFE are orders larger (its 1- and 2-NFE rows coincide: the Karras grid's second step only goes from 0.002
to 0; at w = 1 the CFG wrapper skips the null pass, so 1 pass per call). The paper's stochastic sampler
(RMS against the deterministic flow is not a fair measure for it: it is not meant to follow that path;
its energy distance is) is worse than the deterministic rule here at every w and NFE but one (mix8, w =
1, NFE 8: 0.0024 against 0.0027), and increasingly so with w: at w = 8 its energy distance grows with NFE
(ring2: 0.25, 0.45, 0.71 at NFE 2, 4, 8; mix8: 0.17, 0.26, 0.37), each re-noised student step adding the
student's high-w error again. Its use in the paper, FID on ImageNet at 1-4 steps where a deterministic
few-step student blurs, is not what an exact 2-D / 8-D mixture tests. One seed and one budget per
mixture; a shared 2-core machine (load average 4-7), so wall times are loose. A w outside [1, 8] samples
with the note shown below each mixture's tables (0.5 and 12 tried)."""


def _student_net(gmm) -> dict:
    return {"kind": "mlp", "dim": gmm.dim, "hidden": 128, "depth": 3, "emb_dim": 64, "num_classes": gmm.num_classes}


def _ed_per_label(x, ref, lab, ref_lab, k) -> list:
    from fewstep.metrics import energy_distance

    return [energy_distance(x[lab == c].double(), ref[ref_lab == c].double()) for c in range(k)]


def _quiet_sample(model, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.sample(*a, **kw)[0]


def run_student(quick: bool, mixtures=None, reuse: bool = False) -> dict:
    """One guided student per mixture (``distill("guided", ...)``), then for each w and NFE: its
    RMS error against the accurate guided flow of the same start, and the per-label energy
    distance to the accurate guided flow of fresh noise; the guided teacher's Euler (DDIM) and
    DPM-Solver++(2M) beside it; the paper's stochastic sampler at NFE 2, 4, 8."""
    from fewstep import load
    from fewstep.methods import distill
    from fewstep.metrics import rms

    n = 600 if quick else 3000
    budget = {**STUDENT_BUDGET, **(STUDENT_QUICK if quick else {})}
    res = {"part": "student", "n": n, "guidance": STUDENT_WS, "nfes": STUDENT_NFES, "stochastic_nfes": STOCH_NFES,
           "budget": budget, "teachers": {}, "mixtures": []}
    root = Path("bench/out/guided_student_runs")
    for tname, (gmm, desc) in teachers().items():
        if mixtures and tname not in mixtures:
            continue
        res["teachers"][tname] = desc
        folder = root / tname
        folder.mkdir(parents=True, exist_ok=True)
        spec = "gmm:" + str(folder / "cond.npz")
        gmm.save(folder / "cond.npz")
        k = gmm.num_classes
        cfg = {**budget, "teacher": spec, "net": _student_net(gmm)}
        t0 = time.time()
        if reuse and (folder / "run" / "model.json").exists():  # evaluate a finished run again
            run = str(folder / "run")
            saved = json.loads((folder / "run" / "config.json").read_text())
            assert all(saved.get(k) == v for k, v in cfg.items() if k != "teacher"), "the saved run has another budget"
            train_s = float(json.loads((folder / "run" / "model.json").read_text())["cost"]["seconds"])
        else:
            run = distill("guided", cfg, str(folder / "run"), progress=False)
            train_s = time.time() - t0
        print(json.dumps({"mixture": tname, "train_seconds": round(train_s, 1)}), flush=True)
        top, teacher = load(run), load(spec)
        meta = json.loads((Path(run) / "model.json").read_text())
        lab = torch.arange(n) % k
        x_T = top.noise(n, seed=100)                 # the same start for every row (sigma_max = 80)
        x_F = top.noise(n, seed=200)                 # fresh noise for the energy-distance reference
        s_max = float(top.sigma_max)
        assert abs(s_max - float(teacher.sigma_max)) < 1e-9, (s_max, teacher.sigma_max)
        mix = {"mixture": tname, "description": desc, "run": str(run), "train_seconds": train_s,
               "cost": meta.get("cost"), "sigma_max": s_max, "classes": k, "cases": [], "outside": []}
        for w in STUDENT_WS:
            t1 = time.time()
            ref = gmm.flow(x_T.double(), s_max, 0.0, rtol=1e-8, labels=lab, guidance=w)
            ref_f = gmm.flow(x_F.double(), s_max, 0.0, rtol=1e-8, labels=lab, guidance=w)
            floor = _ed_per_label(ref, ref_f, lab, lab, k)
            case = {"w": w, "reference_seconds": time.time() - t1, "ed_floor": floor,
                    "ed_floor_mean": sum(floor) / k, "rows": []}

            def add(model, nfe, x, calls, passes):
                ed = _ed_per_label(x, ref_f, lab, lab, k)
                case["rows"].append({"model": model, "nfe": nfe, "calls": calls, "passes": passes,
                                     "rms": rms(x.double(), ref), "ed": ed, "ed_mean": sum(ed) / k,
                                     "finite": bool(torch.isfinite(x).all())})

            for nfe in STUDENT_NFES:
                add("student", nfe, _quiet_sample(top, n, nfe, x=x_T, labels=lab, guidance=w), nfe, nfe)
            for nfe in STOCH_NFES:
                x = _quiet_sample(top, n, nfe, "guided_stochastic", seed=7, x=x_T, labels=lab, guidance=w)
                add("student, guided_stochastic", nfe, x, nfe, nfe)
            for sampler, label in (("euler", "teacher euler (DDIM)"), ("dpmpp_2m", "teacher dpmpp_2m")):
                for nfe in STUDENT_NFES:
                    counter = Passes(teacher.denoiser, n)
                    inner, teacher.denoiser = teacher.denoiser, counter
                    try:
                        x = _quiet_sample(teacher, n, nfe, sampler, x=x_T, labels=lab, guidance=w)
                    finally:
                        teacher.denoiser = inner
                    add(label, nfe, x, counter.calls, counter.passes)
            case["teacher_more"] = []
            for sampler in ("euler", "dpmpp_2m"):
                for nfe in TEACHER_MORE_NFES:
                    x = _quiet_sample(teacher, n, nfe, sampler, x=x_T, labels=lab, guidance=w)
                    case["teacher_more"].append({"sampler": sampler, "nfe": nfe, "rms": rms(x.double(), ref),
                                                 "ed_mean": sum(_ed_per_label(x, ref_f, lab, lab, k)) / k})
            by = {(r["model"], r["nfe"]): r for r in case["rows"]}
            s4, t8 = by[("student", 4)]["rms"], by[("teacher dpmpp_2m", 8)]["rms"]
            case["target"] = {"student_4": s4, "teacher_dpmpp_2m_8": t8, "met": s4 <= t8, "ratio": s4 / t8}
            mix["cases"].append(case)
            print(json.dumps({"mixture": tname, "w": w, "student_rms": [f"{by[('student', j)]['rms']:.3f}"
                                                                          for j in STUDENT_NFES],
                              "target": case["target"]}), flush=True)
        for w in OUTSIDE_W:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                top.sample(8, 4, x=x_T[:8], labels=lab[:8], guidance=w)
            mix["outside"].append({"w": w, "warnings": sorted({str(c.message) for c in caught})})
        res["mixtures"].append(mix)
    return res


def student_tables(res: dict) -> str:
    out = []
    nfes = res["nfes"]
    for mix in res["mixtures"]:
        k = mix["classes"]
        for case in mix["cases"]:
            out.append(f"### {mix['mixture']}, w = {case['w']:g}: RMS error against the accurate guided flow of "
                       f"the same start / energy distance to it of fresh noise (mean over the {k} labels; "
                       f"floor {case['ed_floor_mean']:.4f})\n")
            out.append("| model | calls (passes) per sample | " + " | ".join(f"NFE {j}" for j in nfes) + " |")
            out.append("|---|---|" + "---|" * len(nfes))
            models = []
            for r in case["rows"]:
                if r["model"] not in models:
                    models.append(r["model"])
            for m in models:
                rows = {r["nfe"]: r for r in case["rows"] if r["model"] == m}
                cost = ", ".join(f"{r['calls']} ({r['passes']:g})" for r in rows.values())
                cells = [(f"{_f(rows[j]['rms'])} / {rows[j]['ed_mean']:.4f}" if j in rows else "-") for j in nfes]
                out.append(f"| {m} | {cost} | " + " | ".join(cells) + " |")
            out.append("")
        out.append(f"### {mix['mixture']}: target, the 4-step student's RMS error at most the guided teacher's "
                   f"DPM-Solver++(2M) at 8 NFE\n")
        out.append("| w | student, 4 steps | teacher dpmpp_2m, 8 NFE (16 passes) | ratio | verdict |")
        out.append("|---|---|---|---|---|")
        for case in mix["cases"]:
            t = case["target"]
            out.append(f"| {case['w']:g} | {t['student_4']:.4f} | {t['teacher_dpmpp_2m_8']:.4f} | {t['ratio']:.2f} | "
                       f"{'met' if t['met'] else 'missed'} |")
        out.append("")
        if all(c.get("teacher_more") for c in mix["cases"]):
            more = mix["cases"][0]["teacher_more"]
            out.append(f"### {mix['mixture']}: the guided teacher at more NFE (2 passes each), RMS / energy distance\n")
            out.append("| w | " + " | ".join(f"{t['sampler']} {t['nfe']}" for t in more) + " |")
            out.append("|---|" + "---|" * len(more))
            for case in mix["cases"]:
                out.append(f"| {case['w']:g} | " + " | ".join(f"{t['rms']:.3f} / {t['ed_mean']:.4f}"
                                                           for t in case["teacher_more"]) + " |")
            out.append("")
        for o in mix["outside"]:
            out.append(f"- `guidance={o['w']:g}`: " + ("; ".join(f"\"{m}\"" for m in o["warnings"]) or "no warning"))
        out.append("")
    return "\n".join(out)


def student_summary(res: dict) -> str:
    """The measured facts the section's reading rests on, per mixture."""
    lines = []
    for mix in res["mixtures"]:
        cs = mix["cases"]

        def get(case, model, nfe, key="rms"):
            return next(r[key] for r in case["rows"] if r["model"] == model and r["nfe"] == nfe)

        verdicts = ", ".join(f"w = {c['w']:g}: {'met' if c['target']['met'] else 'missed'} "
                             f"({c['target']['student_4']:.3f} vs {c['target']['teacher_dpmpp_2m_8']:.3f}, "
                             f"x{c['target']['ratio']:.2f})" for c in cs)
        lines.append(f"- `{mix['mixture']}` target (4-step student RMS <= teacher DPM-Solver++(2M) at 8 NFE): "
                     f"{verdicts}")
        lines.append(f"- `{mix['mixture']}` student RMS at NFE 1 -> 8: " + "; ".join(
            f"w = {c['w']:g}: " + " / ".join(f"{get(c, 'student', j):.3f}" for j in res["nfes"]) for c in cs))
        lines.append(f"- `{mix['mixture']}` teacher at 8 NFE (16 passes), RMS euler / dpmpp_2m: " + "; ".join(
            f"w = {c['w']:g}: {get(c, 'teacher euler (DDIM)', 8):.3f} / {get(c, 'teacher dpmpp_2m', 8):.3f}"
            for c in cs))
        lines.append(f"- `{mix['mixture']}` energy distance (label mean) at NFE 4, student deterministic / "
                     f"stochastic / teacher euler / dpmpp_2m / floor: " + "; ".join(
                         f"w = {c['w']:g}: {get(c, 'student', 4, 'ed_mean'):.4f} / "
                         f"{get(c, 'student, guided_stochastic', 4, 'ed_mean'):.4f} / "
                         f"{get(c, 'teacher euler (DDIM)', 4, 'ed_mean'):.4f} / "
                         f"{get(c, 'teacher dpmpp_2m', 4, 'ed_mean'):.4f} / {c['ed_floor_mean']:.4f}" for c in cs))
    return "\n".join(lines)


def merge_student(saved: list) -> dict:
    """Part student run one mixture at a time: one result with every mixture, each keeping
    its own command, machine and seconds."""
    res = {**saved[0], "mixtures": [], "teachers": {}, "runs": []}
    for r in saved:
        res["mixtures"] += r["mixtures"]
        res["teachers"].update(r["teachers"])
        res["runs"].append({"command": r["command"], "machine": r["machine"], "seconds": r["seconds"],
                            "mixtures": [x["mixture"] for x in r["mixtures"]]})
    return res


def student_section(res: dict) -> str:
    b = res["budget"]
    runs = res.get("runs") or [{"command": res["command"], "machine": res["machine"], "seconds": res["seconds"],
                                "mixtures": [x["mixture"] for x in res["mixtures"]]}]
    train = {x["mixture"]: x["train_seconds"] for x in res["mixtures"]}
    cmds = "\n".join(
        f"- `{r['command']}`: {r['seconds']:.0f} s in all, "
        + ("evaluation only, of the run(s) trained in " if "--reuse" in r["command"] else "of it training ")
        + ", ".join(f"`{x}` {train[x]:.0f} s" for x in r["mixtures"])
        + f"; {r['machine']['nproc']} cores ({r['machine']['cpu']}, shared with other jobs: load average "
        f"{r['machine']['load_average'][0]:.1f}), torch {r['machine']['torch']}, {r['machine']['torch_threads']} "
        f"thread(s), {r['machine']['date']} UTC, commit {r['machine']['commit']}" for r in runs)
    files = ", ".join(f"`bench/out/guided_student_{x['mixture']}.json`" for x in res["mixtures"])
    text = f"""{STUDENT_HEADING}

{cmds}

Tables rebuilt with `python bench/guided.py --part student --from-json {' '.join(
        f'bench/out/guided_student_{x["mixture"]}.json' for x in res['mixtures'])} --doc docs/BENCHMARKS.md`.
Raw numbers: {files}.

`fewstep distill guided` (Meng et al. 2022; `fewstep.methods.guided`) on the exact class-conditional
mixtures of the splitting section ({'; '.join(f'`{k}` {v}' for k, v in res['teachers'].items())}): ONE
student per mixture, w ~ U[{b['w_min']:g}, {b['w_max']:g}] as its input, stage one {b['stage1_steps']} steps, then
progressive rounds {b['start_steps']} -> {b['end_steps']} steps ({b['steps']} steps per round), batch {b['batch_size']},
lr {b['lr']:g}, warm-up {b['warmup']}, EMA {b['ema_decay']}, an MLP (hidden 128, depth 3, class and w embeddings
64), seed {b['seed']}, process vp_cosine, v-prediction (the method's defaults). Evaluation, n = {res['n']} with
balanced labels: the RMS error (`fewstep.metrics.rms`, per coordinate) of each sampler's output against the
accurate guided flow `gmm.flow(x_T, 80, 0, rtol=1e-8, labels, guidance=w)` of the same start x_T
(`top.noise(n, seed=100)`, the same x_T for every row; the student's sigma_max is the teacher's 80); and the
energy distance, per label then averaged over the labels, to the accurate guided flow of fresh noise (seed 200)
(floor: the flow of x_T itself against it). Student: `fewstep.load(run).sample(n, nfe, x=x_T, labels,
guidance=w)` (its deterministic rule, the round of nfe steps; 1 pass per step) and `sampler="guided_stochastic"`
(the paper's stochastic sampler, nfe = 2 x the round's steps). Teacher: `fewstep.load("gmm:...").sample(n, nfe,
"euler" | "dpmpp_2m", x=x_T, labels, guidance=w)` on its Karras grid 80 -> 0.002 -> 0, one batched call of 2
passes per step (calls and passes counted at its denoiser: so the teacher's NFE k costs 2k passes).

Measured:
{student_summary(res)}

{STUDENT_READING}

{student_tables(res)}"""
    return text.rstrip() + "\n"


PARTS = {"splitting": (run_splitting, splitting_tables, splitting_section, SPLITTING_HEADING),
         "student": (run_student, student_tables, student_section, STUDENT_HEADING)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--quick", action="store_true", help="fewer starts, one guidance scale")
    ap.add_argument("--out", default=None, help="result JSON (default bench/out/guided_<part>.json)")
    ap.add_argument("--from-json", default=None, nargs="+",
                    help="rebuild tables / the docs section from a saved run (part student: one file per mixture)")
    ap.add_argument("--doc", default=None, help="markdown file whose section of this part is rewritten")
    ap.add_argument("--mixture", default=None, choices=sorted(teachers()),
                    help="part student: only this mixture (results to bench/out/guided_student_<mixture>.json)")
    ap.add_argument("--reuse", action="store_true",
                    help="part student: evaluate the finished run in bench/out/guided_student_runs again (no training)")
    a = ap.parse_args()
    run, tables, section, heading = PARTS[a.part]
    if a.from_json:
        saved = [json.loads(Path(f).read_text()) for f in a.from_json]
        res = saved[0] if len(saved) == 1 else merge_student(saved)
    else:
        torch.set_num_threads(1)
        t0 = time.time()
        res = run(a.quick) if a.part != "student" else run(a.quick, [a.mixture] if a.mixture else None, a.reuse)
        res.update({"command": "python bench/guided.py " + " ".join(sys.argv[1:]), "machine": machine(),
                    "seconds": time.time() - t0})
        name = a.part if not (a.part == "student" and a.mixture) else f"student_{a.mixture}"
        out = Path(a.out or f"bench/out/guided_{name}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")
    print(tables(res))
    if a.doc:
        replace_section(a.doc, heading, section(res))
        print(f"updated {a.doc}: {heading}")


if __name__ == "__main__":
    main()
