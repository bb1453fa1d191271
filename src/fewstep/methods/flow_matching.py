"""Flow matching on stochastic interpolants, with independent, teacher, minibatch-OT and
Schroedinger-bridge couplings (one flow model, sampled by every fewstep sampler).

Interpolant (Albergo & Vanden-Eijnden 2022, eq. 1-2; Albergo, Boffi & Vanden-Eijnden 2023,
Def. 2.1 and eq. 2.1), time running from noise at t = 1 to data at t = 0 as in every fewstep
process (the papers' t is 1 - t here)::

    x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z,      x0 ~ data, x1 ~ N(0, I), z ~ N(0, I)
    u_t = alpha'(t) x0 + beta'(t) x1 + gamma'(t) z                        (d x_t / dt)

``--path`` (each with alpha(0) = 1, beta(0) = 0):
    linear   alpha = 1 - t, beta = t                       :class:`~fewstep.process.LinearFlow`
    trig     alpha = cos(pi t / 2), beta = sin(pi t / 2)   ``VP("cosine", s=0, t_max=0.999)``
                                                            (alpha_bar = cos^2(pi t / 2) exactly)
    vp       alpha = exp(-(b0 t + (b1 - b0) t^2 / 2) / 2), beta = sqrt(1 - alpha^2)
                                                            ``VP.linear()`` (b0 = 0.1, b1 = 20); its
             noise end is reached only approximately: alpha(1) = exp(-5.025) = 0.0066
``--gamma a``: gamma(t) = a sqrt(t (1 - t)), zero at both ends (Albergo et al. 2023, eq. 2.5).

Loss: conditional flow matching (Lipman et al. 2023, eq. 9 and 23; Tong et al. 2024, eq. 14;
Albergo et al. 2023, eq. 2.13 for b)::

    min_v E_{t ~ U[t_min, t_max]} E_{(x0, x1) ~ coupling, z} || v(x_t, t) - u_t ||^2

(per sample: the mean over coordinates). Its minimiser is b(x, t) = E[u_t | x_t = x], whose ODE
dx/dt = b transports the interpolant's marginals rho_t (Albergo et al. 2023, Theorem 2.6).

The model: with gamma = 0 the path is the process above (scale = alpha, std = beta, sigma =
beta / alpha) and v is its ``flow`` prediction, an ordinary fewstep flow model: ``fewstep
sample`` / :func:`fewstep.load` and every sampler use it, and its own rule (model.json
``sampling``) is Euler in sigma-space (DDIM) on the grid uniform in t, t_i = t_max - i (t_max -
t_min) / k, then 0; on the linear path that is Euler in t, x_{t'} = x_t + (t' - t) v, as
reflow's rounds. The net sees x_t and the process's c_noise(t) (1000 t), as
:class:`~fewstep.denoiser.ModelDenoiser` gives it.

gamma > 0 (``--gamma``, and the sb coupling's bridge noise): the net still learns b, the
velocity of rho_t, stored as the ``flow`` prediction of the gamma = 0 process. Every
deterministic sampler integrates exactly dx/dt = b (the sigma-space ODE dy/dsigma = (y - D) /
sigma of the flow prediction is a change of variables of dx/dt = v, for any v), so the ODE
samplers sample rho_0 = data from x1 ~ N(0, I) at t_max; with Gaussian independent x1 the rho_t
are those of the gamma = 0 path of std sqrt(beta^2 + gamma^2), another process, and b is its
probability-flow velocity. But D is then not E[x0 | x_t] of the stored process, so stochastic
samplers (ancestral, SDE, Langevin), which read D as a posterior mean or a score, do not sample
rho_t: model.json's ``interpolant.ode_only`` says so (not enforced by fewstep.model yet).

Couplings (``--coupling``), the pairs (x0, x1) of a batch, all drawn from the step's generator:
    independent  x0 ~ data, x1 ~ N(0, I) (I-CFM, Tong et al. 2024; the 1-rectified flow)
    teacher      (teacher sampler(sigma_max z), z): :func:`fewstep.methods.pairs.make_pairs`,
                 any fewstep teacher and sampler, as reflow's round 1
    ot           minibatch OT (Pooladian et al. 2023; Tong et al. 2024's OT-CFM): the exact
                 assignment of the batch's data to its noise with squared Euclidean cost
                 (POT's ``ot.emd``), a permutation, deterministic given the batch;
                 ``--ot-pairs sample`` draws B pairs with replacement from that plan
                 instead, as torchcfm's OT-CFM does (some samples twice, ~37 % not at all)
    sb           entropic OT (Tong et al. 2024's SB-CFM): pairs drawn with replacement from the
                 Sinkhorn plan pi ~ exp(-|x0 - x1|^2 / epsilon) (POT's ``ot.sinkhorn``, reg =
                 ``--sb-epsilon``, the cost in the data's units, not normalised), with the
                 Brownian-bridge noise gamma(t) = sqrt(epsilon t (1 - t) / 2) of that plan: the
                 static Schroedinger bridge of a Brownian reference of variance s^2 per unit
                 time has pi ~ exp(-|x0 - x1|^2 / (2 s^2)), so s^2 = epsilon / 2 (torchcfm's
                 reg = 2 sigma^2 with sigma_t = sigma sqrt(t (1 - t))); ``--gamma`` overrides it

Measured (``eval.json``, fixed evaluation noise z, ``--eval-samples``): energy distance and
sliced-W2 of k Euler steps (its own rule) to fresh data samples (k = 1, 2, 4); RMS of k steps
against the exact probability-flow map z -> x0 of a mixture (the independent coupling's target;
other couplings' flows need not reach it) and against the flow's own accurate ODE; the
straightness measures of :mod:`fewstep.methods.reflow`, on this path: ``straightness`` E_t E ||
u_t - v(x_t, t)||^2 on the coupling (t at 16 midpoints) and ``flow_straightness`` Liu et al.'s
S(Z) on the flow's own 64-step Euler path in t (on the linear path with gamma = 0 both are
reflow's :func:`~fewstep.methods.reflow.coupling_straightness` / ``flow_straightness``).

Deviations: OT-CFM's code draws B pairs with replacement from the exact plan; here the default
pairs the batch by the plan's permutation itself (every sample used once; the same plan), and
``--ot-pairs sample`` is OT-CFM's draw. The sb noise
uses epsilon / 2 as stated above. Only unconditional runs (a class label would be permuted away
by the OT couplings). The net starts fresh (no teacher weights).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..errors import UserError
from ..io import write_json
from ..process import VP, LinearFlow
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import (COUPLING_PAIR_OPTIONS, N_DATA, bcast, conditioning, fixed_grids, is_exact,
                     load_teacher, net_config, path_velocity, quiet_sample, student_meta, training_data)
from .common import flow_straightness  # noqa: F401 (eval.json's S(Z); bench and tests reach it here too)
from .pairs import make_pairs, pair_spec

PATHS = ("linear", "trig", "vp")
COUPLINGS = ("independent", "teacher", "ot", "sb")
OT_PAIRS = ("permutation", "sample")

OPTIONS = (
    Option("path", str, "linear", "interpolant x_t = alpha x0 + beta x1: linear (1-t, t), trig (cos, sin of "
           "pi t/2) or vp (the VP schedule's alpha, sqrt(1 - alpha^2))", choices=PATHS),
    Option("coupling", str, None, "pairs (x0, x1): independent, teacher (teacher sampler pairs), ot (exact "
           "minibatch OT) or sb (entropic OT, Schroedinger bridge)", choices=COUPLINGS,
           none="teacher when --teacher is given, else independent", example="ot"),
    Option("gamma", float, None, "noise gamma(t) = a sqrt(t (1 - t)) added to the interpolant: a >= 0",
           low=0.0, none="0; the Brownian bridge's sqrt(sb_epsilon / 2) with --coupling sb", example=0.1),
    Option("ot_pairs", str, "permutation", "how the ot coupling pairs a batch: permutation (the exact plan's own "
           "pairs, each sample once) or sample (B draws with replacement from that plan, torchcfm's OT-CFM)",
           choices=OT_PAIRS),
    Option("sb_epsilon", float, 1.0, "entropic regularisation of the sb coupling's Sinkhorn plan, in squared data "
           "units (default 1.0)", low=0.0, above=True),
    *COUPLING_PAIR_OPTIONS,
    N_DATA,
    Option("eval_samples", int, 2000, "evaluation samples (default 2000)", low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)

EVAL_NFES = (1, 2, 4)
RULE_NFES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128)  # NFE of the model's own Euler rule
FLOW_GRID = "time-trailing"
ODE_SAMPLER, ODE_NFE = "dpmpp_2m", 64  # the flow's accurate ODE (euler_self_error's reference)
VP_B0, VP_B1 = 0.1, 20.0


# --------------------------------------------------------------------- the interpolant
def path_process(path: str):
    """The process whose scale / std are the path's alpha / beta (module docstring)."""
    if path == "linear":
        return LinearFlow()
    if path == "trig":
        return VP("cosine", s=0.0, t_max=0.999)
    if path == "vp":
        return VP.linear(VP_B0, VP_B1)
    raise UserError(f"--path {path}: use one of {', '.join(PATHS)}")


def path_coefficients(path: str, t: Tensor):
    """(alpha, beta, alpha', beta') of ``path`` at t in [0, 1], in closed form."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "trig":
        h = 0.5 * math.pi
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)
    if path == "vp":
        a = torch.exp(-0.5 * (VP_B0 * t + 0.5 * (VP_B1 - VP_B0) * t**2))
        da = -0.5 * (VP_B0 + (VP_B1 - VP_B0) * t) * a
        b = torch.sqrt(-torch.expm1(-(VP_B0 * t + 0.5 * (VP_B1 - VP_B0) * t**2)))  # sqrt(1 - a^2)
        return a, b, da, -a * da / b
    raise UserError(f"--path {path}: use one of {', '.join(PATHS)}")


def gamma_coefficients(a: float, t: Tensor):
    """(gamma, gamma') of gamma(t) = a sqrt(t (1 - t)) (gamma' is infinite at t = 0, 1)."""
    r = torch.sqrt(t * (1 - t))
    return a * r, a * (1 - 2 * t) / (2 * r) if a else torch.zeros_like(t)


def interpolate(path: str, x0: Tensor, x1: Tensor, t: Tensor, z: Tensor = None, gamma: float = 0.0):
    """(x_t, u_t): the interpolant and its conditional velocity d x_t / dt at per-sample t."""
    al, be, dal, dbe = (bcast(c, x0) for c in path_coefficients(path, t.to(x0.dtype)))
    x, u = al * x0 + be * x1, dal * x0 + dbe * x1
    if gamma and z is not None:
        g, dg = (bcast(c, x0) for c in gamma_coefficients(float(gamma), t.to(x0.dtype)))
        x, u = x + g * z, u + dg * z
    return x, u


# ------------------------------------------------------------------------- couplings
def _cost(x0: Tensor, x1: Tensor):
    return (torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()) ** 2).cpu().numpy()


def ot_plan(x0: Tensor, x1: Tensor) -> Tensor:
    """The exact OT plan [n, n] (sums to 1) of the two uniform batches under squared Euclidean
    cost (``ot.emd``: a vertex of the Birkhoff polytope, a permutation matrix / n)."""
    import ot

    n = len(x0)
    return torch.as_tensor(ot.emd(ot.unif(n), ot.unif(n), _cost(x0, x1)), dtype=torch.float64)


def ot_assignment(x0: Tensor, x1: Tensor) -> Tensor:
    """perm with x1[perm[i]] paired to x0[i]: the permutation of :func:`ot_plan`."""
    n = len(x0)
    perm = ot_plan(x0, x1).argmax(1)
    if len(torch.unique(perm)) != n:  # a degenerate (tied) plan: pair by the assignment solver
        from scipy.optimize import linear_sum_assignment

        perm = torch.as_tensor(linear_sum_assignment(_cost(x0, x1))[1])
    return perm.long()


def sinkhorn_plan(x0: Tensor, x1: Tensor, epsilon: float) -> Tensor:
    """The entropic OT plan [n, n] (sums to 1) of two uniform batches: min <P, M> - eps H(P),
    M = |x0_i - x1_j|^2 (``ot.sinkhorn``; log-domain iterations where exp(-M / eps) would underflow)."""
    import ot

    n, M = len(x0), _cost(x0, x1)
    method = "sinkhorn" if M.max() / epsilon < 500 else "sinkhorn_log"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns when not converged to stopThr; the plan is still used
        plan = ot.sinkhorn(ot.unif(n), ot.unif(n), M, float(epsilon), method=method, numItermax=5000,
                           stopThr=1e-7)
    plan = torch.as_tensor(plan, dtype=torch.float64)
    if not bool(torch.isfinite(plan).all()) or float(plan.sum()) <= 0:
        raise UserError(f"--sb-epsilon {epsilon}: the Sinkhorn plan failed (under- or overflow); give a larger "
                        f"--sb-epsilon")
    return plan / plan.sum()


def draw_from_plan(plan: Tensor, x0: Tensor, x1: Tensor, gen: torch.Generator):
    """len(x0) pairs (x0_i, x1_j) drawn with replacement with probability plan[i, j]."""
    n = len(x0)
    idx = torch.multinomial(plan.flatten(), n, replacement=True, generator=gen)
    return x0[idx // n], x1[idx % n]


def couple(kind: str, x0: Tensor, x1: Tensor, gen: torch.Generator, epsilon: float = 1.0,
           ot_pairs: str = "permutation"):
    """The batch's pairs: as drawn (independent), the OT permutation (ot; with ``ot_pairs=
    "sample"`` draws from the OT plan) or B draws with replacement from the Sinkhorn plan (sb)."""
    if kind == "ot":
        if ot_pairs == "sample":
            return draw_from_plan(ot_plan(x0, x1), x0, x1, gen)
        return x0, x1[ot_assignment(x0, x1)]
    if kind == "sb":
        return draw_from_plan(sinkhorn_plan(x0, x1, epsilon), x0, x1, gen)
    return x0, x1


def mean_pair_distance(x0: Tensor, x1: Tensor) -> float:
    """E |x0 - x1|^2 over the pairs."""
    return float((x0 - x1).pow(2).flatten(1).sum(1).mean())


# ----------------------------------------------------------------------- straightness
@torch.no_grad()
def coupling_straightness(D, process, path: str, x0: Tensor, x1: Tensor, z: Tensor = None, gamma: float = 0.0,
                          levels: int = 16) -> float:
    """E_t E || u_t - v(x_t, t) ||^2 (squared norm) on the pairs, t at ``levels`` midpoints: the
    flow-matching residual; on the linear path with gamma = 0 reflow's ``coupling_straightness``."""
    total = 0.0
    for j in range(levels):
        t = torch.full((len(x0),), (j + 0.5) / levels, dtype=x0.dtype, device=x0.device)
        x_t, u = interpolate(path, x0, x1, t, z, gamma)
        total += float((u - path_velocity(D, process, x_t, t)).pow(2).flatten(1).sum(1).mean())
    return total / levels


# --------------------------------------------------------------------------- options
def check_options(cfg: dict) -> None:
    """The rules between options, before anything is written."""
    if cfg["coupling"] == "teacher" and not cfg["teacher"]:
        raise UserError("--coupling teacher needs --teacher (a run folder or gmm:FILE.npz)")
    if cfg.get("ot_pairs", "permutation") != "permutation" and cfg["coupling"] != "ot":
        raise UserError(f"--ot-pairs {cfg['ot_pairs']}: only the ot coupling has an exact plan to draw pairs from; "
                        f"give --coupling ot or drop --ot-pairs")


def gamma_of(cfg: dict, kind: str) -> float:
    """The interpolant's noise amplitude a: --gamma, else sqrt(epsilon / 2) for sb, else 0."""
    if cfg["gamma"] is not None:
        return float(cfg["gamma"])
    return math.sqrt(float(cfg["sb_epsilon"]) / 2) if kind == "sb" else 0.0


def _pair_cfg(cfg: dict, teacher) -> dict:
    grid = cfg["pair_grid"] or (FLOW_GRID if isinstance(teacher.process, LinearFlow) else "karras")
    return {"teacher": str(cfg["teacher"]), "pair_sampler": cfg["pair_sampler"], "pair_nfe": int(cfg["pair_nfe"]),
            "pair_grid": grid, "pairs": int(cfg["pairs"]), "pair_batch": int(cfg["pair_batch"]),
            "seed": int(cfg["seed"]) + 1, "latent_dim": None}


# ------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(D, process, path: str, gamma: float, pairs, data, gmm, n: int, seed: int, device) -> dict:
    """eval.json's measures (module docstring); ``pairs(n, gen) -> (x0, x1)`` the coupling (in
    training-size batches: a minibatch OT plan of all n at once would be a straighter coupling
    than the one trained on)."""
    from ..metrics import energy_distance, rms, sliced_w2
    from ..samplers import get
    from . import get as method

    euler_grid = method("reflow").euler_grid  # k Euler steps uniform in t, on any process
    g = torch.Generator().manual_seed(int(seed) + 424242)
    z = torch.randn((n,) + tuple(data.shape), generator=g).to(device)
    ref = data.draw(n, g).to(device)
    gc = torch.Generator().manual_seed(int(seed) + 77)
    x0c, x1c = pairs(n, gc)
    zc = torch.randn(x0c.shape, generator=gc) if gamma else None
    s = process.sigma_max
    exact = gmm.flow(s * z.double().cpu(), s, 0.0, rtol=1e-7).float().to(device) if gmm is not None else None
    ode = quiet_sample(D, s * z, sampler=ODE_SAMPLER, nfe=ODE_NFE, grid=FLOW_GRID, sigma_min=process.sigma_min,
                       sigma_max=s, process=process)
    out = {"path": path, "gamma": gamma,
           "straightness": coupling_straightness(D, process, path, x0c.to(device), x1c.to(device),
                                                 zc.to(device) if zc is not None else None, gamma),
           "flow_straightness": flow_straightness(D, process, z),
           "pair_distance": mean_pair_distance(x0c, x1c), "eval_samples": n,
           "energy_distance": {}, "sliced_w2": {}, "euler_error": {}, "euler_self_error": {},
           "ode": {"sampler": ODE_SAMPLER, "nfe": ODE_NFE, "energy_distance": energy_distance(ode, ref),
                   "error": rms(ode, exact) if exact is not None else None},
           "reference": "exact probability-flow map" if exact is not None else None}
    for k in EVAL_NFES:
        x = get("euler")(D, s * z, euler_grid(process, k).to(device))
        out["energy_distance"][str(k)] = energy_distance(x.flatten(1), ref.flatten(1))
        out["sliced_w2"][str(k)] = sliced_w2(x, ref)
        out["euler_self_error"][str(k)] = rms(x, ode)
        out["euler_error"][str(k)] = rms(x, exact) if exact is not None else None
    return out


# ---------------------------------------------------------------------------- stages
def stages(job):
    """One stage in the top folder: conditional flow matching of the path on the coupling."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net
    from . import get

    reflow = get("reflow")  # its helpers, reached at run time (a method imports no other method)
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, required=False, cfg=cfg, method="flow-matching")
    kind = cfg["coupling"] or ("teacher" if teacher is not None else "independent")
    data = training_data(cfg, teacher)
    if (teacher is not None and int(teacher.num_classes or 0)) or int(data.num_classes or 0) and \
            net_config(cfg["net"], teacher, data.shape, data.kind).get("num_classes"):
        raise UserError("flow-matching trains unconditional models (an OT coupling would pair across classes); give "
                        "an unconditional teacher or --net without num_classes")
    conditioning(cfg, teacher, data)  # refuses --guidance / --label-dropout
    if kind == "teacher":
        pair_spec(_pair_cfg(cfg, teacher), teacher)  # bad pair options fail before any work
    path, process = cfg["path"], path_process(cfg["path"])
    gamma, eps_sb = gamma_of(cfg, kind), float(cfg["sb_epsilon"])
    ot_pairs = cfg.get("ot_pairs", "permutation")  # runs made before the option pair by the permutation
    net_cfg = net_config(cfg["net"], teacher if teacher is not None and not is_exact(teacher) else None,
                         data.shape, data.kind)
    gmm = reflow._mixture(cfg, teacher)  # the exact mixture behind the teacher or the data
    B = int(cfg["batch_size"])

    def plan(st):
        pinfo = {"teacher_evals": 0}
        x0_all = x1_all = None
        if kind == "teacher":
            lat, x0_all, pinfo = make_pairs(teacher, _pair_cfg(cfg, teacher), st)
            pinfo.pop("labels")
            x1_all = lat / float(pinfo["sigma_max"])  # x_T = sigma_max z: the noise end is z
        torch.manual_seed(int(cfg["seed"]))
        net = build_net(net_cfg)
        full_cfg = dict(getattr(net, "config", net_cfg))
        D = ModelDenoiser(net, process, "flow", data.sigma_data)

        def pairs(n, gen):
            """n pairs (x0, x1) of the coupling (one batch of it)."""
            if x0_all is not None:
                idx = torch.randint(0, len(x0_all), (n,), generator=gen)
                return x0_all[idx], x1_all[idx]
            x0 = data.draw(n, gen)
            return couple(kind, x0, torch.randn(x0.shape, generator=gen), gen, eps_sb, ot_pairs)

        def eval_pairs(n, gen):
            """n pairs as training sees them: batches of --batch-size (a minibatch plan's pairs)."""
            parts = [pairs(min(B, n - i), gen) for i in range(0, n, B)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        def draw(gen, step):
            x0, x1 = pairs(B, gen)
            batch = {"x0": x0, "x1": x1, "t": process.sample_t(B, generator=gen)}
            if gamma:
                batch["z"] = torch.randn(x0.shape, generator=gen)
            return batch

        def loss(model, b):
            """CFM per sample: || v(x_t, t) - u_t ||^2, mean over coordinates."""
            x_t, u = interpolate(path, b["x0"], b["x1"], b["t"], b.get("z"), gamma)
            v = model(x_t, process.c_noise(b["t"]).to(x_t.dtype))
            return (v - u).pow(2).flatten(1).mean(1)

        def describe(ema_module):
            D_ema = ModelDenoiser(ema_module, process, "flow", data.sigma_data).eval()
            measures = evaluate(D_ema, process, path, gamma, eval_pairs, data, gmm, int(cfg["eval_samples"]),
                                int(cfg["seed"]), st.job.device)
            measures.update(coupling=kind, epsilon=eps_sb if kind == "sb" else None,
                            cost={"teacher_evals": int(pinfo["teacher_evals"]), "seconds": st.seconds})
            write_json(st.folder / "eval.json", measures)
            sampling = {"sampler": "euler", "grids": fixed_grids({k: reflow.euler_grid(process, k) for k in RULE_NFES})}
            return student_meta("flow_matching", D, full_cfg, data.shape, data.kind, data.name, process.sigma_min,
                                process.sigma_max, sampling, cfg, cost=measures["cost"],
                                interpolant={"path": path, "gamma": gamma, "coupling": kind,
                                             "sb_epsilon": eps_sb if kind == "sb" else None,
                                             "ot_pairs": ot_pairs if kind == "ot" else None,
                                             "ode_only": bool(gamma)})

        return Plan(Task(student=net, draw=draw, loss=loss), describe)

    job.stage("", plan)
