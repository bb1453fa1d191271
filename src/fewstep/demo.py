"""``fewstep demo``: the whole story on an embedded default, in minutes on a laptop CPU.

1. train a 2-D teacher (moons, VP, eps prediction, MLP);
2. through ``fewstep bench`` (:func:`fewstep.report.run_bench`): solve its probability-flow
   ODE accurately once (rk45, tight tolerance) from fixed noise, the teacher's own "exact"
   answer; sample it with every deterministic demo sampler at NFE 2..32 from that noise
   (and any distilled students found beside the teacher, with their own rules); measure
   the error against the exact ODE answer, the sliced-W2 and the other metrics against
   held-out data, and the teacher's NLL; write the report into ``report/``;
3. write metrics.json, plots and a short table into the demo folder and print where
   ``report/report.html`` is.
"""
from __future__ import annotations

import time
from pathlib import Path

from .errors import UserError

DEMO_NFE = (2, 4, 8, 16, 32)
DEMO_SAMPLERS = ("euler", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ipndm", "era")


def run_demo(out: str, data: str = "moons", steps: int = 3000, seed: int = 0, device=None, progress=True) -> dict:
    from .io import write_json
    from .report.bench import run_bench
    from .samplers import info, names
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
    samplers = [s for s in DEMO_SAMPLERS if s in names() and not info(s).stochastic]
    print(f"[demo] 2/3 the teacher's exact ODE answer (adaptive RK45, tolerance 1e-5), then {len(samplers)} "
          f"samplers at NFE {', '.join(map(str, DEMO_NFE))} from the same noise, and any students beside it")
    res, report = run_bench(str(teacher_dir), samplers=samplers, students="auto", nfe=DEMO_NFE,
                            out=str(root / "report"), n=2000, seed=seed, nll_n=200, device=device,
                            progress=progress, command=f"fewstep demo --out {root} --data {data} --seed {seed}")
    print("[demo] 3/3 metrics, plots and the report")
    by_kind = {r["kind"]: r for r in res.rows if r["kind"] in ("data", "reference")}
    rows = [{"sampler": r["method"], "nfe": r["nfe"], "nfe_used": r["nfe_used"], "ode_error": r.get("flow_error"),
             "sliced_w2": r["sliced_w2"]} for r in res.rows if r["kind"] == "sampler"]
    students = [{"student": r["method"], "nfe": r["nfe"], "ode_error": r.get("flow_error"),
                 "sliced_w2": r["sliced_w2"]} for r in res.rows if r["kind"] == "student"]
    result = {"data": data, "teacher": str(teacher_dir), "train_seconds": train_s,
              "reference": {"sampler": "rk45", "rtol": 1e-5, "sliced_w2": by_kind["reference"]["sliced_w2"],
                            "nfe": by_kind["reference"]["nfe_used"]},
              "data_floor_sliced_w2": by_kind["data"]["sliced_w2"], "rows": rows, "students": students,
              "teacher_nll_bits_per_dim": res.meta["summary"].get("teacher_nll_bits_per_dim"),
              "report": str(report)}
    write_json(root / "metrics.json", result)
    panels = res.samples
    ref_panels = panels["reference"]
    samples = {(r["sampler"], r["nfe"]): panels[r["sampler"]][f"NFE {r['nfe']}"] for r in rows}
    _plots(root, rows, samples, list(ref_panels.values())[1], ref_panels["data"])
    _print_table(result)
    print(f"[demo] done in {time.time() - t0:.0f} s: {root / 'metrics.json'}, {root / 'error_vs_nfe.png'}, "
          f"{root / 'samples.png'}")
    print(f"[demo] report: {report}")
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
