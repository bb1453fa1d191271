"""Teacher training speed and final quality per toy set -> bench/out/teacher.json and a
table for docs/BENCHMARKS.md.

    .venv/bin/python bench/teacher.py [--steps 3000] [--sets moons,swiss_roll,...] [--device cpu]

For each set: steps/s of the whole loop (data, loss, backward, AdamW, EMA), the sliced-W2
of 2000 samples (Euler, 100 NFE) to held-out data, and the data-to-data floor at that n.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fewstep.data.registry import load_dataset
from fewstep.metrics import sliced_w2
from fewstep.train.teacher import train_teacher

SETS = ["moons", "swiss_roll", "8gaussians", "checkerboard", "rings", "pinwheel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/out/teacher.json")
    a = ap.parse_args()
    rows = []
    for name in a.sets.split(","):
        tmp = Path(tempfile.mkdtemp()) / name
        t0 = time.time()
        run = train_teacher({"data": name, "steps": a.steps, "device": a.device, "seed": 0}, str(tmp), progress=False,
                            evaluate=True)
        meta = json.loads((Path(run) / "model.json").read_text())
        ev = json.loads((Path(run) / "eval.json").read_text())
        held = load_dataset(name, n=4000, seed=123)
        floor = sliced_w2(held.x[:2000], held.x[2000:])
        rows.append({"data": name, "steps": a.steps, "train_seconds": meta["train_seconds"],
                     "steps_per_second": a.steps / meta["train_seconds"], "sliced_w2": ev["sliced_w2"],
                     "data_floor_sliced_w2": floor, "total_seconds": time.time() - t0})
        print(json.dumps(rows[-1]))
        shutil.rmtree(tmp.parent, ignore_errors=True)
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or ''}",
              "date": time.strftime("%Y-%m-%d"), "command": "python bench/teacher.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(a).items() if k != "out"), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print("\n| data | steps | steps/s | train s | sliced-W2 (Euler 100 NFE) | data floor |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['steps']} | {r['steps_per_second']:.0f} | {r['train_seconds']:.0f} | "
              f"{r['sliced_w2']:.3f} | {r['data_floor_sliced_w2']:.3f} |")


if __name__ == "__main__":
    main()
