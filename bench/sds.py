"""Score distillation sampling (issue 16): points on the exact mixture, an image generator and
radiance fields on the render teacher, with sds, sjc and coarse-to-fine.

Parts (each writes bench/out/sds_<part>.json; ``--table`` prints the markdown of all done):
- ``points``: the exact 4-mode mixture of tests/test_methods_sds.py (two classes) and the
  ring of 8: log-density gap to the mode each point climbs to, share in the label's class,
  for DreamFusion's t range and a low-noise range, both weightings, sds and sjc, guidance.
- ``teacher``: the class-conditional render teacher (``fewstep train --data renders:...``),
  reused when it exists; its classifier (``fewstep.metrics.features.classifier_for``).
- ``image``: SDS into the image generator per class against the teacher's own samples:
  classifier accuracy on the label, Frechet distance on the classifier's features to real
  renders of the class, diversity (mean pairwise distance), saturated share.
- ``nerf``: per class a field by sds, sjc and coarse-to-fine; accuracy over 32 random new
  views by the classifier trained on real renders (chance 1/num_classes; the untrained field
  and real renders beside), steps and seconds; turntable strips into docs/sds/.

    .venv/bin/python bench/sds.py --part points
    .venv/bin/python bench/sds.py --part teacher --teacher-steps 6000
    .venv/bin/python bench/sds.py --part image
    .venv/bin/python bench/sds.py --part nerf --steps 1500
    .venv/bin/python bench/sds.py --table
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

OUT = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))
RUNS = OUT / "sds_runs"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "sds"
RENDERS = "renders:size=16"
CLASSES = ("sphere", "cube", "torus", "cylinder", "cone")


def _save(part: str, res: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    res["machine"] = machine()
    (OUT / f"sds_{part}.json").write_text(json.dumps(res, indent=1))


def _load(part: str) -> dict:
    p = OUT / f"sds_{part}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _distill(name: str, opts: dict, fresh: bool = True) -> tuple[Path, float]:
    from fewstep.methods import distill

    out = RUNS / name
    if fresh and out.exists() and not (out / "model.json").is_file():
        shutil.rmtree(out)
    t = time.perf_counter()
    if not (out / "model.json").is_file():
        distill("sds", opts, out=str(out), progress=False)
    return out, time.perf_counter() - t


# ---------------------------------------------------------------------------- points
def four_modes():
    from fewstep import GaussianMixture

    means = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0], [0.0, -3.0]], dtype=torch.float64)
    return GaussianMixture(torch.ones(4), means, 0.09 * torch.eye(2, dtype=torch.float64).expand(4, 2, 2),
                           labels=torch.tensor([0, 0, 1, 1]))


def run_points(steps: int) -> dict:
    from fewstep import GaussianMixture
    from fewstep.model import load_generator

    RUNS.mkdir(parents=True, exist_ok=True)
    mixtures = {"four": four_modes(), "ring8": GaussianMixture.ring(8, radius=2.0, std=0.25)}
    rows = []
    configs = [
        ("sds, t 0.02-0.98 (DreamFusion)", {}),
        ("sds, t 0.02-0.5", {"t_max": 0.5}),
        ("sds uniform w, t 0.02-0.98", {"weighting": "uniform"}),
        ("sjc, t 0.02-0.98", {"estimator": "sjc"}),
        ("sjc, t 0.02-0.5", {"estimator": "sjc", "t_max": 0.5}),
    ]
    guided = [("label 0, w 1", {"label": 0}), ("label 0, w 4", {"label": 0, "guidance": 4.0}),
              ("label 0, w 16", {"label": 0, "guidance": 16.0}), ("label 0, w 100 (DreamFusion)",
                                                                   {"label": 0, "guidance": 100.0})]
    for mname, gmm in mixtures.items():
        path = RUNS / f"{mname}.npz"
        gmm.save(path)
        todo = configs + ([(n, c) for n, c in guided] + [(n + ", t 0.02-0.5", {**c, "t_max": 0.5}) for n, c in guided]
                          if gmm.num_classes else [])
        for label, extra in todo:
            opts = {"teacher": f"gmm:{path}", "count": 64, "batch_size": 64, "steps": steps, "lr": 0.02, "seed": 0,
                    **extra}
            tag = f"{mname}-" + "-".join(f"{k}{v}" for k, v in sorted(extra.items())) or "default"
            out, secs = _distill(tag, opts)
            ev = json.loads((out / "eval.json").read_text())
            x = load_generator(out).sample(64).double()
            rows.append({"mixture": mname, "config": label, "options": extra, "seconds": round(secs, 1),
                         "steps": steps, "mode_gap_mean": ev["mode_gap_mean"], "mode_gap_median": ev["mode_gap_median"],
                         "mode_gap_max": ev["mode_gap_max"], "label_share": ev.get("label_share"),
                         "radius_mean": float(x.norm(dim=1).mean()),
                         "radius_mode": 3.0 if mname == "four" else 2.0})
            print(rows[-1], flush=True)
    return {"rows": rows, "command": f"bench/sds.py --part points --points-steps {steps}"}


def points_table(res: dict) -> str:
    lines = ["| mixture | configuration | mean / median / max log-density gap to the mode (nats) | points' mean radius "
             "(modes at) | share in the label's class | seconds |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        share = "" if r["label_share"] is None else f"{100 * r['label_share']:.0f}%"
        lines.append(f"| {r['mixture']} | {r['config']} | {r['mode_gap_mean']:.2f} / {r['mode_gap_median']:.2f} / "
                     f"{r['mode_gap_max']:.2f} | {r['radius_mean']:.2f} ({r['radius_mode']:.0f}) | {share} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("points", "teacher", "image", "nerf"))
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--points-steps", type=int, default=1500)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.part == "points":
        _save("points", run_points(a.points_steps))
    if a.table:
        res = _load("points")
        if res:
            m = res["machine"]
            print(f"`{res['command']}` on {m['nproc']} cores ({m['cpu']}), {m['date']}, commit {m['commit']}.\n")
            print(points_table(res))


if __name__ == "__main__":
    main()
