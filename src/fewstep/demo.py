"""``fewstep demo``: the whole story on an embedded default, in minutes on a laptop CPU.

1. train a 2-D teacher (moons, VP, eps prediction, MLP);
2. solve its probability-flow ODE accurately once (rk45, tight tolerance) from fixed noise:
   the teacher's own "exact" answer;
3. sample it with every deterministic registered sampler at NFE 2..32 from that noise;
   measure the error against the teacher's exact ODE answer and the sliced-W2 to the data;
4. write metrics.json, plots and a short table into one folder.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from .errors import UserError

DEMO_NFE = (2, 4, 8, 16, 32)
DEMO_SAMPLERS = ("euler", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ipndm", "era")


def run_demo(out: str, data: str = "moons", steps: int = 3000, seed: int = 0, device=None, progress=True) -> dict:
    from .data.registry import load_dataset
    from .metrics import rms, sliced_w2
    from .model import load
    from .samplers import info, names
    from .train.checkpoint import write_json
    from .train.teacher import train_teacher

    root = Path(out)
    teacher_dir = root / "teacher"
    if root.exists() and any(root.iterdir()) and not (teacher_dir / "model.json").is_file():
        if not (teacher_dir / "config.json").is_file():
            raise UserError(f"demo folder {root} exists and is not a demo; choose another --out")
    t0 = time.time()
    if (teacher_dir / "model.json").is_file():
        print(f"[demo] reusing the teacher in {teacher_dir}")
    else:
        print(f"[demo] 1/3 training a {data} teacher ({steps} steps) into {teacher_dir}")
        resume = (teacher_dir / "config.json").is_file()
        train_teacher({"data": data, "steps": steps, "seed": seed, "device": device}, str(teacher_dir),
                      resume=resume, progress=progress)
    train_s = time.time() - t0
    model = load(str(teacher_dir), device=device)
    ds = load_dataset(data, n=4000, seed=seed + 10)
    n = 2000
    x_T = model.noise(n, seed=seed + 100)
    print("[demo] 2/3 the teacher's exact ODE answer (adaptive RK45, tolerance 1e-5)")
    ref = model.sample(n, nfe=100000, sampler="rk45", x=x_T, rtol=1e-5, atol=1e-5)[0]
    rows = []
    samplers = [s for s in DEMO_SAMPLERS if s in names() and not info(s).stochastic]
    print(f"[demo] 3/3 sampling with {len(samplers)} samplers at NFE {', '.join(map(str, DEMO_NFE))}")
    samples = {}
    for s in samplers:
        for k in DEMO_NFE:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    x = model.sample(n, nfe=k, sampler=s, x=x_T)[0]
                except UserError:
                    continue  # the sampler needs more than k evaluations for one step
            rows.append({"sampler": s, "nfe": k, "ode_error": rms(x, ref), "sliced_w2": sliced_w2(x, ds.x[:n])})
            samples[(s, k)] = x
    result = {"data": data, "teacher": str(teacher_dir), "train_seconds": train_s,
              "reference": {"sampler": "rk45", "rtol": 1e-5, "sliced_w2": sliced_w2(ref, ds.x[:n])},
              "data_floor_sliced_w2": sliced_w2(ds.x[n:2 * n], ds.x[:n]), "rows": rows}
    write_json(root / "metrics.json", result)
    _plots(root, rows, samples, ref, ds.x[:n])
    _print_table(result)
    print(f"[demo] done in {time.time() - t0:.0f} s: {root / 'metrics.json'}, {root / 'error_vs_nfe.png'}, "
          f"{root / 'samples.png'}")
    return result


def _plots(root: Path, rows, samples, ref, data) -> None:
    from .plots import _plt, draw_samples

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for s in sorted({r["sampler"] for r in rows}):
        rr = [r for r in rows if r["sampler"] == s]
        axes[0].loglog([r["nfe"] for r in rr], [r["ode_error"] for r in rr], "o-", label=s, ms=3)
        axes[1].semilogx([r["nfe"] for r in rr], [r["sliced_w2"] for r in rr], "o-", label=s, ms=3)
    axes[0].set(xlabel="NFE", ylabel="RMS error vs teacher ODE", title="error against the exact ODE solution")
    axes[1].set(xlabel="NFE", ylabel="sliced W2 to data", title="distance to the data")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "error_vs_nfe.png")
    plt.close(fig)
    show = [k for k in samples if k[1] in (4, 16)][:8]
    fig, axes = plt.subplots(1, len(show) + 2, figsize=(2.4 * (len(show) + 2), 2.6), dpi=100)
    draw_samples(axes[0], data, title="data", lim=3)
    draw_samples(axes[1], ref, title="teacher ODE (rk45)", lim=3)
    for ax, k in zip(axes[2:], show):
        draw_samples(ax, samples[k], title=f"{k[0]} @ {k[1]}", lim=3)
    fig.tight_layout()
    fig.savefig(root / "samples.png")
    plt.close(fig)


def _print_table(result) -> None:
    rows = result["rows"]
    nfes = sorted({r["nfe"] for r in rows})
    print(f"\nRMS error against the teacher's exact ODE answer (sliced-W2 of rk45: "
          f"{result['reference']['sliced_w2']:.3f}, data floor {result['data_floor_sliced_w2']:.3f})")
    print("sampler".ljust(14) + "".join(f"NFE {k:<6d}" for k in nfes))
    for s in sorted({r["sampler"] for r in rows}):
        by = {r["nfe"]: r["ode_error"] for r in rows if r["sampler"] == s}
        print(s.ljust(14) + "".join(f"{by[k]:<10.4f}" if k in by else " " * 10 for k in nfes))
