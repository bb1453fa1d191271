"""Shortcut models (Frans, Hafner, Levine & Abbeel 2024, "One step diffusion via shortcut models").

One network s_theta(x_t, t, d) is conditioned on the time t and on the step size d it is asked
to take, on the linear interpolant of fewstep's flow (:class:`~fewstep.process.LinearFlow`:
t = 1 noise, t = 0 data, the paper's time reversed, as reflow's):

    x_t = (1 - t) x0 + t x1,  x0 data, x1 ~ N(0, I),   dx_t/dt = x1 - x0 in expectation
    the shortcut step         x_{t - d} = x_t - d s(x_t, t, d)                        (a step of d down in t)

The paper's objective L^S (its Sec. 3), trained jointly on one batch:

    flow matching       || s(x_t, t, 0) - (x1 - x0) ||^2                    (d = 0: the empirical velocity)
    self-consistency    || s(x_t, t, 2d) - sg(s_target) ||^2,
                        s_target = ( s(x_t, t, d) + s(x'_{t-d}, t - d, d) ) / 2,   x'_{t-d} = x_t - d s(x_t, t, d)

(one step of 2d is two steps of d; :func:`shortcut_target`). The squared errors are means over
coordinates, as the paper's code (``jnp.mean(..., axis=(1, 2, 3))``). Sampling with k steps
(k = 1, 2, 4, ...) is k Euler steps of d = 1/k with the same network and that d as its input:
x_{t - d} = x_t - d s(x_t, t, d) from t = 1 (:func:`fewstep.model.shortcut_sample`; model.json's
``"sampling": {"sampler": "shortcut", "base_steps": M}`` makes ``fewstep.load(run).sample(n, k)``
and ``fewstep sample RUN --nfe k`` run it). The flow d = 0 is an ordinary flow model: a named
``--sampler`` (euler, heun, ...) samples it on its grid.

The step-size input: the nets' scalar ``cond`` input (``use_cond``, :mod:`fewstep.nets.embed`,
the input guided distillation gives w) carries d, on the scale of the level input c_noise(t) =
1000 t: cond = 1000 d (:func:`fewstep.model.shortcut_velocity`, also MeanFlow's scale for its
interval t - r). The finest step 1/M is the paper's d = 0 (the flow) and is cond 0, so a net
called without cond, the run's flow ``ModelDenoiser``, is s(x, t, 0). (The paper's code embeds the
level index log2(1/d), ``dt_base``, with a second sinusoidal embedder of its own; here the nets'
existing cond embedding takes 1000 d, which also gives d = 0 a finite input.)

What the paper's code does and this module follows (github:kvfrans/shortcut-models,
``targets_shortcut.py`` ``get_targets`` and ``train.py``), and where it differs:
  * step sizes: powers of two; the self-consistency part trains s(., ., 2d) for 2d = 1, 1/2, ...,
    2/M in equal shares (the code's ``dt_base = log2_sections - 1 - arange(log2_sections)``), its
    two half steps d = 1/2, ..., 1/M queried at d (the code's ``dt_base + 1``); the code's
    finest level ``dt_base = log2(M)`` is also its flow-matching level, which is d = 0 here
    (the paper's text). ``--base-steps`` is M (the code's ``denoise_timesteps``, 128).
    The code repeats the levels in fixed blocks and puts the remainder at 2d = 1; here row i of
    the self-consistency part takes level (i + step) mod log2(M) (equal shares when the part is
    a multiple of log2(M), every level in turn when it is smaller).
  * times: t on the grid of multiples of the step being trained (the code's ``t =
    randint(0, 2^dt_base) / 2^dt_base``): the self-consistency rows at t in {1, 1 - 2d, ..., 2d}
    (so t - 2d >= 0), the flow-matching rows at t in {1, 1 - 1/M, ..., 1/M} (the code's
    ``randint(0, denoise_timesteps)``), here reversed in time.
  * the batch split: the first int(B f) rows of each batch are self-consistency rows, the rest
    flow matching (``--sc-fraction`` f: 1/4 as the paper says; the code's default
    ``bootstrap_every = 8`` is 1/8); each row has its own data draw and noise (the code takes
    both parts from one batch of images with fresh noise).
  * the target network: an EMA of the student (the code's ``bootstrap_ema = 1``,
    ``call_model_ema`` with ``target_update_rate`` 0.999: ``--target-ema``; 0 uses the student
    itself), kept in the checkpoints beside the student; the saved model is the loop's own EMA
    (``--ema-decay``), as every fewstep method's.
  * class labels (its ImageNet runs): every row carries its label; the flow-matching rows' labels
    are replaced by the null label with probability ``--label-dropout`` (the code's
    ``class_dropout_prob`` 0.1; here it applies to every row drawn from data, the code keeps the
    self-consistency rows' labels), so the student also learns the unconditional field.
    Guidance two ways, as the code: at sampling (``fewstep sample RUN --label c --guidance w``,
    the code's ``inference_cfg_scale``: s_null + w (s_c - s_null) at each step, both halves in one
    batched call), or built into the student with ``--guidance w`` (the code's ``bootstrap_cfg``:
    the finest self-consistency level, whose half steps are the flow, bootstraps from the guided
    flow s(null) + w (s(c) - s(null)), so every coarser step inherits w; its d = 0 flow stays
    unguided). With ``--couplings teacher`` the pairs come from the guided teacher (reflow's
    conditional pairs: labels drawn with the pairs, a share ``--label-dropout`` null, x0 the
    teacher at w), so w is in the couplings and the targets are not guided again.
  * not followed: the code's clipping of x'_{t-d} and of the target to [-4, 4] (fitted to its
    unit-scale latents; fewstep data need not lie there), its (1 - 1e-5) t noise factor; its
    AdamW settings (lr 1e-4, weight decay 0.1) and DiT are the shared runner's options and nets.

Couplings (``--couplings``): ``independent`` (x0 ~ --data, x1 ~ N(0, I) fresh every step: the
paper, training from scratch) or ``teacher`` (distillation: x1 = z, x0 = teacher sampler(sigma_max
z), a fixed set of pairs made once, as reflow's round 1; :mod:`fewstep.methods.pairs`). A teacher
given with independent couplings supplies its data set (``--data`` default).

``shortcut.json`` (written with the model): energy distance and sliced-W2 of the EMA student's 1,
2, 4 and 8-step samples (fixed noise) to fresh data draws (exact samples for a mixture; the
teacher's pairs where there is no data).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..io import write_json
from ..model import SHORTCUT, shortcut_sample, shortcut_velocity
from ..process import LinearFlow
from ..train.ema import EMA
from ..train.job import Plan, Task
from ..train.options import Option, check_batch_memory, power_of_two, table_defaults, table_help
from .common import COUPLING_PAIR_OPTIONS, N_DATA, bcast, check_student_net, conditioning, data_source, load_teacher, \
    cond_net_config, student_meta
from .pairs import make_pairs, pair_spec

COUPLINGS = ("independent", "teacher")
OPTIONS = (
    Option("base_steps", int, 128, "M: steps d = 1, 1/2, ..., 1/M are learned, the finest 1/M taken as the flow "
           "(d = 0); a power of two of at least 2 (default 128, the paper's)",
           test=lambda n: n >= 2 and power_of_two(n), must="a power of two of at least 2 (2, 4, ..., 128)",
           example=128),
    Option("sc_fraction", float, 0.25, "share of each batch trained on the self-consistency target, the rest on "
           "flow matching; in [0, 1) (default 0.25, the paper's 1/4)", low=0.0, high=1.0),
    Option("target_ema", float, 0.999, "EMA rate of the network that makes the self-consistency targets; 0: the "
           "student itself (default 0.999, the paper's code; runs of a few thousand steps do far better with 0.99)",
           low=0.0, high=1.0),
    Option("couplings", str, None, "independent (data x noise, fresh each step: the paper) or teacher ((z, "
           "teacher(z)) pairs)", choices=COUPLINGS, none="teacher when --teacher is given, else independent",
           example="independent"),
    *COUPLING_PAIR_OPTIONS,
    N_DATA,
    Option("eval_samples", int, 2000, "samples of the 1, 2, 4 and 8-step evaluation in shortcut.json (default 2000)",
           low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
EVAL_STEPS = (1, 2, 4, 8)
FLOW_GRID = "time-trailing"


def check_options(cfg: dict) -> None:
    """The rules between options, before anything is written: teacher couplings need a teacher."""
    if cfg["couplings"] == "teacher" and not cfg["teacher"]:
        raise UserError("--couplings teacher needs --teacher (a run folder or gmm:FILE.npz)")


# ------------------------------------------------------------------------ the idea
def _bootstrap_velocity(net, process, x, t, d, base: int, labels=None, guidance: float = 1.0):
    """s(x, t, d | c) of the target net; with ``guidance`` w != 1, the rows whose step d is the flow
    (d <= 1/M) and whose label is a class take the guided flow s(null) + w (s(c) - s(null)) (the
    paper's code's ``bootstrap_cfg``: guidance enters at the finest level and the coarser levels
    inherit it)."""
    cond = {"labels": labels} if labels is not None else {}
    s = shortcut_velocity(net, process, x, t, d, base, **cond)
    if labels is None or float(guidance) == 1.0:
        return s
    rows = (d <= 1.0 / int(base)) & (labels >= 0)
    if bool(rows.any()):
        s = s.clone()
        s_u = shortcut_velocity(net, process, x[rows], t[rows], d[rows], base, labels=torch.full_like(labels[rows], -1))
        s[rows] = s_u + float(guidance) * (s[rows] - s_u)
    return s


@torch.no_grad()
def shortcut_target(net, process, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, base: int,
                    labels=None, guidance: float = 1.0) -> torch.Tensor:
    """The self-consistency target of s(x_t, t, 2d), stop-gradient: two steps of d with ``net``,
    (s(x_t, t, d) + s(x'_{t-d}, t - d, d)) / 2 with x'_{t-d} = x_t - d s(x_t, t, d). At d = 0 it
    is s(x_t, t, 0) itself; for a field that does not depend on x or t it is that field. ``labels``
    condition both steps; ``guidance`` w guides the flow half steps (:func:`_bootstrap_velocity`)."""
    s1 = _bootstrap_velocity(net, process, x, t, d, base, labels, guidance)
    x2 = x - bcast(d, x) * s1
    s2 = _bootstrap_velocity(net, process, x2, t - d, d, base, labels, guidance)
    return (s1 + s2) / 2


def warn_slow_target(rate: float, base: int, steps: int) -> None:
    """A note when the target EMA is too slow for the run: level 2d bootstraps from level d, so
    the log2(M) levels learn one after another, each behind a target lagging 1 / (1 - rate) steps;
    under 2 log2(M) such time constants (14000 steps at the paper's 0.999 and M = 128) the coarse
    steps stay near their initialisation (1-step samples no better than noise pushed to the mean)."""
    import warnings

    if rate <= 0:
        return
    need = 2 * math.log2(base) / (1.0 - rate)
    if steps < need:
        faster = max(0.0, 1.0 - 2 * math.log2(base) / steps)
        warnings.warn(f"--target-ema {rate:g} lags {1 / (1 - rate):.0f} steps and the {int(math.log2(base))} step "
                      f"levels learn one after another: {steps} steps are too few for the coarse steps (about "
                      f"{need:.0f} needed); give --target-ema {math.floor(faster * 1000) / 1000:g} or lower, or more "
                      f"--steps", stacklevel=2)


def draw_times(B: int, n_sc: int, base: int, gen: torch.Generator, step: int = 0):
    """(t, d), each [B]: rows 0..n_sc-1 self-consistency rows, row i training s(., t, 2d) with 2d =
    2^-b, b = L - 1 - ((i + step) mod L), L = log2(base) (2d = 2/M ... 1), its half step d > 0 and t
    a multiple of 2d in [2d, 1]; the other rows flow matching, d = 0 and t in {1/M, 2/M, ..., 1}."""
    L = int(round(math.log2(base)))
    b = (L - 1 - (torch.arange(n_sc) + int(step)) % L).double()
    cells = 2.0 ** b  # the 2d grid's cells: t = 1 - j 2d, j < cells
    j = torch.minimum(torch.floor(torch.rand(n_sc, generator=gen, dtype=torch.float64) * cells), cells - 1)
    t_sc, d_sc = 1.0 - j / cells, 0.5 / cells
    t_fm = torch.randint(1, int(base) + 1, (B - n_sc,), generator=gen).double() / int(base)
    return torch.cat([t_sc, t_fm]).float(), torch.cat([d_sc, torch.zeros(B - n_sc, dtype=torch.float64)]).float()


def shortcut_loss(model, target, process, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                  base: int, labels=None, guidance: float = 1.0) -> torch.Tensor:
    """Per-sample L^S: flow-matching rows (d = 0) || s(x_t, t, 0 | c) - (x1 - x0) ||^2, self-consistency
    rows (d > 0) || s(x_t, t, 2d | c) - sg(s_target) ||^2 with the ``target`` net's two steps of d
    (means over coordinates); ``labels`` (-1: null) condition every row, ``guidance`` the finest
    level's target (:func:`shortcut_target`)."""
    x_t = (1 - bcast(t, x0)) * x0 + bcast(t, x0) * x1
    cond = {"labels": labels} if labels is not None else {}
    pred = shortcut_velocity(model, process, x_t, t, 2 * d, base, **cond)
    goal = x1 - x0
    sc = d > 0
    if bool(sc.any()):
        goal = goal.clone()
        goal[sc] = shortcut_target(target, process, x_t[sc], t[sc], d[sc], base,
                                   labels[sc] if labels is not None else None, guidance).to(goal.dtype)
    return (pred - goal).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(D, reference: torch.Tensor, shape, base: int, n: int, seed: int, device, labels=None) -> dict:
    """1, 2, 4 and 8-step samples of the shortcut rule from fixed noise (at the reference's
    ``labels`` for a conditional student) against ``reference`` samples: energy distance and sliced-W2."""
    from ..metrics import energy_distance, sliced_w2

    g = torch.Generator().manual_seed(int(seed) + 424242)
    z = torch.randn((n,) + tuple(shape), generator=g).to(device)
    ref = reference.to(device)
    extra = {"labels": labels.to(device)} if labels is not None else None
    out = {"energy_distance": {}, "sliced_w2": {}, "eval_samples": n}
    for k in EVAL_STEPS:
        x = shortcut_sample(D, z, k, base, extra)
        out["energy_distance"][str(k)] = energy_distance(x.flatten(1), ref.flatten(1))
        out["sliced_w2"][str(k)] = sliced_w2(x, ref)
    return out


# ----------------------------------------------------------------------- the stage
def _net_config(cfg: dict, teacher, shape, kind) -> dict:
    """``--net``, else the teacher's, else the data's default, with use_cond on (d goes through ``cond``)."""
    return cond_net_config(cfg["net"], teacher, shape, kind, "a shortcut model takes the step size d")


def check_conditional(cond, couplings: str, data) -> None:
    """A class-conditional run's rules: labelled data for independent couplings; guidance from data
    (the finest target's CFG) needs the null branch that --label-dropout trains."""
    if not cond.on:
        return
    if couplings == "independent" and (data is None or not data.num_classes):
        raise UserError("independent couplings of a class-conditional run need labelled --data")
    if couplings == "independent" and cond.guidance != 1.0 and not cond.label_dropout > 0:
        raise UserError(f"--guidance {cond.guidance} from data guides the finest step's target with the student's own "
                        f"unconditional flow, which only --label-dropout trains; give --label-dropout 0.1 (the paper's)")


def _pair_cfg(cfg: dict, teacher) -> dict:
    grid = cfg["pair_grid"] or (FLOW_GRID if isinstance(teacher.process, LinearFlow) else "karras")
    return {"teacher": str(cfg["teacher"]), "pair_sampler": cfg["pair_sampler"], "pair_nfe": int(cfg["pair_nfe"]),
            "pair_grid": grid, "pairs": int(cfg["pairs"]), "pair_batch": int(cfg["pair_batch"]),
            "seed": int(cfg["seed"]) + 1, "latent_dim": None}


def stages(job):
    """One stage in the top folder: L^S on data x noise (or the teacher's couplings)."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net

    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, required=False, cfg=cfg, method="shortcut")
    couplings = cfg["couplings"] or ("teacher" if teacher is not None else "independent")
    try:
        data = data_source(cfg["data"], teacher, int(cfg["seed"]), cfg["n_data"])
    except UserError:
        if couplings == "independent" or cfg["data"] is not None:
            raise
        data = None  # teacher couplings need no data; the evaluation then compares with the teacher's pairs
    if data is not None and teacher is not None and tuple(data.shape) != tuple(teacher.shape):
        raise UserError(f"--data {data.name} has samples of shape {list(data.shape)}, the teacher "
                        f"{list(teacher.shape)}")
    shape = tuple(data.shape) if data is not None else tuple(teacher.shape)
    kind = data.kind if data is not None else teacher.kind
    if teacher is None:  # a teacher's batch is checked on load
        check_batch_memory("--batch-size", int(cfg["batch_size"]), shape)
    cond = conditioning(cfg, teacher, data)  # classes, --guidance and --label-dropout checked in one line
    check_conditional(cond, couplings, data)
    pcfg = _pair_cfg(cfg, teacher) if couplings == "teacher" else None
    if pcfg is not None:
        pair_spec(pcfg, teacher, cond)  # bad pair options fail before any work
    net_cfg = _net_config(cfg, teacher, shape, kind)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = dict(getattr(net, "config", net_cfg))
    if cond.on:
        check_student_net(net, cond)
    # guidance from data enters the finest target; with a teacher it is in the teacher's pairs already
    w_target = cond.guidance if couplings == "independent" else 1.0
    process, M = LinearFlow(), int(cfg["base_steps"])
    sd = data.sigma_data if data is not None else float(teacher.meta.get("sigma_data", 0.5))
    D = ModelDenoiser(net, process, "flow", sd)
    rate = float(cfg["target_ema"])
    warn_slow_target(rate, M, int(cfg["steps"]))
    target = EMA(net, rate) if rate > 0 else None
    B = int(cfg["batch_size"])
    n_sc = int(B * float(cfg["sc_fraction"]))

    def plan(st):
        pinfo = {"teacher_evals": 0}
        x0_all = x1_all = l_all = None
        if pcfg is not None:
            lat, x0_all, pinfo = make_pairs(teacher, pcfg, st, cond)  # conditional: the guided teacher's, labelled
            l_all = pinfo.pop("labels")
            x1_all = lat / float(pinfo["sigma_max"])  # x_T = sigma_max z: the noise end is z

        def draw(gen, step):
            lab = None
            if x0_all is None:
                x0, lab = data.labelled(B, gen) if cond.on else (data.draw(B, gen), None)
                x1 = torch.randn(x0.shape, generator=gen)
                lab = cond.drop(lab, gen)
            else:
                idx = torch.randint(0, len(x0_all), (B,), generator=gen)
                x0, x1 = x0_all[idx], x1_all[idx]
                lab = l_all[idx] if l_all is not None else None
            t, d = draw_times(B, n_sc, M, gen, step)
            batch = {"x0": x0, "x1": x1, "t": t, "d": d}
            if lab is not None:
                batch["labels"] = lab
            return batch

        def loss(model, b):
            """L^S per sample (module docstring); the targets from the EMA target net (or the student)."""
            return shortcut_loss(model, target.module if target is not None else model, process, b["x0"], b["x1"],
                                 b["t"], b["d"], M, b.get("labels"), w_target)

        def describe(ema_module):
            D_ema = ModelDenoiser(ema_module, process, "flow", sd).eval()
            n = int(cfg["eval_samples"])
            g = torch.Generator().manual_seed(int(cfg["seed"]) + 77)
            labels = None
            if data is not None and cond.on:
                ref, labels = data.labelled(n, g)
            elif data is not None:
                ref = data.draw(n, g)
            else:
                pick = torch.randperm(len(x0_all), generator=g)[:n]
                ref, labels = x0_all[pick], (l_all[pick] if l_all is not None else None)
            if labels is not None:  # the teacher's null-label pairs are unconditional samples: evaluate at classes
                keep = labels >= 0
                ref, labels = ref[keep], labels[keep]
            measures = {**evaluate(D_ema, ref, shape, M, len(ref), int(cfg["seed"]), st.job.device, labels),
                        "reference": "data" if data is not None else "teacher pairs"}
            write_json(st.folder / "shortcut.json", measures)  # before model.json: a finished run has both
            return student_meta("shortcut", D, net_cfg, shape, kind, data.name if data is not None else teacher.name,
                                process.sigma_min, process.sigma_max, {"sampler": SHORTCUT, "base_steps": M}, cfg,
                                cond=cond, couplings=couplings,
                                shortcut={"base_steps": M, "sc_fraction": float(cfg["sc_fraction"]),
                                          "target_ema": rate, "level": "1000 t",
                                          "cond": f"1000 d (0 for d <= 1/{M})"},
                                cost={"teacher_evals": int(pinfo["teacher_evals"]), "seconds": st.seconds})

        extra = {"target": target.module} if target is not None else {}
        after = (lambda model, step: target.update()) if target is not None else None
        return Plan(Task(student=net, draw=draw, loss=loss, extra=extra, after_step=after), describe)

    job.stage("", plan)
