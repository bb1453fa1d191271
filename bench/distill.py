"""Distilled students against their teachers -> bench/out/distill_<part>.json and markdown
tables for docs/BENCHMARKS.md ("Distillation (issue 4)").

    .venv/bin/python bench/distill.py --part gmm2     # exact 2-D teacher, 8 separated modes
    .venv/bin/python bench/distill.py --part gmm16    # exact d = 16 teacher (4 full-covariance modes)
    .venv/bin/python bench/distill.py --part moons    # a trained 2-D toy teacher (fewstep train --data moons)
    .venv/bin/python bench/distill.py --part digits   # a trained 8x8 digits teacher (MLP), classifier FD
    .venv/bin/python bench/distill.py --part cond [--guidance 3]   # exact 3-class mixture, conditional students

Exact parts: each student (knowledge distillation, progressive distillation, consistency
distillation, consistency training with the iCT schedule) at NFE 1, 2, 4 (the ones it has):
RMS error against the exact flow map from the same x_T (deterministic students only;
multistep consistency sampling is stochastic) and sliced-W2 to fresh data, beside the
teacher's own Euler (= DDIM) at the same NFE on its Karras grid and on the progressive
student's grid. Trained part: 1-step KD / CD (the paper's N = 18 and N = 40) and the 4-step PD
student against the teacher at 64 NFE (Heun), sliced-W2 ratios. Every method reports wall time and teacher
evaluations (samples passed through the teacher). One torch thread (small shared CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.methods import distill
from fewstep.metrics import frechet_distance, rms, sliced_w2
from fewstep.model import load

N_EVAL = 4000


def exact_teacher(part: str, folder: Path) -> tuple[str, GaussianMixture]:
    gmm = GaussianMixture.ring(8, radius=2.0, std=0.25) if part == "gmm2" else GaussianMixture.random(4, 16, seed=3)
    path = folder / f"{part}.npz"
    gmm.save(path)
    return f"gmm:{path}", gmm


def method_runs(spec: str, steps: int) -> dict:
    """name -> (method, options): the defaults, with the step budget of the bench."""
    return {
        "KD": ("knowledge", {"teacher": spec, "steps": steps}),
        "PD": ("progressive", {"teacher": spec, "steps": steps // 2, "start_steps": 64}),
        "CD": ("consistency", {"teacher": spec, "steps": steps, "tune_levels": 1000}),
        "iCT": ("consistency", {"teacher": None, "data": spec, "mode": "training", "schedule": "ict", "steps": steps,
                                "tune_levels": 1000}),
    }


def cost(run: str) -> dict:
    meta = json.loads((Path(run) / "model.json").read_text())
    return meta.get("cost", {})


def start(teacher, model) -> torch.Tensor:
    """The same noise for every model (common random numbers), at the model's sigma_max."""
    return teacher.noise(N_EVAL, seed=100).double() * (model.sigma_max / teacher.sigma_max)


def evaluate_exact(name: str, run: str, teacher, gmm: GaussianMixture, data: torch.Tensor, nfes) -> list:
    model = load(run)
    rows = []
    for k in nfes:
        if model.rule_nfes() and k not in model.rule_nfes():
            continue
        x_T = start(teacher, model)
        x = model.sample(N_EVAL, k, x=x_T.float(), seed=101)[0].double()
        deterministic = model.sampling.get("sampler") != "consistency" or k == 1
        err = rms(x, gmm.flow(x_T, model.sigma_max, 0.0, rtol=1e-7)) if deterministic else None
        rows.append({"model": name, "nfe": k, "rms_flow": err, "sliced_w2": sliced_w2(x, data)})
    return rows


def teacher_rows(spec: str, gmm, data, nfes, pd_run: str | None) -> list:
    teacher, rows = load(spec), []
    pd = load(pd_run) if pd_run else None
    for k in nfes:
        x_T = teacher.noise(N_EVAL, seed=100)
        ref = gmm.flow(x_T, teacher.sigma_max, 0.0, rtol=1e-7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = teacher.sample(N_EVAL, k, "euler", x=x_T)[0]
        rows.append({"model": "teacher Euler/DDIM (Karras grid)", "nfe": k, "rms_flow": rms(x, ref),
                     "sliced_w2": sliced_w2(x, data)})
        if pd is not None and k in pd.rule_nfes():
            grid = torch.tensor(pd.variant(k).sampling["grids"][str(k)], dtype=torch.float64)
            y_T = start(teacher, pd)
            x = teacher.sample(N_EVAL, k, "euler", x=y_T, grid=grid)[0]
            rows.append({"model": "teacher Euler/DDIM (PD's cosine grid)", "nfe": k,
                         "rms_flow": rms(x, gmm.flow(y_T, pd.sigma_max, 0.0, rtol=1e-7)), "sliced_w2": sliced_w2(x, data)})
    x_T = teacher.noise(N_EVAL, seed=100)
    flow = gmm.flow(x_T, teacher.sigma_max, 0.0, rtol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = teacher.sample(N_EVAL, 64, "heun", x=x_T)[0]
    rows.append({"model": "teacher Heun", "nfe": 63, "rms_flow": rms(x, flow), "sliced_w2": sliced_w2(x, data)})
    rows.append({"model": "exact flow map", "nfe": None, "rms_flow": 0.0, "sliced_w2": sliced_w2(flow, data)})
    return rows


def run_exact(part: str, steps: int, folder: Path) -> dict:
    spec, gmm = exact_teacher(part, folder)
    teacher = load(spec)
    data = gmm.sample(N_EVAL, generator=torch.Generator().manual_seed(12345))
    floor = sliced_w2(gmm.sample(N_EVAL, generator=torch.Generator().manual_seed(999)), data)
    rows, costs, runs = [], {}, {}
    for name, (method, opts) in method_runs(spec, steps).items():
        t0 = time.time()
        runs[name] = distill(method, {**opts, "device": "cpu", "seed": 0}, str(folder / name), progress=False)
        costs[name] = {**cost(runs[name]), "wall_seconds": time.time() - t0}
        rows += evaluate_exact(name, runs[name], teacher, gmm, data, (1, 2, 4))
        print(json.dumps({"method": name, **costs[name]}), flush=True)
    rows += teacher_rows(spec, gmm, data, (1, 2, 4), runs.get("PD"))
    return {"teacher": part, "rows": rows, "costs": costs, "data_floor_sliced_w2": floor, "n": N_EVAL}


# trained teachers: (dataset, teacher training options, metric name, metric(x, data))
TRAINED = {
    "moons": ({}, "sliced-W2", lambda x, data: sliced_w2(x, data)),
    # an MLP on the 64 flattened pixels keeps the CPU bench to minutes (a UNet teacher is ~10x slower)
    "digits": ({"net": {"kind": "mlp", "dim": 64, "hidden": 512, "depth": 4, "emb_dim": 128}},
               "FD (digits classifier)", lambda x, data: frechet_distance(x.float(), data.float(), "digits")),
}


def run_trained(part: str, steps: int, teacher_steps: int, folder: Path) -> dict:
    """A teacher trained by ``fewstep train --data PART`` and its 1-step KD / CD and 4-step PD students,
    against the teacher at 63 NFE (Heun) on the part's metric."""
    from fewstep.data.registry import load_dataset
    from fewstep.train.teacher import train_teacher

    extra, metric_name, metric = TRAINED[part]
    t0 = time.time()
    teacher_dir = train_teacher({"data": part, "steps": teacher_steps, "device": "cpu", "seed": 0, **extra},
                                str(folder / "teacher"), progress=False, evaluate=False)
    teacher_seconds = time.time() - t0
    full = load_dataset(part, seed=123).x
    n_eval = min(N_EVAL, len(full) // 2)
    held = load_dataset(part, n=2 * n_eval, seed=123).x
    data, floor = held[:n_eval], metric(held[n_eval:], held[:n_eval])
    teacher = load(teacher_dir, device="cpu")
    x_T = teacher.noise(n_eval, seed=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_x = teacher.sample(n_eval, 64, "heun", x=x_T)[0]
    base = metric(t_x, data)
    rows = [{"model": "teacher Heun", "nfe": 63, "metric": base, "ratio": 1.0}]
    for k in (1, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = teacher.sample(n_eval, k, "euler", x=x_T)[0]
        rows.append({"model": "teacher Euler/DDIM", "nfe": k, "metric": metric(x, data),
                     "ratio": metric(x, data) / base})
    runs = {"KD": ("knowledge", {"steps": steps}, 1),
            "CD": ("consistency", {"steps": steps, "tune_levels": 1000}, 1),
            "CD (N = 40)": ("consistency", {"steps": steps, "tune_levels": 1000, "n": 40}, 1),
            "PD": ("progressive", {"steps": steps // 2, "start_steps": 64, "end_steps": 4}, 4)}
    costs = {}
    for name, (method, opts, k) in runs.items():
        t0 = time.time()
        run = distill(method, {"teacher": teacher_dir, "device": "cpu", "seed": 0, **opts},
                      str(folder / name.split()[0] / str(len(costs))), progress=False)
        costs[name] = {**cost(run), "wall_seconds": time.time() - t0}
        student = load(run, device="cpu")
        x = student.sample(n_eval, k, x=x_T * (student.sigma_max / teacher.sigma_max), seed=101)[0]
        m = metric(x, data)
        rows.append({"model": name, "nfe": k, "metric": m, "ratio": m / base})
        print(json.dumps({"method": name, **costs[name], "metric": m, "ratio": m / base}), flush=True)
    return {"teacher": f"{part} (trained, EDM, MLP)", "teacher_steps": teacher_steps, "teacher_seconds": teacher_seconds,
            "metric": metric_name, "rows": rows, "costs": costs, "data_floor": floor, "n": n_eval}


def table(result: dict) -> str:
    lines = []
    if result["teacher"].startswith("gmm"):
        lines += ["| model | NFE | RMS vs exact flow | sliced-W2 to data |", "|---|---|---|---|"]
        for r in result["rows"]:
            e = "-" if r["rms_flow"] is None else f"{r['rms_flow']:.4f}"
            lines.append(f"| {r['model']} | {r['nfe'] or '-'} | {e} | {r['sliced_w2']:.4f} |")
    else:
        lines += [f"| model | NFE | {result['metric']} to data | ratio to teacher (Heun 63) |", "|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['model']} | {r['nfe']} | {r['metric']:.4g} | {r['ratio']:.2f} |")
    lines += ["", "| method | wall s | teacher evaluations |", "|---|---|---|"]
    for name, c in result["costs"].items():
        lines.append(f"| {name} | {c['wall_seconds']:.0f} | {c.get('teacher_evals', 0):.3g} |")
    floor = result.get("data_floor", result.get("data_floor_sliced_w2"))
    lines.append(f"\ndata floor ({result.get('metric', 'sliced-W2')} of {result['n']} fresh samples to the data): {floor:.4g}")
    return "\n".join(lines)


# ------------------------------------------------------------- conditional (issue 12)
def cond_runs(spec: str, steps: int, guidance) -> dict:
    """The methods on a conditional teacher, at the bench's step budget (the same for all)."""
    g = {"guidance": guidance} if guidance else {}
    net = {"kind": "mlp", "dim": 2, "hidden": 128, "depth": 3, "emb_dim": 32, "num_classes": 3}
    base = {"teacher": spec, "steps": steps, "net": net, "device": "cpu", "batch_size": 256, **g}
    # the guided ODE is stiffer: its pairs take 80 Heun evaluations (39 leave an energy distance of
    # 2.5-3e-3 to the exact guided flow, 79 reach the estimator's floor), CD 80 levels; PD starts from
    # the teacher's 32-step DDIM (its 16-step DDIM bounded the 1-step student at ~3e-3)
    nfe, levels, start = (80, 80, 32) if guidance else (40, 40, 32)
    pairs = {"pairs": 8000, "pair_batch": 2000, "pair_nfe": nfe}
    rounds = int(math.log2(start))
    runs = {
        "KD": ("knowledge", {**base, **pairs}),
        "PD": ("progressive", {**base, "steps": max(1, steps // rounds), "start_steps": start}),
        "CD": ("consistency", {**base, "n": levels}),
        "reflow+KD": ("reflow", {**base, **pairs, "rounds": 1, "reflow_nfe": nfe, "eval_samples": 500}),
    }
    if not guidance:  # consistency training learns from data, which has no guidance
        runs["iCT"] = ("consistency", {**base, "teacher": None, "data": spec, "mode": "training", "schedule": "ict"})
    return runs


def run_cond(steps: int, guidance, folder: Path, only=None) -> dict:
    """Each method's 1-step conditional student on the exact 3-class mixture, per label:
    energy distance to the exact p(x | c) (guided: to the exact guided flow of fresh noise)
    beside the teacher's Euler at 1 NFE and its accurate ODE (Heun 63 NFE; guided: rk45),
    and the estimator's floor (two independent exact sets)."""
    from fewstep.metrics import energy_distance

    gmm = GaussianMixture.labelled_ring()
    path = folder / "cond.npz"
    gmm.save(path)
    spec, n = f"gmm:{path}", N_EVAL
    teacher = load(spec)

    def exact(c, seed):
        lab = torch.full((n,), c)
        if guidance:
            x_T = 80.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            return gmm.flow(x_T, 80.0, 0.0, rtol=1e-7, labels=lab, guidance=guidance)
        return gmm.conditional(c).sample(n, generator=torch.Generator().manual_seed(seed))

    refs = {c: exact(c, 1000 + c) for c in range(3)}
    rows, costs = [], {}
    w = guidance or None
    ode = ("rk45", 4000) if guidance else ("heun", 64)  # rk45: an evaluation budget, not a step count
    for c in range(3):
        lab = torch.full((n,), c)
        e1 = teacher.sample(n, 1, sampler="euler", labels=lab, seed=200 + c, guidance=w)[0]
        acc = teacher.sample(n, ode[1], sampler=ode[0], labels=lab, seed=300 + c, guidance=w)[0]
        rows.append({"model": "teacher euler 1", "label": c, "ed": energy_distance(e1, refs[c])})
        rows.append({"model": f"teacher {ode[0]}", "label": c, "ed": energy_distance(acc, refs[c])})
        rows.append({"model": "floor (exact vs exact)", "label": c, "ed": energy_distance(exact(c, 2000 + c), refs[c])})
    for name, (method, opts) in cond_runs(spec, steps, guidance).items():
        if only and name not in only:
            continue
        t0 = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = distill(method, opts, str(folder / name.replace("+", "_")), progress=False)
            model = load(run)
            for c in range(3):
                x = model.sample(n, 1, labels=torch.full((n,), c), seed=400 + c)[0].double()
                rows.append({"model": name, "label": c, "ed": energy_distance(x, refs[c])})
        costs[name] = {"seconds": time.time() - t0, **cost(run)}
        print(name, [r["ed"] for r in rows[-3:]], flush=True)
    return {"teacher": f"labelled ring (3 classes), guidance {guidance or 1}", "rows": rows, "costs": costs, "n": n,
            "steps": steps}


ED_RESOLUTION = 1e-3  # about twice the estimator's spread at n = 4000 (the floor rows: |ED| <= 5e-4)


def cond_table(res: dict) -> str:
    """Per method and label: ED, ED / teacher Euler-1 (target <= 0.5) and ED / max(accurate
    ODE, the estimator's resolution) (target <= 3): below the resolution an ED cannot be
    told from 0, so a ratio to the accurate ODE's (about 0, often negative) would be noise."""
    rows = res["rows"]
    by = {(r["model"], r["label"]): r["ed"] for r in rows}
    acc_name = next(m for m, _ in by if m.startswith("teacher ") and m != "teacher euler 1")
    out = [f"| model | " + " | ".join(f"label {c}: ED, /Euler-1, /{acc_name[8:]}" for c in range(3)) + " |",
           "|---|" + "---|" * 3]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for c in range(3):
            e = by[(m, c)]
            ref = max(by[(acc_name, c)], ED_RESOLUTION)
            cells.append(f"{e:.4f}, {e / by[('teacher euler 1', c)]:.3f}, {e / ref:.1f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["gmm2", "gmm16", "cond", *TRAINED], required=True)
    ap.add_argument("--guidance", type=float, default=None, help="cond part: the guidance scale of the targets")
    ap.add_argument("--only", default=None, help="cond part: comma-separated methods (KD, PD, CD, reflow+KD, iCT)")
    ap.add_argument("--steps", type=int, default=2000, help="training steps per method (PD rounds: half "
                    "each; 64 -> 1 is 7 rounds on exact teachers, 64 -> 4 is 4 rounds on moons)")
    ap.add_argument("--teacher-steps", type=int, default=3000, help="trained teachers' training steps")
    ap.add_argument("--out", default=None, help="result JSON (default bench/out/distill_<part>.json)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix=f"distill_{a.part}_"))
    t0 = time.time()
    try:
        if a.part == "cond":
            res = run_cond(a.steps, a.guidance, folder, a.only.split(",") if a.only else None)
        else:
            res = (run_trained(a.part, a.steps, a.teacher_steps, folder) if a.part in TRAINED
                   else run_exact(a.part, a.steps, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    res.update({"command": "python bench/distill.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 torch thread",
                "total_seconds": time.time() - t0})
    tag = a.part + (f"_w{a.guidance:g}" if a.part == "cond" and a.guidance else "")
    out = Path(a.out or f"bench/out/distill_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(cond_table(res) if a.part == "cond" else table(res))


if __name__ == "__main__":
    main()
