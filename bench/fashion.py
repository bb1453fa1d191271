"""Fashion-MNIST end to end on a CPU (issue 19): the feature classifiers, a small UNet teacher
(unconditional and class-conditional), its samplers at 2-64 NFE and every distillation
method at 1, 2 and 4 NFE, scored by the classifier Frechet distance to the 10,000 test
images -> bench/out/fashion_<part>[_cond].json and the section "Fashion-MNIST (issue 19)" of
docs/BENCHMARKS.md.

    .venv/bin/python -m fewstep.metrics.features --write-assets fashion fashion_b   # the classifiers (once)
    .venv/bin/python bench/fashion.py --part classifier             # their test accuracy, per class
    .venv/bin/python bench/fashion.py --part teacher  [--conditional] [--scale S]
    .venv/bin/python bench/fashion.py --part students [--conditional] [--scale S] [--methods kd,pd,...]
    .venv/bin/python bench/fashion.py --from-json bench/out/fashion_*.json --doc docs/BENCHMARKS.md

Every stage is a run folder under bench/out/fashion_runs/ (``fewstep train`` / ``fewstep
distill`` with the options printed), reused when finished and resumed when interrupted, so
the script can be run again after a kill. ``--scale`` multiplies every step budget (0.1 for a
quick look; the recorded table says which scale made it). The GPU versions of the same runs
are ``recipes/fashion_*.json``.

Metric: ``fewstep bench`` on the teacher with the students beside it: FD on the features of
the project's Fashion-MNIST classifier (``fd``; not an Inception FID), FD on the second,
differently built classifier (``fd_check``), between N generated images and N test images
(the data floor compares N training images with them), all methods from the same noise;
label accuracy of conditional samples (the classifier's class for the asked label).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, machine, publish  # noqa: E402
from _common import where as machine_line  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
RUNS = OUT / "fashion_runs"
ASSETS = Path(__file__).resolve().parent / "assets"  # teachers trained by this script, reused when asked again
HEADING = "## Fashion-MNIST (issue 19)"
N = 2000  # samples per method (and test images)
SAMPLERS = ("euler", "heun", "dpmpp_2m", "unipc", "ipndm")
TEACHER_NFE = (1, 2, 4, 8, 16, 32, 64)
STUDENT_NFE = (1, 2, 4)
# the CPU teacher: a small UNet (28 -> 14 -> 7), EDM; what fits hours on 2 cores
NET = {"kind": "unet", "in_channels": 1, "image_size": 28, "base_channels": 32, "channel_mult": [1, 2, 2],
       "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.1}
TEACHER = {"data": "fashion", "process": "edm", "prediction": "edm", "steps": 20000, "batch_size": 64, "lr": 4e-4,
           "warmup": 500, "ema_decay": 0.999, "checkpoint_every": 1000, "eval_samples": 256, "eval_nfe": 35}
# the students: each method's defaults with the CPU budgets (steps scaled by --scale) and the teacher's batch of 64
# (the methods' default 256 makes a UNet step 4x dearer: 3.3 s on one thread)
METHODS = {
    "kd": ("knowledge", {"steps": 4000, "batch_size": 64, "pairs": 10000, "pair_nfe": 32, "pair_batch": 500}),
    "pd": ("progressive", {"steps": 1500, "batch_size": 64, "start_steps": 64, "end_steps": 1}),
    "cd": ("consistency", {"steps": 4000, "batch_size": 64, "n": 40}),
    "ict": ("consistency", {"steps": 4000, "batch_size": 64, "mode": "training", "schedule": "ict"}),
    # round 1 on the teacher's couplings (5000 at 32 NFE, half of KD's pairs), then its one-step student
    "reflow": ("reflow", {"rounds": 1, "batch_size": 64, "pairs": 5000, "pair_nfe": 32, "pair_batch": 500,
                          "steps": 4000, "distill_steps": 2000}),
}
STEP_KEYS = ("steps", "distill_steps")


def _scaled(opts: dict, scale: float) -> dict:
    return {k: max(1, int(round(v * scale))) if k in STEP_KEYS else v for k, v in opts.items()}


def _folder(conditional: bool) -> Path:
    return RUNS / ("cond" if conditional else "uncond")


def part_classifier() -> dict:
    """Test accuracy (overall, per class) of the shipped classifiers on the 10,000 test images."""
    import torch

    from fewstep.data.registry import load_dataset
    from fewstep.metrics.features import classifier_for, logits_extractor

    test = load_dataset("fashion:test")
    rows, preds = [], {}
    for arch in ("a", "b"):
        clf = classifier_for("fashion", arch=arch)
        with torch.no_grad():
            p = logits_extractor(clf)(test.x).argmax(1)
        preds[arch] = p
        per = [float((p[test.labels == c] == c).double().mean()) for c in range(10)]
        rows.append({"arch": arch, "config": clf.config, "train_info": clf.train_info,
                     "test_accuracy": float((p == test.labels).double().mean()), "per_class": per,
                     "params": sum(q.numel() for q in clf.parameters())})
        print(f"  classifier {arch}: test accuracy {rows[-1]['test_accuracy']:.4f}", flush=True)
    agree = float((preds["a"] == preds["b"]).double().mean())
    return {"part": "classifier", "machine": machine(), "rows": rows, "agreement": agree}


def train(conditional: bool, scale: float) -> Path:
    from fewstep.train.teacher import train_teacher

    run = _folder(conditional) / "teacher"
    if (run / "model.json").is_file():
        return run
    cfg = {**_scaled(TEACHER, scale), "net": dict(NET), "conditional": conditional, "device": None, "seed": 0}
    if conditional:
        cfg["net"]["num_classes"] = 10
        cfg["label_dropout"] = 0.1  # a null class for classifier-free guidance
    if _reuse_asset(cfg, conditional, run):
        return run
    print(f"[fashion] training the teacher into {run}: {json.dumps(cfg)}", flush=True)
    train_teacher(cfg, str(run), resume=_started(run), progress=True)
    return run


def _reuse_asset(cfg: dict, conditional: bool, run: Path) -> bool:
    """A teacher this script trained before and that ships in bench/assets/ (model.json, its weights, the
    config.json it was trained with): copied into the run folder when that config is the one asked for, so
    that the students need not wait an hour for the same teacher again. Returns whether it did."""
    import shutil

    asset = ASSETS / f"fashion_teacher_{'cond' if conditional else 'uncond'}"
    if not (asset / "model.json").is_file():
        return False
    have = json.loads((asset / "config.json").read_text())
    net = have.get("net") or {}
    if any(net.get(k) != v for k, v in cfg["net"].items()) or \
            any(have.get(k) != v for k, v in cfg.items() if k not in ("device", "net")):
        return False
    run.mkdir(parents=True, exist_ok=True)
    for f in asset.iterdir():
        shutil.copy2(f, run / f.name)
    print(f"[fashion] the teacher from {asset} (trained by this script with the same config)", flush=True)
    return True


def _started(run: Path) -> bool:
    """A run folder this script began (its config.json is there): resumed, from its last checkpoint or, when
    it was stopped before the first one, from step 0 with the same config."""
    return (run / "config.json").is_file()


def distil(teacher: Path, key: str, scale: float) -> Path:
    from fewstep.methods import distill

    method, opts = METHODS[key]
    out = teacher.parent / "students" / key
    if (out / "model.json").is_file():
        return out
    opts = {**_scaled(opts, scale), "seed": 0}
    if opts.get("mode") == "training":
        opts["data"] = "fashion"
    else:
        opts["teacher"] = str(teacher)
    print(f"[fashion] fewstep distill {method} {json.dumps(opts)} --out {out}", flush=True)
    resume = _started(out)
    distill(method, None if resume else opts, str(out), resume=resume, progress=True)
    return out


def _options(run: Path, keys) -> dict:
    """The options a finished run was made with (its own config.json), so a table made at
    another --scale, or from runs reused from an earlier one, says what really ran."""
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    return {k: cfg[k] for k in keys if k in cfg}


def _cost(run: Path) -> dict:
    meta = json.loads((run / "model.json").read_text())
    return {"train_seconds": meta.get("train_seconds"), **(meta.get("cost") or {})}


def part_bench(conditional: bool, scale: float, methods, students: bool, n: int = N) -> dict:
    from fewstep.report.bench import run_bench

    teacher = train(conditional, scale)
    runs = {k: distil(teacher, k, scale) for k in methods} if students else {}
    name = "students" if students else "teacher"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, report = run_bench(str(teacher), samplers=list(SAMPLERS), students=[str(r) for r in runs.values()] or "none",
                                nfe=STUDENT_NFE if students else TEACHER_NFE, n=n, seed=0, nll_n=0,
                                reference=not students,  # the teacher part has the accurate-ODE row (16 min)
                                out=str(_folder(conditional) / f"bench_{name}"), progress=True)
    rows = [{k: r.get(k) for k in ("method", "kind", "nfe", "nfe_used", "fd", "fd_check", "label_accuracy",
                                   "precision", "recall", "seconds")} for r in res.rows if r.get("class") is None]
    return {"part": name, "conditional": conditional, "scale": scale, "machine": machine(), "n": n,
            "teacher": {"options": {**_options(teacher, TEACHER), "net": NET}, **_cost(teacher)},
            "students": {k: {"method": METHODS[k][0], "options": _options(r, METHODS[k][1]) or _scaled(METHODS[k][1], scale),
                             **_cost(r)}
                         for k, r in runs.items()},
            "rows": rows, "notes": res.meta.get("notes", []), "report": str(report)}


# -------------------------------------------------------------------------------- markdown
def _f(v, p=2):
    return fmt(v, p)


def markdown(results: list) -> str:
    lines = [HEADING, ""]
    for res in results:
        where = machine_line(res["machine"])
        if res["part"] == "classifier":
            lines += ["### Feature classifiers", "",
                      f"`.venv/bin/python -m fewstep.metrics.features --write-assets fashion fashion_b`, then "
                      f"`.venv/bin/python bench/fashion.py --part classifier` ({where}). Accuracy on the 10,000 test "
                      f"images (never trained on); the two agree on {100 * res['agreement']:.1f} % of them.", "",
                      "| classifier | parameters | epochs | test accuracy | worst class | train s |", "|---|---|---|---|---|---|"]
            for r in res["rows"]:
                worst = min(range(10), key=lambda c: r["per_class"][c])
                lines.append(f"| {r['arch']} ({json.dumps({k: r['config'][k] for k in ('width', 'kernel', 'pool', 'num_features') if k in r['config']})}) "
                             f"| {r['params']} | {r['train_info'].get('epochs')} | {100 * r['test_accuracy']:.2f} % | "
                             f"{worst}: {100 * r['per_class'][worst]:.1f} % | {_f(r['train_info'].get('seconds'), 0)} |")
            lines.append("")
            continue
        kind = "class-conditional" if res["conditional"] else "unconditional"
        flags = ((" --conditional" if res["conditional"] else "") + ("" if res["scale"] == 1 else f" --scale {res['scale']:g}")
                 + ("" if res["n"] == N else f" --n {res['n']}"))
        cmd = f"`.venv/bin/python bench/fashion.py --part {res['part']}{flags}`"
        lines += [f"### {kind.capitalize()} teacher: {res['part']}", "",
                  f"{cmd} ({where}). FD to {res['n']} test images on the classifier's features (FD check: the "
                  "second classifier), all from the same noise.", ""]
        t = res["teacher"]
        lines += [f"Teacher: `fewstep train` with {json.dumps(t['options'])}; {_f(t.get('train_seconds'), 0)} s.", ""]
        if res["students"]:
            lines += ["| student | method | options | seconds (pairs included) | teacher evaluations |",
                      "|---|---|---|---|---|"]
            lines += [f"| {k} | {s['method']} | `{json.dumps(s['options'])}` | "
                      f"{_f(s.get('seconds') or s.get('train_seconds'), 0)} | {_f(s.get('teacher_evals'), 0)} |"
                      for k, s in res["students"].items()]
            lines.append("")
        cols = ["fd", "fd_check"] + (["label_accuracy"] if res["conditional"] else [])
        lines += ["| method | kind | NFE | " + " | ".join(cols) + " | seconds |", "|---" * (4 + len(cols)) + "|"]
        for r in res["rows"]:
            lines.append(f"| {r['method']} | {r['kind']} | {_f(r['nfe_used'])} | "
                         + " | ".join(_f(r.get(c), 3 if c == "label_accuracy" else 2) for c in cols)
                         + f" | {_f(r.get('seconds'), 1)} |")
        lines.append("")
    lines += checks(results)
    return "\n".join(lines) + "\n"


def _fd(rows, kind, method, nfe):
    for r in rows:
        if r["kind"] == kind and r["method"] == method and r["nfe_used"] == nfe and r.get("fd") is not None:
            return float(r["fd"])
    return None


def checks(results: list) -> list:
    """The Done-when lines of issue 19 for each students table: every 1-step student against the
    teacher's Euler at 1, 2 and 4 NFE (same run, same noise), and PD's 4-step student against the
    teacher at 64 NFE (the teacher table of the same conditioning, every sampler's 64-NFE row)."""
    out = []
    for res in results:
        if res.get("part") != "students":
            continue
        rows = res["rows"]
        euler = {k: _fd(rows, "sampler", "euler", k) for k in STUDENT_NFE}
        studs = sorted({r["method"] for r in rows if r["kind"] == "student"})
        one = {m: _fd(rows, "student", m, 1) for m in studs}
        kind = "class-conditional" if res["conditional"] else "unconditional"
        if None in euler.values() or not any(v is not None for v in one.values()):
            continue
        beats = [m for m, v in one.items() if v is not None and v < min(euler.values())]
        text = (f"Check ({kind}): 1-step students against the teacher's Euler at 1 / 2 / 4 NFE (FD "
                + " / ".join(_f(euler[k], 1) for k in STUDENT_NFE) + "): "
                + ", ".join(f"{m} {_f(v, 2)}" for m, v in one.items()) + f"; {len(beats)} of {len(one)} below all three"
                + ("" if len(beats) == len(one) else f" (not: {', '.join(m for m in one if m not in beats)})") + ".")
        teach = next((t for t in results if t.get("part") == "teacher" and t["conditional"] == res["conditional"]), None)
        pd = next((m for m in studs if m.startswith("progressive")), None)
        pd4 = _fd(rows, "student", pd, 4) if pd else None
        if teach is not None and pd4 is not None:
            at64 = {r["method"]: float(r["fd"]) for r in teach["rows"] if r["kind"] == "sampler" and r["nfe_used"] == 64}
            best = min(at64, key=at64.get)
            text += (f" PD's 4-step student {_f(pd4, 2)} against the teacher at 64 NFE: "
                     + ", ".join(f"{m} {_f(v, 2)} ({pd4 / v:.2f}x)" for m, v in sorted(at64.items(), key=lambda kv: kv[1]))
                     + f"; target within 1.5x of the best ({best}): {'met' if pd4 <= 1.5 * at64[best] else 'missed'}"
                     + (f" (teacher table n = {teach['n']}, students n = {res['n']})" if teach["n"] != res["n"] else "")
                     + ".")
        out += [text, ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["classifier", "teacher", "students"])
    ap.add_argument("--conditional", action="store_true", help="the class-conditional teacher")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step budget")
    ap.add_argument("--n", type=int, default=N, help=f"samples per method and test images (default {N})")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"students ({', '.join(METHODS)})")
    ap.add_argument("--from-json", nargs="+", help="only render these result files")
    ap.add_argument("--doc", help="markdown file whose section's parts to replace (other parts are kept)")
    a = ap.parse_args()
    if a.from_json:
        results = [json.loads(Path(f).read_text()) for f in a.from_json]
    else:
        if a.part is None:
            ap.error("give --part or --from-json")
        methods = [m for m in a.methods.split(",") if m]
        bad = [m for m in methods if m not in METHODS]
        if bad:
            ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        OUT.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if a.part == "classifier":
            res = part_classifier()
        else:
            if a.n < 100:
                ap.error(f"--n {a.n}: a Frechet distance needs at least 100 samples; give --n 100 or more")
            res = part_bench(a.conditional, a.scale, methods, a.part == "students", a.n)
        res["seconds"] = time.time() - t0
        name = f"fashion_{a.part}{'_cond' if a.conditional else ''}.json"
        (OUT / name).write_text(json.dumps(res, indent=1))
        results = [res]
    publish(markdown(results), a.doc, HEADING)


if __name__ == "__main__":
    main()
