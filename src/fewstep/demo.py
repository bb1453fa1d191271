"""``fewstep demo``: the whole story on an embedded default, in minutes on a laptop CPU.

1. train a 2-D teacher (moons, VP, eps prediction, MLP);
2. distil it into few-step students, one per method (:data:`DEMO_STUDENTS`: knowledge
   distillation, progressive distillation, consistency distillation and rectified flow +
   its one-step student), each with ``fewstep distill METHOD`` at a budget that fits a
   laptop CPU, into ``students/METHOD`` beside the teacher;
3. through ``fewstep bench`` (:func:`fewstep.report.run_bench`): solve its probability-flow
   ODE accurately once (rk45, tight tolerance) from fixed noise, the teacher's own "exact"
   answer; sample it with every deterministic demo sampler at NFE 2..32 from that noise
   (and any distilled students found beside the teacher, with their own rules); measure
   the error against the exact ODE answer, the sliced-W2 and the other metrics against
   held-out data, and the teacher's NLL; write the report into ``report/``;
4. write metrics.json, plots and a short table into the demo folder and print where
   ``report/report.html`` is, with a sentence at the top of the report saying what the reader
   sees (the best 1-step student against the samplers).

Every stage is skipped when its run folder is complete and resumed when it was interrupted,
so ``fewstep demo`` run again continues where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path

from .errors import UserError

DEMO_NFE = (1, 2, 4, 8, 16, 32)
# the students: each method's own defaults, budgets cut to fit about ten minutes on 2 cores
# (measured in docs/BENCHMARKS.md, "make demo from a clean clone")
DEMO_STUDENTS = {
    "knowledge": {"steps": 1500, "pairs": 8000},
    "progressive": {"steps": 200, "start_steps": 32, "end_steps": 1},  # 5 rounds of 200 steps
    "consistency": {"steps": 1000, "n": 40, "tune_levels": 500},
    "reflow": {"rounds": 1, "pairs": 4000, "steps": 1000, "distill_steps": 600, "reflow_nfe": 16},
}
DEMO_SAMPLERS = ("auto", "euler", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ipndm", "era")


def _students(names) -> list[str]:
    if names is None:
        return list(DEMO_STUDENTS)
    if isinstance(names, str):
        names = [] if names.strip().lower() == "none" else [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if n not in DEMO_STUDENTS]
    if bad:
        raise UserError(f"--students: unknown demo student {', '.join(bad)}; choose from "
                        f"{', '.join(DEMO_STUDENTS)} or none")
    return list(dict.fromkeys(names))


def distil_students(teacher_dir: Path, names, seed: int = 0, device=None, progress=True) -> dict:
    """Distil the demo students of ``names`` into ``students/METHOD`` beside the teacher
    (skipped when complete, resumed when interrupted); returns {method: wall seconds}."""
    from .methods import distill
    from .train.job import worth_resuming

    seconds = {}
    for i, name in enumerate(names, 1):
        out = teacher_dir.parent / "students" / name
        if (out / "model.json").is_file():
            print(f"[demo]   {name}: reusing {out}")
            continue
        opts = {**DEMO_STUDENTS[name], "teacher": str(teacher_dir), "seed": seed, "device": device}
        shown = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_STUDENTS[name].items())
        print(f"[demo]   {i}/{len(names)} fewstep distill {name} --teacher {teacher_dir} {shown} --out {out}")
        t0 = time.time()
        resume = worth_resuming(out)
        distill(name, None if resume else opts, str(out), resume=resume, progress=progress)
        seconds[name] = time.time() - t0
    return seconds


def run_demo(out: str, data: str = "moons", steps: int = 3000, seed: int = 0, device=None, progress=True,
             students=None) -> dict:
    from .io import write_json
    from .report.bench import run_bench, write_report
    from .samplers import info, names
    from .train.teacher import train_teacher

    chosen = _students(students)
    root = Path(out)
    teacher_dir = root / "teacher"
    if root.exists() and any(root.iterdir()) and not (teacher_dir / "model.json").is_file():
        if not (teacher_dir / "config.json").is_file():
            raise UserError(f"demo folder {root} exists and is not a demo; choose another --out")
    t0 = time.time()
    if (teacher_dir / "model.json").is_file():
        print(f"[demo] reusing the teacher in {teacher_dir}")
    else:
        print(f"[demo] 1/4 training a {data} teacher ({steps} steps) into {teacher_dir}")
        resume = (teacher_dir / "config.json").is_file()
        train_teacher({"data": data, "steps": steps, "seed": seed, "device": device}, str(teacher_dir),
                      resume=resume, progress=progress)
    train_s = time.time() - t0
    if chosen:
        print(f"[demo] 2/4 distilling the teacher into {len(chosen)} few-step students: {', '.join(chosen)}")
    student_s = distil_students(teacher_dir, chosen, seed=seed, device=device, progress=progress)
    samplers = [s for s in DEMO_SAMPLERS if s == "auto" or (s in names() and not info(s).stochastic)]
    specs = [str(teacher_dir.parent / "students" / c) for c in chosen]
    print(f"[demo] 3/4 the teacher's exact ODE answer (adaptive RK45, tolerance 1e-5), then {len(samplers)} "
          f"samplers and {len(specs)} students at NFE {', '.join(map(str, DEMO_NFE))} from the same noise")
    res, report = run_bench(str(teacher_dir), samplers=samplers, students=specs or "none", nfe=DEMO_NFE,
                            out=str(root / "report"), n=2000, seed=seed, nll_n=200, device=device,
                            progress=progress, command=f"fewstep demo --out {root} --data {data} --seed {seed}")
    print("[demo] 4/4 metrics, plots and the report")
    by_kind = {r["kind"]: r for r in res.rows if r["kind"] in ("data", "reference")}
    rows = [{"sampler": r["method"], "nfe": r["nfe"], "nfe_used": r["nfe_used"], "ode_error": r.get("flow_error"),
             "sliced_w2": r["sliced_w2"]} for r in res.rows if r["kind"] == "sampler"]
    studs = [{"student": r["method"], "nfe": r["nfe"], "nfe_used": r["nfe_used"], "ode_error": r.get("flow_error"),
              "sliced_w2": r["sliced_w2"]} for r in res.rows if r["kind"] == "student"]
    head = headline(rows, studs)
    if head:
        res.meta["headline"] = head
        report = write_report(res, root / "report", res.samples)
    result = {"data": data, "teacher": str(teacher_dir), "train_seconds": train_s,
              "student_seconds": student_s, "total_seconds": None,
              "reference": {"sampler": "rk45", "rtol": 1e-5, "sliced_w2": by_kind["reference"]["sliced_w2"],
                            "nfe": by_kind["reference"]["nfe_used"]},
              "data_floor_sliced_w2": by_kind["data"]["sliced_w2"], "rows": rows, "students": studs,
              "headline": head, "teacher_nll_bits_per_dim": res.meta["summary"].get("teacher_nll_bits_per_dim"),
              "report": str(report)}
    panels = res.samples
    ref_panels = panels["reference"]
    samples = {(r["sampler"], r["nfe"]): panels[r["sampler"]][f"NFE {r['nfe']}"] for r in rows}
    samples.update({(r["student"], r["nfe"]): panels[r["student"]][f"NFE {r['nfe']}"] for r in studs
                    if r["student"] in panels and f"NFE {r['nfe']}" in panels[r["student"]]})
    _plots(root, rows, studs, samples, list(ref_panels.values())[1], ref_panels["data"])
    _print_table(result)
    result["total_seconds"] = time.time() - t0
    write_json(root / "metrics.json", result)
    if head:
        print(f"\n{head}")
    print(f"[demo] done in {time.time() - t0:.0f} s: {root / 'metrics.json'}, {root / 'error_vs_nfe.png'}, "
          f"{root / 'samples.png'}")
    print(f"[demo] report: {report}")
    return result


def headline(rows: list, students: list) -> str | None:
    """One sentence on what the demo shows: the best 1-step student (by RMS error against the
    teacher's exact ODE answer), Euler at 1 NFE, and the fewest NFE at which a training-free
    sampler does as well (or that none does within the demo's budgets)."""
    one = [r for r in students if r["nfe"] == 1 and _finite(r["ode_error"])]
    if not one:
        return None
    best = min(one, key=lambda r: r["ode_error"])
    euler = next((r for r in rows if r["sampler"] == "euler" and r["nfe"] == 1 and _finite(r["ode_error"])), None)
    text = (f"The best 1-step student is {best['student']}: RMS error {best['ode_error']:.3g} against the "
            f"teacher's exact ODE answer from the same noise")
    if euler:
        text += f", where the teacher's Euler at 1 NFE is {euler['ode_error']:.3g}"
    match = sorted((r for r in rows if _finite(r["ode_error"]) and r["ode_error"] <= best["ode_error"]),
                   key=lambda r: (r["nfe_used"], r["ode_error"]))
    if match:
        m = match[0]
        text += (f"; the fewest evaluations a training-free sampler needs to do as well is {m['nfe_used']} "
                 f"({m['sampler']}, {m['ode_error']:.3g}).")
    else:
        top = max(r["nfe_used"] for r in rows) if rows else 0
        text += f"; no training-free sampler does as well within {top} evaluations."
    return text


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")


def _plots(root: Path, rows, students, samples, ref, data) -> None:
    from .plots import _plt, draw_samples

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for s in sorted({r["sampler"] for r in rows}):
        rr = [r for r in rows if r["sampler"] == s]
        axes[0].loglog([r["nfe_used"] for r in rr], [r["ode_error"] for r in rr], "o-", label=s, ms=3, lw=1)
        axes[1].semilogx([r["nfe_used"] for r in rr], [r["sliced_w2"] for r in rr], "o-", label=s, ms=3, lw=1)
    for s in sorted({r["student"] for r in students}):  # the students: stars, thick lines
        rr = sorted((r for r in students if r["student"] == s), key=lambda r: r["nfe_used"])
        kw = dict(marker="*", ms=11, lw=2.2, label=f"student: {s}")
        axes[0].loglog([r["nfe_used"] for r in rr], [r["ode_error"] for r in rr], **kw)
        axes[1].semilogx([r["nfe_used"] for r in rr], [r["sliced_w2"] for r in rr], **kw)
    axes[0].set(xlabel="NFE", ylabel="RMS error vs teacher ODE", title="error against the exact ODE solution")
    axes[1].set(xlabel="NFE", ylabel="sliced W2 to data", title="distance to the data")
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(root / "error_vs_nfe.png")
    plt.close(fig)
    show = [k for k in samples if k[1] in (4, 16) and any(k[0] == r["sampler"] for r in rows)][:6]
    show += [k for k in samples if k[1] == 1 and any(k[0] == r["student"] for r in students)][:4]
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
    nfes = sorted({r["nfe"] for r in rows} | {r["nfe"] for r in result["students"]})
    print(f"\nRMS error against the teacher's exact ODE answer (sliced-W2 of rk45: "
          f"{result['reference']['sliced_w2']:.3f}, data floor {result['data_floor_sliced_w2']:.3f})")
    width = max([14] + [len(r["student"]) + 2 for r in result["students"]])
    print("sampler".ljust(width) + "".join(f"NFE {k:<6d}" for k in nfes))
    for key, group in (("sampler", rows), ("student", result["students"])):
        for s in sorted({r[key] for r in group}):
            by = {r["nfe"]: r["ode_error"] for r in group if r[key] == s}
            print(s.ljust(width) + "".join(f"{by[k]:<10.4f}" if _finite(by.get(k)) else " " * 10 for k in nfes))
