"""Diffusion operator distillation (Zheng, Nie, Vahdat, Azizzadenesheli & Anandkumar 2022, "Fast
sampling of diffusion models via operator learning"; DFNO in its first arXiv version, DSNO in the
ICML 2023 one).

The teacher's probability-flow ODE defines a solution operator from the initial condition x_T to
the whole trajectory t -> x_t. The paper learns that operator with a neural operator G_phi that
outputs the trajectory at a fixed set of times t_1 > ... > t_K in one evaluation ("parallel
decoding"), trained by regression on trajectories the teacher made once:

    L(phi) = E_{x_T} (1/K) sum_m w_m d( G_phi(x_T)(t_m), x(t_m) ),   d = |.| (L1) or (.)^2 (L2)

(the official training script's ``weightedL1`` / ``weightedL2``, chosen by its config, with w_m = 1
or, with ``loss_weight: snr``, sqrt(SNR(t_m)) clipped to [1, 10^4]). The architecture (the paper's
Figure 1): the diffusion model's backbone, whose blocks act on each time point t_m with that
time's embedding (pixel x channel dimensions), with temporal convolution layers inserted after
them that act on the time x channel dimensions: a Fourier layer along the time axis, FFT over the
K points, the lowest modes multiplied by a learned complex kernel R (channel-mixing, one matrix
per mode), inverse FFT (:class:`fewstep.nets.fno.TemporalFourier`), with a residual path. The
sample is the last point of the predicted trajectory (t_K = 0): one network evaluation.

Here (sigma-space, any fewstep teacher):

* levels: the teacher sampler's grid of ``--pair-nfe`` evaluations on ``--pair-grid`` from sigma_T
  = its first level (sigma_max); the operator's K + P levels (``--levels``, ``--pad``) are grid
  points i_m = round(m S / (K + P)), m = 1..K + P, of its S steps (uniform in the step index, as the official trajectories' "uniform time steps"), so
  the last is sigma = 0, the sample. The states are read from the sampler's per-step callback,
  so each pair costs exactly one teacher sampling run.
* states: the paper's trajectories are VP states; a sigma-space state x at level sigma is the VP
  state z = x / sqrt(1 + sigma^2) (alpha = 1 / sqrt(1 + sigma^2)), so the operator takes z_T and
  outputs z at every level, and the loss compares z (at sigma = 0, z = x: the sample itself). The
  SNR of level sigma is 1 / sigma^2.
* the student saved (model.json) is a one-step sampler model like knowledge distillation's: a
  denoiser D(x_T, sigma_T) whose net (kind ``fno``) maps z_T to the last level, with the
  ``consistency`` rule on the fixed grid [sigma_T, 0] (one evaluation); its process is a VP
  process with the ``x0`` prediction, so the net sees exactly z_T = alpha(sigma_T) x_T.

Deviations (and why): the per-level backbone is the project's FiLM-MLP block on the flattened
sample (points; images flattened) instead of the paper's UNet, as the task asks for a small
backbone; the official code's padding of the time axis ("num_pad": extra time points before the
supervised ones, predicted but not in the loss, so that the FFT's periodic view need not join the
trajectory's ends) is ``--pad P``, with the K + P levels uniform in the step index and the first
P unsupervised, default 0 (the paper's choice is not known here); the operator's output is the
departure from the pure-noise part c_m z_T of each level (c_m: its noise scale over sigma_T's), an
own parametrization so that the untrained operator starts at the DDIM-like noise path (the
official script compares the net's output with the states directly); the optimiser, EMA and
schedule are the project's loop's (Adam, a warm-up and an EMA are in both). The paper's section
and equation numbers are not cited: only its abstract, its Figure 1 caption and the official
training script could be read while writing this (the loss, its weights and the padding above are
from that script).

Trajectories live in ``trajectories/`` as resumable chunks (``trajectories.json``, their spec;
``chunk_NNNNN.safetensors`` + ``.json``, each drawn from its own seed), as
:mod:`fewstep.methods.pairs` makes its pairs.
"""
from __future__ import annotations

import math
import time

import torch

from ..errors import UserError
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import EvalCounter, conditioning, load_teacher, student_meta, fixed_grids
from .pairs import chunk_folder, stage_cost

PAIR_SAMPLER = "heun"  # a teacher without a sampler of its own: Heun, accurate at pair budgets
DISTANCES = ("l2", "l1")
WEIGHTS = ("none", "snr")
KINDS = ("points", "image")  # the backbone is an MLP on the flattened sample; clouds need order-free nets

OPTIONS = (
    Option("pair_sampler", str, None, "the teacher's deterministic grid sampler for its trajectories (default: "
           "its own, else heun)", none="the teacher's own sampler, else heun", example="heun"),
    Option("pair_nfe", int, 64, "teacher evaluations per trajectory (default 64)", low=1),
    Option("pair_grid", str, "karras", "sigma grid of the teacher's sampler (default karras)"),
    Option("pairs", int, 20000, "number of (x_T, trajectory) pairs made once (default 20000)", low=1),
    Option("pair_batch", int, 1000, "pairs made per teacher batch, one resumable chunk each (default 1000)", low=1),
    Option("levels", int, 8, "K: trajectory levels the operator outputs, the last the sample (default 8)", low=1),
    Option("pad", int, 0, "extra, unsupervised levels before the K on the operator's time axis (the official "
           "code's Fourier-continuation padding; default 0)", low=0),
    Option("modes", int, None, "lowest temporal Fourier modes kept, at most (levels + pad) // 2 + 1 (default: all)",
           low=1, none="all, (levels + pad) // 2 + 1", example=3),
    Option("distance", str, "l2", "loss over the levels: l2 (mean squared) or l1 (the official code's two)",
           choices=DISTANCES),
    Option("level_weight", str, "none", "per-level loss weight: none, or snr (sqrt(SNR) clipped to [1, 1e4], "
           "the official code's)", choices=WEIGHTS),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)


def check_options(cfg: dict) -> None:
    """The rules between options, before anything is written."""
    K = int(cfg["levels"]) + int(cfg["pad"])
    if cfg["modes"] is not None and int(cfg["modes"]) > K // 2 + 1:
        raise UserError(f"--modes {cfg['modes']}: {K} levels (--levels + --pad) have {K // 2 + 1} temporal Fourier "
                        f"modes; give --modes {K // 2 + 1} or fewer (or more --levels)")
    backbone(cfg)


def backbone(cfg: dict) -> dict:
    """hidden / depth / emb_dim (and modes) of ``--net``: an ``mlp`` config (its sizes for the
    per-level backbone) or an ``fno`` one without the levels the method sets."""
    out = {"hidden": 256, "depth": 4, "emb_dim": 128}
    if cfg.get("net") is None:
        return out
    from ..train.options import read_net

    net = read_net(cfg["net"], "--net")
    kind = net.get("kind")
    if kind not in ("mlp", "fno"):
        raise UserError(f"--net kind '{kind}': the operator's backbone is an MLP; give an mlp config (its hidden, "
                        f"depth, emb_dim) or an fno one")
    fixed = sorted((set(net) & {"levels", "sigma_max"}) | ({"use_cond"} if net.get("use_cond") else set()))
    if fixed:
        raise UserError(f"--net: {', '.join(fixed)} set by the method (--levels, the teacher's grid); leave them out")
    for k in ("hidden", "depth", "emb_dim"):
        if k in net:
            out[k] = int(net[k])
    if kind == "fno" and net.get("modes"):
        out["modes"] = int(net["modes"])
    return out


def trajectory_spec(cfg: dict, teacher, cond) -> dict:
    """What the trajectories are (checked before any work): sampler, grid, levels, counts."""
    from ..grids import make_grid
    from ..samplers import info, steps_for_nfe

    sampler = cfg["pair_sampler"] or teacher.default_sampler or PAIR_SAMPLER
    si = info(sampler)
    if si.stochastic or si.adaptive:
        raise UserError(f"--pair-sampler {sampler}: the operator learns the ODE's trajectory on a fixed grid; give a "
                        f"deterministic grid sampler (heun, euler, dpm_solver_2, ...)")
    steps = steps_for_nfe(sampler, int(cfg["pair_nfe"]))
    if steps < 1:
        raise UserError(f"--pair-nfe {cfg['pair_nfe']} is too few for one {sampler} step")
    K, P = int(cfg["levels"]), int(cfg["pad"])
    if K + P > steps:
        what = f"--levels {K}" + (f" with --pad {P}" if P else "")
        raise UserError(f"{what}: the teacher's trajectory has {steps} steps ({sampler} at --pair-nfe "
                        f"{cfg['pair_nfe']}); give --levels + --pad {steps} or fewer, or more --pair-nfe")
    sig = make_grid(cfg["pair_grid"], steps, teacher.sigma_min, teacher.sigma_max, process=teacher.process)
    sig = torch.as_tensor(sig, dtype=torch.float64)
    if len(sig) != steps + 1 or float(sig[-1]) != 0.0:
        raise UserError(f"--pair-grid {cfg['pair_grid']}: the operator's last level is the sample (sigma 0); give a "
                        f"grid that ends at 0")
    idx = [round(m * steps / (K + P)) for m in range(1, K + P + 1)]  # the operator's axis; the last K supervised
    from ..train.options import check_batch_memory

    check_batch_memory("--pairs", int(cfg["pairs"]), teacher.shape, copies=K + 1, fix="make fewer pairs")
    spec = {"teacher": str(cfg["teacher"]), "sampler": sampler, "nfe": int(cfg["pair_nfe"]),
            "grid": cfg["pair_grid"], "pairs": int(cfg["pairs"]), "batch": int(cfg["pair_batch"]),
            "seed": int(cfg["seed"]), "sigmas": [float(s) for s in sig], "index": idx, "pad": P}
    if cond.on:
        spec.update(classes=cond.num_classes, **cond.meta())
    return spec


@torch.no_grad()
def teacher_trajectory(D, sampler: str, x_T: torch.Tensor, sigmas: torch.Tensor, index: list, extra=None):
    """The teacher sampler's states at grid points ``index`` (of grid ``sigmas``), from x_T at
    sigmas[0]: [B, K, *shape], read from its per-step callback (the state at sigmas[i] before
    step i) and its result (the state at the last point)."""
    from ..samplers import get

    states = {}

    def grab(info):
        states[int(info["i"])] = info["x"].detach().clone()

    opts = {"extra_args": extra} if extra else {}
    last = get(sampler)(D, x_T, sigmas.to(x_T.device), callback=grab, **opts)
    S = len(sigmas) - 1
    states[S] = last
    missing = [i for i in index if i not in states]
    if missing:
        raise UserError(f"sampler {sampler} reported no state at step {missing[0]}; give another --pair-sampler")
    return torch.stack([states[i] for i in index], 1)


def vp(x: torch.Tensor, sigmas) -> torch.Tensor:
    """The VP states z = x / sqrt(1 + sigma_m^2) of sigma-space states x [B, K, ...] at levels sigma_m."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    a = (1.0 / torch.sqrt(1 + s**2)).to(x.dtype).to(x.device)
    return x * a.reshape((1, -1) + (1,) * (x.ndim - 2))


def make_trajectories(teacher, cfg: dict, st, cond):
    """(z_T [N, *shape], Z [N, K, *shape], labels or None, info) from ``trajectories/`` chunks;
    missing chunks are made (process r of W makes chunks r, r + W, ...), each atomically."""
    from tqdm.auto import tqdm

    from ..io import load_weights, read_json, save_checkpoint

    start = time.time()
    spec = trajectory_spec(cfg, teacher, cond)
    folder = chunk_folder(st, "trajectories", spec)
    n, b = spec["pairs"], spec["batch"]
    chunks = math.ceil(n / b)
    shape = tuple(teacher.shape)
    sigmas = torch.tensor(spec["sigmas"], dtype=torch.float64)
    supervised = spec["index"][spec["pad"]:]
    levels = sigmas[supervised]
    for i in tqdm(range(st.rank, chunks, st.world), disable=not st.progress, desc="trajectories",
                  dynamic_ncols=True, mininterval=1.0):
        name = f"chunk_{i:05d}"
        if (folder / f"{name}.json").is_file():
            continue
        t0 = time.time()
        g = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + 7919 * i + 29)
        k = min(b, n - i * b)
        eps = torch.randn((k,) + shape, generator=g, dtype=torch.float64)
        x_T = (float(sigmas[0]) * eps).to(teacher.device, teacher.dtype)
        labels = cond.draw(k, g)
        counter = EvalCounter(cond.teacher(teacher.denoiser))
        extra = {"labels": labels.to(teacher.device)} if labels is not None else None
        X = teacher_trajectory(counter, spec["sampler"], x_T, sigmas, supervised, extra)
        tensors = {"z_T": (x_T / math.sqrt(1 + float(sigmas[0]) ** 2)).float().cpu(),
                   "Z": vp(X.double(), levels).float().cpu()}
        if labels is not None:
            tensors["labels"] = labels.cpu()
        save_checkpoint(folder, tensors, {"pairs": k, "teacher_evals": counter.evals, "seconds": time.time() - t0},
                        name=name)
        st.commit()
    st.barrier()
    zT, Z, lab, evals, secs = [], [], [], 0, 0.0
    for i in range(chunks):
        w = load_weights(folder / f"chunk_{i:05d}.safetensors")
        meta = read_json(folder / f"chunk_{i:05d}.json")
        zT.append(w["z_T"])
        Z.append(w["Z"])
        if cond.on:
            lab.append(w["labels"])
        evals, secs = evals + int(meta["teacher_evals"]), secs + float(meta["seconds"])
    Z = torch.cat(Z)
    if not bool(torch.isfinite(Z).all()):
        raise UserError(f"the teacher's trajectories in {folder} hold NaN or inf; use another --pair-sampler or more "
                        f"--pair-nfe")
    return torch.cat(zT), Z, (torch.cat(lab) if cond.on else None), {
        "teacher_evals": evals, "pair_seconds": secs, "pair_seconds_here": time.time() - start, **spec,
        "levels": [float(s) for s in levels]}


def level_weights(levels, kind: str) -> torch.Tensor:
    """w_m: 1, or sqrt(SNR) = 1 / sigma_m clipped to [1, 1e4] (the official code's ``snr``)."""
    s = torch.as_tensor(levels, dtype=torch.float64)
    if kind == "none":
        return torch.ones(len(s))
    return (1.0 / s.clamp(min=1e-300)).clamp(1.0, 1e4).float()


def build_operator(teacher, cfg: dict, spec: dict, cond):
    """(student denoiser, its fno net, the net config): a VP x0-prediction ModelDenoiser around
    :class:`fewstep.nets.fno.OperatorNet` on the spec's output levels."""
    from ..denoiser import ModelDenoiser
    from ..nets.fno import OperatorNet
    from ..process import make_process

    sizes = backbone(cfg)
    modes = int(cfg["modes"]) if cfg["modes"] is not None else sizes.get("modes", 0)
    sigmas = spec["sigmas"]
    levels = [sigmas[i] for i in spec["index"]]
    torch.manual_seed(int(cfg["seed"]))
    net = OperatorNet(math.prod(teacher.shape), levels, sigmas[0], sizes["hidden"], sizes["depth"], modes,
                      sizes["emb_dim"], cond.num_classes)
    sd = float(teacher.meta.get("sigma_data", 0.5))
    return ModelDenoiser(net, make_process("vp"), "x0", sd), net, dict(net.config)


def stages(job):
    """One stage in the top folder: the teacher's trajectories, then the operator's regression."""
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, kinds=KINDS, method="operator")
    cond = conditioning(cfg, teacher)
    spec = trajectory_spec(cfg, teacher, cond)  # bad options fail before any work
    D, net, net_cfg = build_operator(teacher, cfg, spec, cond)
    sigma_T = float(spec["sigmas"][0])
    square, pad = cfg["distance"] == "l2", int(cfg["pad"])

    def plan(st):
        zT, Z, labels, info = make_trajectories(teacher, cfg, st, cond)
        w = level_weights(info["levels"], cfg["level_weight"])
        B, n = int(cfg["batch_size"]), len(zT)

        def draw(gen, step):
            idx = torch.randint(0, n, (B,), generator=gen)
            batch = {"z": zT[idx], "Z": Z[idx]}
            if labels is not None:
                batch["labels"] = labels[idx]
            return batch

        def loss(model, b):
            """(1/K) sum_m w_m |G(z_T)(sigma_m) - z(sigma_m)| (l1) or its square (l2), mean over coordinates."""
            lab = b.get("labels")
            pred = model(b["z"], None, trajectory=True) if lab is None else \
                model(b["z"], None, labels=lab, trajectory=True)
            err = (pred[:, pad:] - b["Z"]).flatten(2)  # the K supervised levels, not the padding
            err = err.pow(2) if square else err.abs()
            return (w.to(err.device, err.dtype)[None, :] * err.mean(2)).mean(1)

        def describe(ema_module):
            sampling = {"sampler": "consistency", "grids": fixed_grids({1: [sigma_T, 0.0]})}
            return student_meta("operator", D, net_cfg, teacher.shape, teacher.kind,
                                teacher.meta.get("data", {}).get("name", teacher.name), teacher.sigma_min, sigma_T,
                                sampling, cfg, cond=cond, distance=cfg["distance"], level_weight=cfg["level_weight"],
                                cost=stage_cost(st, info),
                                trajectories={"sampler": info["sampler"], "nfe": info["nfe"], "grid": info["grid"],
                                              "pairs": info["pairs"], "levels": info["levels"], "pad": pad})

        return Plan(Task(student=net, draw=draw, loss=loss), describe)

    job.stage("", plan)
