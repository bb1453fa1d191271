"""One- and two-step students of every method, side by side on the exact mixtures (issue 20)
-> bench/out/one_step_<part>.json and the markdown tables of docs/BENCHMARKS.md ("One-step
methods beyond the survey, side by side (issue 20)").

    OMP_NUM_THREADS=1 .venv/bin/python bench/one_step.py --part gmm2 [--steps 3000] [--only DMD2,SiD]
    OMP_NUM_THREADS=1 .venv/bin/python bench/one_step.py --part gmm16 [--redo shortcut]
    OMP_NUM_THREADS=1 .venv/bin/python bench/one_step.py --part digits --steps 2000
    .venv/bin/python bench/one_step.py --table gmm2      # the markdown of a finished part

Teachers: the exact ring of 8 (d = 2) and the d = 16 mixture of 4 full-covariance modes of
bench/distill.py. Every method runs with its defaults at the same training budget (``--steps``;
PD splits it over its 6 rounds, reflow over its flow and its one-step student), the default MLP,
batch 256, seed 0: what a user gets with no tuning, except two schedules the papers give as a
count of steps in runs 100x longer, which the bench scales to its budget: sCM's tangent warm-up
(a tenth of the steps, the paper's 10k of 100k+) and shortcut's target EMA (0.99: the paper's
0.999 has a time constant of 1000 steps, and its seven bootstrap levels each wait for the one
below, so at a few thousand steps the d > 0 levels never leave their initialisation). Each student is sampled at NFE 1 and 2
(where its rule has them) from the same noise (4000 samples): energy distance and sliced-W2 to
4000 exact samples, and the RMS error against the exact flow map from the same x_T for the
methods that target that map (KD, PD, CD, reflow, sCM, CTM, shortcut, MeanFlow; DMD2 and SiD
match the distribution, not the map: "-"). Multistep consistency-style sampling is stochastic,
so its 2-step RMS is left out too. The teacher's Euler at 1 and 2 NFE and its Heun at 64 NFE
(127 evaluations) from the same noise, and the estimator's floor (two exact sets), are the
yardsticks. Each method's result is saved as it finishes; a rerun skips those present.
``--only "DMD2 4x,SiD 4x"`` adds DMD2 and SiD at 4x the loop steps (still fewer teacher evaluations than KD at
1x: their steps spend few), rows outside the default set.

Digits: a teacher trained by ``fewstep train --data digits`` (EDM, an MLP 512x4 on the 64
pixels, 3000 steps; bench/distill.py's digits teacher), kept in bench/out/one_step_runs/digits
so that reruns reuse it; each method distils it with its defaults (MeanFlow trains from the
digits themselves: it starts only from a flow teacher); classifier Frechet distance (the
digits classifier's features) of 898 samples to 898 held-out digits, beside the teacher's
samplers; the floor is the FD of two held-out sets.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill import cost, exact_teacher  # noqa: E402

from fewstep.methods import distill  # noqa: E402
from fewstep.metrics import energy_distance, rms, sliced_w2  # noqa: E402
from fewstep.model import load  # noqa: E402

N = 4000
OUT = Path(__file__).resolve().parent / "out"
MAP = {"KD", "PD", "CD", "reflow", "sCM", "CTM", "shortcut", "MeanFlow"}  # methods that target the flow map
SURVEY = ("KD", "PD", "CD", "reflow")


def runs(spec: str, steps: int) -> dict:
    """name -> (method, options): each method's defaults at the bench's budget."""
    return {
        "KD": ("knowledge", {"teacher": spec, "steps": steps}),
        "PD": ("progressive", {"teacher": spec, "steps": steps // 6, "start_steps": 64}),
        "CD": ("consistency", {"teacher": spec, "steps": steps}),
        "reflow": ("reflow", {"teacher": spec, "rounds": 1, "round_steps": [steps // 2],
                              "distill_steps": steps // 2}),
        "DMD2": ("dmd2", {"teacher": spec, "steps": steps}),
        "SiD": ("sid", {"teacher": spec, "steps": steps}),
        # the tangent warm-up is a share of training (the paper's 10k of its 100k-400k steps), not a count
        "sCM": ("scm", {"teacher": spec, "steps": steps, "tangent_warmup": steps // 10}),
        "CTM": ("ctm", {"teacher": spec, "steps": steps}),
        "shortcut": ("shortcut", {"teacher": spec, "steps": steps, "target_ema": 0.99}),
        "MeanFlow": ("meanflow", {"data": spec, "steps": steps}),
    }


# the distribution matchers at 4x the loop steps: a DMD2 / SiD step spends far fewer teacher evaluations than a
# KD or CD step (DMD2 updates its generator on one step in five), so at 4x the steps they still spend fewer
# teacher evaluations than KD at 1x; run with --only "DMD2 4x,SiD 4x" (not part of the default set)
LONGER = {"DMD2 4x": ("dmd2", 4, {}), "SiD 4x": ("sid", 4, {}),
          # SiD's drift at 4x on d = 16 (0.0039 at 1x, 0.0425 at 4x): the same run at a tenth of the shared lr
          "SiD 4x lr 1e-4": ("sid", 4, {"lr": 1e-4})}  # no comma: --only splits on commas


def longer_runs(spec: str, steps: int) -> dict:
    return {name: (method, {"teacher": spec, "steps": k * steps, **extra})
            for name, (method, k, extra) in LONGER.items()}


def measure(model, teacher, gmm, data, k: int, name: str) -> dict:
    x_T = teacher.noise(N, seed=100).double() * (model.sigma_max / teacher.sigma_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = model.sample(N, k, x=x_T.to(model.dtype), seed=101)[0].double().cpu()
    stochastic = model.sampling.get("sampler") == "consistency" and k > 1
    err = None
    if name in MAP and not stochastic:
        err = rms(x, gmm.flow(x_T, float(model.sigma_max), 0.0, rtol=1e-7))
    return {"energy_distance": energy_distance(x, data), "sliced_w2": sliced_w2(x, data), "rms_flow": err}


def teacher_rows(teacher, gmm, data) -> dict:
    out = {}
    x_T = teacher.noise(N, seed=100)
    flow = gmm.flow(x_T, teacher.sigma_max, 0.0, rtol=1e-7)
    for label, k, sampler in (("teacher Euler", 1, "euler"), ("teacher Euler", 2, "euler"),
                              ("teacher Heun (127 evaluations)", 64, "heun")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = teacher.sample(N, k, sampler, x=x_T)[0]
        out.setdefault(label, {})[str(k)] = {"energy_distance": energy_distance(x, data),
                                             "sliced_w2": sliced_w2(x, data), "rms_flow": rms(x, flow)}
    out["exact flow map"] = {"-": {"energy_distance": energy_distance(flow, data), "sliced_w2": sliced_w2(flow, data),
                                   "rms_flow": 0.0}}
    return out


def run_digits(steps: int, only, out_dir: Path, teacher_steps: int = 3000) -> dict:
    """The digits part (module docstring): the trained teacher and every method's students by FD."""
    from fewstep.data.registry import load_dataset
    from fewstep.metrics import frechet_distance
    from fewstep.train.teacher import train_teacher

    path = out_dir / "one_step_digits.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("steps") not in (None, steps):
        raise SystemExit(f"{path} holds a run at --steps {result['steps']}; move it away or give that budget")
    work = out_dir / "one_step_runs" / "digits"
    tdir = work / "teacher"
    if not (tdir / "model.json").is_file():
        t0 = time.time()
        train_teacher({"data": "digits", "steps": teacher_steps, "device": "cpu", "seed": 0,
                       "net": {"kind": "mlp", "dim": 64, "hidden": 512, "depth": 4, "emb_dim": 128}},
                      str(tdir), progress=False, evaluate=False, resume=tdir.exists())
        result["teacher_seconds"] = time.time() - t0
    teacher = load(str(tdir), device="cpu")
    n = min(N, len(load_dataset("digits", seed=123).x) // 2)
    held = load_dataset("digits", n=2 * n, seed=123).x.float()
    data = held[:n]

    def fd(x):
        return frechet_distance(x.float(), data, "digits")

    result.update(part="digits", steps=steps, n=n, machine=f"{platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} torch thread(s)", torch=torch.__version__, metric="classifier FD")
    result["floor"] = {"fd": fd(held[n:])}
    x_T = teacher.noise(n, seed=100)
    if "teacher" not in result:
        rows = {}
        for label, k, sampler in (("teacher Euler", 1, "euler"), ("teacher Euler", 2, "euler"),
                                  ("teacher Heun (127 evaluations)", 64, "heun")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows.setdefault(label, {})[str(k)] = {"fd": fd(teacher.sample(n, k, sampler, x=x_T)[0])}
        result["teacher"] = rows
    methods = result.setdefault("methods", {})
    for name, (method, opts) in runs(str(tdir), steps).items():
        if (only and name not in only) or name in methods:
            continue
        opts = {**opts, "data": "digits", "teacher": None} if name == "MeanFlow" else opts
        t0 = time.time()
        out = distill(method, {**opts, "device": "cpu", "seed": 0}, str(work / name), progress=False,
                      resume=(work / name / "config.json").is_file())
        wall = time.time() - t0
        model = load(out, device="cpu")
        nfes = [k for k in (1, 2) if not model.rule_nfes() or k in model.rule_nfes()]
        row = {}
        for k in nfes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = model.sample(n, k, x=(x_T * (model.sigma_max / teacher.sigma_max)).to(model.dtype), seed=101)[0]
            row[str(k)] = {"fd": fd(x.cpu())}
        methods[name] = {"method": method, "options": {k: v for k, v in opts.items() if k not in ("teacher", "data")},
                         "wall_seconds": wall, "teacher_evals": cost(out).get("teacher_evals", 0), "nfe": row}
        print(json.dumps({"method": name, "wall_seconds": round(wall), **row}), flush=True)
        path.write_text(json.dumps(result, indent=1))
    path.write_text(json.dumps(result, indent=1))
    return result


def digits_table(result: dict) -> str:
    lines = ["| model | NFE | classifier FD to held-out digits | teacher evaluations | wall s |", "|---|---|---|---|---|"]
    for name, rows in result["teacher"].items():
        for k, r in rows.items():
            lines.append(f"| {name} | {k} | {r['fd']:.2f} | - | - |")
    for name, m in result["methods"].items():
        for k, r in m["nfe"].items():
            lines.append(f"| {name} (`{m['method']}`) | {k} | {r['fd']:.2f} | {m['teacher_evals']:.3g} | "
                         f"{m['wall_seconds']:.0f} |")
    lines.append(f"\nFloor (FD of two held-out sets of {result['n']}): {result['floor']['fd']:.2f}")
    survey = [m["nfe"]["1"]["fd"] for n, m in result["methods"].items() if n in SURVEY]
    new = {n: m["nfe"]["1"]["fd"] for n, m in result["methods"].items() if n not in SURVEY}
    if survey and new:
        best = min(new, key=new.get)
        lines.append(f"\nBest survey method at 1 NFE: FD {min(survey):.2f}; best new method: {best} {new[best]:.2f}.")
    return "\n".join(lines)


def run(part: str, steps: int, only, folder: Path, out_dir: Path = OUT) -> dict:
    path = out_dir / f"one_step_{part}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("steps") not in (None, steps):
        raise SystemExit(f"{path} holds a run at --steps {result['steps']}; move it away or give that budget")
    spec, gmm = exact_teacher(part, folder)
    teacher = load(spec)
    data = gmm.sample(N, generator=torch.Generator().manual_seed(12345))
    result.update(part=part, steps=steps, n=N, machine=f"{platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} torch thread(s)", torch=torch.__version__)
    result["floor"] = {"energy_distance": energy_distance(gmm.sample(N, generator=torch.Generator().manual_seed(999)),
                                                          data)}
    result.setdefault("teacher", teacher_rows(teacher, gmm, data))
    methods = result.setdefault("methods", {})
    for name, (method, opts) in {**runs(spec, steps), **longer_runs(spec, steps)}.items():
        if (only and name not in only) or (not only and name in LONGER) or name in methods:
            continue
        t0 = time.time()
        out = distill(method, {**opts, "device": "cpu", "seed": 0}, str(folder / name.replace(" ", "_")),
                      progress=False)
        wall = time.time() - t0
        model = load(out, device="cpu")
        nfes = [k for k in (1, 2) if not model.rule_nfes() or k in model.rule_nfes()]
        methods[name] = {"method": method, "options": {k: v for k, v in opts.items() if k not in ("teacher", "data")},
                         "wall_seconds": wall, "teacher_evals": cost(out).get("teacher_evals", 0),
                         "nfe": {str(k): measure(model, teacher, gmm, data, k, name) for k in nfes}}
        print(json.dumps({"method": name, "wall_seconds": round(wall), **methods[name]["nfe"]}), flush=True)
        out_dir.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    path.write_text(json.dumps(result, indent=1))
    return result


def floor_noise(part: str, pairs: int = 8) -> float:
    """The energy-distance estimator's noise at N samples: the standard deviation over ``pairs``
    pairs of independent exact sets of the part's mixture."""
    with tempfile.TemporaryDirectory() as tmp:
        _, gmm = exact_teacher(part, Path(tmp))
    vals = [energy_distance(gmm.sample(N, generator=torch.Generator().manual_seed(7000 + 2 * i)),
                            gmm.sample(N, generator=torch.Generator().manual_seed(7001 + 2 * i))) for i in range(pairs)]
    return float(torch.tensor(vals).std())


def table(result: dict) -> str:
    """The part's markdown: one row per model and NFE, then the targets."""
    def cell(v, f=".4f"):
        return "-" if v is None else format(v, f)

    lines = ["| model | NFE | energy distance | sliced-W2 | RMS vs exact flow map | teacher evaluations | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in result["teacher"].items():
        for k, r in rows.items():
            lines.append(f"| {name} | {k} | {cell(r['energy_distance'])} | {cell(r['sliced_w2'])} | "
                         f"{cell(r['rms_flow'])} | - | - |")
    for name, m in result["methods"].items():
        for k, r in m["nfe"].items():
            lines.append(f"| {name} (`{m['method']}`) | {k} | {cell(r['energy_distance'])} | {cell(r['sliced_w2'])} | "
                         f"{cell(r['rms_flow'])} | {m['teacher_evals']:.3g} | {m['wall_seconds']:.0f} |")
    lines.append(f"\nEstimator floor (energy distance of two exact sets of {result['n']}): "
                 f"{result['floor']['energy_distance']:.4f}")
    euler1 = result["teacher"]["teacher Euler"]["1"]["energy_distance"]
    heun = result["teacher"]["teacher Heun (127 evaluations)"]["64"]["energy_distance"]
    noise = floor_noise(result["part"])
    bar = max(heun, noise)  # the teacher at 64 NFE sits at the estimator's floor: 3x its noise, not of a number ~0
    lines.append(f"Estimator noise (standard deviation of the energy distance of two exact sets of {result['n']}, "
                 f"8 pairs): {noise:.4f}")
    lines += ["", f"Targets (1-step energy distance): at most 0.5x the teacher's Euler at 1 NFE ({0.5 * euler1:.4f}) "
              f"and at most 3x the teacher's Heun at 64 NFE, read as 3x max(its energy distance {heun:.4f}, the "
              f"estimator's noise {noise:.4f}) = {3 * bar:.4f}.", "",
              "| method | 1-step energy distance | / teacher Euler 1 | / max(Heun 64, noise) | both targets |",
              "|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        e = m["nfe"]["1"]["energy_distance"]
        ok = e <= 0.5 * euler1 and e <= 3 * bar
        lines.append(f"| {name} | {e:.4f} | {e / euler1:.3f} | {e / bar:.1f} | {'yes' if ok else 'no'} |")
    survey = {n: m["nfe"]["1"]["energy_distance"] for n, m in result["methods"].items() if n in SURVEY}
    new = {n: m["nfe"]["1"]["energy_distance"] for n, m in result["methods"].items() if n not in SURVEY}
    if survey and new:
        bs, bn = min(survey, key=survey.get), min(new, key=new.get)
        gap = survey[bs] - new[bn]
        verdict = ("beats it" if gap > 2 * noise else "ties with it within twice the estimator's noise"
                   if abs(gap) <= 2 * noise else "does not beat it")
        lines.append(f"\nBy energy distance at 1 NFE: best survey method {bs} {survey[bs]:.4f}, best new method {bn} "
                     f"{new[bn]:.4f}: {verdict}.")
        rms1 = {n: m["nfe"]["1"]["rms_flow"] for n, m in result["methods"].items() if m["nfe"]["1"]["rms_flow"] is not None}
        rs = {n: v for n, v in rms1.items() if n in SURVEY}
        rn = {n: v for n, v in rms1.items() if n not in SURVEY}
        if rs and rn:
            bs, bn = min(rs, key=rs.get), min(rn, key=rn.get)
            lines.append(f"By RMS against the exact flow map at 1 NFE (the methods that target it): best survey method "
                         f"{bs} {rs[bs]:.4f}, best new method {bn} {rn[bn]:.4f} "
                         f"({'beats it' if rn[bn] < rs[bs] else 'does not beat it'}).")
    return "\n".join(lines)


def redo(part: str, names: set, out_dir: Path) -> None:
    """Drop ``names``' results from the part's file (and their digits run folders) so they run again."""
    import shutil

    path = out_dir / f"one_step_{part}.json"
    if path.is_file():
        result = json.loads(path.read_text())
        for name in names:
            result.get("methods", {}).pop(name, None)
        path.write_text(json.dumps(result, indent=1))
    for name in names:
        if part == "digits" and name != "teacher":
            shutil.rmtree(out_dir / "one_step_runs" / "digits" / name, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("gmm2", "gmm16", "digits"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--only", default=None, help="comma-separated method names (default all; 'DMD2 4x' and "
                    "'SiD 4x' only when named)")
    ap.add_argument("--redo", default=None, help="comma-separated method names to run again (their results and "
                    "digits run folders are dropped first)")
    ap.add_argument("--table", choices=("gmm2", "gmm16", "digits"), help="print the markdown of a finished part")
    ap.add_argument("--teacher-steps", type=int, default=3000, help="digits: the teacher's training steps")
    ap.add_argument("--out", default=str(OUT), help="folder of the result files (default bench/out)")
    args = ap.parse_args()
    if args.table:
        res = json.loads((Path(args.out) / f"one_step_{args.table}.json").read_text())
        print(digits_table(res) if args.table == "digits" else table(res))
        return
    torch.set_num_threads(1)
    only = set(args.only.split(",")) if args.only else None
    if args.redo:
        redo(args.part, set(args.redo.split(",")), Path(args.out))
    if args.part == "digits":
        print(digits_table(run_digits(args.steps, only, Path(args.out), args.teacher_steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.part, args.steps, only, Path(tmp), Path(args.out))
    print(table(result))


if __name__ == "__main__":
    main()
