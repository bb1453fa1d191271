"""Consistency trajectory models (Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji & Ermon 2023, "Consistency
trajectory models: learning probability flow ODE trajectory of diffusion", ICLR 2024).

One network learns the anytime-to-anytime jump along the teacher's probability-flow ODE, in fewstep's sigma
space (EDM: t = sigma, x_t = x0 + t eps, the ODE dx/dt = (x - D(x, t)) / t):

    G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s),   s <= t              (the paper's parametrization)
    g(x_t, t, s) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t), cond = c(s))   (EDM preconditioning in t)

so G(x, t, t) = x exactly (no boundary condition to learn) and G(x, t, 0) = g(x, t, 0), a denoiser. The end s
goes to the net through its scalar ``cond`` input as the paper's code embeds it, like t (c_noise(s) = ln(s)/4),
shifted to be 0 at the grid's sigma_min, the code's stand-in for s = 0: c(s) = ln(max(s, sigma_min) /
sigma_min) / 4 (:func:`fewstep.model.ctm_cond`). A net called without cond is then g(x, t, 0): the saved student
is an ordinary EDM-preconditioned sigma-space denoiser D(y, t) = G(y, t, 0) (``"prediction": "edm"`` in
model.json, no parametrization of its own) that every fewstep sampler takes (``--sampler consistency`` reads it as
the consistency function it is; an ODE sampler such as heun reads it as a posterior mean, which G(., t, 0) is
not: the paper's score is g(x, t, t), trained by the DSM term), and ``fewstep.load(run).sample(n, k)`` runs
the paper's gamma-sampling with k jumps.

Soft consistency matching (the paper's L_CTM), per sample, with the target net theta- an EMA of the student
(``--target-ema``, the paper's 0.999; theta- <- mu theta- + (1 - mu) theta after each step):

    t > u >= s on the N Karras levels sigma_0 = T > ... > sigma_{N-1} = sigma_min (``--levels`` N),
    x_t = x0 + t eps  (x0 the teacher's data: an exact mixture's samples, a run folder's data set)
    x_u = Solver_teacher(x_t, t -> u)                       (k teacher Heun steps along the levels)
    estimate = G_sg(G_theta(x_t, t, s), s, 0)               (:func:`ctm_pair`)
    target   = G_sg(G_sg(x_u, u, s), s, 0)
    L_CTM    = || estimate - target ||^2  (mean over coordinates)

Both are carried to 0 by the stop-gradient target net (its weights fixed, the gradient flows through its input:
the code's ``ctm_estimate_outer_type = 'target_model_sg'``). Denoising score matching on the same data keeps
g(x, t, t) the teacher's denoiser (the paper's L_DSM):

    L_DSM = lambda(sigma) || x0 - g_theta(x0 + sigma eps', sigma, sigma) ||^2,  lambda = (sigma^2 + sd^2) / (sigma sd)^2
    L     = L_CTM + lambda_DSM L_DSM                                                        (``--dsm-weight``)

The draws follow the official code (github:sony/ctm, ``cm/karras_diffusion.py`` ``ctm_losses``, ``cm/resample.py``):
one number of solver steps k per batch, P(k) ~ k on 1..K (``heun_step_strategy = 'weighted'``, K =
``--max-solver-steps``, default N - 1 as the code's ``num_heun_step``), per sample t = sigma_n with n uniform on
0..N-1-k, u = sigma_{n+k}, s = sigma_j with j uniform on n+k..N-1 (``sample_s_strategy = 'uniform'``; j = N-1 is
s = 0 here, the code's sigma_min); the teacher's solver is the registered sampler ``--solver`` (heun, the
paper's) on each sample's k + 1 levels, through :func:`fewstep.methods.common.solve_rows`. DSM levels: half
log-normal (P_mean -1.2, P_std 1.2), half sigma = Karras(r) with r uniform on [0, 0.7) (the code's
``halflognormal`` sampler and ``diffusion_mult``), EDM's weight (``karras_weight``), fresh noise.

gamma-sampling (:func:`fewstep.model.ctm_sample`): from t_n jump to sqrt(1 - gamma^2) t_{n+1}, add noise up to
t_{n+1}; gamma = 0 deterministic jumps along the ODE, gamma = 1 the consistency model's multistep rule; the grid
is the k + 1 Karras levels from sigma_max to sigma_min, the last one 0 (the code's ``get_sigmas_karras(steps +
1)``); one step is G(x_T, T, 0). ``--gamma`` is the stored default; ``sample(n, k, gamma=...)`` overrides it.

Where this differs from the paper and its code:
  * the distance is the squared L2 (mean over coordinates), not LPIPS (the paper's images; LPIPS has no meaning
    on 2-D points or 8x8 digits), with the code's uniform weight;
  * lambda_DSM is a fixed ``--dsm-weight``, not the code's adaptive weight (the ratio of the two losses' gradient
    norms at the net's last layer, which needs a named last layer of each architecture);
  * the GAN term (the paper's L_GAN, a discriminator on feature networks) is not implemented;
  * the jump's end is exactly s = 0 (the code stops at sigma_min = 0.002: G(x, t, sigma_min)), and the outer
    transport G(., s, 0) is skipped for rows with s = 0 (the identity there; G(., 0, 0) would divide by 0);
  * the student starts from the teacher's weights only when the teacher is a run folder of an EDM-preconditioned
    net of the student's architecture (the paper initialises from its EDM teachers), else at random;
  * labels: a class-conditional teacher trains a conditional student (labels to the teacher's solver, the student
    and the target; ``--guidance`` / ``--label-dropout`` through :func:`fewstep.methods.common.conditioning`);
    with a guided teacher (w != 1) the DSM term (which learns the unguided denoiser) must be off.

``ctm.json`` (written with the model): energy distance and sliced-W2 of the EMA student's 1-, 2- and 4-step
samples (the stored gamma, fixed noise) to fresh data draws (exact samples for a mixture).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..grids import karras
from ..io import write_json
from ..model import CTM, ctm_cond, ctm_grid, ctm_jump, ctm_sample
from ..process import EDM
from ..train.ema import EMA
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import (N_DATA, EvalCounter, call_denoiser, check_student_net, conditioning, data_source, is_exact,
                     load_teacher, cond_net_config, solve_rows, student_meta)

OPTIONS = (
    Option("levels", int, 18, "N: the Karras levels sigma_max > ... > sigma_min that t, u and s are drawn from "
           "(default 18, the paper's CIFAR-10 code; 40 for ImageNet)", low=3),
    Option("max_solver_steps", int, None, "K: the most teacher solver steps from t to u, k drawn with P(k) ~ k on "
           "1..K once per batch (default N - 1, the paper's code)", low=1, none="N - 1", example=17),
    Option("solver", str, "heun", "the teacher's ODE solver between adjacent levels: a deterministic fixed-step "
           "sampler (heun, the paper's; euler, dpm_solver_2, ...)"),
    Option("target_ema", float, 0.999, "EMA rate mu of the target net theta- (stop-gradient); 0: the student's "
           "current weights (default 0.999, the paper's; short runs do better with 0.99)", low=0.0, high=1.0),
    Option("dsm_weight", float, 1.0, "lambda_DSM: weight of the denoising score matching term on g(x, t, t); 0: "
           "off (default 1; the paper's code adapts it by gradient norms)", low=0.0),
    Option("gamma", float, 0.0, "stored default of gamma-sampling: 0 deterministic jumps along the ODE (default), "
           "1 the consistency model's multistep rule; in [0, 1]", low=0.0, must="a number in [0, 1]",
           test=lambda g: 0.0 <= g <= 1.0),
    Option("sigma_min", float, 0.002, "smallest level of the grid (the paper's code's stand-in for 0; default 0.002)",
           low=0.0, above=True),
    Option("sigma_max", float, None, "largest level T (default: the teacher's)", low=0.0, above=True,
           none="the teacher's", example=80.0),
    Option("rho", float, 7.0, "Karras rho of the levels and of the sampling grid (default 7)", low=0.0, above=True),
    Option("init", str, "auto", "student start: auto (the teacher's weights when it is an EDM-preconditioned net "
           "of the student's architecture, else random) or random", choices=("auto", "random")),
    N_DATA,
    Option("eval_samples", int, 2000, "samples of the 1-, 2- and 4-step evaluation in ctm.json (default 2000)",
           low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
KINDS = ("points", "image")
EVAL_STEPS = (1, 2, 4)
# the paper's code's DSM level draw ('halflognormal'): half log-normal, half Karras(r), r ~ U[0, 0.7)
DSM_P_MEAN, DSM_P_STD, DSM_MULT = -1.2, 1.2, 0.7


def check_options(cfg: dict) -> None:
    """The rules between options, before anything is written: K <= N - 1, sigma_min < sigma_max, a deterministic
    fixed-step solver."""
    from ..samplers import info

    N, K = int(cfg["levels"]), cfg.get("max_solver_steps")
    if K is not None and int(K) > N - 1:
        raise UserError(f"--max-solver-steps {K} must be at most --levels - 1 = {N - 1}: the solver steps from t to "
                        f"u run along the {N} levels")
    if cfg.get("sigma_max") is not None and not float(cfg["sigma_min"]) < float(cfg["sigma_max"]):
        raise UserError(f"--sigma-min {cfg['sigma_min']} must be below --sigma-max {cfg['sigma_max']}")
    si = info(cfg["solver"])
    if si.stochastic or si.adaptive:
        raise UserError(f"--solver {cfg['solver']}: the teacher's ODE steps need a deterministic fixed-step sampler "
                        f"(heun, euler, dpm_solver_2, ...)")


# ------------------------------------------------------------------------ the idea
def levels(N: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """The N Karras levels sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min (float64, the ends exact), the code's
    get_t."""
    sig = karras(N - 1, float(sigma_min), float(sigma_max), rho=float(rho), final_zero=False)
    sig[0], sig[-1] = float(sigma_max), float(sigma_min)
    return sig


def draw_levels(B: int, N: int, K: int, gen: torch.Generator):
    """(k, n, j): one solver step count k with P(k) ~ k on 1..K for the batch, per sample the index n of t
    (uniform on 0..N-1-k; u is level n + k) and the index j of s (uniform on n+k..N-1; N-1 is s = 0)."""
    p = torch.arange(1, K + 1, dtype=torch.float64)
    k = int(torch.multinomial(p, 1, generator=gen)) + 1
    n = torch.randint(0, N - k, (B,), generator=gen)
    j = n + k + torch.floor(torch.rand(B, generator=gen, dtype=torch.float64) * (N - n - k)).long()
    return k, n, torch.minimum(j, torch.full_like(j, N - 1))


def s_levels(sig: Tensor) -> Tensor:
    """The values s takes: the levels with the last one (sigma_min, the code's stand-in for 0) made 0."""
    s = sig.clone()
    s[-1] = 0.0
    return s


def to_zero(g, x: Tensor, s: Tensor, labels=None) -> Tensor:
    """G(x, s, 0) per sample; rows with s = 0 are already there (G(., 0, 0) is the identity)."""
    pos = s > 0
    if not bool(pos.any()):
        return x
    out = x.clone()
    extra = {"labels": labels[pos]} if labels is not None else {}
    out[pos] = ctm_jump(g, x[pos], s[pos], torch.zeros_like(s[pos]), **extra)
    return out


def ctm_pair(g, g_sg, solve, x_t: Tensor, t: Tensor, u: Tensor, s: Tensor, labels=None):
    """(estimate, target) of soft consistency matching: estimate = G_sg(G_theta(x_t, t, s), s, 0) (the gradient
    flows through G_theta and through the input of G_sg), target = G_sg(G_sg(solve(x_t), u, s), s, 0) without
    gradient; ``solve`` is the teacher's solver from t to u, ``g`` / ``g_sg`` the student's and the target's g."""
    extra = {"labels": labels} if labels is not None else {}
    estimate = to_zero(g_sg, ctm_jump(g, x_t, t, s, **extra), s, labels)
    with torch.no_grad():
        x_u = solve(x_t)
        target = to_zero(g_sg, ctm_jump(g_sg, x_u, u, s, **extra), s, labels)
    return estimate, target


def dsm_sigmas(B: int, sigma_min: float, sigma_max: float, rho: float, gen: torch.Generator) -> Tensor:
    """The DSM levels of the paper's code: half log-normal(P_mean, P_std), half Karras(r), r ~ U[0, 0.7)."""
    h = B // 2
    a = torch.exp(DSM_P_MEAN + DSM_P_STD * torch.randn(h, generator=gen, dtype=torch.float64))
    r = torch.rand(B - h, generator=gen, dtype=torch.float64) * DSM_MULT
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return torch.cat([a, (hi + r * (lo - hi)) ** rho])


def student_g(D, net, s_floor: float):
    """g(x, t, s) of the student ``D`` evaluated with ``net`` (the accelerate-wrapped student, or the target)."""
    def g(x, t, s, labels=None):
        return call_denoiser(D, net, x, t.to(x.dtype), labels, cond=ctm_cond(s, s_floor).to(x.device, torch.float32))
    return g


# ----------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(D, reference: Tensor, labels, shape, sigma_min: float, sigma_max: float, rho: float, gamma: float,
             n: int, seed: int, device) -> dict:
    """1-, 2- and 4-step gamma-sampling from fixed noise against ``reference`` samples: energy distance and
    sliced-W2."""
    from ..metrics import energy_distance, sliced_w2

    g = torch.Generator().manual_seed(int(seed) + 424242)
    z = torch.randn((n,) + tuple(shape), generator=g).to(device)
    ref = reference.to(device)
    extra = {"labels": labels.to(device)} if labels is not None else {}
    out = {"energy_distance": {}, "sliced_w2": {}, "eval_samples": n, "gamma": gamma}
    for k in EVAL_STEPS:
        x = ctm_sample(D, sigma_max * z, ctm_grid(k, sigma_min, sigma_max, rho), gamma, sigma_min,
                       torch.Generator(device=device).manual_seed(int(seed) + 5), extra)
        out["energy_distance"][str(k)] = energy_distance(x.flatten(1).cpu(), ref.flatten(1).cpu())
        out["sliced_w2"][str(k)] = sliced_w2(x.cpu(), ref.cpu())
    return out


# ----------------------------------------------------------------------- the stage
def _net_config(cfg: dict, teacher, shape, kind) -> dict:
    """``--net``, else the teacher's, else the data's default, with use_cond on (s goes through ``cond``)."""
    return cond_net_config(cfg["net"], teacher, shape, kind, "a CTM student takes the jump's end s")


def _init_from_teacher(net, net_cfg: dict, teacher) -> bool:
    """Load the teacher's weights into the student when the teacher is an EDM-preconditioned net of the student's
    architecture apart from the cond input, whose embedding then starts at output 0: the student starts as
    g(x, t, s) = D_teacher(x, t) for every s, so G(x, t, s) is the teacher's Euler (DDIM) step from t to s.
    True when loaded."""
    from ..denoiser import ModelDenoiser
    from ..nets.embed import ScalarEmbedding

    D = getattr(teacher, "denoiser", None)
    if is_exact(teacher) or not isinstance(D, ModelDenoiser) or D.prediction != "edm":
        return False
    if {**dict(teacher.meta.get("net", {})), "use_cond": True} != dict(net_cfg):
        return False
    missing, unexpected = net.load_state_dict(D.net.state_dict(), strict=False)
    if unexpected or not all(".cond." in f".{k}" for k in missing):
        raise UserError(f"teacher {teacher.name}: its weights do not fit the student net apart from the cond input; "
                        f"give --init random")
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, ScalarEmbedding) and name.split(".")[-1] == "cond":
                m.fc2.weight.zero_()
                m.fc2.bias.zero_()
    return True


def stages(job):
    """One stage in the top folder: L_CTM + lambda_DSM L_DSM against the teacher's solver, then the rule."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net

    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, required=True, cfg=cfg, kinds=KINDS, method="ctm")
    data = data_source(cfg["data"], teacher, int(cfg["seed"]), cfg["n_data"])
    if tuple(data.shape) != tuple(teacher.shape):
        raise UserError(f"--data {data.name} has samples of shape {list(data.shape)}, the teacher "
                        f"{list(teacher.shape)}")
    cond = conditioning(cfg, teacher, data)
    if cond.on and not data.num_classes:
        raise UserError(f"the teacher is class-conditional but the training data {data.name} has no labels; "
                        f"give labelled --data")
    if cond.on and cond.guidance != 1.0 and float(cfg["dsm_weight"]) > 0:
        raise UserError(f"--guidance {cond.guidance} with --dsm-weight {cfg['dsm_weight']}: the DSM term learns the "
                        f"unguided denoiser from data; give --dsm-weight 0 with a guided teacher")
    N = int(cfg["levels"])
    K = int(cfg["max_solver_steps"] or N - 1)
    smin, smax, rho = float(cfg["sigma_min"]), float(cfg["sigma_max"] or teacher.sigma_max), float(cfg["rho"])
    if not smin < smax:
        raise UserError(f"--sigma-min {smin} must be below the teacher's sigma_max {smax} (or give --sigma-max)")
    net_cfg = _net_config(cfg, teacher, data.shape, data.kind)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = dict(getattr(net, "config", net_cfg))
    if cond.on:
        check_student_net(net, cond)
    started = cfg["init"] == "auto" and _init_from_teacher(net, net_cfg, teacher)
    sd = float(teacher.meta.get("sigma_data", 0.5)) if not is_exact(teacher) else data.sigma_data
    D = ModelDenoiser(net, EDM(smin, smax), "edm", sd)
    target = EMA(net, float(cfg["target_ema"]))
    sig = levels(N, smin, smax, rho)
    s_sig = s_levels(sig)
    teacher_D = EvalCounter(cond.teacher(teacher.denoiser))
    B, lam = int(cfg["batch_size"]), float(cfg["dsm_weight"])
    gamma = float(cfg["gamma"])

    def draw(gen, step):
        k, n, j = draw_levels(B, N, K, gen)
        x0, labels = data.labelled(B, gen) if cond.on else (data.draw(B, gen), None)
        batch = {"x0": x0, "z": torch.randn(x0.shape, generator=gen), "n": n, "j": j, "k": k}
        if lam > 0:
            batch["dsm_sigma"] = dsm_sigmas(B, smin, smax, rho, gen)
            batch["dsm_z"] = torch.randn(x0.shape, generator=gen)
        if cond.on:
            batch["labels"] = cond.drop(labels, gen)
        return batch

    def loss(model, b):
        """L_CTM (+ lambda_DSM L_DSM) per sample (module docstring)."""
        x0, n, j, k, labels = b["x0"], b["n"], b["j"], int(b["k"]), b.get("labels")
        grid = sig.to(x0.device)
        t, u, s = grid[n].to(x0.dtype), grid[n + k].to(x0.dtype), s_sig.to(x0.device)[j].to(x0.dtype)
        x_t = x0 + t.reshape((-1,) + (1,) * (x0.ndim - 1)) * b["z"]
        rows = grid[n[:, None] + torch.arange(k + 1, device=n.device)]

        def solve(x):
            return solve_rows(cfg["solver"], teacher_D, x, rows, labels)

        g, g_sg = student_g(D, model, smin), student_g(D, target.module, smin)
        est, tgt = ctm_pair(g, g_sg, solve, x_t, t, u, s, labels)
        out = (est - tgt.to(est.dtype)).pow(2).flatten(1).mean(1)
        if lam > 0:
            sd_ = b["dsm_sigma"].to(x0.dtype)
            y = x0 + sd_.reshape((-1,) + (1,) * (x0.ndim - 1)) * b["dsm_z"]
            w = (sd_ ** 2 + D.sigma_data ** 2) / (sd_ * D.sigma_data) ** 2
            out = out + lam * w * (g(y, sd_, sd_, labels) - x0).pow(2).flatten(1).mean(1)
        return out

    def plan(st):
        def describe(ema_module):
            D_ema = ModelDenoiser(ema_module, D.process, "edm", sd).eval()
            n_eval = int(cfg["eval_samples"])
            gref = torch.Generator().manual_seed(int(cfg["seed"]) + 77)
            ref, labels = data.labelled(n_eval, gref) if cond.on else (data.draw(n_eval, gref), None)
            measures = {**evaluate(D_ema, ref, labels, data.shape, smin, smax, rho, gamma, n_eval, int(cfg["seed"]),
                                   st.job.device), "reference": "data"}
            write_json(st.folder / "ctm.json", measures)  # before model.json: a finished run has both
            return student_meta("ctm", D, net_cfg, data.shape, data.kind, data.name, smin, smax,
                                {"sampler": CTM, "gamma": gamma, "rho": rho, "s_floor": smin}, cfg, cond=cond,
                                ctm={"levels": N, "max_solver_steps": K, "solver": cfg["solver"],
                                     "target_ema": float(cfg["target_ema"]), "dsm_weight": lam,
                                     "cond": f"ln(max(s, {smin}) / {smin}) / 4", "init": "teacher" if started
                                     else "random", "distance": "l2"},
                                cost={"teacher_evals": int(teacher_D.evals), "seconds": st.seconds})

        frozen = {"teacher": teacher.denoiser} if isinstance(teacher.denoiser, nn.Module) else {}
        return Plan(Task(student=net, draw=draw, loss=loss, frozen=frozen, extra={"target": target.module},
                         after_step=lambda model, step: target.update()), describe)

    job.stage("", plan)
