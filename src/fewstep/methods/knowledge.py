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

Point sets (PSF, Wu et al. 2022, eq. 45): with ``--distance chamfer`` or ``emd`` the squared
error of eq. 40 is replaced by a distance between point sets, since the order of a cloud's
points carries no meaning.
"""
from __future__ import annotations

import torch

from ..errors import UserError, unknown_name
from ..students import Generator
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import call_denoiser, check_student_net, conditioning, fixed_grids, load_teacher, net_config, \
    student_meta, teacher_like_denoiser
from .pairs import make_pairs, pair_spec, stage_cost

DISTANCES = ("mse", "chamfer", "emd")
OPTIONS = (
    Option("pair_sampler", str, None, "sampler that makes the teacher's pairs (default: the teacher's own, else heun)",
           none="the teacher's own sampler", example="heun"),
    Option("pair_nfe", int, 64, "teacher evaluations per pair (default 64)", low=1),
    Option("pair_grid", str, "karras", "sigma grid of the pair sampler (default karras)"),
    Option("pairs", int, 20000, "number of (x_T, x_0) pairs (default 20000)", low=1),
    Option("pair_batch", int, 1000, "pairs made per teacher batch, one resumable chunk each (default 1000)", low=1),
    Option("init", str, "auto", "student start: auto, teacher (its weights) or random",
           choices=("auto", "teacher", "random")),
    Option("latent_dim", int, None, "stochastic-generator form: a latent of this dimension (default: x_T itself)",
           low=1, none="x_T itself", example=2),
    Option("distance", str, "mse", "student loss: mse (eq. 40), or for point clouds chamfer / emd (PSF eq. 45)",
           choices=DISTANCES),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)


def distance_fn(name: str):
    """Per-sample distance [B, ...] x [B, ...] -> [B]: the squared error (mean over
    coordinates) of eq. 40, or Chamfer / exact EMD between point sets [B, N, 3]."""
    if name == "mse":
        return lambda a, b: ((a - b) ** 2).flatten(1).mean(1)
    from ..metrics.pointcloud import chamfer_loss, emd_loss

    if name not in DISTANCES:
        raise unknown_name("knowledge-distillation distance", name, DISTANCES)
    return {"chamfer": chamfer_loss, "emd": emd_loss}[name]


def build_student(teacher, cfg: dict):
    """(denoiser, trained module, net config): the teacher's architecture (weights too with
    init auto/teacher), an EDM-preconditioned MLP for an exact teacher, or a Generator."""
    from ..nets import build_net

    net_cfg = net_config(cfg["net"], teacher, teacher.shape, teacher.kind)
    if cfg["init"] not in ("auto", "teacher", "random"):
        raise UserError(f"--init {cfg['init']}: use auto, teacher or random")
    torch.manual_seed(int(cfg["seed"]))
    if cfg["latent_dim"] is not None:
        if not isinstance(cfg["latent_dim"], int) or int(cfg["latent_dim"]) < 1:
            raise UserError(f"--latent-dim must be an integer of at least 1, got {cfg['latent_dim']!r}")
        net = build_net(net_cfg)
        G = Generator(net, int(cfg["latent_dim"]), teacher.shape, teacher.sigma_max)
        return G, G, getattr(net, "config", net_cfg)
    D, net = teacher_like_denoiser(teacher, net_cfg, cfg["init"])
    return D, net, getattr(net, "config", net_cfg)


def stages(job):
    """One stage in the top folder: the teacher's pairs, then eq. 40 on them."""
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, method="knowledge")
    cond = conditioning(cfg, teacher)
    D, module, net_cfg = build_student(teacher, cfg)  # bad options fail before any work
    if cond.on:
        check_student_net(D.net, cond)
    pair_spec(cfg, teacher, cond)
    dist = distance_fn(cfg["distance"])
    if cfg["distance"] != "mse" and teacher.kind != "clouds":
        raise UserError(f"--distance {cfg['distance']} compares point sets; the teacher's samples are {teacher.kind}")
    generator = isinstance(D, Generator)
    sigma_T = float(teacher.sigma_max)

    def plan(st):
        latents, targets, pinfo = make_pairs(teacher, cfg, st, cond)
        labels = pinfo.pop("labels")
        B, n = int(cfg["batch_size"]), len(latents)

        def draw(gen, step):
            idx = torch.randint(0, n, (B,), generator=gen)
            batch = {"z": latents[idx], "x0": targets[idx]}
            if labels is not None:
                batch["labels"] = labels[idx]
            return batch

        def loss(model, b):
            """Eq. 40: || f(x_T, c) - ODE(x_T, c) ||^2 per sample (or a point-set distance)."""
            z, lab = b["z"], b.get("labels")
            if generator:
                pred = model(z) if lab is None else model(z, labels=lab)
            else:
                pred = call_denoiser(D, model, z, torch.full((len(z),), sigma_T, device=z.device), lab)
            return dist(pred, b["x0"])

        def describe(ema_module):
            den = {"kind": "generator", "latent_dim": int(cfg["latent_dim"]), "sigma_max": sigma_T} if generator else None
            sampling = {"sampler": "consistency", "grids": fixed_grids({1: [sigma_T, 0.0]})}
            meta = student_meta("knowledge", D, net_cfg, teacher.shape, teacher.kind,
                                teacher.meta.get("data", {}).get("name", teacher.name), teacher.sigma_min, sigma_T,
                                sampling, cfg, denoiser=den, cond=cond, distance=cfg["distance"],
                                cost=stage_cost(st, pinfo),
                                pairs={k: pinfo[k] for k in ("sampler", "nfe", "grid", "pairs")})
            if generator:
                meta["latent_shape"] = [int(cfg["latent_dim"])]
            return meta

        return Plan(Task(student=module, draw=draw, loss=loss), describe)

    job.stage("", plan)
