"""The ``fewstep`` command line: train, sample, demo.

Every user mistake ends in one line on stderr (what, where, what to do) and exit code 2;
an interruption ends with exit code 130 and leaves a resumable run folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError


def _add_train(sub):
    p = sub.add_parser("train", help="train a diffusion teacher into a run folder",
                       description="Train a teacher by weighted denoising score matching. Options not given "
                                   "come from --config, else the defaults (see fewstep.train.config).")
    p.add_argument("--data", help="dataset: moons, swiss_roll, 8gaussians, checkerboard, rings, pinwheel, digits, "
                                  "shapes16, shapes32, mnist:DIR, cifar10:DIR, or a .npy/.npz file / PNG folder")
    p.add_argument("--process", help="noise process: vp, vp_cosine, vp_discrete (ddpm), ve, edm, flow")
    p.add_argument("--prediction", help="network parametrization: eps, x0, v, score, flow, edm")
    p.add_argument("--weighting", help="loss weighting: simple, x0, snr, truncated_snr, min_snr, v, edm, likelihood")
    p.add_argument("--steps", type=int, help="training steps (default 2000)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 256)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 100)")
    p.add_argument("--ema-decay", type=float, help="EMA decay (default 0.995)")
    p.add_argument("--grad-clip", type=float, help="gradient-norm clip, 0 for none (default 1.0)")
    p.add_argument("--conditional", action="store_true", default=None, help="class-conditional (labelled data)")
    p.add_argument("--n-data", type=int, help="number of training samples (default: the dataset's)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="GPU mixed precision")
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    p.add_argument("--config", help="JSON file of training options")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_sample(sub):
    p = sub.add_parser("sample", help="sample a run folder or an exact teacher",
                       description="Sample RUN_OR_SPEC (a run folder or gmm:FILE.npz) and write FILE.npz "
                                   "(array 'samples', plus 'labels' for a conditional model) and a PNG beside it.")
    p.add_argument("model", metavar="RUN_OR_SPEC", help="run folder, or gmm:FILE.npz for an exact Gaussian mixture")
    p.add_argument("--sampler", help="sampler name (default: the model's own); see 'fewstep samplers'")
    p.add_argument("--nfe", type=int, required=True, help="network evaluations to spend")
    p.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--grid", default="karras", help="sigma grid: karras, logsnr, polyexponential, time, "
                                                    "time-leading, time-trailing, or FILE.json")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (conditional models)")
    p.add_argument("--label", type=int, help="class label for all samples (conditional models)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_sample)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the whole story on an embedded default, in minutes on a CPU",
                       description="Train a 2-D teacher, sample it with every sampler at several NFE, "
                                   "measure against the data and the teacher's exact ODE, write plots and metrics.")
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--data", default="moons", help="2-D toy set (default moons)")
    p.add_argument("--steps", type=int, default=3000, help="teacher training steps (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def _add_samplers(sub):
    p = sub.add_parser("samplers", help="list the registered samplers")
    p.set_defaults(func=cmd_samplers)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fewstep", description="Fast diffusion sampling: train or load a teacher, "
                                 "sample it with training-free solvers, distil it into few-step students.")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_sample, _add_demo, _add_samplers):
        add(sub)
    from .commands import add_all

    add_all(sub)
    return ap


def cmd_train(a) -> int:
    from .train.teacher import train_teacher

    keys = ["data", "process", "prediction", "weighting", "steps", "batch_size", "lr", "warmup", "ema_decay",
            "grad_clip", "conditional", "n_data", "checkpoint_every", "mixed_precision", "seed", "device"]
    overrides = {k: getattr(a, k) for k in keys}
    if a.resume and (a.config or any(v is not None for k, v in overrides.items() if k != "steps")):
        raise UserError("--resume continues the run with its stored config; give only --out (and optionally --steps)")
    out = train_teacher(overrides, a.out, a.config, resume=a.resume, progress=not a.quiet)
    print(f"teacher written to {out}")
    return 0


def cmd_sample(a) -> int:
    import numpy as np
    import torch

    from .model import load
    from .plots import save_samples_png
    from .train.checkpoint import atomic_write

    out = Path(a.out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: the output must be a .npz file")
    if a.n < 1 or a.nfe < 1:
        raise UserError("--n and --nfe must be at least 1")
    model = load(a.model, device=a.device)
    labels = torch.full((a.n,), a.label, dtype=torch.long) if a.label is not None else None
    if labels is not None and not (0 <= a.label < max(model.num_classes, 1)) and model.num_classes:
        raise UserError(f"--label {a.label}: the model has classes 0..{model.num_classes - 1}")
    x_T = None
    if str(a.grid).endswith(".json"):  # a grid file (e.g. from fewstep schedule): start as noise at its first level
        from .grids import load as load_grid

        x_T = model.noise(a.n, a.seed) * (float(load_grid(a.grid)[0]) / model.sigma_max)
    x, labels = model.sample(a.n, a.nfe, sampler=a.sampler, seed=a.seed, labels=labels, grid=a.grid,
                             x=x_T, guidance=a.guidance)
    arrays = {"samples": x.float().cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(out, write)
    png = save_samples_png(x, out.with_suffix(".png"), labels=labels,
                           title=f"{a.sampler or model.default_sampler}, {a.nfe} NFE")
    print(f"wrote {out} and {png}")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(a.out, data=a.data, steps=a.steps, seed=a.seed, device=a.device, progress=not a.quiet)
    return 0


def cmd_samplers(a) -> int:
    from .samplers import info, names

    for n in names():
        i = info(n)
        kind = "adaptive" if i.adaptive else ("stochastic" if i.stochastic else f"order {i.order}")
        print(f"{n:22s} {kind}")
    return 0


def main(argv=None) -> int:
    import warnings

    warnings.formatwarning = lambda msg, cat, *rest, **kw: f"fewstep: note: {msg}\n"
    ap = build_parser()
    a = ap.parse_args(argv)
    if not getattr(a, "func", None):
        ap.print_help()
        return 2
    try:
        return int(a.func(a) or 0)
    except UserError as e:
        print(f"fewstep {a.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fewstep {a.command}: interrupted; a run folder with a checkpoint continues with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
