"""The models before diffusion (issue 14, survey sec. 1) against truth and side by side.

    .venv/bin/python bench/foundations.py --part exact               # ~10 min on 2 cores
    .venv/bin/python bench/foundations.py --part side --data moons   # ~10 min
    .venv/bin/python bench/foundations.py --part side --data digits  # ~60 min
    .venv/bin/python bench/foundations.py --from-json bench/out/foundations_exact.json \
        bench/out/foundations_side_moons.json bench/out/foundations_side_digits.json --doc docs/BENCHMARKS.md

Results go to ``bench/out/foundations_<part>[_<data>].json``; the markdown is printed and,
with ``--doc``, replaces the section "Models before diffusion (issue 14)" of that file.

Part ``exact``, on an exact 2-D mixture (``GaussianMixture.ring(4, radius=2, std=0.3)``,
whose score, log-density and samples are known; trained on ``gmm:FILE.npz``, fresh draws):

1. score matching (``--family sm``: exact trace, sliced (SSM-VR), DSM at sigma = 0.1) at
   250 / 1000 / 4000 steps: the relative L2 error of the learned score against the exact
   one under the data distribution (``families.score_matching.score_error``; DSM against
   the score of the data noised at its level), and NCSN's per-level error;
2. the ARM (``--family arm``) with Gaussian, 5-component mixture and 256-bin softmax
   conditionals at 3000 steps: held-out NLL (nats per dimension, a density) against the
   mixture's exact entropy per dimension (-E log p / d, Monte Carlo on 20000 samples);
3. Langevin samplers on the exact score: ULA (``langevin``) and MALA at one level (0.05)
   from N(0, 3^2), 100 / 1000 / 4000 steps, and annealed Langevin (10 geometric levels
   3 -> 0.01, T = 1, 3, 10, 30, 100 per level), energy distance of 2000 samples to 2000
   exact ones, beside the null level (the 99th percentile of the energy distance between two
   independent exact sets of 2000); and the EBM (``--family ebm``, 400 steps) sampled by its
   own rule and by MALA on its energy.

Part ``side``: every family and the diffusion teacher trained with the same steps and batch
on one data set (a 2-D toy, or 8x8 digits; on digits the EBM gets the same network work
instead, steps / (1 + 20) since each of its steps runs 20 Langevin steps), then ``fewstep bench`` on each run folder:
NLL (bits/dim: the ARM's exact one, the diffusion teacher's and NCSN's through the
probability-flow ODE; none for SM and EBM, whose single-level score has no normalised
density), sample quality (sliced-W2 for the toy, the classifier Frechet distance for
digits) and sampling cost (network evaluations per sample and seconds for the bench's n).
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
from _common import fmt, machine, publish  # noqa: E402
from _common import where as machine_line  # noqa: E402

from fewstep.data.gmm import GaussianMixture  # noqa: E402
from fewstep.metrics import energy_distance  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
HEADING = "## Models before diffusion (issue 14)"
N_ED = 2000
EBM_STEPS = 400
EBM_CHAIN = 20  # the family's default ebm_steps (Langevin steps per training step)


def _train(run: Path, overrides: dict, reuse: bool) -> Path:
    from fewstep.train.teacher import train_teacher

    if reuse and (run / "eval.json").exists():
        return run
    if run.exists():
        import shutil

        shutil.rmtree(run)
    t0 = time.time()
    train_teacher({"device": "cpu", "seed": 0, **overrides}, str(run), progress=False)
    print(f"  trained {run.name} in {time.time() - t0:.0f} s", flush=True)
    return run


def _seconds(run: Path) -> float:
    return float(json.loads((run / "model.json").read_text()).get("train_seconds", float("nan")))


def null_level(gmm, n: int, reps: int = 100, q: float = 0.99) -> float:
    g = torch.Generator().manual_seed(4321)
    vals = sorted(energy_distance(gmm.sample(n, generator=g), gmm.sample(n, generator=g)) for _ in range(reps))
    return float(vals[min(len(vals) - 1, int(q * len(vals)))])


# ------------------------------------------------------------------------------ part exact
def part_exact(reuse: bool) -> dict:
    from fewstep import samplers as S
    from fewstep.families.score_matching import score_error
    from fewstep.model import load

    runs = OUT / "foundations_runs" / "exact"
    runs.mkdir(parents=True, exist_ok=True)
    gmm = GaussianMixture.ring(4, radius=2.0, std=0.3)
    spec = runs / "ring4.npz"
    gmm.save(spec)
    data = f"gmm:{spec}"
    common = {"data": data, "batch_size": 256, "n_data": 20000, "eval_samples": 500}
    out = {"machine": machine(), "mixture": "GaussianMixture.ring(4, radius=2, std=0.3), d = 2"}

    # 1. score matching
    score_rows = []
    for obj in ("exact", "sliced", "dsm"):
        for steps in (250, 1000, 4000):
            run = _train(runs / f"sm_{obj}_{steps}", {**common, "family": "sm", "sm_objective": obj, "steps": steps},
                         reuse)
            m = load(str(run), device="cpu")
            level = float(m.meta.get("level", m.sigma_min)) if obj == "dsm" else 0.0
            err = score_error(lambda y, s: m.denoiser.score(y, max(s, m.sigma_min)), gmm, level, n=20000, seed=11)
            score_rows.append({"objective": obj, "steps": steps, "level": level, "rel_score_error": err,
                               "train_seconds": _seconds(run)})
            print(f"  sm {obj} {steps}: {err:.4f}", flush=True)
    ncsn_rows = []
    for steps in (1000, 4000):
        run = _train(runs / f"ncsn_{steps}", {**common, "family": "ncsn", "steps": steps}, reuse)
        ev = json.loads((run / "eval.json").read_text())
        ncsn_rows.append({"steps": steps, **{k: v for k, v in ev.items() if "score" in k},
                          "train_seconds": _seconds(run)})
    out["score"], out["ncsn"] = score_rows, ncsn_rows

    # 2. ARM against the exact entropy
    g = torch.Generator().manual_seed(77)
    xs = gmm.sample(20000, generator=g)
    lp = gmm.log_prob(xs, 0.0)
    entropy = float(-lp.mean()) / gmm.dim
    entropy_se = float(lp.std() / math.sqrt(len(lp))) / gmm.dim
    arm_rows = []
    for output, extra in (("gaussian", {}), ("mixture", {}), ("softmax", {"arm_range": [-3.5, 3.5]})):
        run = _train(runs / f"arm_{output}", {**common, "family": "arm", "arm_output": output, "steps": 3000, **extra},
                     reuse)
        ev = json.loads((run / "eval.json").read_text())
        arm_rows.append({"output": output, "nll_nats_per_dim": ev["nll_nats_per_dim"],
                         "gap": ev["nll_nats_per_dim"] - entropy, "train_seconds": _seconds(run),
                         "sliced_w2": ev.get("sliced_w2")})
        print(f"  arm {output}: {ev['nll_nats_per_dim']:.4f} (H {entropy:.4f})", flush=True)
    out["arm"] = {"entropy_nats_per_dim": entropy, "entropy_se": entropy_se, "rows": arm_rows}

    # 3. Langevin samplers on the exact score, and the EBM
    ref = gmm.sample(N_ED, generator=torch.Generator().manual_seed(5))
    null = null_level(gmm, N_ED)
    start = 3.0 * torch.randn(N_ED, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    lang = []
    level = 0.05
    for name in ("langevin", "mala"):
        for steps in (100, 1000, 4000):
            sig = torch.tensor([3.0] + [level] * steps, dtype=torch.float64)  # len - 1 = steps, at the last level
            t0 = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = S.get(name)(gmm, start.clone(), sig, generator=torch.Generator().manual_seed(8))
            lang.append({"sampler": name, "steps": steps, "level": level, "nfe": steps + (name == "mala"),
                         "energy_distance": energy_distance(x, ref), "seconds": time.time() - t0})
    from fewstep.grids import logsnr_uniform

    levels = logsnr_uniform(10, 0.01, 3.0, final_zero=True)
    for T in (1, 3, 10, 30, 100):
        t0 = time.time()
        x = S.get("annealed_langevin")(gmm, start.clone(), levels, steps_per_level=T,
                                       generator=torch.Generator().manual_seed(8))
        lang.append({"sampler": "annealed_langevin", "steps": T, "level": "10 levels 3 -> 0.01",
                     "nfe": 10 * T + 1, "energy_distance": energy_distance(x, ref), "seconds": time.time() - t0})
    for r in lang:
        print(f"  {r['sampler']} {r['steps']}: ED {r['energy_distance']:.4f} (null {null:.4f})", flush=True)
    run = _train(runs / "ebm", {**common, "family": "ebm", "steps": EBM_STEPS}, reuse)
    ebm = load(str(run), device="cpu")
    ebm_rows = []
    for name, steps in (("own rule", None), ("mala", 1000)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if steps is None:
                k = int(ebm.meta["default_nfe"])
                x, _ = ebm.sample(N_ED, nfe=k, seed=3)
            else:
                k = steps + 1
                x, _ = ebm.sample(N_ED, nfe=k, sampler=name, seed=3)
        ebm_rows.append({"sampler": name if steps else f"own rule ({ebm.sampling.get('sampler')})", "nfe": k,
                         "energy_distance": energy_distance(x.double(), ref)})
    out["langevin"] = {"null_level": null, "n": N_ED, "rows": lang, "ebm": ebm_rows,
                       "ebm_train_seconds": _seconds(run)}
    return out


# ------------------------------------------------------------------------------- part side
SIDE = {"moons": {"steps": 4000, "batch_size": 256, "bench_n": 2000},
        "digits": {"steps": 3000, "batch_size": 128, "bench_n": 500}}


def part_side(data: str, reuse: bool, steps=None) -> dict:
    from fewstep.report.bench import run_bench

    conf = dict(SIDE[data])
    if steps:
        conf["steps"] = int(steps)
    runs = OUT / "foundations_runs" / f"side_{data}"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for fam in ("diffusion", "arm", "ebm", "sm", "ncsn"):
        over = {"data": data, "family": fam, "steps": conf["steps"], "batch_size": conf["batch_size"]}
        if data == "digits" and fam == "ebm":
            # equal network work: each EBM step runs ebm_steps Langevin steps (a forward and a
            # backward pass each) besides its own, ~21x a diffusion step through the UNet
            over["steps"] = max(1, conf["steps"] // (1 + EBM_CHAIN))
        if data == "digits" and fam == "sm":
            over["sm_objective"] = "dsm"  # sliced SM on 64 dims works too, DSM is the usual image choice
        run = _train(runs / fam, over, reuse)
        samplers = {"diffusion": ["heun"], "ncsn": []}.get(fam, [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res, _ = run_bench(str(run), samplers=samplers or "none", students="none", nfe=[35], n=conf["bench_n"],
                               out=str(runs / f"bench_{fam}"), reference=False, progress=False)
        primary = res.meta["primary"]
        summary = res.meta["summary"] or {}
        for r in res.rows:
            if r["kind"] in ("sampler", "family") and r.get("class") is None:
                rows.append({"family": fam, "method": r["method"], "nfe": r["nfe_used"], primary: r.get(primary),
                             "sample_seconds": r.get("seconds"), "train_seconds": _seconds(run),
                             "train_steps": over["steps"],
                             "nll_bits_per_dim": summary.get("teacher_nll_bits_per_dim"),
                             "nll_se": summary.get("teacher_nll_stderr_bits_per_dim")})
        floor = next(r for r in res.rows if r["kind"] == "data" and r.get("class") is None)
        print(f"  {fam}: {[(r['method'], r[primary]) for r in rows if r['family'] == fam]}", flush=True)
    return {"machine": machine(), "data": data, **conf, "primary": primary, "data_floor": floor.get(primary),
            "rows": rows}


# -------------------------------------------------------------------------------- markdown
def _f(v, p=4):
    return fmt(v, p)


def markdown(results: list) -> str:
    lines = [HEADING, ""]
    for res in results:
        where = machine_line(res["machine"])
        if "score" in res:
            lines += [f"### On the exact mixture ({res['mixture']})", "",
                      f"`.venv/bin/python bench/foundations.py --part exact` ({where}).", "",
                      "**Score matching** (`--family sm`): relative L2 error E||s - s*||^2 / E||s*||^2 of the learned "
                      "score against the exact one under the data (DSM: under the data noised at its level, against "
                      "that density's score); 0 is exact, 1 is s = 0.", "",
                      "| objective | steps | level | rel. score error | train s |", "|---|---|---|---|---|"]
            lines += [f"| {r['objective']} | {r['steps']} | {_f(r['level'], 3)} | {_f(r['rel_score_error'])} | "
                      f"{_f(r['train_seconds'], 0)} |" for r in res["score"]]
            if res.get("ncsn"):
                keys = sorted({k for r in res["ncsn"] for k in r if "score" in k})
                lines += ["", "NCSN (`--family ncsn`, 10 geometric levels, weighted DSM), its eval.json: "
                          + "; ".join(f"{r['steps']} steps: " + ", ".join(f"{k} {_f(r[k]) if not isinstance(r[k], list) else '[' + ', '.join(_f(v, 3) for v in r[k]) + ']'}" for k in keys)
                                      for r in res["ncsn"])]
            a = res["arm"]
            lines += ["", f"**ARM** (`--family arm`, MADE, 3000 steps): held-out NLL in nats per dimension against the "
                      f"mixture's exact entropy per dimension H = {a['entropy_nats_per_dim']:.4f} "
                      f"(+- {a['entropy_se']:.4f}). A Gaussian conditional cannot represent a multimodal "
                      "p(x2 | x1) or p(x1): it falls short; mixture and softmax conditionals come close.", "",
                      "| conditionals | NLL nats/dim | NLL - H | sliced-W2 | train s |", "|---|---|---|---|---|"]
            lines += [f"| {r['output']} | {_f(r['nll_nats_per_dim'])} | {_f(r['gap'])} | {_f(r.get('sliced_w2'))} | "
                      f"{_f(r['train_seconds'], 0)} |" for r in a["rows"]]
            lg = res["langevin"]
            lines += ["", f"**Langevin samplers on the exact score** and the **EBM**: energy distance of {lg['n']} "
                      f"samples to {lg['n']} exact ones; null level (99th percentile between two exact sets) "
                      f"{lg['null_level']:.4f}. ULA and MALA at one level (0.05) from N(0, 3^2); annealed Langevin "
                      "(Song & Ermon 2019, Alg. 1, eps = 2e-5, final denoising step) on 10 geometric levels; "
                      "steps = steps per level for it.", "",
                      "| sampler | steps | NFE | energy distance | seconds |", "|---|---|---|---|---|"]
            lines += [f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {_f(r['energy_distance'])} | "
                      f"{_f(r['seconds'], 2)} |" for r in lg["rows"]]
            lines += [f"| EBM ({EBM_STEPS} steps): {r['sampler']} | - | {r['nfe']} | {_f(r['energy_distance'])} | - |"
                      for r in lg["ebm"]]
            lines += [""]
        else:
            p = res["primary"]
            name = {"sliced_w2": "sliced-W2", "fd": "classifier FD"}.get(p, p)
            lines += [f"### Side by side on {res['data']} ({res['steps']} steps, batch {res['batch_size']} each)", "",
                      f"`.venv/bin/python bench/foundations.py --part side --data {res['data']}` ({where}). "
                      f"{name} of {res['bench_n']} samples against held-out data (data-to-data floor "
                      f"{_f(res['data_floor'])}); NLL on held-out data (ARM exact; diffusion and NCSN through the "
                      "probability-flow ODE; SM and EBM have none); seconds = sampling the bench's n.", "",
                      f"| family | method | NFE / sample | {name} | NLL bits/dim | sample s | train steps | train s |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['family']} | {r['method']} | {r['nfe']} | {_f(r.get(p))} | "
                      f"{_f(r['nll_bits_per_dim'], 3)}{' +- ' + _f(r['nll_se'], 3) if r.get('nll_se') else ''} | "
                      f"{_f(r['sample_seconds'], 1)} | {r.get('train_steps', res['steps'])} | {_f(r['train_seconds'], 0)} |"
                      for r in res["rows"]]
            if any(r.get("train_steps", res["steps"]) != res["steps"] for r in res["rows"]):
                lines += ["", f"The EBM trains {res['steps'] // (1 + EBM_CHAIN)} steps here, the same network work as "
                          f"the others' {res['steps']}: each of its steps runs {EBM_CHAIN} Langevin steps (a forward "
                          "and a backward pass each) besides its own. Its FD says that this budget is far from "
                          "enough on 64 dimensions; the 2-D tables show it learning."]
            lines += [""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["exact", "side"])
    ap.add_argument("--data", default="moons", help="part side: a 2-D toy or digits")
    ap.add_argument("--steps", type=int, help="part side: training steps (default per data set)")
    ap.add_argument("--reuse", action="store_true", help="evaluate finished run folders again, train the others")
    ap.add_argument("--from-json", nargs="+", help="only render these result files")
    ap.add_argument("--doc", help="markdown file whose section to replace")
    a = ap.parse_args()
    if a.from_json:
        results = [json.loads(Path(f).read_text()) for f in a.from_json]
    else:
        if a.part is None:
            ap.error("give --part exact|side or --from-json")
        OUT.mkdir(parents=True, exist_ok=True)
        res = part_exact(a.reuse) if a.part == "exact" else part_side(a.data, a.reuse, a.steps)
        name = "foundations_exact.json" if a.part == "exact" else f"foundations_side_{a.data}.json"
        (OUT / name).write_text(json.dumps(res, indent=1))
        results = [res]
    publish(markdown(results), a.doc, HEADING)


if __name__ == "__main__":
    main()
