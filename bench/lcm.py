"""Latent consistency distillation (issue 23, first slice): LCM on class-conditional teachers
whose guided flow is exact, before text and latents.

Part ``mixture`` (writes bench/out/lcm_mixture.json; ``--table`` prints the markdown):
the labelled ring of 8 modes (3 classes; ``GaussianMixture.labelled_ring``) as the exact
teacher, and a trained conditional MLP teacher on its samples (``fewstep train --data
gmm:... --conditional``). Students: LCM of the exact teacher (full), and of the trained
teacher full and as LoRA (rank 4 and 16) adapters. Each at w = 1, 2, 4 (the student's input)
and 1, 2, 4 NFE against the exact guided samples (the exact guided flow map of the same
noise, ``GaussianMixture.flow(..., guidance=w)``) by sliced-W2 and energy distance; beside
them the teachers with classifier-free guidance at w by the measured default sampler at 4, 8 and 50 NFE; the
sampling floor (two exact sets); trained parameters and wall time.

    .venv/bin/python bench/lcm.py --part mixture --steps 3000
    .venv/bin/python bench/lcm.py --table
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_part, save_part  # noqa: E402

OUT = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))
RUNS = OUT / "lcm_runs"
MLP = {"kind": "mlp", "dim": 2, "hidden": 128, "depth": 3, "emb_dim": 64, "num_classes": 3}
WS = (1.0, 2.0, 4.0)
N = 4000


def _measures(x, ref) -> dict:
    from fewstep.metrics import energy_distance, sliced_w2

    return {"sliced_w2": float(sliced_w2(x.float(), ref.float())),
            "energy": float(energy_distance(x.double(), ref.double()))}


def run_mixture(steps: int) -> dict:
    from fewstep import GaussianMixture
    from fewstep.methods import distill
    from fewstep.model import load
    from fewstep.train.teacher import train_teacher

    g = GaussianMixture.labelled_ring()
    RUNS.mkdir(parents=True, exist_ok=True)
    spec_file = RUNS / "ring.npz"
    g.save(spec_file)
    spec = f"gmm:{spec_file}"
    loop = {"batch_size": 256, "lr": 2e-3, "warmup": 50, "ema_decay": 0.995, "device": "cpu",
            "checkpoint_every": 100000, "w_min": 1.0, "w_max": 4.0, "levels": 50, "loss": "l2", "mu": 0.95}
    t0 = time.perf_counter()
    teacher_run = RUNS / "teacher"
    if not (teacher_run / "model.json").is_file():
        train_teacher({"data": spec, "conditional": True, "steps": steps, "batch_size": 512, "lr": 2e-3,
                       "net": MLP, "device": "cpu", "eval_samples": 512, "eval_nfe": 16, "checkpoint_every": 100000},
                      str(teacher_run), progress=False)
    times = {"teacher": time.perf_counter() - t0}
    students = {"LCM of the exact teacher (full)": ("exact", {"teacher": spec, "net": MLP}),
                "LCM of the trained teacher (full)": ("full", {"teacher": str(teacher_run)}),
                "LCM-LoRA r=4 of the trained teacher": ("lora4", {"teacher": str(teacher_run), "lora_rank": 4}),
                "LCM-LoRA r=16 of the trained teacher": ("lora16", {"teacher": str(teacher_run), "lora_rank": 16})}
    runs = {}
    for name, (tag, opts) in students.items():
        out = RUNS / tag
        t = time.perf_counter()
        if not (out / "model.json").is_file():
            distill("lcm", {**loop, **opts, "steps": steps}, str(out), progress=False)
        times[tag] = time.perf_counter() - t
        runs[name] = out
    gen = torch.Generator().manual_seed(11)
    labels = g.labels[torch.randint(0, len(g.labels), (N,), generator=gen)]
    smax = 80.0
    x_T = smax * torch.randn(N, 2, generator=gen, dtype=torch.float64)
    x_T2 = smax * torch.randn(N, 2, generator=gen, dtype=torch.float64)
    rows = []
    trained = load(str(teacher_run))
    exact_model = load(spec)
    for w in WS:
        ref = g.flow(x_T, smax, 0.0, labels=labels, guidance=w, rtol=1e-6)
        ref2 = g.flow(x_T2, smax, 0.0, labels=labels, guidance=w, rtol=1e-6)
        rows.append({"model": "floor: a second exact set", "w": w, "nfe": 0, **_measures(ref2, ref)})
        for tname, tm in (("exact teacher + CFG (default sampler)", exact_model),
                          ("trained teacher + CFG (default sampler)", trained)):
            for nfe in (4, 8, 50):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x, _ = tm.sample(N, nfe, labels=labels, x=x_T.float() * tm.sigma_max / smax, guidance=w,
                                     seed=0)
                rows.append({"model": tname, "w": w, "nfe": nfe, **_measures(x, ref)})
        for name, out in runs.items():
            m = load(str(out))
            for nfe in (1, 2, 4):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x, _ = m.sample(N, nfe, labels=labels, x=(x_T * m.sigma_max / smax).float(), guidance=w, seed=0)
                rows.append({"model": name, "w": w, "nfe": nfe, **_measures(x, ref)})
    params = {}
    import json

    for name, out in runs.items():
        meta = json.loads((out / "model.json").read_text())
        p = meta.get("parameters")
        params[name] = p if p else {"full": int(sum(v.numel() for v in load(str(out)).denoiser.net.parameters()))}
    return {"steps": steps, "n": N, "rows": rows, "seconds": times, "parameters": params}


def table() -> str:
    r = load_part(OUT, "lcm_mixture")
    if not r:
        return ""
    lines = [f"Labelled ring (3 classes, d = 2), {r['n']} samples, {r['steps']} steps per run; sliced-W2 / energy "
             f"distance to the exact guided flow's samples.", "",
             "| model | NFE | " + " | ".join(f"w = {w:g}" for w in WS) + " |", "|---|---|" + "---|" * len(WS)]
    keys = []
    for row in r["rows"]:
        k = (row["model"], row["nfe"])
        if k not in keys:
            keys.append(k)
    for model, nfe in keys:
        cells = []
        for w in WS:
            hit = [x for x in r["rows"] if x["model"] == model and x["nfe"] == nfe and x["w"] == w]
            cells.append(f"{hit[0]['sliced_w2']:.3f} / {hit[0]['energy']:.4f}" if hit else "-")
        lines.append(f"| {model} | {nfe or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "Parameters trained: " + "; ".join(f"{k}: {v}" for k, v in r["parameters"].items())]
    timed = {k: v for k, v in r["seconds"].items() if v >= 1}  # runs reused from an earlier call are not timed
    if timed:
        lines.append("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timed.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("mixture",))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    if a.part == "mixture":
        save_part(OUT, "lcm_mixture", run_mixture(a.steps))
    if a.table:
        print(table())


if __name__ == "__main__":
    main()
