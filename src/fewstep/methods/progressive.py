"""Progressive distillation (Salimans & Ho 2022, Algorithm 2; survey eq. 41).

Rounds N -> N/2 -> ... -> 1: a student that starts as a copy of its teacher learns to do
in one DDIM step what the teacher does in two. The levels are uniform in the time of a
process (cosine VP by default, the paper's): for N student steps sigma_i = sigma(t_i),
t_i = t_hi - i (t_hi - t_lo) / N, i < N, then sigma_N = 0; the teacher's grid of 2N steps
interleaves it. In sigma-space (y = z / alpha, s = sigma / alpha = std / alpha) the
paper's target for a student step s -> s'' through the teacher's DDIM steps s -> s' -> s''

    z_t'  = alpha_t' x(z_t) + (sigma_t'/sigma_t)(z_t - alpha_t x(z_t))      (DDIM, eta = 0)
    x~    = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)

becomes, with the Euler (= DDIM) steps of :mod:`fewstep.samplers.euler`,

    x~ = (y'' - (s''/s) y) / (1 - s''/s)      (x~ = y'' when s'' = 0),

the x0 that one DDIM step from (y, s) must predict to land on y''. The loss is
w(s) || x_student(y, s) - x~ ||^2 with the truncated-SNR weight w = max(SNR, 1),
SNR = 1/s^2 (the paper's "truncated SNR"; ``v`` gives SNR + 1). The student network
predicts x0 or v (or keeps the teacher's own parametrization when it is x0, v or EDM).

An exact teacher (or one whose parametrization differs from the student's) has no network
to start from: a first round N -> N copies it (one teacher step per student step: x~ = D)
into the student network, randomly initialised. Every round is a run folder
``rounds/steps_NNNN`` that samples with its own N-step grid; the top folder samples with
the round that matches ``--nfe``.

The rounds are :func:`run_rounds`, which guided distillation (:mod:`fewstep.methods.guided`,
stage two) runs too, with a per-sample w passed to teacher and student as the net's input.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..train.job import Plan, Task, Top
from ..train.options import table_defaults, table_help
from .common import (PD_OPTIONS, STUDENT_PREDICTIONS, bcast, call_denoiser, check_student_net, conditioning,
                     data_source, fixed_grids, group_levels, is_exact, level_grid, load_teacher, log2_int, net_config,
                     solve_rows, student_meta)

OPTIONS = PD_OPTIONS
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
KINDS = ("points", "image", "speech")  # a cloud teacher: fewstep distill pointcloud (or knowledge, reflow)


def check_options(cfg: dict) -> None:
    """The rules between options, checked before anything is written (the teacher's own
    rules, e.g. end_steps == start_steps only for an exact teacher, in :func:`_check`)."""
    if int(cfg["end_steps"]) > int(cfg["start_steps"]):
        raise UserError(f"--end-steps {cfg['end_steps']} must be below --start-steps {cfg['start_steps']}")


@torch.no_grad()
def target(teacher, y: torch.Tensor, rows: torch.Tensor, labels=None, cond=None) -> torch.Tensor:
    """x~ for samples y at levels rows[:, 0]: the teacher's DDIM (Euler) steps along each
    row (two for PD, one for a copy round) from y to y_end, then
    x~ = (y_end - r y) / (1 - r) with r = rows[:, -1] / rows[:, 0] (module docstring).
    ``cond``: each sample's scalar input of a teacher that takes one (a guided student's w)."""
    y_end = solve_rows("euler", teacher, y, rows, labels, cond)
    r = bcast((rows[:, -1] / rows[:, 0]).to(y.device), y)
    return (y_end - r * y) / (1 - r)


def _rounds(n0: int, n_end: int, copy: bool) -> list:
    """[(student steps N, teacher steps per student step)] in order."""
    out = [(n0, 1)] if copy else []
    n = n0 // 2
    while n >= n_end:
        out.append((n, 2))
        n //= 2
    return out


def _student(prev, cfg, process, prediction, data, net_cfg, first_copy: bool):
    """The round's student: a copy of its teacher (same net, weights, parametrization), or
    for a copy round a fresh net in ``prediction`` under ``process``."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net

    torch.manual_seed(int(cfg["seed"]))
    if first_copy:
        net = build_net(net_cfg)
        return ModelDenoiser(net, process, prediction, data.sigma_data), getattr(net, "config", net_cfg)
    T = prev.denoiser
    net = build_net(prev.meta["net"])
    net.load_state_dict({k: v.detach().cpu() for k, v in T.net.state_dict().items()})
    if hasattr(net, "freeze_context"):  # ProDiff's student keeps its teacher's text encoder and adaptor
        net.freeze_context()
    return ModelDenoiser(net, T.process, T.prediction, T.sigma_data), dict(prev.meta["net"])


def _check(cfg: dict, teacher):
    from ..train.losses import x0_weight

    n0, n_end = int(cfg["start_steps"]), int(cfg["end_steps"])
    log2_int(n0, "--start-steps")
    log2_int(n_end, "--end-steps")
    if n_end > n0 or (n_end == n0 and not is_exact(teacher)):
        raise UserError(f"--end-steps {n_end} must be below --start-steps {n0}")
    x0_weight(cfg["weighting"], torch.ones(1))  # unknown names fail here
    pred = cfg["prediction"]
    if pred is None:
        tp = getattr(teacher.denoiser, "prediction", None)
        pred = tp if (not is_exact(teacher) and tp in STUDENT_PREDICTIONS) else "v"
    if pred not in STUDENT_PREDICTIONS:
        raise UserError(f"--prediction {pred}: progressive distillation students predict x0, v or edm")
    copy = is_exact(teacher) or pred != getattr(teacher.denoiser, "prediction", None)
    return n0, n_end, pred, copy


def prepare(job, method: str = "progressive", kinds=KINDS):
    """What the rounds of a PD-style method need, checked before any work: the teacher, the
    rounds ``[(N, k)]``, the base levels, data, conditioning, process, student parametrization
    and net (progressive itself, and CFD's rounds, :mod:`fewstep.methods.cfd`)."""
    from types import SimpleNamespace

    from ..process import process_from_config

    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, kinds=kinds, method=method)
    n0, n_end, prediction, copy = _check(cfg, teacher)
    process = process_from_config(cfg["process"])
    data = data_source(cfg["data"], teacher, int(cfg["seed"]))
    cond = conditioning(cfg, teacher)
    if cond.num_classes and not data.num_classes:
        raise UserError(f"the teacher is class-conditional but its training data {data.name} has no labels; "
                        f"give labelled --data")
    return SimpleNamespace(teacher=teacher, rounds=_rounds(n0, n_end, copy), base=level_grid(process, n0,
                           teacher.sigma_max), data=data, cond=cond, process=process, prediction=prediction,
                           net_cfg=net_config(cfg["net"], teacher, teacher.shape, teacher.kind), copy=copy)


def stages(job):
    """The rounds N -> N/2 -> ... -> end_steps, each a stage ``rounds/steps_NNNN`` whose
    teacher is the round before; the top folder samples with the round matching --nfe."""
    p = prepare(job)
    done = run_rounds(job, p.teacher, p.rounds, p.base, p.data, p.cond, p.process, p.prediction, p.net_cfg, p.copy)
    return Top(done[-1][1], lambda: _top_meta(done))


def run_rounds(job, teacher, rounds: list, base: torch.Tensor, data, cond, process, prediction: str, net_cfg: dict,
               copy: bool, w_input=None, method: str = "progressive", seed: int = None, round_loss=None,
               frozen: dict = None) -> list:
    """Run the rounds ``[(N, k)]`` (:func:`_rounds`) as stages ``rounds/steps_NNNN`` on the
    levels ``base`` (n0 + 1 of them), each round's teacher the round before (the first's:
    ``teacher``, guided by ``cond``); returns ``[(N, folder, meta)]`` of the rounds.

    ``w_input = (w_min, w_max, w_default)``: teacher and student take a per-sample scalar
    input w (the net's ``cond``), drawn uniformly from [w_min, w_max] for every sample (after
    the draws of a plain round, which stay as they are) and passed to both; the rounds'
    model.json record ``w_input``, ``w_default`` and the paper's stochastic rule
    (``sampling.stochastic``: the round's teacher levels, 2N of them, for 2N evaluations).
    Guided distillation (Meng et al. 2022), stage two. ``seed``: of round 0 (default the
    run's), round r's is seed + 1000 r; ``method`` names the rounds' method.

    ``round_loss(N, k)``: None for a round of the plain loss, else ``(pixel_weight, extra,
    meta)``: that round's per-sample loss is ``pixel_weight * w(s) || x_student - x~ ||^2 +
    extra(pred, x_tilde, batch, sigma)`` (``pred`` the student's x0 prediction, with its
    gradient; ``x_tilde`` the target; ``batch`` this process's slice; ``sigma`` the student
    levels; ``extra`` None: the weighted pixel term alone) and ``meta`` is merged into its
    model.json (a ``cost`` entry into its cost): CFD (:mod:`fewstep.methods.cfd`) adds its
    classifier loss so. ``frozen``: more modules of every round's task, moved to the device
    and never trained (CFD's classifier). Without either the rounds are those of plain
    progressive distillation, bit for bit."""
    from ..train.losses import per_sample_mean, x0_weight

    cfg = job.cfg
    n0 = len(base) - 1
    seed0 = int(cfg["seed"]) if seed is None else int(seed)
    B, G = int(cfg["batch_size"]), int(cfg["level_groups"])
    prev, done = teacher, []
    for r, (N, k) in enumerate(rounds):
        grid_s = base[:: n0 // N]             # the student's N + 1 levels
        grid_t = base[:: n0 // (N * k)]       # the teacher's k N + 1 levels

        def plan(st, r=r, N=N, k=k, grid_s=grid_s, grid_t=grid_t, prev=prev):
            D, round_net_cfg = _student(prev, cfg, process, prediction, data, net_cfg, copy and r == 0)
            if cond.on:
                check_student_net(D.net, cond)
            T = prev.denoiser
            T_target = cond.teacher(T) if r == 0 else T  # later rounds' teachers are guided students
            guided_calls = 2 if T_target is not T else 1  # a guided call evaluates D(c) and D(null)
            hook = round_loss(N, k) if round_loss is not None else None

            def draw(gen, step):
                i = group_levels(N, B, G, gen)
                x0, labels = data.labelled(B, gen) if cond.on else (data.draw(B, gen), None)
                eps = torch.randn(x0.shape, generator=gen)
                rows = torch.stack([grid_t[k * i + j] for j in range(k + 1)], 1)
                batch = {"x0": x0, "eps": eps, "sigma": grid_s[i], "rows": rows}
                if cond.on:
                    batch["labels"] = cond.drop(labels, gen)
                if data.mask_of is not None:  # padded sequences (speech): the loss counts real frames only
                    batch["mask"] = data.mask_of(labels)
                if w_input is not None:
                    lo, hi = float(w_input[0]), float(w_input[1])
                    batch["w"] = lo + (hi - lo) * torch.rand(B, generator=gen)
                return batch

            def loss(model, b):
                """Per sample: w(s) || x_student(y, s, c[, w]) - x~ ||^2 at a student level s."""
                x0, labels, wc = b["x0"], b.get("labels"), b.get("w")
                y = x0 + bcast(b["sigma"], x0) * b["eps"]
                x_tilde = target(T_target, y, b["rows"], labels, wc)
                s = b["sigma"].to(x0.dtype)
                pred = call_denoiser(D, model, y, s, labels, wc)
                w = x0_weight(cfg["weighting"], s.double()).to(x0.dtype)
                if hook is None:
                    return w * per_sample_mean((pred - x_tilde) ** 2, b.get("mask"))
                pixel_weight, extra, _ = hook
                if extra is None:
                    return pixel_weight * w * per_sample_mean((pred - x_tilde) ** 2, b.get("mask"))
                out = extra(pred, x_tilde, b, s)
                if pixel_weight:
                    out = out + pixel_weight * w * per_sample_mean((pred - x_tilde) ** 2, b.get("mask"))
                return out

            def describe(ema_module):
                sampling = {"sampler": "euler", "grids": fixed_grids({N: grid_s.tolist()})}
                extra = {}
                if w_input is not None:
                    sampling["stochastic"] = {"sampler": "guided_stochastic", "nfe": k * N,
                                              "grid": [float(v) for v in grid_t.tolist()]}
                    extra = {"w_input": [float(w_input[0]), float(w_input[1])], "w_default": float(w_input[2])}
                meta = student_meta(method, D, round_net_cfg, teacher.shape, teacher.kind, data.name,
                                    float(grid_s[-2]), float(grid_s[0]), sampling, cfg, cond=cond,
                                    round={"index": r, "student_steps": N, "teacher_steps": k},
                                    cost={"teacher_evals": int(cfg["steps"]) * B * k * guided_calls,
                                          "seconds": st.seconds},
                                    **extra)
                if w_input is not None:
                    meta.pop("guidance", None)  # w is an input, not built in
                if hook is not None:
                    more = dict(hook[2] or {})
                    meta["cost"].update(more.pop("cost", {}))
                    meta.update(more)
                return meta

            task_frozen = {"teacher": T} if isinstance(T, torch.nn.Module) else {}
            task_frozen.update(frozen or {})
            return Plan(Task(student=D.net, draw=draw, loss=loss, frozen=task_frozen), describe)

        name = f"rounds/steps_{N:04d}"
        prev = job.stage(name, plan, seed=seed0 + 1000 * r, round=r, student_steps=N, teacher_steps=k,
                         method=method)
        done.append((N, name, prev.meta))
    return done


def _top_meta(done: list) -> dict:
    """The top folder: the last round's student plus every round as a variant."""
    meta = dict(done[-1][2])
    meta["sampling"] = {"sampler": "euler", "variants": {str(N): rel for N, rel, _ in done}}
    meta["rounds"] = [{"student_steps": N, "folder": rel, "cost": m.get("cost", {})} for N, rel, m in done]
    meta["cost"] = {"teacher_evals": sum(m.get("cost", {}).get("teacher_evals", 0) for _, _, m in done),
                    "seconds": sum(m.get("cost", {}).get("seconds", 0.0) for _, _, m in done)}
    return meta
