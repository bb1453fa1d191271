"""Text-to-image in a latent space and its latent consistency distillation (issue 23), at CPU
size on captioned Fashion-MNIST.

Parts (each writes bench/out/text_<part>.json; ``--table`` prints the markdown of all done):
- ``ae``: ``fewstep train-autoencoder --data fashion`` (KL, f = 4: 4 x 7 x 7 latents; reused
  when its run folder holds a model; ``TEXT_AE`` names another);
- ``teacher``: ``fewstep train --data latents:AE,captions:fashion`` (captions from the labels and
  measured attributes through the training templates, encoded by all-MiniLM-L6-v2; a UNet with
  cross-attention; prompts dropped 10 % for classifier-free guidance);
- ``lcm``: ``fewstep distill lcm`` of it, the whole student and LoRA adapters (rank 8);
- ``eval``: ``--n`` test images' captions as prompts, with the training templates ("seen") and
  the held-out templates ("held-out"), at guidance w = ``--w``: the teacher (the measured default
  sampler) at 25 and 50 NFE and the students at 1, 2, 4 NFE, decoded; classifier Frechet
  distance (the project's Fashion classifier's features) against the test images, prompt
  adherence (that classifier's accuracy on the prompt's class), seconds per 100 images.

    .venv/bin/python bench/text.py --part ae
    .venv/bin/python bench/text.py --part teacher --steps 6000
    .venv/bin/python bench/text.py --part lcm --steps 2000
    .venv/bin/python bench/text.py --part eval --n 1000
    .venv/bin/python bench/text.py --table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_part, save_part  # noqa: E402

OUT = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))
RUNS = OUT / "text_runs"
AE = Path(os.environ.get("TEXT_AE", RUNS / "ae"))
TEACHER = Path(os.environ.get("TEXT_TEACHER", RUNS / "teacher"))
STUDENTS = {"LCM (full student)": RUNS / "lcm", "LCM-LoRA (rank 8)": RUNS / "lcm_lora8"}


def data_spec() -> str:
    return f"latents:{AE},captions:fashion"


def run_ae(steps: int) -> dict:
    from fewstep.train.autoencoder import train_autoencoder

    t = time.perf_counter()
    if not (AE / "model.json").is_file():
        train_autoencoder({"data": "fashion", "steps": steps}, str(AE), resume=(AE / "checkpoints").is_dir())
    meta = json.loads((AE / "model.json").read_text())
    return {"run": str(AE), "seconds_here": time.perf_counter() - t, "scale_factor": meta.get("scale_factor"),
            "latent_shape": meta.get("latent_shape"), "reconstruction": meta.get("reconstruction")}


def run_teacher(steps: int, batch: int) -> dict:
    from fewstep.train.teacher import train_teacher

    cfg = {"data": data_spec(), "steps": steps, "batch_size": batch, "lr": 1e-3, "warmup": 200, "ema_decay": 0.999,
           "grad_clip": 1.0, "checkpoint_every": 500, "eval_samples": 64, "eval_nfe": 32}
    t = time.perf_counter()
    if not (TEACHER / "model.json").is_file():
        train_teacher(cfg, str(TEACHER), resume=(TEACHER / "checkpoints").is_dir())
    meta = json.loads((TEACHER / "model.json").read_text())
    return {"run": str(TEACHER), "options": cfg, "train_seconds": meta.get("train_seconds"),
            "seconds_here": time.perf_counter() - t}


def run_lcm(steps: int, batch: int, only: str = None) -> dict:
    from fewstep.methods import distill

    base = {"teacher": str(TEACHER), "steps": steps, "batch_size": batch, "lr": 1e-4, "warmup": 100,
            "w_min": 1.0, "w_max": 4.0, "levels": 50, "checkpoint_every": 500}
    out = {}
    for name, folder in STUDENTS.items():
        if only and (("LoRA" in name) != (only == "lora")):
            continue
        opts = {**base, **({"lora_rank": 8, "lr": 1e-3} if "LoRA" in name else {})}
        t = time.perf_counter()
        if not (folder / "model.json").is_file():
            distill("lcm", opts, out=str(folder), resume=(folder / "config.json").is_file())
        meta = json.loads((folder / "model.json").read_text())
        cfg = json.loads((folder / "config.json").read_text())  # what the run was trained with (a reused run too)
        opts = {k: cfg[k] for k in opts if k in cfg}
        if meta.get("parameters") is None:  # a full student of an older run: every weight is trained
            from fewstep.model import load

            net = load(str(folder)).denoiser
            meta["parameters"] = {"trained_in_full": sum(p.numel() for p in net.parameters())}
        out[name] = {"run": str(folder), "options": opts, "seconds": meta.get("cost", {}).get("seconds"),
                     "parameters": meta.get("parameters"), "seconds_here": time.perf_counter() - t}
    return out


def _images_and_prompts(n: int, templates: str):
    from fewstep.data.registry import caption_data, held_out

    if templates == "held-out":
        d, _ = held_out(data_spec(), n, 0)
        raw = caption_data("captions:fashion:test", n, 0, split="test")
    else:
        from fewstep.data.registry import load_dataset

        d = load_dataset(f"latents:{AE},captions:fashion:test", n=n, seed=0)
        raw = caption_data("captions:fashion:test", n, 0, split="train")
    _, ctx, _ = d.take(torch.arange(len(d)))
    return raw.x, ctx, raw.class_labels, raw.captions


def run_eval(n: int, w: float) -> dict:
    from fewstep.metrics.features import classifier_for, logits_extractor
    from fewstep.metrics.frechet import frechet_distance
    from fewstep.model import load

    clf = classifier_for("fashion")
    logits = logits_extractor(clf)
    rows = []
    teacher = load(str(TEACHER))
    cases = [("teacher + CFG", teacher, k) for k in (25, 50)]
    for name, folder in STUDENTS.items():
        if (folder / "model.json").is_file():
            m = load(str(folder))
            cases += [(name, m, k) for k in (1, 2, 4)]
    for templates in ("seen", "held-out"):
        real, ctx, classes, prompts = _images_and_prompts(n, templates)
        for name, model, k in cases:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x, _ = model.sample(len(ctx), k, labels=ctx, guidance=w, seed=1)
            images = model.decode(x).cpu()
            secs = time.perf_counter() - t
            acc = float((logits(images).argmax(1).cpu() == classes).float().mean())
            rows.append({"model": name, "nfe": k, "templates": templates, "fd": frechet_distance(images, real,
                         feature="fashion"), "adherence": acc, "seconds_per_100": 100 * secs / len(ctx)})
            print(json.dumps(rows[-1]), flush=True)
        rows.append({"model": "test images themselves", "nfe": 0, "templates": templates, "fd": None,
                     "adherence": float((logits(real).argmax(1).cpu() == classes).float().mean()),
                     "seconds_per_100": 0.0})
    return {"n": n, "w": w, "rows": rows}


def table() -> str:
    ae, te, lcm = _load("ae"), _load("teacher"), _load("lcm")
    evals = [load_part(OUT, p.stem) for p in sorted(OUT.glob("text_eval*.json"))]
    lines = []
    if ae:
        r = ae.get("reconstruction") or {}
        lines.append(f"Autoencoder: latents {ae.get('latent_shape')}, scale factor {ae.get('scale_factor'):.3f}, "
                     f"reconstruction of {r.get('images')} {r.get('reference')} images: PSNR {r.get('psnr', 0):.1f} dB, "
                     f"L1 {r.get('l1', 0):.3f} (the mean image: L1 {r.get('l1_mean_image', 0):.3f}).")
    if te:
        lines.append(f"Teacher: `{te['options']['data']}`, {te['options']['steps']} steps of batch "
                     f"{te['options']['batch_size']}, {(te.get('train_seconds') or 0) / 60:.0f} min.")
    for name, r in (lcm or {}).items():
        if isinstance(r, dict) and "run" in r:
            lines.append(f"{name}: {r['options']['steps']} steps, {(r.get('seconds') or 0) / 60:.0f} min, "
                         f"parameters {r.get('parameters') or 'all of the net'}.")
    for ev in sorted((e for e in evals if e), key=lambda e: -e["w"] if e["w"] == 2.0 else e["w"]):
        lines += ["", f"{ev['n']} test prompts per row, guidance w = {ev['w']:g}.", "",
                  "| model | NFE | FD (seen) | adherence (seen) | FD (held-out) | adherence (held-out) | s / 100 images |",
                  "|---|---|---|---|---|---|---|"]
        keys = []
        for r in ev["rows"]:
            if (r["model"], r["nfe"]) not in keys:
                keys.append((r["model"], r["nfe"]))
        for model, nfe in keys:
            cell = {r["templates"]: r for r in ev["rows"] if r["model"] == model and r["nfe"] == nfe}
            s, h = cell.get("seen", {}), cell.get("held-out", {})

            def f(v, p=1):
                return "-" if v is None else f"{v:.{p}f}"
            lines.append(f"| {model} | {nfe or '-'} | {f(s.get('fd'))} | {f(100 * s['adherence'] if s else None)} % | "
                         f"{f(h.get('fd'))} | {f(100 * h['adherence'] if h else None)} % | "
                         f"{f(s.get('seconds_per_100'), 2)} |")
    return "\n".join(lines)


def _eval_part(w: float) -> str:
    """w = 2 (the table's main guidance) in text_eval, any other in text_eval_w{w}."""
    return "text_eval" if w == 2.0 else f"text_eval_w{w:g}"


def _load(part: str) -> dict:
    return load_part(OUT, f"text_{part}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("ae", "teacher", "lcm", "eval"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--w", type=float, default=2.0, help="eval: the guidance (2: the main table; others beside it)")
    ap.add_argument("--student", choices=("full", "lora"), help="lcm: only this student (run both at once)")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    if a.part == "ae":
        save_part(OUT, "text_ae", run_ae(a.steps or 2000))
    elif a.part == "teacher":
        save_part(OUT, "text_teacher", run_teacher(a.steps or 6000, a.batch))
    elif a.part == "lcm":
        done = {**_load("lcm"), **run_lcm(a.steps or 2000, a.batch, a.student)}
        done.pop("machine", None)
        save_part(OUT, "text_lcm", done)
    elif a.part == "eval":
        save_part(OUT, _eval_part(a.w), run_eval(a.n, a.w))
    if a.table:
        print(table())


if __name__ == "__main__":
    main()
