"""Knowledge distillation into a one-step student (Luhman & Luhman 2021; survey eq. 38-40).

The teacher's deterministic sampler is a map x_T -> x_0 = ODE(x_T). The student is the
Gaussian model p_stu(x0 | x_T) = N(x0; f_phi(x_T), I) (eq. 38) and minimises the
conditional KL to the teacher's N(x0; ODE(x_T), I) (eq. 39), i.e. the regression

    L(phi) = 1/2 E_{x_T ~ N(0, sigma_max^2 I)} || f_phi(x_T) - ODE(x_T) ||^2          (eq. 40)

on a fixed set of pairs (x_T, ODE(x_T)) made once with any fewstep sampler at any NFE.
f_phi is the student denoiser evaluated at sigma_max, f_phi(x_T) = D_phi(x_T, sigma_max),
with the teacher's architecture and (when it has one) its weights to start from.

Stochastic-generator form (survey section 3.2): with ``latent_dim = m`` the student is a
generator G(z), z ~ N(0, I_m), whose latent has its own dimension. The teacher starts from
x_T = sigma_max [z_1..z_min(m,d), u] with fresh u ~ N(0, I_{d-m}) when m < d; so G learns
E[ODE(x_T) | z] (the exact map when m >= d, the conditional mean otherwise).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError
from ..process import EDM
from ..train.checkpoint import read_json, save_checkpoint, write_json
from ..train.loop import Task, fit, make_accelerator
from ..train.runfolder import open_run
from .common import (EvalCounter, StudentRun, Timer, batch_slice, call_denoiser, fit_config, fixed_grids,
                     gmm_sigma_data, is_exact, load_teacher, net_config, quiet_sample, student_meta,
                     teacher_net_state, write_student)

DEFAULTS = {
    "pair_sampler": None,   # the teacher's default sampler (heun)
    "pair_nfe": 64,
    "pair_grid": "karras",
    "pairs": 20000,
    "pair_batch": 1000,
    "init": "auto",         # auto (teacher weights when the architecture matches) | teacher | random
    "latent_dim": None,     # stochastic-generator form: the latent's own dimension
}
HELP = {
    "pair_sampler": "sampler that makes the teacher's pairs (default: the teacher's own, heun)",
    "pair_nfe": "teacher evaluations per pair (default 64)",
    "pair_grid": "sigma grid of the pair sampler (default karras)",
    "pairs": "number of (x_T, x_0) pairs (default 20000)",
    "pair_batch": "pairs made per teacher batch, one resumable chunk each (default 1000)",
    "init": "student start: auto, teacher (its weights) or random",
    "latent_dim": "stochastic-generator form: a latent of this dimension (default: x_T itself)",
}


class Generator(nn.Module):
    """x0 = G(z): the latent z (dimension m, given at scale sigma_max as every model's noise)
    goes through a linear map to the data's shape, then the student net at a fixed level.

    Presents the denoiser contract D(x, sigma) (sigma is ignored) so the one-step sampling
    rule and ``fewstep.load`` treat it like any student."""

    prediction = "generator"

    def __init__(self, net: nn.Module, latent_dim: int, shape, sigma_max: float):
        super().__init__()
        self.net, self.latent_dim, self.shape = net, int(latent_dim), tuple(shape)
        d = math.prod(self.shape)
        self.inp = nn.Linear(self.latent_dim, d)
        with torch.no_grad():  # start as the coordinate embedding z -> (z, 0) / (z_1..d)
            self.inp.weight.copy_(torch.eye(d, self.latent_dim))
            self.inp.bias.zero_()
        self.sigma_max, self.sigma_data = float(sigma_max), 0.5
        self.process = EDM(0.002, self.sigma_max)

    def forward(self, x, sigma=None, **cond):
        z = x.reshape(x.shape[0], -1) / self.sigma_max
        h = self.inp(z).reshape((x.shape[0],) + self.shape)
        return self.net(h, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), **cond)


def pair_spec(cfg: dict, teacher) -> dict:
    from ..samplers import info

    sampler = cfg["pair_sampler"] or teacher.default_sampler
    info(sampler)  # unknown names fail before any work
    from ..grids import make_grid

    if isinstance(cfg["pair_grid"], str) and not cfg["pair_grid"].endswith(".json"):
        make_grid(cfg["pair_grid"], 2, teacher.sigma_min, teacher.sigma_max, process=teacher.process)
    if int(cfg["pair_nfe"]) < 1 or int(cfg["pairs"]) < 1 or int(cfg["pair_batch"]) < 1:
        raise UserError("--pair-nfe, --pairs and --pair-batch must be at least 1")
    return {"teacher": str(cfg["teacher"]), "sampler": sampler, "nfe": int(cfg["pair_nfe"]),
            "grid": cfg["pair_grid"], "pairs": int(cfg["pairs"]), "batch": int(cfg["pair_batch"]),
            "seed": int(cfg["seed"]), "latent_dim": cfg["latent_dim"], "sigma_max": teacher.sigma_max}


def make_pairs(teacher, cfg: dict, run: StudentRun, progress: bool = True, acc=None):
    """Pairs (latent, x_0 = teacher sampler(x_T)) in ``<run>/pairs/chunk_*.safetensors``.

    Each chunk is drawn from its own seed and written atomically, so an interrupted job
    resumes at the first missing chunk. Under ``accelerate`` (``acc``) process r of W makes
    chunks r, r + W, ...; after a barrier every process reads all of them, so the pairs
    do not depend on the process count. Returns (latents, x0, info)."""
    from tqdm.auto import tqdm

    from ..samplers import info
    from ..train.checkpoint import load_weights

    spec = pair_spec(cfg, teacher)
    folder = run.path("pairs/pairs.json").parent
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    if (folder / "pairs.json").is_file():
        stored = read_json(folder / "pairs.json")
        if stored != spec:
            raise UserError(f"{folder} holds pairs made with {stored}; this run asks for {spec}")
    elif rank == 0:
        write_json(folder / "pairs.json", spec)
    n, b = spec["pairs"], spec["batch"]
    chunks = math.ceil(n / b)
    shape, d = tuple(teacher.shape), math.prod(teacher.shape)
    m = int(spec["latent_dim"]) if spec["latent_dim"] else None
    if m is not None and m < 1:
        raise UserError(f"--latent-dim must be at least 1, got {m}")
    stochastic = info(spec["sampler"]).stochastic
    for i in tqdm(range(rank, chunks, world), disable=not progress, desc="pairs", dynamic_ncols=True,
                  mininterval=1.0):
        name = f"chunk_{i:05d}"
        if (folder / f"{name}.json").is_file():
            continue
        timer = Timer()
        g = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + 7919 * i + 17)
        k = min(b, n - i * b)
        if m is None:
            latent = torch.randn((k,) + shape, generator=g, dtype=torch.float64)
            x_T = latent
        else:
            latent = torch.randn(k, m, generator=g, dtype=torch.float64)
            parts = [latent[:, :min(m, d)]] + ([torch.randn(k, d - m, generator=g, dtype=torch.float64)] if m < d else [])
            x_T = torch.cat(parts, 1).reshape((k,) + shape)
        x_T = (teacher.sigma_max * x_T).to(teacher.device, teacher.dtype)
        counter = EvalCounter(teacher.denoiser)
        opts = {"generator": torch.Generator(device=teacher.device).manual_seed(int(g.initial_seed()) + 1)} if stochastic else {}
        x0 = quiet_sample(counter, x_T, sampler=spec["sampler"], nfe=spec["nfe"], grid=spec["grid"],
                          sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max, process=teacher.process, **opts)
        save_checkpoint(folder, {"latent": (teacher.sigma_max * latent).float(), "x0": x0.float().cpu()},
                        {"pairs": k, "teacher_evals": counter.evals, "seconds": timer.seconds}, name=name)
        run.commit()  # pairs on disk are worth resuming
    if acc is not None:
        acc.wait_for_everyone()  # every process's chunks are on disk
    lat, x0, evals, secs = [], [], 0, 0.0
    for i in range(chunks):
        w = load_weights(folder / f"chunk_{i:05d}.safetensors")
        meta = read_json(folder / f"chunk_{i:05d}.json")
        lat.append(w["latent"])
        x0.append(w["x0"])
        evals, secs = evals + int(meta["teacher_evals"]), secs + float(meta["seconds"])
    if not bool(torch.isfinite(torch.cat(x0)).all()):
        raise UserError(f"the teacher's pairs in {folder} hold NaN or inf; use another --pair-sampler or more --pair-nfe")
    return torch.cat(lat), torch.cat(x0), {"teacher_evals": evals, "pair_seconds": secs, **spec}


def build_student(teacher, cfg: dict):
    """(denoiser, trained module, net config): the teacher's architecture (weights too with
    init auto/teacher), an EDM-preconditioned MLP for an exact teacher, or a Generator."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net

    net_cfg = net_config(cfg["net"], teacher, teacher.shape, teacher.kind)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = getattr(net, "config", net_cfg)
    if cfg["init"] not in ("auto", "teacher", "random"):
        raise UserError(f"--init {cfg['init']}: use auto, teacher or random")
    if cfg["latent_dim"] is not None:
        if int(cfg["latent_dim"]) < 1:
            raise UserError(f"--latent-dim must be at least 1, got {cfg['latent_dim']}")
        G = Generator(net, int(cfg["latent_dim"]), teacher.shape, teacher.sigma_max)
        return G, G, net_cfg
    state = None if cfg["init"] == "random" else teacher_net_state(teacher, net_cfg)
    if cfg["init"] == "teacher" and state is None:
        raise UserError("--init teacher: the teacher has no network of the student's architecture; use --init random")
    if state is not None:
        net.load_state_dict(state)
        T = teacher.denoiser
        D = ModelDenoiser(net, T.process, T.prediction, T.sigma_data)
    else:
        sd = gmm_sigma_data(teacher.denoiser) if is_exact(teacher) else teacher.meta.get("sigma_data", 0.5)
        D = ModelDenoiser(net, EDM(teacher.sigma_min, teacher.sigma_max), "edm", sd)
    return D, net, net_cfg


def run(cfg: dict, out: str, resume: bool = False, progress: bool = True) -> str:
    acc = make_accelerator(cfg["device"], cfg["mixed_precision"])
    teacher = load_teacher(cfg["teacher"], acc.device)
    timer = Timer()
    D, module, net_cfg = build_student(teacher, cfg)  # bad options fail before any work
    pair_spec(cfg, teacher)
    with open_run(acc, out, cfg, resume, StudentRun) as run_:
        latents, targets, pinfo = make_pairs(teacher, cfg, run_, progress and acc.is_main_process, acc)
        generator = isinstance(D, Generator)
        B, n = int(cfg["batch_size"]), len(latents)
        sigma_T = float(teacher.sigma_max)

        def loss(model, gen, rank, world, device):
            """Eq. 40: || f(x_T) - ODE(x_T) ||^2 per sample (mean over coordinates)."""
            idx = torch.randint(0, n, (B,), generator=gen)[batch_slice(B, rank, world)]
            z, x0 = latents[idx].to(device), targets[idx].to(device)
            pred = model(z) if generator else call_denoiser(D, model, z, torch.full((len(z),), sigma_T, device=device))
            return ((pred - x0) ** 2).flatten(1).mean(1)

        train_t = Timer()
        ema = fit(Task(student=module, loss=loss), run_, fit_config(cfg), accelerator=acc, progress=progress)
        if acc.is_main_process:
            den = {"kind": "generator", "latent_dim": int(cfg["latent_dim"]), "sigma_max": sigma_T} if generator else None
            sampling = {"sampler": "consistency", "grids": fixed_grids({1: [sigma_T, 0.0]})}
            meta = student_meta("knowledge", D, net_cfg, teacher.shape, teacher.kind,
                                teacher.meta.get("data", {}).get("name", teacher.name), teacher.sigma_min, sigma_T,
                                sampling, cfg, denoiser=den,
                                cost={"teacher_evals": pinfo["teacher_evals"], "pair_seconds": pinfo["pair_seconds"],
                                      "train_seconds": train_t.seconds, "seconds": timer.seconds},
                                pairs={k: pinfo[k] for k in ("sampler", "nfe", "grid", "pairs")})
            if generator:
                meta["latent_shape"] = [int(cfg["latent_dim"])]
            write_student(run_.root, ema.module, meta)
        acc.wait_for_everyone()
    return str(run_.root)
