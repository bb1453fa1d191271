"""PSF point clouds (issue 5): flow teacher -> reflow -> one-step student at a CPU size,
MMD-CD / COV-CD / 1-NNA-CD of the multistep teacher against the one-step student ->
bench/out/pointcloud.json and a table for docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pointcloud.py [--teacher-steps 3000] [--steps 1000] ...

All models start from the same noise and are scored against the same held-out clouds
(``eval_clouds`` of a fresh draw of the data spec). The "data" row scores a second fresh
draw against them: the floor of each metric at this set size. The target (issue 5) is the
student's MMD-CD and 1-NNA-CD within 1.3x of the multistep teacher's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Clock, machine  # noqa: E402

TARGET = 1.3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="pointclouds:points=256,classes=cube+torus+cone,pose=yaw")
    ap.add_argument("--n-data", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--reflow-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=1000, help="one-step student's training steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--pair-nfe", type=int, default=32)
    ap.add_argument("--distance", default="chamfer")
    ap.add_argument("--eval-clouds", type=int, default=100)
    ap.add_argument("--eval-nfe", type=int, default=32)
    ap.add_argument("--heun-nfe", type=int, default=63, help="extra teacher row: Heun at this NFE (0: none)")
    ap.add_argument("--teacher", default=None, help="a trained flow teacher (e.g. another run's round1/): skips stage 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--run", default="bench/out/pointcloud_run", help="the PSF run folder (resumed if present)")
    ap.add_argument("--out", default="bench/out/pointcloud.json")
    a = ap.parse_args()

    from fewstep.data.registry import load_dataset
    from fewstep.methods import distill
    from fewstep.metrics.pointcloud import cloud_set_metrics
    from fewstep.model import load

    net = {"kind": "pointnet", "dim": 3, "hidden": a.hidden, "depth": a.depth, "emb_dim": 64}
    cfg = {"data": a.data, "n_data": a.n_data, "net": net, "teacher_steps": a.teacher_steps,
           "reflow_steps": a.reflow_steps, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
           "pairs": a.pairs, "pair_nfe": a.pair_nfe, "distance": a.distance, "eval_clouds": a.eval_clouds,
           "eval_nfe": a.eval_nfe, "seed": a.seed, "device": a.device, "teacher": a.teacher}
    run = Path(a.run)
    with Clock() as clock:
        distill("pointcloud", cfg, str(run), resume=(run / "config.json").is_file(), progress=False)
    ev = json.loads((run / "eval.json").read_text())
    rows = {k: dict(v) for k, v in ev["models"].items()}
    real = load_dataset(a.data, n=a.eval_clouds, seed=ev["reference_seed"]).x
    rows["data"] = {"nfe": 0, "sampler": "fresh draw", **cloud_set_metrics(
        load_dataset(a.data, n=a.eval_clouds, seed=a.seed + 31337).x, real)}
    if a.heun_nfe:
        teacher = load(a.teacher or str(run / "round1"), device=a.device)
        x = teacher.sample(a.eval_clouds, a.heun_nfe, sampler="heun", grid="time",
                           x=teacher.noise(a.eval_clouds, seed=a.seed + 104729))[0]
        rows["teacher_heun"] = {"nfe": a.heun_nfe, "sampler": "heun", **cloud_set_metrics(x.float().cpu(), real)}
    stages = json.loads((run / "model.json").read_text())["stages"]  # stage -> folder (round1, round2, student)
    cost = {s: json.loads((run / f / "model.json").read_text()).get("cost", {}) for s, f in stages.items()
            if (run / f / "model.json").is_file()}
    ratio = {m: rows["student_1"][m] / rows["teacher"][m] for m in ("mmd_cd", "nna_cd")}
    result = {"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/pointcloud.py " + " ".join(sys.argv[1:]),
              "machine": machine(), "config": cfg, "rows": rows, "student_over_teacher": ratio,
              "target": TARGET, "met": {m: r <= TARGET for m, r in ratio.items()},
              "stage_seconds": {s: c.get("seconds") for s, c in cost.items()},
              "wall_seconds": clock.wall, "cpu_seconds": clock.cpu, "date": time.strftime("%Y-%m-%d")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("student_over_teacher", "met", "stage_seconds", "wall_seconds",
                                              "cpu_seconds")}))
    print("\n| model | sampler, NFE | MMD-CD (x1e-2) | COV-CD | 1-NNA-CD | MMD-CD / teacher | 1-NNA / teacher |")
    print("|---|---|---|---|---|---|---|")
    names = {"data": "data (fresh draw)", "teacher": "flow teacher", "teacher_heun": "flow teacher",
             "teacher_1": "flow teacher", "reflow": "reflowed flow", "reflow_1": "reflowed flow (= student init)",
             "student_1": f"one-step student ({a.distance})"}
    t = rows["teacher"]
    for key in ("data", "teacher", "teacher_heun", "teacher_1", "reflow", "reflow_1", "student_1"):
        if key not in rows:
            continue
        r = rows[key]
        where = "-" if key == "data" else f"{r['sampler']}, {r['nfe']}"
        print(f"| {names[key]} | {where} | {100 * r['mmd_cd']:.3f} | {r['cov_cd']:.2f} | {r['nna_cd']:.3f} | "
              f"{r['mmd_cd'] / t['mmd_cd']:.2f} | {r['nna_cd'] / t['nna_cd']:.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
