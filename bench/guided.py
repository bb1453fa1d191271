"""Guided (classifier-free) sampling on exact class-conditional Gaussian mixtures, by part.

    .venv/bin/python bench/guided.py --part splitting                 # about 20 s on 2 cores
    .venv/bin/python bench/guided.py --part splitting --quick         # fewer starts, w = 8 only
    .venv/bin/python bench/guided.py --part splitting --doc docs/BENCHMARKS.md
    .venv/bin/python bench/guided.py --part splitting --from-json bench/out/guided_splitting.json --doc docs/BENCHMARKS.md

    .venv/bin/python bench/guided.py --part student --mixture ring2    # ~4-5 min on 2 cores (one guided student)
    .venv/bin/python bench/guided.py --part student --mixture mix8 --reuse   # evaluate a trained run again
    .venv/bin/python bench/guided.py --part student --from-json bench/out/guided_student_ring2.json \
        bench/out/guided_student_mix8.json --doc docs/BENCHMARKS.md

    .venv/bin/python bench/guided.py --part digits                   # ~20 min on 2 cores (teacher + student)
    .venv/bin/python bench/guided.py --part digits --quick           # ~2 min: tiny budgets, n = 100
    .venv/bin/python bench/guided.py --part digits --from-json bench/out/guided_digits.json --doc docs/BENCHMARKS.md

Results go to ``bench/out/guided_<part>.json`` (part student with ``--mixture M``:
``bench/out/guided_student_M.json``); the markdown tables are printed, and with
``--doc`` they replace the part's own section of that file (appended at the end if absent).
Part digits with ``--quick`` writes ``bench/out/guided_digits_quick.json`` (its runs under
``bench/out/guided_digits_runs/quick/``), so the check never overwrites the full run.

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

Part ``digits`` (issue 13): the same on a class-conditional image teacher, 8x8 digits. A
teacher (``train_teacher``, as ``fewstep train --data digits --conditional``: label dropout
0.1 for the null branch, an MLP on the 64 pixels, ``DIGITS_TEACHER_BUDGET``, ~5 min) on the
first ``DIGITS_TRAIN_N`` = 797 digits of their seeded order, the other 1000 held out
(``fewstep.data.registry.held_out``); one w-input guided student of it (``distill("guided",
...)``, w in [1, 8], stage one then rounds 16 -> 1, ``DIGITS_STUDENT_BUDGET``, ~14 min, on the
teacher's training digits). Run folders ``bench/out/guided_digits_runs/{teacher,student}``
are kept (a rerun only evaluates; an interrupted one resumes). For w in 1, 2, 4, 8 and NFE
1, 2, 4, 8, from the same x_T and balanced labels (n = 500, 50 per class): the classifier
Frechet distance (the digits classifier's features, as ``fewstep bench``'s FD) to 500
held-out digits (50 per class) and the classifier's accuracy on the asked label, of the
student (its own rule; ``guided_stochastic`` at NFE 2, 4, 8) beside the guided teacher's
Euler (DDIM) and DPM-Solver++(2M) on the Karras grid (calls and passes counted: 2 passes per
step under guidance), the teacher at 16, 32, 64 NFE, and the target: the student's accuracy
at most 2 points below the guided teacher's DPM-Solver++(2M) at 64 NFE, per w and NFE. Data
floor: the FD of other held-out digits to the reference, the classifier's accuracy on them.
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


# ------------------------------------------------------------------------------ part digits
DIGITS_HEADING = "## Guided distillation on 8x8 digits (issue 13)"
DIGITS_CLASSES = 10
# the teacher trains on the first 797 of the 1797 digits in their seeded order; the other 1000
# (fewstep.data.registry.held_out) are never trained on: n / 10 per class of them are the FD
# reference, the next (up to n / 10 per class) the data floor's real set
DIGITS_TRAIN_N = 797
DIGITS_NET = {"kind": "mlp", "dim": 64, "hidden": 512, "depth": 4, "emb_dim": 128, "num_classes": DIGITS_CLASSES}
# the CPU budgets (recorded in the JSON and the docs): the teacher ~5 min, the student ~14 min on 2 cores
DIGITS_TEACHER_BUDGET = {"data": "digits", "n_data": DIGITS_TRAIN_N, "conditional": True, "label_dropout": 0.1,
                         "net": DIGITS_NET, "steps": 5000, "batch_size": 128, "device": "cpu", "seed": 0}
DIGITS_TEACHER_QUICK = {"steps": 300}
DIGITS_STUDENT_BUDGET = {"w_min": 1.0, "w_max": 8.0, "stage1_steps": 2500, "steps": 1000, "start_steps": 16,
                         "end_steps": 1, "batch_size": 256, "lr": 1e-3, "warmup": 100, "ema_decay": 0.995,
                         "device": "cpu", "seed": 0}
DIGITS_STUDENT_QUICK = {"stage1_steps": 100, "steps": 40}
DIGITS_TEACHER_MORE = [16, 32, 64]  # the guided teacher beyond the table; 64 NFE is the accuracy reference
DIGITS_REF = ("dpmpp_2m", 64)  # the target's reference: the guided teacher's DPM-Solver++(2M) at 64 NFE
DIGITS_POINTS = 2.0  # the student's accuracy may lie at most this many points below that reference
DIGITS_TEACHER_KEYS = ("process", "prediction", "weighting", "lr", "warmup", "ema_decay", "grad_clip")


def _same_budget(folder: Path, budget: dict, skip=()) -> None:
    """A kept run folder must have been made with ``budget`` (else: delete it, or keep the old budget)."""
    saved = json.loads((folder / "config.json").read_text())
    for key, want in budget.items():
        have = saved.get(key)
        if key == "net" and isinstance(have, dict) and isinstance(want, dict):
            have = {k: have.get(k) for k in want}
        if key not in skip and have != want:
            raise SystemExit(f"{folder} was made with {key} = {have!r}, not {want!r} (this budget); delete the "
                             f"folder to train it again")


def _digits_run(folder: Path, budget: dict, train) -> tuple:
    """(run folder, train seconds, how): a finished folder (model.json) is kept, an
    interrupted one (config.json, no model.json) resumed from its last checkpoint, else trained."""
    if (folder / "model.json").exists():
        _same_budget(folder, budget, skip=("teacher", "data"))
        how = "kept"
    else:
        resume = (folder / "config.json").exists()
        if resume:
            _same_budget(folder, budget, skip=("teacher", "data"))
        train(str(folder), resume)
        how = "resumed" if resume else "trained"
    meta = json.loads((folder / "model.json").read_text())
    seconds = meta["train_seconds"] if "train_seconds" in meta else meta.get("cost", {}).get("seconds")
    return str(folder), float(seconds), how


def _digits_sets(n: int) -> tuple:
    """(reference A, its labels, floor set B, its labels, where they come from): held-out digits
    never trained on by the teacher, A with n / 10 per class in the order of the asked labels
    arange(n) % 10, B the next ones of each class (at most n / 10)."""
    from fewstep.data.registry import held_out

    pool, source = held_out("digits", 1797 - DIGITS_TRAIN_N, 0, DIGITS_TRAIN_N, 0)
    assert source == "held-out", source
    lab = torch.arange(n) % DIGITS_CLASSES
    a = pool.x.new_empty((n,) + tuple(pool.x.shape[1:]))
    b, b_lab = [], []
    for c in range(DIGITS_CLASSES):
        pos, src = (lab == c).nonzero().flatten(), (pool.labels == c).nonzero().flatten()
        assert len(src) >= len(pos), f"held-out digits of class {c}: {len(src)}, need {len(pos)}"
        a[pos] = pool.x[src[:len(pos)]]
        rest = src[len(pos):2 * len(pos)]
        b.append(pool.x[rest])
        b_lab.append(torch.full((len(rest),), c))
    where = f"{source}: {len(pool.x)} digits after the teacher's {DIGITS_TRAIN_N}"
    return a, lab, torch.cat(b), torch.cat(b_lab), where


class _DigitsMetrics:
    """The classifier Frechet distance (the digits classifier's 64 features, as ``fewstep bench``
    computes "FD") to the reference set and the classifier's accuracy on the asked label."""

    def __init__(self, ref: torch.Tensor):
        from fewstep.metrics.features import classifier_for, feature_extractor, logits_extractor

        clf = classifier_for("digits")
        self.info = dict(getattr(clf, "train_info", {}))
        self.features, self.logits = feature_extractor(clf), logits_extractor(clf)
        self.ref_f = self.features(ref.float())

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        from fewstep.metrics import frechet_distance

        x = x.detach().float().cpu()
        if not torch.isfinite(x).all():
            return {"fd": None, "accuracy": None, "finite": False}
        return {"fd": frechet_distance(self.features(x), self.ref_f),
                "accuracy": float((self.logits(x).argmax(1) == labels.cpu()).double().mean()), "finite": True}


def _counted(model, n: int, draw) -> tuple:
    """(samples, calls, passes per sample) of ``draw()``, counted at ``model``'s denoiser."""
    counter = Passes(model.denoiser, n)
    inner, model.denoiser = model.denoiser, counter
    try:
        x = draw()
    finally:
        model.denoiser = inner
    return x, counter.calls, counter.passes


def run_digits(quick: bool) -> dict:
    """A class-conditional digits teacher with a null branch (label dropout), one guided student
    of it (``distill("guided", ...)``, w in [1, 8]), then for each w and NFE the classifier FD to
    held-out digits and the accuracy on the asked label of the student (its own rule and the
    stochastic sampler) and of the guided teacher's Euler (DDIM) and DPM-Solver++(2M)."""
    from fewstep import load
    from fewstep.methods import distill
    from fewstep.train.teacher import train_teacher

    n = 100 if quick else 500
    t_budget = {**DIGITS_TEACHER_BUDGET, **(DIGITS_TEACHER_QUICK if quick else {})}
    s_budget = {**DIGITS_STUDENT_BUDGET, **(DIGITS_STUDENT_QUICK if quick else {})}
    root = Path("bench/out/guided_digits_runs") / ("quick" if quick else "")
    root.mkdir(parents=True, exist_ok=True)
    res = {"part": "digits", "n": n, "guidance": STUDENT_WS, "nfes": STUDENT_NFES, "stochastic_nfes": STOCH_NFES,
           "teacher_more_nfes": DIGITS_TEACHER_MORE, "reference_sampler": list(DIGITS_REF), "points": DIGITS_POINTS,
           "train_n": DIGITS_TRAIN_N, "teacher_budget": t_budget, "student_budget": s_budget, "cases": []}

    t0 = time.time()
    t_run, t_s, t_how = _digits_run(root / "teacher", t_budget, lambda out, resume: train_teacher(
        dict(t_budget), out, resume=resume, progress=False))
    print(json.dumps({"teacher": t_run, "how": t_how, "train_seconds": round(t_s, 1),
                      "wall": round(time.time() - t0, 1)}), flush=True)
    # the student learns from the teacher's own training digits (by default a run-folder teacher's
    # data is its data set by name, all 1797 digits, the held-out ones too)
    from fewstep.data.registry import load_dataset

    train = load_dataset("digits", n=DIGITS_TRAIN_N, seed=int(t_budget["seed"]))
    data_file = root / f"digits_train{DIGITS_TRAIN_N}.npz"
    import numpy as np

    np.savez(data_file, x=train.x.float().numpy(), labels=train.labels.numpy())
    cfg = {**s_budget, "teacher": t_run, "data": str(data_file)}
    t0 = time.time()
    s_run, s_s, s_how = _digits_run(root / "student", s_budget, lambda out, resume: distill(
        "guided", cfg, out, resume=resume, progress=False))
    print(json.dumps({"student": s_run, "how": s_how, "train_seconds": round(s_s, 1),
                      "wall": round(time.time() - t0, 1)}), flush=True)
    t_cfg = json.loads((Path(t_run) / "config.json").read_text())
    s_meta = json.loads((Path(s_run) / "model.json").read_text())
    res.update({"teacher_run": t_run, "teacher_train_seconds": t_s, "teacher_how": t_how,
                "teacher_config": {k: t_cfg.get(k) for k in DIGITS_TEACHER_KEYS},
                "student_run": s_run, "student_train_seconds": s_s, "student_how": s_how,
                "student_cost": s_meta.get("cost"), "student_stage1": s_meta.get("stage1"),
                "student_rounds": s_meta.get("rounds"), "student_data": str(data_file)})

    t1 = time.time()
    ref, lab, floor_x, floor_lab, source = _digits_sets(n)
    metric = _DigitsMetrics(ref)
    res["reference"] = {"source": source, "n": len(ref), "floor_n": len(floor_x),
                        "floor_per_class": torch.bincount(floor_lab, minlength=DIGITS_CLASSES).tolist(),
                        "classifier": metric.info}
    res["floor"] = {"fd": metric(floor_x, floor_lab)["fd"], "accuracy_reference": metric(ref, lab)["accuracy"],
                    "accuracy_floor_set": metric(floor_x, floor_lab)["accuracy"]}
    top, teacher = load(s_run), load(t_run)
    x_T = top.noise(n, seed=100)  # the same start for every row
    assert abs(float(top.sigma_max) - float(teacher.sigma_max)) < 1e-6, (top.sigma_max, teacher.sigma_max)
    for w in STUDENT_WS:
        case = {"w": w, "rows": [], "teacher_more": []}

        def add(rows, model, nfe, drawn, **extra):
            x, calls, passes = drawn
            rows.append({"model": model, "nfe": nfe, "calls": calls, "passes": passes, **extra, **metric(x, lab)})

        for nfe in STUDENT_NFES:
            add(case["rows"], "student", nfe, _counted(top.variant(nfe), n, lambda: _quiet_sample(
                top, n, nfe, x=x_T, labels=lab, guidance=w)))
        for nfe in STOCH_NFES:
            add(case["rows"], "student, guided_stochastic", nfe, _counted(top.variant(nfe // 2), n, lambda: (
                _quiet_sample(top, n, nfe, "guided_stochastic", seed=7, x=x_T, labels=lab, guidance=w))))
        for sampler, label in (("euler", "teacher euler (DDIM)"), ("dpmpp_2m", "teacher dpmpp_2m")):
            for nfe in STUDENT_NFES:
                add(case["rows"], label, nfe, _counted(teacher, n, lambda: _quiet_sample(
                    teacher, n, nfe, sampler, x=x_T, labels=lab, guidance=w, grid="karras")))
        for sampler in ("euler", "dpmpp_2m"):
            for nfe in DIGITS_TEACHER_MORE:
                add(case["teacher_more"], f"teacher {sampler}", nfe, _counted(teacher, n, lambda: _quiet_sample(
                    teacher, n, nfe, sampler, x=x_T, labels=lab, guidance=w, grid="karras")), sampler=sampler)
        case["target"] = digits_target(case)
        res["cases"].append(case)
        ref_t = case["target"][0]
        print(json.dumps({"w": w, "student_fd_acc": [f"{_g(t['student_fd'])} / {_pct(t['student_accuracy'])}"
                                                     for t in case["target"]],
                          "teacher_ref": f"{_g(ref_t['teacher_fd'])} / {_pct(ref_t['teacher_accuracy'])}",
                          "met": [t["met"] for t in case["target"]]}), flush=True)
    res["evaluation_seconds"] = time.time() - t1
    return res


def digits_target(case: dict) -> list:
    """Per student NFE: its accuracy against the guided teacher's at ``DIGITS_REF``, met when
    at most ``DIGITS_POINTS`` points below it (non-finite samples: missed)."""
    ref = next(r for r in case["teacher_more"] if (r["sampler"], r["nfe"]) == DIGITS_REF)
    out = []
    for s in (r for r in case["rows"] if r["model"] == "student"):
        ok = s["accuracy"] is not None and ref["accuracy"] is not None
        diff = 100 * (s["accuracy"] - ref["accuracy"]) if ok else None
        out.append({"nfe": s["nfe"], "student_accuracy": s["accuracy"], "student_fd": s["fd"],
                    "teacher_accuracy": ref["accuracy"], "teacher_fd": ref["fd"], "points": diff,
                    "met": bool(ok and diff >= -DIGITS_POINTS - 1e-9)})  # 1e-9: -2.0 points is within 2
    return out


def _pct(v) -> str:
    return "non-finite" if v is None else f"{100 * v:.1f}%"


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _fd_acc(r: dict) -> str:
    return "non-finite" if r.get("fd") is None else f"{r['fd']:.3g} / {100 * r['accuracy']:.1f}%"


def digits_tables(res: dict) -> str:
    out = []
    nfes, fl = res["nfes"], res["floor"]
    ref_s, ref_k = res["reference_sampler"]
    for case in res["cases"]:
        out.append(f"### digits, w = {case['w']:g}: classifier FD to held-out digits / accuracy on the asked label "
                   f"(n = {res['n']}; floor {fl['fd']:.3g} / {100 * fl['accuracy_floor_set']:.1f}%)\n")
        out.append("| model | calls (passes) per sample | " + " | ".join(f"NFE {j}" for j in nfes) + " |")
        out.append("|---|---|" + "---|" * len(nfes))
        models = list(dict.fromkeys(r["model"] for r in case["rows"]))
        for m in models:
            rows = {r["nfe"]: r for r in case["rows"] if r["model"] == m}
            cost = ", ".join(f"{r['calls']} ({r['passes']:g})" for r in rows.values())
            out.append(f"| {m} | {cost} | " + " | ".join(_fd_acc(rows[j]) if j in rows else "-" for j in nfes) + " |")
        out.append("")
    more = res["cases"][0]["teacher_more"]
    out.append("### digits: the guided teacher at more NFE, FD / accuracy\n")
    out.append("| w | calls (passes) per sample | " + " | ".join(f"{t['model']} {t['nfe']}" for t in more) + " |")
    out.append("|---|---|" + "---|" * len(more))
    for case in res["cases"]:
        cost = {r["nfe"]: f"{r['calls']} ({r['passes']:g})" for r in case["teacher_more"]}
        out.append(f"| {case['w']:g} | {', '.join(cost.values())} | "
                   + " | ".join(_fd_acc(t) for t in case["teacher_more"]) + " |")
    out.append("")
    out.append(f"### digits: target, the student's accuracy within {res['points']:g} points of the guided teacher's "
               f"{ref_s} at {ref_k} NFE\n")
    out.append(f"| w | student NFE | student accuracy | student FD | teacher {ref_s} {ref_k}: accuracy | its FD | "
               f"points | verdict |")
    out.append("|---|---|---|---|---|---|---|---|")
    for case in res["cases"]:
        for t in case["target"]:
            out.append(f"| {case['w']:g} | {t['nfe']} | {_pct(t['student_accuracy'])} | {_g(t['student_fd'])} | "
                       f"{_pct(t['teacher_accuracy'])} | {_g(t['teacher_fd'])} | "
                       f"{'-' if t['points'] is None else format(t['points'], '+.1f')} | "
                       f"{'met' if t['met'] else 'missed'} |")
    out.append("")
    return "\n".join(out)


def digits_summary(res: dict) -> str:
    """The measured facts the section rests on."""
    cs, fl = res["cases"], res["floor"]

    def get(case, model, nfe, key):
        rows = case["rows"] + case["teacher_more"]
        v = next(r[key] for r in rows if r["model"] == model and r["nfe"] == nfe)
        return "n/a" if v is None else (f"{100 * v:.1f}" if key == "accuracy" else f"{v:.3g}")

    ref_s, ref_k = res["reference_sampler"]
    lines = [f"- data floor: FD {fl['fd']:.3g} ({res['reference']['floor_n']} other held-out digits against the "
             f"reference); the classifier's accuracy on the real held-out digits {100 * fl['accuracy_reference']:.1f}% "
             f"(reference set), {100 * fl['accuracy_floor_set']:.1f}% (floor set)"]
    lines.append(f"- target (student accuracy at most {res['points']:g} points below the teacher's {ref_s} at {ref_k} "
                 f"NFE): " + "; ".join(f"w = {c['w']:g}: " + ", ".join(
                     f"NFE {t['nfe']} {'met' if t['met'] else 'missed'}"
                     + (f" ({t['points']:+.1f})" if t["points"] is not None else "") for t in c["target"]) for c in cs))
    for key, what in (("accuracy", "accuracy %"), ("fd", "FD")):
        lines.append(f"- guided teacher at {ref_k} NFE, {what} euler / dpmpp_2m: " + "; ".join(
            f"w = {c['w']:g}: {get(c, 'teacher euler', ref_k, key)} / {get(c, 'teacher dpmpp_2m', ref_k, key)}"
            for c in cs))
        lines.append(f"- student, {what} at NFE " + " / ".join(map(str, res["nfes"])) + ": " + "; ".join(
            f"w = {c['w']:g}: " + " / ".join(get(c, "student", j, key) for j in res["nfes"]) for c in cs))
        lines.append(f"- guided teacher at 8 NFE (16 passes; w = 1: 8), {what} euler / dpmpp_2m: " + "; ".join(
            f"w = {c['w']:g}: {get(c, 'teacher euler (DDIM)', 8, key)} / {get(c, 'teacher dpmpp_2m', 8, key)}"
            for c in cs))
    return "\n".join(lines)


def digits_section(res: dict) -> str:
    m, tb, sb, tc = res["machine"], res["teacher_budget"], res["student_budget"], res["teacher_config"]
    how = {"trained": "trained in this run", "resumed": "resumed in this run (seconds of the last session only)",
           "kept": "kept from an earlier run"}
    clf, ref = res["reference"]["classifier"], res["reference"]
    st1 = (res.get("student_stage1") or {}).get("init", "?")
    quick = "--quick" in res["command"]
    out, runs = ("guided_digits_quick.json", "guided_digits_runs/quick/") if quick else ("guided_digits.json",
                                                                                        "guided_digits_runs/")
    text = f"""{DIGITS_HEADING}

`{res['command']}`: {res['seconds']:.0f} s in all, of it the teacher {res['teacher_train_seconds']:.0f} s \
({how[res['teacher_how']]}), the student {res['student_train_seconds']:.0f} s ({how[res['student_how']]}), the \
evaluation {res['evaluation_seconds']:.0f} s; {m['nproc']} cores ({m['cpu']}, shared with other jobs: load average \
{m['load_average'][0]:.1f}), torch {m['torch']}, {m['torch_threads']} thread(s), {m['date']} UTC, commit \
{m['commit']}. Tables rebuilt with `python bench/guided.py --part digits --from-json bench/out/{out} \
--doc docs/BENCHMARKS.md`. Raw numbers: `bench/out/{out}`; run folders under `bench/out/{runs}` (kept: a rerun \
evaluates them again, an interrupted one resumes).

Teacher (`fewstep.train.teacher.train_teacher`, what `fewstep train --data digits --conditional --n-data \
{tb['n_data']} --steps {tb['steps']} --batch-size {tb['batch_size']}` runs with a config file giving `net` and \
`label_dropout`): class-conditional on the first {tb['n_data']} of the 1797 8x8 digits (seeded order, seed \
{tb['seed']}), label dropout {tb['label_dropout']:g} (the null label -1 of classifier-free guidance), an MLP on the 64 \
pixels (hidden {DIGITS_NET['hidden']}, depth {DIGITS_NET['depth']}, embeddings {DIGITS_NET['emb_dim']}), process \
{tc['process'] if isinstance(tc['process'], str) else tc['process'].get('kind')}, prediction {tc['prediction']}, \
weighting {tc['weighting']}, lr {tc['lr']:g}, warm-up {tc['warmup']}, EMA {tc['ema_decay']}. Student \
(`distill("guided", ...)`, Meng et al. 2022, `fewstep.methods.guided`): ONE student, w ~ U[{sb['w_min']:g}, \
{sb['w_max']:g}] as its input, the teacher's net with a w embedding (stage one starts from the teacher's \
weights: init `{st1}`), stage one {sb['stage1_steps']} steps, then progressive rounds {sb['start_steps']} -> \
{sb['end_steps']} steps ({sb['steps']} steps per round), batch {sb['batch_size']}, lr {sb['lr']:g}, warm-up \
{sb['warmup']}, EMA {sb['ema_decay']}, seed {sb['seed']}; its training data the teacher's {res['train_n']} \
training digits (`--data` a file of them: by default a run-folder teacher's data set is taken by name, all 1797 \
digits).

Evaluation, n = {res['n']} with balanced labels arange(n) % 10, all from the same x_T = `top.noise(n, seed=100)`: \
the student `fewstep.load(run).sample(n, nfe, x=x_T, labels, guidance=w)` (its own rule, the round of nfe steps) \
and `sampler="guided_stochastic"` (the paper's stochastic sampler, nfe = 2 x the round's steps, seed 7); the guided \
teacher `fewstep.load(teacher).sample(n, nfe, "euler" | "dpmpp_2m", grid="karras", x=x_T, labels, guidance=w)`, \
one batched CFG call of 2 passes per step (1 at w = 1). Calls and passes are counted at each model's denoiser. \
Metrics: the classifier Frechet distance (the 64 features of the digits classifier \
`fewstep.metrics.features.classifier_for("digits")`, as `fewstep bench` computes FD; NOT comparable with FID) to \
{ref['n']} held-out digits ({ref['n'] // 10} per class; {ref['source']}, never trained on by the teacher or the \
student), and the accuracy on the asked label (the share of samples the classifier puts in it). Data floor: \
{ref['floor_n']} other held-out digits (per class {ref['floor_per_class']}) against the reference. The classifier is \
the shipped one, trained on 90% of all 1797 digits (its own held-out accuracy \
{100 * float(clf.get('val_accuracy', float('nan'))):.1f}%), so its accuracy on "held-out" digits is mostly on \
digits it was trained on: held out from the teacher, not from the classifier.

Measured:
{digits_summary(res)}

{digits_tables(res)}"""
    return text.rstrip() + "\n"


PARTS = {"splitting": (run_splitting, splitting_tables, splitting_section, SPLITTING_HEADING),
         "student": (run_student, student_tables, student_section, STUDENT_HEADING),
         "digits": (run_digits, digits_tables, digits_section, DIGITS_HEADING)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--quick", action="store_true",
                    help="splitting: fewer starts, one guidance scale; student / digits: fewer samples, tiny training "
                         "budgets (digits: its own run folders and bench/out/guided_digits_quick.json)")
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
        if a.part == "digits" and a.quick:  # the quick check does not overwrite the full run's results
            name = "digits_quick"
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
