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
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_part, save_part  # noqa: E402

OUT = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))
RUNS = OUT / "sds_runs"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "sds"
RENDERS = "renders:size=16"
CLASSES = ("sphere", "cube", "torus", "cylinder", "cone")


def _save(part: str, res: dict) -> None:
    save_part(OUT, f"sds_{part}", res)


def _load(part: str) -> dict:
    return load_part(OUT, f"sds_{part}")


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
            tag = f"{mname}-" + "-".join(f"{k}{v}" for k, v in sorted(extra.items()))
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


# ---------------------------------------------------------------------------- render teacher
TEACHER = Path(os.environ.get("SDS_TEACHER", RUNS / "teacher"))
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "renders_teacher.json"


def run_teacher(steps: int) -> dict:
    """The render teacher (recipes/renders_teacher.json; reused when finished) and the classifier."""
    from fewstep.metrics.features import classifier_for
    from fewstep.train.config import read_config_file
    from fewstep.train.teacher import train_teacher

    t = time.perf_counter()
    if not (TEACHER / "model.json").is_file():
        cfg = read_config_file(RECIPE)
        cfg["steps"] = steps
        train_teacher(cfg, str(TEACHER), progress=False, resume=(TEACHER / "config.json").is_file())
    teacher_s = time.perf_counter() - t
    t = time.perf_counter()
    clf = classifier_for(RENDERS)
    meta = json.loads((TEACHER / "model.json").read_text())
    return {"teacher": str(TEACHER), "steps": meta.get("config", {}).get("steps", steps),
            "teacher_seconds": teacher_s, "classifier_seconds": time.perf_counter() - t,
            "classifier": dict(getattr(clf, "train_info", {}) or {})}


def _real(label: int, n: int, seed: int):
    from fewstep.data.registry import load_dataset

    ds = load_dataset(RENDERS, n=max(20 * n, 2000), seed=seed)
    return ds.x[ds.labels == label][:n]


def _judge(x, label: int, ref=None) -> dict:
    """Classifier accuracy on the label; with ``ref``, FD on its features; diversity, saturation."""
    from fewstep.metrics.features import classifier_for, feature_extractor
    from fewstep.metrics.frechet import frechet_distance

    clf = classifier_for(RENDERS)  # trained on first use (outside no_grad), then cached
    with torch.no_grad():
        x = x.float().clamp(-1, 1)
        acc = float((clf(x).argmax(1) == label).float().mean())
        div = float(torch.pdist(x.flatten(1)).mean()) if len(x) > 1 else 0.0
        # bright saturation: real renders' object colours lie in [-0.8, 1], the background at -1
        out = {"accuracy": acc, "diversity": div, "saturated": float((x > 0.95).float().mean()), "n": len(x)}
        if ref is not None:
            out["fd"] = frechet_distance(x, ref.float(), feature_extractor(clf))
    return out


def run_image(steps: int, count: int, guidances) -> dict:
    """Per class: SDS into `count` images (pixels) at each guidance, the teacher's own samples
    (32 NFE, the same label and guidance), real renders of the class."""
    from fewstep.model import load, load_generator

    teacher = load(str(TEACHER))
    rows = []
    for label, name in enumerate(CLASSES):
        ref = _real(label, 500, seed=77)
        rows.append({"class": name, "what": "real renders", **_judge(_real(label, count, seed=78), label, ref)})
        for w in guidances:
            x, _ = teacher.sample(count, 32, seed=label, labels=torch.full((count,), label), guidance=w)
            rows.append({"class": name, "what": f"teacher, 32 NFE, w {w:g}", "guidance": w, **_judge(x, label, ref)})
            opts = {"teacher": str(TEACHER), "generator": "image", "count": count, "batch_size": count,
                    "steps": steps, "lr": 0.02, "label": label, "guidance": float(w), "seed": label}
            out, secs = _distill(f"image-{name}-w{w:g}", opts)
            x = load_generator(out).sample(count)
            rows.append({"class": name, "what": f"SDS image, w {w:g}", "guidance": w, "seconds": secs, "steps": steps,
                         **_judge(x, label, ref)})
            print(rows[-2], rows[-1], flush=True)
    return {"rows": rows, "command": f"bench/sds.py --part image --image-steps {steps} --count {count}"}


def run_nerf(steps: int, guidance: float, views: int = 32) -> dict:
    """Per class a voxel field by sds, sjc and coarse-to-fine (half the steps at 8x8 on a 16^3 grid,
    half at 16x16 on 32^3); accuracy over `views` random new views; an untrained field and real
    renders beside; turntable strips to docs/sds/."""
    from fewstep.model import load_generator
    from fewstep.nets.generators import build_generator
    from fewstep.plots import save_strip_png

    DOCS.mkdir(parents=True, exist_ok=True)
    rows = []
    g = torch.Generator().manual_seed(5)
    for label, name in enumerate(CLASSES):
        rows.append({"class": name, "what": "real renders (random views)", **_judge(_real(label, views, 79), label)})
        base = {"teacher": str(TEACHER), "generator": "nerf", "label": label, "guidance": guidance, "batch_size": 8,
                "lr": 0.05, "seed": label, "steps": steps}
        cases = [("sds", {}), ("sjc", {"estimator": "sjc"}),
                 ("coarse-to-fine (sds)", {"steps": steps // 2, "fine_steps": steps - steps // 2, "render_size": 8,
                                           "resolution": 16, "fine_resolution": 32})]
        for what, extra in cases:
            tag = f"nerf-{name}-" + what.split()[0]
            out, secs = _distill(tag, {**base, **extra})
            run = load_generator(out)
            x = run.sample(views, seed=label + 100)
            rows.append({"class": name, "what": what, "seconds": secs, "steps": steps, **_judge(x, label)})
            save_strip_png(run.module.turntable(8).float().cpu(), DOCS / f"{tag}.png")
            print(rows[-1], flush=True)
        fresh = build_generator(run.module.config)
        x = fresh.outputs(views, g)
        rows.append({"class": name, "what": "untrained field", **_judge(x, label)})
    return {"rows": rows, "guidance": guidance,
            "command": f"bench/sds.py --part nerf --nerf-steps {steps} --nerf-guidance {guidance:g}"}


def judged_table(res: dict, cols=("accuracy", "fd", "diversity", "saturated")) -> str:
    names = {"accuracy": "classifier accuracy on the label", "fd": "FD to real renders of the class",
             "diversity": "mean pairwise distance", "saturated": "share of pixels above 0.95"}
    use = [c for c in cols if any(c in r for r in res["rows"])]
    lines = ["| class | what | " + " | ".join(names[c] for c in use) + " | steps | seconds |",
             "|---|---|" + "---|" * (len(use) + 2)]
    for r in res["rows"]:
        cells = []
        for c in use:
            v = r.get(c)
            cells.append("" if v is None else (f"{100 * v:.0f}%" if c in ("accuracy", "saturated") else f"{v:.2f}"))
        secs = f"{r['seconds']:.0f}" if "seconds" in r else ""
        lines.append(f"| {r['class']} | {r['what']} | " + " | ".join(cells) + f" | {r.get('steps', '')} | {secs} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("points", "teacher", "image", "nerf"))
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--points-steps", type=int, default=1500)
    ap.add_argument("--teacher-steps", type=int, default=6000)
    ap.add_argument("--image-steps", type=int, default=800)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--guidances", default="1,5")
    ap.add_argument("--nerf-steps", type=int, default=1200)
    ap.add_argument("--nerf-guidance", type=float, default=5.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.part == "points":
        _save("points", run_points(a.points_steps))
    elif a.part == "teacher":
        _save("teacher", run_teacher(a.teacher_steps))
    elif a.part == "image":
        _save("image", run_image(a.image_steps, a.count, [float(w) for w in a.guidances.split(",")]))
    elif a.part == "nerf":
        _save("nerf", run_nerf(a.nerf_steps, a.nerf_guidance))
    if a.table:
        for part, table in (("points", points_table), ("teacher", None), ("image", judged_table),
                            ("nerf", judged_table)):
            res = _load(part)
            if not res:
                continue
            m = res["machine"]
            if table is None:
                c = res.get("classifier", {})
                took = f", {res['teacher_seconds']:.0f} s" if res["teacher_seconds"] > 1 else ", trained before"
                print(f"Teacher: {Path(res['teacher']).name} ({res['steps']} steps{took}), classifier "
                      f"held-out accuracy {c.get('val_accuracy', '?')}; {m['date']}.\n")
                continue
            print(f"`{res['command']}` on {m['nproc']} cores ({m['cpu']}), {m['date']}, commit {m['commit']}.\n")
            print(table(res) + "\n")


if __name__ == "__main__":
    main()
