"""Flow matching couplings (issue 15, item 1) on exact mixtures -> bench/out/paths_<part>.json and a
markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/paths.py                 # both parts, ~10 CPU minutes
    OMP_NUM_THREADS=1 .venv/bin/python bench/paths.py --quick         # 300 steps, a smoke run
    .venv/bin/python bench/paths.py --part ring|d16 --steps 2000

Parts: ``ring`` (``GaussianMixture.ring(8, radius=2.0, std=0.3)``, d = 2) and ``d16``
(``GaussianMixture.random(4, 16, seed=3)``). Each row is ``fewstep distill flow_matching
--data gmm:FILE --path linear --coupling C`` with the default net (MLP 256 x 4), batch 256, the
loop's defaults and ``--steps`` (2000): independent (I-CFM / 1-rectified flow), ot (exact
minibatch OT, ``ot.emd``) and sb (Sinkhorn plan, epsilon 1.0, bridge noise sqrt(eps t (1 - t) / 2)).
Read from each run's eval.json (fixed noise, 4000 samples): energy distance to 4000 exact samples
of the mixture at 1, 2, 4 Euler steps (its own rule, uniform in t), the RMS of those steps
against the flow's own accurate ODE (DPM-Solver++(2M), 64 NFE), the coupling straightness S and
the flow straightness S(Z) (Liu et al. 2022), mean squared pair distance of the coupling, and
the run's seconds (training and evaluation, wall clock; shared 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _common import machine  # noqa: E402

COUPLINGS = ("independent", "ot", "sb")


def mixture(part: str):
    from fewstep import GaussianMixture

    if part == "ring":
        return GaussianMixture.ring(8, radius=2.0, std=0.3)
    return GaussianMixture.random(4, 16, seed=3)


def run_part(part: str, steps: int, eval_samples: int, work: Path) -> dict:
    from fewstep.methods import distill

    spec = work / f"{part}.npz"
    mixture(part).save(spec)
    rows = []
    for c in COUPLINGS:
        t0 = time.time()
        out = distill("flow_matching", {"data": f"gmm:{spec}", "coupling": c, "path": "linear", "steps": steps,
                                        "device": "cpu", "eval_samples": eval_samples},
                      str(work / f"{part}_{c}"), progress=False)
        ev = json.loads((Path(out) / "eval.json").read_text())
        rows.append({"coupling": c, "seconds": time.time() - t0, "train_seconds": ev["cost"]["seconds"],
                     **{k: ev[k] for k in ("energy_distance", "sliced_w2", "euler_self_error", "euler_error",
                                           "straightness", "flow_straightness", "pair_distance", "gamma",
                                           "epsilon")}})
        print(f"  {part} {c}: {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    return {"part": part, "steps": steps, "eval_samples": eval_samples, "path": "linear", "rows": rows,
            "machine": machine()}


def table(res: dict) -> str:
    lines = [f"**{res['part']}** (linear path, {res['steps']} steps, energy distance to {res['eval_samples']} "
             f"exact samples)", "",
             "| coupling | ED 1 | ED 2 | ED 4 | self-err 1 | self-err 2 | S | S(Z) | E\\|x0-x1\\|^2 | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ed, se = r["energy_distance"], r["euler_self_error"]
        lines.append(f"| {r['coupling']} | {ed['1']:.4f} | {ed['2']:.4f} | {ed['4']:.4f} | {se['1']:.3f} | "
                     f"{se['2']:.3f} | {r['straightness']:.3f} | {r['flow_straightness']:.4f} | "
                     f"{r['pair_distance']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("ring", "d16", "all"), default="all")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=4000)
    ap.add_argument("--quick", action="store_true", help="300 steps, 1000 evaluation samples")
    a = ap.parse_args(argv)
    steps, n = (300, 1000) if a.quick else (a.steps, a.eval_samples)
    out_dir = ROOT / "out"
    out_dir.mkdir(exist_ok=True)
    parts = ("ring", "d16") if a.part == "all" else (a.part,)
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            res = run_part(part, steps, n, Path(tmp))
            (out_dir / f"paths_{part}{'_quick' if a.quick else ''}.json").write_text(json.dumps(res, indent=1))
            print(table(res) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
