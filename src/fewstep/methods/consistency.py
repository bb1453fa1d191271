"""Consistency models (Song et al. 2023): distillation (CD) and training (CT, iCT).

A consistency function maps every point (x, sigma) of a probability-flow trajectory to
its end at the boundary level epsilon = sigma_min. Its parametrization (eq. 5 and App. C)

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, ln(sigma)/4),
    c_skip = sd^2 / ((sigma - eps)^2 + sd^2),  c_out = sd (sigma - eps) / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2)

gives f(x, eps) = x exactly (c_skip = 1, c_out = 0). On Karras levels
sigma_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho, i = 1..N, the losses
(Algorithms 2 and 3) pair adjacent levels n, n+1 with x_{n+1} = x + sigma_{n+1} z:

    CD:  x^_n = one teacher ODE step from (x_{n+1}, sigma_{n+1}) to sigma_n (euler, heun,
         dpm_solver_2, ... : the registered sampler on the two-level grid)
    CT:  x^_n = x + sigma_n z (the same z: an unbiased one-sample estimate, no teacher)
    L = lambda(sigma_n) d( f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x^_n, sigma_n) ),

with the target theta- <- stopgrad(mu theta- + (1 - mu) theta) after every step, d the
squared L2 (mean over coordinates) or the pseudo-Huber sqrt(|a - b|^2 + c^2) - c.
Curricula ``step -> (N, mu)`` are pure functions:

    constant  N, mu fixed (CD: N = 18, mu = 0.95)
    ct        N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1  (s0 .. s1 + 1),
              mu(k) = exp(s0 ln(mu0) / N(k))                          (CM App. C: 2, 150, 0.9)
    ict       N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)),
              mu = 0 (the target is the student itself)        (Song & Dhariwal 2023: 10, 1280)

    ect       (Geng et al. 2024, "Consistency models made easy") continuous levels: t ~ log-normal,
              r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))) (:func:`ect_r`), the gap halved (q = 2)
              at each of 8 stages; stage 0 is denoising score matching, so a diffusion teacher's
              weights (``--teacher RUN --mode training``) start it; mu = 0, iCT's loss and weight
              1/(t - r). Deviation: t is kept in [2 eps, sigma_max] and r >= eps (the boundary here
              is f(x, eps) = x, eps = sigma_min), and the pseudo-Huber c is iCT's, not ECT's c = 0.

iCT also draws levels from the discretised log-normal p(n) ~ erf((ln sigma_{n+1} - P_mean) /
(sqrt 2 P_std)) - erf((ln sigma_n - P_mean)/(sqrt 2 P_std)) (P_mean = -1.1, P_std = 2),
weights lambda = 1/(sigma_{n+1} - sigma_n) and uses pseudo-Huber with c = 0.00054 sqrt(d).
Sampling is multistep consistency sampling (:mod:`fewstep.samplers.consistency`).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import UserError, unknown_name
from ..grids import karras
from ..students import ConsistencyDenoiser
from ..train.job import Plan, Task
from ..train.options import Option, check_batch_memory, table_defaults, table_help
from .common import (Conditioning, bcast, call_denoiser, check_student_net, conditioning, data_source, fixed_grids,
                     is_exact, load_teacher, net_config, solve_rows, student_meta, teacher_net_state)

SCHEDULES = ("constant", "ct", "ict", "ect")
OPTIONS = (
    Option("mode", str, "distillation", "distillation (with a teacher's ODE step) or training (CT: no teacher)",
           choices=("distillation", "training")),
    Option("schedule", str, None, "curriculum N(k), mu(k): constant, ct (Song et al. 2023), ict (Song & Dhariwal "
           "2023) or ect (Geng et al. 2024: continuous t, r with a shrinking gap; start from a teacher's weights)",
           choices=SCHEDULES, none="constant for distillation, ct for training", example="ct"),
    Option("n", int, 18, "N (number of levels) of the constant schedule (18 as in the paper; 2-D toys do better "
           "with ~40)", low=2),
    Option("mu", float, None, "target EMA rate mu (constant, default 0.95) or mu0 (ct, default 0.9)", low=0.0,
           high=1.0, none="0.95 (constant), 0.9 (ct)", example=0.95),
    Option("s0", int, None, "curriculum start s0 (ct 2, ict 10)", low=1, none="2 (ct), 10 (ict)", example=2),
    Option("s1", int, None, "curriculum end s1 (ct 150, ict 1280)", low=1, none="150 (ct), 1280 (ict)", example=150),
    Option("solver", str, "heun", "teacher ODE step: any deterministic sampler (euler, heun, dpm_solver_2, ...)"),
    Option("loss", str, None, "distance: l2 or pseudo_huber", choices=("l2", "pseudo_huber"),
           none="pseudo_huber for ict, else l2", example="l2"),
    Option("huber_c", float, None, "pseudo-Huber c (default 0.00054 sqrt(d))", low=0.0, above=True,
           none="0.00054 sqrt(d)", example=0.03),
    Option("weighting", str, None, "lambda(sigma_n): uniform or ict (1/(sigma_{n+1} - sigma_n))",
           choices=("uniform", "ict"), none="ict for ict, else uniform", example="uniform"),
    Option("levels", str, None, "level draw: uniform or lognormal (P_mean, P_std)", choices=("uniform", "lognormal"),
           none="lognormal for ict, else uniform", example="uniform"),
    Option("p_mean", float, -1.1, "log-normal level draw: mean of ln sigma"),
    Option("p_std", float, 2.0, "log-normal level draw: std of ln sigma", low=0.0, above=True),
    Option("sigma_min", float, 0.002, "boundary level epsilon: f(x, epsilon) = x", low=0.0, above=True),
    Option("sigma_max", float, None, "largest level T (default: the teacher's, else 80)", low=0.0, above=True,
           none="the teacher's, else 80", example=80.0),
    Option("rho", float, 7.0, "Karras rho of the levels", low=0.0, above=True),
    Option("init", str, "auto", "student start: auto (teacher weights when an EDM net of the same architecture), "
           "teacher, random", choices=("auto", "teacher", "random")),
    Option("ect_q", float, 2.0, "ECT: the gap t - r shrinks by this factor at every stage (default 2)", low=1.0,
           above=True),
    Option("ect_k", float, 8.0, "ECT: mapping n(t) = 1 + k sigmoid(-b t) (default k 8)", low=0.0),
    Option("ect_b", float, 1.0, "ECT: mapping n(t) = 1 + k sigmoid(-b t) (default b 1)", low=0.0),
    Option("ect_stages", int, 8, "ECT: stages over the run, the gap halved (q) at each (default 8, the paper's 200 "
           "Mimg / 25 Mimg)", low=1),
    Option("level_groups", int, 8, "CD: distinct levels per batch (>= batch size: one per sample)", low=1),
    Option("sample_levels", (str, dict), None, 'multistep sampling levels after sigma_max, JSON {"2": [0.8], '
           '"3": [1.5, 0.3]}', none="a ladder", must='a JSON object such as {"2": [0.8]} (or its text)'),
    Option("tune_levels", int, 0, "samples for a greedy search of the multistep levels on sliced-W2 to the data "
           "(0: off)", low=0),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
KINDS = ("points", "image")  # a cloud teacher: fewstep distill pointcloud (or knowledge, reflow)


def check_options(cfg: dict) -> None:
    """The rules between options, checked before anything is written: the curriculum's
    s0 < s1 (with the schedule's defaults for the one not given), s0 / s1 only with a
    curriculum (ct, ict), and sigma_min < sigma_max when both are given."""
    schedule = cfg["schedule"] or ("constant" if cfg["mode"] == "distillation" else "ct")
    given = [k for k in ("s0", "s1") if cfg.get(k) is not None]
    if schedule == "constant" and given:
        raise UserError(f"--{given[0]} sets the ct / ict curriculum; the constant schedule takes --n (N) instead: "
                        f"drop --{given[0]} or give --schedule ct")
    if schedule == "ect" and cfg["mode"] != "training":
        raise UserError("--schedule ect is consistency training (the target is the student at the nearer level "
                        "r); give --mode training (with --teacher RUN to start from its weights, as ECT does)")
    if schedule == "ect" and given:
        raise UserError(f"--{given[0]} sets the ct / ict curriculum; ect takes --ect-q, --ect-k, --ect-b, "
                        f"--ect-stages instead")
    if schedule in ("ct", "ict"):
        s0, s1 = cfg.get("s0") or (2 if schedule == "ct" else 10), cfg.get("s1") or (150 if schedule == "ct" else 1280)
        if s0 >= s1:
            raise UserError(f"--s0 {s0} must be below --s1 {s1}: the {schedule} curriculum grows N from s0 to s1")
    if cfg.get("sigma_max") is not None and not float(cfg["sigma_min"]) < float(cfg["sigma_max"]):
        raise UserError(f"--sigma-min {cfg['sigma_min']} must be below --sigma-max {cfg['sigma_max']}")


MAX_RULE_NFE = 8


# ------------------------------------------------------------------------ curricula
def constant_schedule(k: int, K: int, n: int = 18, mu: float = 0.95):
    """N and mu fixed (consistency distillation)."""
    return int(n), float(mu)


def ct_schedule(k: int, K: int, s0: int = 2, s1: int = 150, mu0: float = 0.9):
    """CM App. C: N grows like sqrt(k) from s0 to s1 + 1; mu(k) = exp(s0 ln(mu0) / N)."""
    N = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    return N, math.exp(s0 * math.log(mu0) / N)


def ict_schedule(k: int, K: int, s0: int = 10, s1: int = 1280):
    """Song & Dhariwal 2023: N doubles every K' steps from s0 + 1 up to s1 + 1; mu = 0."""
    Kp = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** math.floor(k / Kp), s1) + 1, 0.0


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping p(r | t, stage) (Geng et al. 2024, "Consistency models made easy", the
    sigmoid mapping of their code): r = t (1 - q^-(stage+1) n(t)), n(t) = 1 + k sigmoid(-b t),
    clamped at 0. Stage 0 (k 8, b 1) has r ~ t / 2 at high noise and r = 0 (the data) at low
    noise: denoising score matching, the diffusion model's own objective; every stage shrinks the
    gap t - r by q, towards the continuous-time consistency condition."""
    n = 1.0 + k * torch.sigmoid(-b * t)
    return (t * (1.0 - n / q ** (stage + 1))).clamp_min(0.0)


def ect_stage(step: int, K: int, stages: int) -> int:
    """The stage of training step ``step`` of ``K``: ``stages`` equal parts."""
    return min(int(step) * int(stages) // max(1, int(K)), int(stages) - 1)


def curriculum(cfg: dict):
    """The pure ``step -> (N, mu)`` of the config."""
    K, name = int(cfg["steps"]), cfg["schedule"]
    if name == "constant":
        return lambda k: constant_schedule(k, K, int(cfg["n"]), float(cfg["mu"]))
    if name == "ct":
        return lambda k: ct_schedule(k, K, int(cfg["s0"] or 2), int(cfg["s1"] or 150), float(cfg["mu"]))
    if name == "ict":
        return lambda k: ict_schedule(k, K, int(cfg["s0"] or 10), int(cfg["s1"] or 1280))
    if name == "ect":  # continuous levels (consistency_task draws them); no EMA target: mu = 0
        return lambda k: (None, 0.0)
    raise unknown_name("consistency schedule", name, SCHEDULES)


def levels(N: int, cfg: dict) -> Tensor:
    """The N Karras levels sigma_1 < ... < sigma_N on [sigma_min, sigma_max] (float64): the
    (N - 1)-step Karras grid that ends at sigma_min, increasing."""
    if N < 2:
        raise UserError(f"a consistency schedule needs N >= 2 levels, got {N}")
    sig = karras(N - 1, float(cfg["sigma_min"]), float(cfg["sigma_max"]), rho=float(cfg["rho"]),
                 final_zero=False).flip(0)
    sig[0], sig[-1] = float(cfg["sigma_min"]), float(cfg["sigma_max"])  # exact ends: f(x, sigma_1) = x
    return sig


def level_probs(sig: Tensor, cfg: dict) -> Tensor:
    """p(n) for the pairs (n, n+1), n < N - 1: uniform, or iCT's discretised log-normal."""
    if cfg["levels"] == "uniform":
        return torch.ones(len(sig) - 1, dtype=torch.float64)
    if cfg["levels"] != "lognormal":
        raise unknown_name("level draw", cfg["levels"], ["uniform", "lognormal"])
    e = torch.erf((torch.log(sig) - float(cfg["p_mean"])) / (math.sqrt(2) * float(cfg["p_std"])))
    return (e[1:] - e[:-1]).clamp_min(1e-30)


def distance(a: Tensor, b: Tensor, kind: str, c: float) -> Tensor:
    """Per sample: squared L2 (mean over coordinates) or pseudo-Huber sqrt(|a-b|^2 + c^2) - c."""
    sq = ((a - b) ** 2).flatten(1)
    if kind == "l2":
        return sq.mean(1)
    if kind == "pseudo_huber":
        return torch.sqrt(sq.sum(1) + c * c) - c
    raise unknown_name("consistency loss", kind, ["l2", "pseudo_huber"])


def default_levels(k: int, sigma_data: float) -> list:
    """Multistep sampling levels after sigma_max for k steps: geometric from 1.6 sd down to
    0.2 sd (k = 2: 1.6 sd, near the CM paper's 0.821 for sd = 0.5)."""
    if k < 2:
        return []
    if k == 2:
        return [1.6 * sigma_data]
    return torch.logspace(math.log10(1.6 * sigma_data), math.log10(0.2 * sigma_data), k - 1).tolist()


# ----------------------------------------------------------------------------- the job
def resolve(cfg: dict, teacher) -> dict:
    """Fill the mode-dependent defaults (a copy)."""
    cfg = dict(cfg)
    if cfg["mode"] not in ("distillation", "training"):
        raise UserError(f"--mode {cfg['mode']}: use distillation or training")
    if cfg["mode"] == "distillation" and teacher is None:
        raise UserError("consistency distillation needs --teacher (or use --mode training)")
    ict = cfg["schedule"] in ("ict", "ect")  # ECT keeps iCT's loss, weighting and log-normal levels
    cfg["schedule"] = cfg["schedule"] or ("constant" if cfg["mode"] == "distillation" else "ct")
    if cfg["schedule"] not in SCHEDULES:
        raise unknown_name("consistency schedule", cfg["schedule"], SCHEDULES)
    if cfg["mu"] is None:
        cfg["mu"] = 0.95 if cfg["schedule"] == "constant" else 0.9
    cfg["loss"] = cfg["loss"] or ("pseudo_huber" if ict else "l2")
    cfg["weighting"] = cfg["weighting"] or ("ict" if ict else "uniform")
    cfg["levels"] = cfg["levels"] or ("lognormal" if ict else "uniform")
    if cfg["weighting"] not in ("uniform", "ict"):
        raise unknown_name("consistency weighting", cfg["weighting"], ["uniform", "ict"])
    cfg["sigma_max"] = float(cfg["sigma_max"] or (teacher.sigma_max if teacher is not None else 80.0))
    if not 0 < float(cfg["sigma_min"]) < cfg["sigma_max"]:
        raise UserError(f"need 0 < --sigma-min < --sigma-max, got {cfg['sigma_min']}, {cfg['sigma_max']}")
    for k in (0, int(cfg["steps"])):
        N, mu = curriculum(cfg)(k)
        if N is not None:
            levels(N, cfg)
        if not 0 <= mu < 1:
            raise UserError(f"--mu {cfg['mu']}: the target's EMA rate must lie in [0, 1)")
    if int(cfg["level_groups"]) < 1 or int(cfg["tune_levels"]) < 0:
        raise UserError("--level-groups must be at least 1 and --tune-levels at least 0")
    if cfg["mode"] == "distillation":
        from ..samplers import info

        if info(cfg["solver"]).stochastic or info(cfg["solver"]).adaptive:
            raise UserError(f"--solver {cfg['solver']}: the teacher's ODE step needs a deterministic fixed-step sampler")
    return cfg


def build_student(teacher, cfg: dict, data):
    """ConsistencyDenoiser around the student net (teacher architecture and, for an EDM
    teacher of that architecture, its weights)."""
    from ..nets import build_net

    net_cfg = net_config(cfg["net"], teacher, data.shape, data.kind)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = getattr(net, "config", net_cfg)
    state = None
    if cfg["init"] not in ("auto", "teacher", "random"):
        raise UserError(f"--init {cfg['init']}: use auto, teacher or random")
    if cfg["init"] != "random" and teacher is not None:
        state = teacher_net_state(teacher, net_cfg)
        if cfg["init"] == "auto" and getattr(teacher.denoiser, "prediction", None) != "edm":
            state = None
    if cfg["init"] == "teacher" and state is None:
        raise UserError("--init teacher: the teacher has no network of the student's architecture; use --init random")
    if state is not None:
        net.load_state_dict(state)
    sd = float(teacher.meta.get("sigma_data", 0.5)) if (teacher is not None and not is_exact(teacher)) else data.sigma_data
    return ConsistencyDenoiser(net, float(cfg["sigma_min"]), sd, float(cfg["sigma_max"])), net_cfg


def consistency_task(D: ConsistencyDenoiser, cfg: dict, data, teacher, target,
                     cond: Conditioning = Conditioning()) -> Task:
    """CD / CT (module docstring) as the loop's task: ``draw`` takes the curriculum's N at
    the step, ``loss`` compares f_theta(x_{n+1}, sigma_{n+1}) with f_theta-(x^_n, sigma_n),
    and after each update the target moves: theta- <- mu theta- + (1 - mu) theta."""
    schedule, B = curriculum(cfg), int(cfg["batch_size"])
    c = float(cfg["huber_c"]) if cfg["huber_c"] is not None else 0.00054 * math.sqrt(math.prod(data.shape))
    distil = cfg["mode"] == "distillation"
    groups = int(cfg["level_groups"]) if distil else B
    solver_D = cond.teacher(teacher.denoiser) if distil else None
    cache = {}

    def draw_ect(gen, step):
        """ECT (:func:`ect_r`): t ~ log-normal(P_mean, P_std) in [2 eps, sigma_max], r from the
        stage's mapping, at least the boundary eps (there f(x, eps) = x: the target is the data
        up to eps z)."""
        lo, hi = 2.0 * float(cfg["sigma_min"]), float(cfg["sigma_max"])
        t = torch.exp(float(cfg["p_mean"]) + float(cfg["p_std"]) * torch.randn(B, generator=gen, dtype=torch.float64))
        t = t.clamp(lo, hi)
        stage = ect_stage(step, int(cfg["steps"]), int(cfg["ect_stages"]))
        r = ect_r(t, stage, float(cfg["ect_q"]), float(cfg["ect_k"]), float(cfg["ect_b"]))
        r = torch.minimum(r.clamp_min(float(cfg["sigma_min"])), t * (1 - 1e-6))
        x0, labels = data.labelled(B, gen) if cond.on else (data.draw(B, gen), None)
        batch = {"x0": x0, "z": torch.randn(x0.shape, generator=gen), "s_next": t, "s_now": r}
        if cond.on:
            batch["labels"] = cond.drop(labels, gen)
        return batch

    def draw(gen, step):
        if cfg["schedule"] == "ect":
            return draw_ect(gen, step)
        N, _ = schedule(step)
        if N not in cache:
            sig = levels(N, cfg)
            cache[N] = (sig, level_probs(sig, cfg))
        sig, probs = cache[N]
        draws = torch.multinomial(probs, max(1, min(groups, B)), replacement=True, generator=gen)
        n = draws[torch.arange(B) * len(draws) // B]
        x0, labels = data.labelled(B, gen) if cond.on else (data.draw(B, gen), None)
        z = torch.randn(x0.shape, generator=gen)
        batch = {"x0": x0, "z": z, "s_next": sig[n + 1], "s_now": sig[n]}
        if cond.on:
            batch["labels"] = cond.drop(labels, gen)
        return batch

    def loss(model, b):
        x0, z, s_next, s_now, labels = b["x0"], b["z"], b["s_next"], b["s_now"], b.get("labels")
        y_next = x0 + bcast(s_next, x0) * z
        if distil:
            y_now = solve_rows(cfg["solver"], solver_D, y_next, torch.stack([s_next, s_now], 1), labels)
        else:
            y_now = x0 + bcast(s_now, x0) * z
        pred = call_denoiser(D, model, y_next, s_next.to(x0.dtype), labels)
        with torch.no_grad():
            tgt = call_denoiser(D, target if target is not None else model, y_now, s_now.to(x0.dtype), labels)
        lam = (1.0 / (s_next - s_now)).to(x0.dtype) if cfg["weighting"] == "ict" else 1.0
        return lam * distance(pred, tgt, cfg["loss"], c)

    def after_step(model, step):
        """theta- <- mu(k) theta- + (1 - mu(k)) theta after update k."""
        with torch.no_grad():
            dst = list(target.parameters())
            torch._foreach_lerp_(dst, [p.detach().to(dst[0].device) for p in model.parameters()],
                                 1.0 - schedule(step)[1])

    frozen = {"teacher": teacher.denoiser} if distil and isinstance(teacher.denoiser, nn.Module) else {}
    return Task(student=D.net, draw=draw, loss=loss, frozen=frozen,
                extra={"target": target} if target is not None else {},
                after_step=after_step if target is not None else None)


@torch.no_grad()
def tune_levels(f, data, cfg: dict, n: int, max_k: int = 4, cond: Conditioning = Conditioning()) -> dict:
    """Greedy search of the multistep levels (as the CM paper does on FID): for k = 2..max_k
    steps, one pass of coordinate descent over the k - 1 levels on a log-spaced candidate
    set in [0.02 sd, 4 sd], minimising sliced-W2 of n samples to n data samples (the same
    noise for every candidate). Starts from the k - 1 step optimum plus a lower level.
    Images are compared as flattened pixel vectors (sliced-W2 is defined in any dimension;
    the paper searched on FID, which needs a feature network we do not have for every set)."""
    from ..metrics import sliced_w2
    from ..samplers import get

    gen = torch.Generator().manual_seed(int(cfg["seed"]) + 99)
    ref, labels = data.labelled(n, gen) if cond.on else (data.draw(n, gen), None)
    dev = next(f.parameters()).device
    extra = {"extra_args": {"labels": labels.to(dev)}} if labels is not None else {}
    x_T = float(cfg["sigma_max"]) * torch.randn(ref.shape, generator=gen)
    cands = (f.sigma_data * torch.logspace(math.log10(0.02), math.log10(4.0), 12, dtype=torch.float64)).tolist()
    sample, best = get("consistency"), {}

    def score(lv):
        grid = torch.tensor([float(cfg["sigma_max"])] + lv + [0.0], dtype=torch.float64, device=dev)
        x = sample(f, x_T.to(dev), grid, epsilon=float(cfg["sigma_min"]),
                   generator=torch.Generator(device=dev).manual_seed(5), **extra)
        return sliced_w2(x.cpu(), ref, n_projections=128)

    prev = []
    for k in range(2, max_k + 1):
        lv = prev + [min(prev[-1] / 2, cands[-1]) if prev else cands[len(cands) // 2]]
        for j in range(len(lv)):
            hi = lv[j - 1] if j > 0 else float(cfg["sigma_max"])
            lo = lv[j + 1] if j + 1 < len(lv) else float(cfg["sigma_min"])
            options = [c for c in cands if lo < c < hi] + [lv[j]]
            lv[j] = min(options, key=lambda c: score(lv[:j] + [c] + lv[j + 1:]))
        best[k], prev = list(lv), lv
    return best


def sampling_rule(cfg: dict, sigma_data: float, tuned: Optional[dict] = None) -> dict:
    """Multistep consistency sampling on [sigma_max, levels..., 0] for 1..MAX_RULE_NFE steps."""
    import json

    chosen = cfg["sample_levels"]
    if isinstance(chosen, str):
        try:
            chosen = json.loads(chosen)
        except json.JSONDecodeError as e:
            raise UserError(f"--sample-levels {chosen}: not JSON ({e.msg})") from None
    form = 'a JSON object of step counts and levels, e.g. {"2": [0.8], "3": [1.5, 0.3]}'
    if chosen is not None and not isinstance(chosen, dict):
        raise UserError(f"--sample-levels must be {form}, got {json.dumps(chosen)}")
    try:
        chosen = {**(tuned or {}), **{int(k): [float(x) for x in v] for k, v in (chosen or {}).items()}}
    except (TypeError, ValueError):
        given = cfg["sample_levels"]
        raise UserError(f"--sample-levels must be {form}, got {given if isinstance(given, str) else json.dumps(given)}"
                        ) from None
    grids = {}
    for k in range(1, MAX_RULE_NFE + 1):
        lv = chosen.get(k, default_levels(k, sigma_data))
        grid = [float(cfg["sigma_max"])] + [float(v) for v in lv] + [0.0]
        if len(grid) != k + 1 or not all(math.isfinite(v) for v in grid) or any(b >= a for a, b in zip(grid, grid[1:])):
            raise UserError(f"--sample-levels for {k} steps must be {k - 1} decreasing levels below sigma_max, got {lv}")
        grids[k] = grid
    return {"sampler": "consistency", "grids": fixed_grids(grids), "options": {"epsilon": float(cfg["sigma_min"])}}


def stages(job):
    """One stage in the top folder: the curriculum's training, then the sampling rule."""
    from ..samplers import info

    teacher = load_teacher(job.cfg["teacher"], job.device, required=job.cfg["mode"] == "distillation", cfg=job.cfg,
                           kinds=KINDS, method="consistency")
    cfg = resolve(job.cfg, teacher)
    data = data_source(cfg["data"], teacher, int(cfg["seed"]))
    if teacher is None:  # consistency training: the data's kind and batch (a teacher's are checked on load)
        if data.kind not in KINDS:
            raise UserError(f"--data {data.name} holds {data.kind}; consistency models take {' or '.join(KINDS)} "
                            f"(point clouds: fewstep distill pointcloud)")
        check_batch_memory("--batch-size", int(cfg["batch_size"]), data.shape)
    cond = conditioning(cfg, teacher, data)
    if cond.on and not data.num_classes:
        raise UserError(f"the teacher is class-conditional but the training data {data.name} has no labels; "
                        f"give labelled --data")
    if cond.on and cfg["mode"] == "training" and cond.guidance != 1.0:
        raise UserError(f"--guidance {cond.guidance}: consistency training learns from data, which has no guidance; "
                        f"use --mode distillation")
    D, net_cfg = build_student(teacher, cfg, data)
    if cond.on:
        check_student_net(D.net, cond)
    sampling = sampling_rule(cfg, D.sigma_data)
    _, mu0 = curriculum(cfg)(0)
    target = copy.deepcopy(D.net).requires_grad_(False) if cfg["schedule"] != "ict" and mu0 > 0 else None

    def plan(st):
        def describe(ema_module):
            rule = sampling
            if int(cfg["tune_levels"]) > 0:
                f = ConsistencyDenoiser(ema_module, D.sigma_min, D.sigma_data, float(cfg["sigma_max"]))
                rule = sampling_rule(cfg, D.sigma_data, tune_levels(f, data, cfg, int(cfg["tune_levels"]), cond=cond))
            per = info(cfg["solver"]).cost(1, final_zero=False) if cfg["mode"] == "distillation" else 0
            per *= 2 if cond.on and cond.guidance != 1.0 else 1  # a guided call evaluates D(c) and D(null)
            den = {"kind": "consistency", "sigma_min": D.sigma_min, "sigma_data": D.sigma_data,
                   "sigma_max": float(cfg["sigma_max"])}
            return student_meta("consistency", D, net_cfg, data.shape, data.kind, data.name, float(cfg["sigma_min"]),
                                float(cfg["sigma_max"]), rule, cfg, denoiser=den, cond=cond, mode=cfg["mode"],
                                schedule=cfg["schedule"],
                                cost={"teacher_evals": int(cfg["steps"]) * int(cfg["batch_size"]) * per,
                                      "seconds": st.seconds})

        return Plan(consistency_task(D, cfg, data, teacher, target, cond), describe)

    job.stage("", plan)
