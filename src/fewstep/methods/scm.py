"""sCM: continuous-time consistency models (Lu & Song 2024, "Simplifying, stabilizing and scaling
continuous-time consistency models", arXiv 2410.11081): distillation (sCD) and training (sCT).

TrigFlow (the paper's Sec. 2-3): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2], and
the consistency model

    f_theta(x_t, t) = cos(t) x_t - sin(t) sd F_theta(x_t / sd, c_noise(t))          (f(x, 0) = x)

In fewstep's sigma space (y = x0 + sigma eps, D(y, sigma) -> x0) this is sigma = sd tan(t) and
x_t = cos(t) y: the student is saved as the denoiser D(y, sigma) = f_theta(cos(t) y, t)
(:class:`fewstep.students.TrigFlowDenoiser`, model.json ``"denoiser": {"kind": "trigflow", ...}``), so
every sampler and ``fewstep.load(run).sample(n, nfe)`` use it. Its own rule is the registered
``consistency`` sampler (denoise, re-noise, denoise) on fixed grids: 1 step [sigma_max, 0], 2 steps
[sigma_max, sd tan(t_mid), 0] with the paper's t_mid = 1.1 (``--t-mid``), epsilon 0 (f(x, 0) = x
exactly, so re-noising to sigma is y = x0 + sigma eps, which is TrigFlow's x_t / cos(t)). The paper
starts at t = pi/2 (x = z, pure noise); fewstep starts at sigma_max, i.e. t_max = arctan(sigma_max /
sd), from sigma_max eps (x_t = cos(t_max) sigma_max eps: the variance differs from sd^2 by the
factor sigma_max^2 / (sigma_max^2 + sd^2), 1 - 3e-4 at sigma_max = 80, sd = 1.4), and training
draws t up to t_max: a model is trained and sampled on the teacher's sigma range, as every fewstep
student, rather than at the one point t = pi/2 the teacher was never evaluated at.

The objective (the paper's Algorithm 1, eq. 8-9). With F^- = stopgrad(F_theta) (the current
weights, no EMA target):

    tau ~ N(P_mean, P_std^2),  t = arctan(e^tau / sd)   (clamped to the teacher's sigma range)
    dx_t/dt   sCT: cos(t) z - sin(t) x0
              sCD: the teacher's velocity sd F_teacher(x_t / sd, t) =
                   (cos(t) x_t - D_teacher(x_t / cos(t), sd tan(t))) / sin(t)
    g = -cos^2(t) (sd F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF^-/dt)     (= cos(t) df^-/dt at r = 1)
    g <- g / (||g|| + c)                                           (tangent normalisation, c = 0.1)
    L = e^{w_phi(t)} / D ||F_theta - F^- - g||^2 - w_phi(t)        (adaptive weighting)

The sCD velocity: a diffusion model in TrigFlow predicts x0 as D = cos(t) x_t - sin(t) sd F, and
E[dx_t/dt | x_t] = -sin(t) E[x0] + cos(t) E[z] with E[z | x_t] = (x_t - cos(t) D) / sin(t), so
dx_t/dt = (cos(t) x_t - D) / sin(t) = sd F_teacher (:func:`teacher_velocity`; any fewstep teacher's
sigma-space denoiser at y = x_t / cos(t)). dF^-/dt = grad_x F^- . dx_t/dt / sd + dF^-/dt is one
Jacobian-vector product (``torch.func.jvp``) of F^-(x_t / sd, t) with the paper's tangents
(cos(t) sin(t) dx_t/dt, sd cos(t) sin(t)) for (x_t / sd, t), which gives sd cos(t) sin(t) dF^-/dt,
the term g needs, directly (:func:`tangent`). r = min(1, step / H) is the tangent warm-up
(``--tangent-warmup`` H, the paper's 10k). w_phi(t) is a small MLP on Fourier features of t
(:class:`fewstep.students.AdaptiveWeight`), trained jointly: it lives in the student module beside
the net and is saved with it (``--weighting none``: the plain mean squared error).

Choices and deviations (and why):
  * c_noise(t) = t (the paper's identity time transform; ``--time-scale`` s gives s t, e.g. 1000).
  * init (the paper's sCD starts from the teacher): ``--init auto`` copies an EDM-preconditioned
    teacher's weights when its net is the student's: EDM's D = c_skip y + c_out F_edm(c_in y,
    ln(sigma)/4) is at sigma = sd tan(t) exactly cos(t) x_t + sd sin(t) F_edm(x_t / sd, ln(sd tan t)/4),
    i.e. TrigFlow with F = -F_edm and the time input ln(sd tan t)/4 (model.json ``"time": "edm"``,
    ``"sign": -1``), so the student starts as the teacher's denoiser. Other parametrizations (eps,
    v, flow under other processes) convert exactly only in special cases (v under VP with sd = 1):
    those and exact mixtures (no weights) start from random weights (model.json ``"init"``).
  * the proposal: P_mean -1.0, P_std 1.4 (the paper's CIFAR-10 values; its ImageNet runs use
    -0.8, 1.6), for both sCD and sCT; t is clamped to [arctan(sigma_min / sd), arctan(sigma_max /
    sd)] of the teacher (0.002, 80 for sCT without a teacher).
  * ||g|| is the plain L2 norm over all coordinates, as the paper writes it.
  * not followed: the paper's architecture changes (adaptive double normalisation, pixel
    normalisation), its Adam settings and EMA (the shared runner's options), its JVP in fp16
    with Flash attention; its t = pi/2 start (above).
  * ECT (Geng et al. 2024, easy consistency tuning) is discrete-time: a finite difference between
    f(x_t, t) and f(x_r, r) with r -> t shrinking over training, no tangent; it is a schedule of
    discrete-time consistency training (:mod:`fewstep.methods.consistency`), not an option of this
    JVP objective, and is not implemented here.

Conditional teachers: labels go to the teacher and the student net (``--guidance`` w: the targets'
velocity is that of the guided teacher D_null + w (D_c - D_null)); sCT draws the data's labels.

``scm.json`` (written before model.json): energy distance and sliced-W2 of the EMA student's 1- and
2-step samples (fixed noise) to reference samples (exact samples for a mixture, else the data).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..io import write_json
from ..students import TrigFlowDenoiser
from ..train.job import Plan, Task
from ..train.options import Option, check_batch_memory, table_defaults, table_help
from .common import (N_DATA, bcast, check_student_net, conditioning, consistency_rule_measures, data_source,
                     fixed_grids, is_exact, load_teacher, net_config, reference_samples, student_meta,
                     teacher_net_state)

MODES = ("distillation", "training")
KINDS = ("points", "image")
SCT_SIGMA = (0.002, 80.0)  # the sigma range of sCT without a teacher (EDM's)
OPTIONS = (
    Option("mode", str, None, "distillation (sCD: the teacher's velocity) or training (sCT: from data)",
           choices=MODES, none="distillation when --teacher is given, else training", example="distillation"),
    Option("tangent_warmup", int, 10000, "H: the tangent warm-up r = min(1, step / H); 0: r = 1 from the start "
           "(default 10000, the paper's)", low=0),
    Option("tangent_c", float, 0.1, "c of the tangent normalisation g / (||g|| + c) (default 0.1, the paper's)",
           low=0.0, above=True),
    Option("p_mean", float, -1.0, "proposal: mean of tau, t = arctan(e^tau / sigma_data) (default -1.0, the "
           "paper's CIFAR-10)"),
    Option("p_std", float, 1.4, "proposal: standard deviation of tau (default 1.4, the paper's CIFAR-10)",
           low=0.0, above=True),
    Option("t_mid", float, 1.1, "TrigFlow time of the 2-step rule's middle level sigma_data tan(t_mid); in (0, "
           "pi/2) (default 1.1, the paper's)", low=0.0, above=True, high=math.pi / 2),
    Option("weighting", str, "adaptive", "loss weighting: adaptive (the learned w_phi(t), the paper's) or none",
           choices=("adaptive", "none")),
    Option("time_scale", float, 1.0, "a random-init student's time input c_noise(t) = s t (default 1, the paper's "
           "identity)", low=0.0, above=True),
    Option("init", str, "auto", "student start: auto (an EDM teacher's weights when its net is the student's, "
           "else random), teacher or random", choices=("auto", "teacher", "random")),
    N_DATA,
    Option("eval_samples", int, 2000, "samples of the 1- and 2-step evaluation in scm.json (default 2000)", low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
EVAL_STEPS = (1, 2)


def check_options(cfg: dict) -> None:
    """The rules between options, before anything is written: sCD and --init teacher need a teacher."""
    if cfg["mode"] == "distillation" and not cfg["teacher"]:
        raise UserError("--mode distillation (sCD) needs --teacher (a run folder or gmm:FILE.npz); "
                        "or use --mode training with --data")
    if cfg["init"] == "teacher" and not cfg["teacher"]:
        raise UserError("--init teacher needs --teacher (an EDM run folder of the student's net)")


# ------------------------------------------------------------------------ the idea
def proposal_times(n: int, gen: torch.Generator, p_mean: float, p_std: float, sigma_data: float,
                   sigma_lo: float, sigma_hi: float) -> torch.Tensor:
    """t = arctan(e^tau / sd), tau ~ N(P_mean, P_std^2), e^tau clamped to [sigma_lo, sigma_hi] (float64)."""
    tau = float(p_mean) + float(p_std) * torch.randn(n, generator=gen, dtype=torch.float64)
    return torch.atan(tau.exp().clamp(float(sigma_lo), float(sigma_hi)) / float(sigma_data))


def teacher_velocity(D, x_t: torch.Tensor, t: torch.Tensor, sigma_data: float, **cond) -> torch.Tensor:
    """dx_t/dt of the teacher's probability-flow ODE in TrigFlow coordinates (module docstring):
    (cos(t) x_t - D(x_t / cos(t), sd tan(t))) / sin(t), t in (0, pi/2)."""
    c, s = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
    x0 = D(x_t / c, float(sigma_data) * torch.tan(t), **cond)
    return (c * x_t - x0.to(x_t.dtype)) / s


def tangent(F, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor, sigma_data: float):
    """(F(x_t / sd, t), sd cos(t) sin(t) dF/dt): one JVP of ``F(x_in, t)`` with the paper's
    tangents (cos(t) sin(t) dx_t/dt, sd cos(t) sin(t)) for (x_in, t); dF/dt is the total derivative
    along the trajectory (grad_x F . dx_t/dt / sd + dF/dt)."""
    cs = torch.cos(t) * torch.sin(t)
    return torch.func.jvp(F, (x_t / float(sigma_data), t), (bcast(cs, x_t) * dxdt, float(sigma_data) * cs))


def scm_tangent(F_minus: torch.Tensor, dF: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor,
                sigma_data: float, r: torch.Tensor) -> torch.Tensor:
    """g = -cos^2(t) (sd F^- - dx_t/dt) - r cos(t) sin(t) x_t - r dF, with dF = sd cos(t) sin(t) dF^-/dt
    (:func:`tangent`); r the warm-up factor per sample. At r = 1 it is cos(t) df^-/dt."""
    c, s = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
    R = bcast(r, x_t)
    return -c * c * (float(sigma_data) * F_minus - dxdt) - R * (c * s * x_t + dF)


def normalize_tangent(g: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """g / (||g|| + c), the norm per sample over all coordinates."""
    return g / bcast(g.flatten(1).norm(dim=1) + float(c), g)


def scm_loss(F: torch.Tensor, F_minus: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per sample e^{w} / D ||F - F^- - g||^2 - w (w = 0: the plain mean squared error)."""
    sq = (F - F_minus - g).pow(2).flatten(1).mean(1)
    return torch.exp(w) * sq - w


def warmup(step: int, H: int) -> float:
    """The tangent warm-up r = min(1, step / H) (1 when H = 0)."""
    return 1.0 if int(H) <= 0 else min(1.0, float(step) / float(H))


def sampling_rule(sigma_max: float, sigma_data: float, t_mid: float) -> dict:
    """The consistency sampler on [sigma_max, 0] (1 step) and [sigma_max, sd tan(t_mid), 0] (2 steps)."""
    mid = float(sigma_data) * math.tan(float(t_mid))
    if not 0 < mid < float(sigma_max):
        raise UserError(f"--t-mid {t_mid}: the 2-step level sigma_data tan(t_mid) = {mid:.4g} must lie below "
                        f"sigma_max {sigma_max:g}; lower --t-mid")
    grids = {1: [float(sigma_max), 0.0], 2: [float(sigma_max), mid, 0.0]}
    return {"sampler": "consistency", "grids": fixed_grids(grids), "options": {"epsilon": 0.0}}


# ----------------------------------------------------------------------- the stage
def _student(cfg: dict, teacher, data, sigma_data: float, lo: float, hi: float):
    """(TrigFlowDenoiser, net config, init): an EDM teacher's weights (F = -F_edm, EDM's time
    input) where its net is the student's and --init allows, else random weights and c_noise = s t."""
    from ..nets import build_net

    net_cfg = net_config(cfg["net"], teacher, data.shape, data.kind)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = dict(getattr(net, "config", net_cfg))
    state = None
    if cfg["init"] != "random" and teacher is not None and getattr(teacher.denoiser, "prediction", None) == "edm":
        state = teacher_net_state(teacher, net_cfg)
    if cfg["init"] == "teacher" and state is None:
        raise UserError(f"--init teacher: teacher {teacher.name} has no EDM-preconditioned net of the student's "
                        f"architecture (the only exact conversion to TrigFlow); use --init random")
    weighting = cfg["weighting"] == "adaptive"
    if state is not None:
        net.load_state_dict(state)
        return TrigFlowDenoiser(net, sigma_data, lo, hi, "edm", 1.0, -1.0, weighting), net_cfg, "teacher"
    return TrigFlowDenoiser(net, sigma_data, lo, hi, "t", float(cfg["time_scale"]), 1.0, weighting), net_cfg, "random"


def stages(job):
    """One stage in the top folder: sCD (teacher velocity) or sCT (data), then the 1/2-step rule."""
    cfg = dict(job.cfg)
    mode = cfg["mode"] or ("distillation" if cfg["teacher"] else "training")
    teacher = load_teacher(cfg["teacher"], job.device, required=mode == "distillation", cfg=cfg, kinds=KINDS,
                           method="sCM")
    data = data_source(cfg["data"], teacher, int(cfg["seed"]), cfg["n_data"])
    if teacher is None:
        if data.kind not in KINDS:
            raise UserError(f"--data {data.name} holds {data.kind}; sCM takes {' or '.join(KINDS)}")
        check_batch_memory("--batch-size", int(cfg["batch_size"]), data.shape)
    cond = conditioning(cfg, teacher, data)
    if cond.on and not data.num_classes:
        raise UserError(f"the teacher is class-conditional but the training data {data.name} has no labels; "
                        f"give labelled --data")
    if cond.on and mode == "training" and cond.guidance != 1.0:
        raise UserError(f"--guidance {cond.guidance}: sCT learns from data, which has no guidance; "
                        f"use --mode distillation")
    if teacher is not None:
        lo, hi = float(teacher.sigma_min), float(teacher.sigma_max)
        sd = data.sigma_data if is_exact(teacher) else float(teacher.meta.get("sigma_data", 0.5))
    else:
        (lo, hi), sd = SCT_SIGMA, data.sigma_data
    sampling = sampling_rule(hi, sd, float(cfg["t_mid"]))
    D, net_cfg, init = _student(cfg, teacher, data, sd, lo, hi)
    if cond.on:
        check_student_net(D.net, cond)
    D_teacher = cond.teacher(teacher.denoiser) if mode == "distillation" else None
    B, H, c = int(cfg["batch_size"]), int(cfg["tangent_warmup"]), float(cfg["tangent_c"])
    pm, ps = float(cfg["p_mean"]), float(cfg["p_std"])

    def draw(gen, step):
        x0, labels = data.labelled(B, gen) if cond.on else (data.draw(B, gen), None)
        batch = {"x0": x0, "eps": torch.randn(x0.shape, generator=gen),
                 "t": proposal_times(B, gen, pm, ps, sd, lo, hi).float(),
                 "r": torch.full((B,), warmup(step, H))}
        if cond.on:
            batch["labels"] = cond.drop(labels, gen)
        return batch

    def loss(model, b):
        """The sCM loss per sample (module docstring)."""
        x0, t, r = b["x0"], b["t"].to(b["x0"].dtype), b["r"]
        kw = {"labels": b["labels"]} if "labels" in b else {}
        z = sd * b["eps"]
        C, S = bcast(torch.cos(t), x0), bcast(torch.sin(t), x0)
        x_t = C * x0 + S * z
        with torch.no_grad():
            if D_teacher is not None:
                dt = teacher.dtype
                dxdt = teacher_velocity(D_teacher, x_t.to(dt), t.to(dt), sd, **kw).to(x0.dtype)
            else:
                dxdt = C * z - S * x0
            base = getattr(model, "module", model)  # F^-: the current weights, no graph (stop-gradient)
            F_minus, dF = tangent(lambda xi, tt: base.F(xi, tt, **kw), x_t, t, dxdt, sd)
            g = normalize_tangent(scm_tangent(F_minus, dF, x_t, t, dxdt, sd, r), c)
        F, w = model(x_t, t, trigflow=True, **kw)
        return scm_loss(F, F_minus.detach(), g.detach(), w)

    def plan(st):
        def describe(ema_module):
            grids = {int(k): v for k, v in sampling["grids"].items()}
            n = int(cfg["eval_samples"])
            ref, what = reference_samples(teacher, data, n, int(cfg["seed"]))
            measures = consistency_rule_measures(ema_module.eval(), grids, data.shape, cond, ref, int(cfg["seed"]),
                                                 st.job.device)
            write_json(st.folder / "scm.json", {**measures, "reference": what, "mode": mode})
            per = (2 if cond.on and cond.guidance != 1.0 else 1) if mode == "distillation" else 0
            return student_meta("scm", D, net_cfg, data.shape, data.kind, data.name, lo, hi, sampling, cfg,
                                denoiser=D.spec(), cond=cond, mode=mode, init=init,
                                scm={"tangent_warmup": H, "tangent_c": c, "p_mean": pm, "p_std": ps,
                                     "t_mid": float(cfg["t_mid"]), "weighting": cfg["weighting"],
                                     "c_noise": "ln(sd tan t) / 4" if D.time == "edm" else f"{D.time_scale:g} t"},
                                cost={"teacher_evals": int(cfg["steps"]) * B * per, "seconds": st.seconds})

        frozen = {"teacher": teacher.denoiser} if mode == "distillation" and isinstance(teacher.denoiser,
                                                                                        torch.nn.Module) else {}
        return Plan(Task(student=D, draw=draw, loss=loss, frozen=frozen), describe)

    job.stage("", plan)
