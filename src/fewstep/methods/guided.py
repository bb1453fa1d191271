"""Guided distillation (Meng et al. 2022, "On distillation of guided diffusion models").

A classifier-free guided teacher costs two network evaluations per step,

    D_w(y, s, c) = D(y, s, null) + w (D(y, s, c) - D(y, s, null))

(the paper writes (1 + w) x_c - w x with its w one less than ours: its [0, 4] is our [1, 5]).
Two stages distil it into a few-step student that takes w as an input:

* Stage one (``stage1/``): one w-conditioned student x_eta1(y, s, c, w), the teacher's
  architecture with a scalar input w (the net's ``cond``, with its own sinusoidal
  ("Fourier") features, ``use_cond``) and started from the teacher's weights where the
  architecture allows (the new w embedding starts at zero, so the student starts as the
  teacher's D(c)), else at random, learns

      E_{x, c, eps, t ~ U, w ~ U[w_min, w_max]} lambda(s) || x_eta1(y, s, c, w) - D_w(y, s, c) ||^2

  with y = x + s eps at a continuous level s = sigma(t), t uniform in the time of
  ``--process`` over the range of stage two's levels, and lambda(s) = max(SNR, 1) the
  truncated SNR of progressive distillation. One evaluation then replaces the teacher's two.
* Stage two (``rounds/steps_NNNN``): progressive distillation of the stage-one student with w
  as an input, N -> N/2 -> ... -> ``--end-steps``: the rounds of
  :mod:`fewstep.methods.progressive` (its ``run_rounds``; the first round's teacher is the
  stage-one student, whose two DDIM steps at the sample's own w are the targets), w drawn
  anew from U[w_min, w_max] for every sample.

Sampling: ``fewstep sample RUN --guidance w --label c --nfe k`` passes w as the student's
input (a note outside [w_min, w_max]; without --guidance its ``w_default``, said in a note),
with the deterministic DDIM rule of the round of k steps; ``--sampler guided_stochastic``
runs the paper's N-step stochastic sampler instead (``fewstep.model.guided_stochastic``):
with the round of N/2 steps, from each of the N levels of that round's teacher a DDIM jump of
two levels (one student step) then fresh noise back up one level, the last step to 0 plain.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..train.job import Plan, Task, Top
from ..train.options import Option, table_defaults, table_help
from .common import (PD_OPTIONS, STUDENT_PREDICTIONS, bcast, call_denoiser, check_student_net, conditioning,
                     data_source, is_exact, load_teacher, log2_int, net_config, student_meta)

OPTIONS = (
    Option("w_min", float, 1.0, "smallest guidance w the student learns, w >= 0 (1 = plain conditional; default 1.0)",
           low=0.0, must="a finite number, 0 (unconditional) or more"),
    Option("w_max", float, 5.0, "largest guidance w the student learns (default 5.0; the paper's [0, 4] is our "
           "[1, 5])", low=0.0),
    Option("w_default", float, None, "w the student samples at without --guidance (default: the middle of [w_min, "
           "w_max])", none="the middle of [w_min, w_max]", example=3.0),
    Option("stage1_steps", int, None, "training steps of stage one, the w-conditioned student (default: --steps)",
           low=1, none="--steps", example=2000),
    *PD_OPTIONS,  # stage two is progressive distillation: its options, as they are there
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
KINDS = ("points", "image")  # class-conditional points or images


def check_options(cfg: dict) -> None:
    """The rules between options, checked before anything is written: w_min <= w_max with
    the default w inside, end_steps below start_steps."""
    w_range(cfg)
    if int(cfg["end_steps"]) >= int(cfg["start_steps"]):
        raise UserError(f"--end-steps {cfg['end_steps']} must be below --start-steps {cfg['start_steps']}")


def _number(cfg: dict, key: str) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"--{key.replace('_', '-')} must be a finite number, got {v!r}")
    return float(v)


def w_range(cfg: dict) -> tuple:
    """(w_min, w_max, w_default), checked: finite, 0 <= w_min <= w_max, the default inside."""
    lo, hi = _number(cfg, "w_min"), _number(cfg, "w_max")
    if lo < 0:
        raise UserError(f"--w-min must be 0 (unconditional) or more, got {lo:g}")
    if lo > hi:
        raise UserError(f"--w-min {lo:g} is above --w-max {hi:g}; give w_min <= w_max")
    d = (lo + hi) / 2 if cfg.get("w_default") is None else _number(cfg, "w_default")
    if not lo <= d <= hi:
        raise UserError(f"--w-default {d:g} lies outside [--w-min {lo:g}, --w-max {hi:g}]")
    return lo, hi, d


def _check(cfg: dict, teacher) -> tuple:
    """Every option that can be checked before any work: (n0, n_end, w_min, w_max, w_default,
    stage-one steps)."""
    from ..train.losses import x0_weight

    if not int(getattr(teacher, "num_classes", 0) or 0):
        raise UserError(f"teacher {teacher.name} is unconditional: guided distillation needs a class-conditional "
                        f"teacher (its guided D(null) + w (D(c) - D(null)))")
    if teacher.meta.get("w_input"):
        raise UserError(f"teacher {teacher.name} is a guided student already (w is its input); give the guided "
                        f"teacher it was distilled from")
    if cfg.get("guidance") is not None:
        raise UserError("--guidance: a guided student learns every w in [--w-min, --w-max]; choose w when sampling "
                        "(fewstep sample RUN --guidance w), its default with --w-default")
    lo, hi, d = w_range(cfg)
    n0, n_end = int(cfg["start_steps"]), int(cfg["end_steps"])
    log2_int(n0, "--start-steps")
    log2_int(n_end, "--end-steps")
    if n_end >= n0:
        raise UserError(f"--end-steps {n_end} must be below --start-steps {n0}")
    x0_weight(cfg["weighting"], torch.ones(1))  # unknown names fail here
    if cfg.get("prediction") is not None and cfg["prediction"] not in STUDENT_PREDICTIONS:
        raise UserError(f"--prediction {cfg['prediction']}: guided students predict x0, v or edm")
    s1 = cfg.get("stage1_steps")
    s1 = int(cfg["steps"]) if s1 is None else s1
    if isinstance(s1, bool) or not isinstance(s1, int) or s1 < 1:
        raise UserError(f"--stage1-steps must be a whole number of at least 1, got {s1!r}")
    return n0, n_end, lo, hi, d, s1


@torch.no_grad()
def guided_target(D, y: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """D_w(y, s, c) = D(null) + w (D(c) - D(null)) with each sample's own w (one batched call
    of the teacher on [y; y] with labels [c; -1]); a null label c = -1 gives D(null)."""
    from ..denoiser import cfg_halves

    d_cond, d_null = (d.to(y.dtype) for d in cfg_halves(D, y, sigma, labels))
    return d_null + bcast(w, y) * (d_cond - d_null)


def _check_null_branch(teacher) -> None:
    """The teacher must take the null label -1 (its D(null)); a class-embedding net without a
    null row (e.g. a diffusers UNet with num_class_embeds) fails here, in one line."""
    x = teacher.noise(1, seed=0)
    try:
        teacher.denoiser(x, torch.full((1,), float(teacher.sigma_max), dtype=x.dtype, device=x.device),
                         labels=torch.full((1,), -1, dtype=torch.long, device=x.device))
    except (IndexError, RuntimeError, ValueError) as e:
        raise UserError(f"teacher {teacher.name} has no unconditional branch (label -1 fails: "
                        f"{str(e).splitlines()[0][:120]}); guided distillation needs D(null)") from None


def build_student(teacher, cfg: dict, process, data, num_classes: int):
    """(denoiser, net config, init) of stage one: the teacher's net (or --net) with the w input
    (``use_cond``) and the teacher's classes; the teacher's weights where the architecture
    is the same but for the w embedding (which then starts at zero: the student starts as
    D(c)), else random ('init'). Process and parametrization: the teacher's process (a
    network teacher) or --process (exact), predicting --prediction (default: the teacher's
    if x0, v or edm, else v)."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net

    net_cfg = {**net_config(cfg["net"], teacher, teacher.shape, teacher.kind, num_classes), "use_cond": True}
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = dict(getattr(net, "config", net_cfg))
    T = teacher.denoiser
    tp = getattr(T, "prediction", None)
    pred = cfg.get("prediction") or (tp if (not is_exact(teacher) and tp in STUDENT_PREDICTIONS) else "v")
    init = "random"
    if is_exact(teacher):
        D = ModelDenoiser(net, process, pred, data.sigma_data)
        return D, net_cfg, init
    tnet = dict(teacher.meta.get("net", {}))
    if isinstance(T, ModelDenoiser) and tnet and {**tnet, "use_cond": True} == net_cfg:
        state = {k: v.detach().cpu() for k, v in T.net.state_dict().items()}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or not all(".cond." in f".{k}" for k in missing):
            raise UserError(f"teacher {teacher.name}: its weights do not fit its own net config "
                            f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
        for name, p in net.named_parameters():  # the w embedding's output layer starts at zero
            if name in missing and ".fc2." in f".{name}":
                torch.nn.init.zeros_(p.data)
        init = "teacher"
    sd = float(getattr(T, "sigma_data", teacher.meta.get("sigma_data", data.sigma_data)))
    return ModelDenoiser(net, teacher.process, pred, sd), net_cfg, init


def stages(job):
    """Stage one (``stage1``: the w-conditioned student of the guided teacher), then stage two
    (progressive rounds ``rounds/steps_NNNN`` with w as an input); the top folder samples
    with the round matching --nfe."""
    from ..process import process_from_config
    from ..train.losses import x0_weight
    from . import get

    P = get("progressive")
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, kinds=KINDS, method="guided")
    n0, n_end, w_lo, w_hi, w_def, s1_steps = _check(cfg, teacher)
    _check_null_branch(teacher)
    process = process_from_config(cfg["process"])
    data = data_source(cfg["data"], teacher, int(cfg["seed"]))
    cond = conditioning(cfg, teacher)  # guidance 1 here: each sample's w guides its own target
    if not data.num_classes:
        raise UserError(f"the teacher is class-conditional but its training data {data.name} has no labels; "
                        f"give labelled --data")
    D, net_cfg, init = build_student(teacher, cfg, process, data, cond.num_classes)  # bad --net fails here
    check_student_net(D.net, cond)
    base = P.level_grid(process, n0, teacher.sigma_max)
    t_hi = float(process.t_of_sigma(base[0]))
    t_lo = float(process.t_min)
    B, seed = int(cfg["batch_size"]), int(cfg["seed"])
    w_input = (w_lo, w_hi, w_def)

    def plan(st):
        T = teacher.denoiser

        def draw(gen, step):
            x0, labels = data.labelled(B, gen)
            eps = torch.randn(x0.shape, generator=gen)
            t = t_hi - (t_hi - t_lo) * torch.rand(B, generator=gen, dtype=torch.float64)
            w = w_lo + (w_hi - w_lo) * torch.rand(B, generator=gen)
            return {"x0": x0, "eps": eps, "sigma": process.sigma(t).to(torch.float64), "w": w,
                    "labels": cond.drop(labels, gen)}

        def loss(model, b):
            """Per sample: lambda(s) || x_eta1(y, s, c, w) - D_w(y, s, c) ||^2."""
            x0, labels, w = b["x0"], b["labels"], b["w"]
            s = b["sigma"].to(x0.dtype)
            y = x0 + bcast(s, x0) * b["eps"]
            tgt = guided_target(T, y, s, labels, w)
            pred = call_denoiser(D, model, y, s, labels, w)
            lam = x0_weight(cfg["weighting"], b["sigma"].double()).to(x0.dtype)
            return lam * ((pred - tgt) ** 2).flatten(1).mean(1)

        def describe(ema_module):
            meta = student_meta("guided", D, net_cfg, teacher.shape, teacher.kind, data.name,
                                float(process.sigma(torch.tensor(t_lo, dtype=torch.float64))), float(base[0]),
                                {"sampler": "heun"}, cfg, cond=cond, stage="stage1", init=init,
                                w_input=[w_lo, w_hi], w_default=w_def,
                                cost={"teacher_evals": s1_steps * B * 2, "seconds": st.seconds})
            meta.pop("guidance", None)  # w is an input, not built in
            return meta

        frozen = {"teacher": T} if isinstance(T, torch.nn.Module) else {}
        return Plan(Task(student=D.net, draw=draw, loss=loss, frozen=frozen), describe)

    s1 = job.stage("stage1", plan, seed=seed, steps=s1_steps, stage="stage1", method="guided")
    done = P.run_rounds(job, s1, P._rounds(n0, n_end, False), base, data, cond, process, s1.denoiser.prediction,
                        dict(s1.meta["net"]), False, w_input=w_input, method="guided", seed=seed + 1000)

    def describe_top():
        meta = P._top_meta(done)
        c1 = s1.meta.get("cost", {})
        meta["stage1"] = {"folder": "stage1", "init": s1.meta.get("init"), "cost": c1}
        meta["cost"] = {"teacher_evals": meta["cost"]["teacher_evals"] + c1.get("teacher_evals", 0),
                        "seconds": meta["cost"]["seconds"] + c1.get("seconds", 0.0)}
        return meta

    return Top(done[-1][1], describe_top)
