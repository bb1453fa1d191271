"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, "Mean flows for one-step generative modeling").

The flow path is z_t = (1 - t) x + t eps (t = 1 noise, t = 0 data: the paper's convention
is fewstep's :class:`~fewstep.process.LinearFlow` as it stands, no time reversal), with
instantaneous velocity v(z_t, t) = E[eps - x | z_t]. A MeanFlow net models the *average*
velocity over [r, t] (the paper's definition of u):

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau,           so  z_r = z_t - (t - r) u(z_t, r, t)

Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v du/dz + du/dt   (r held fixed)

and the training target (the paper's loss, its u_tgt with a stop-gradient)

    u_tgt = v_t - (t - r) sg(v_t du_theta/dz + du_theta/dt),   L = || u_theta(z_t, r, t) - sg(u_tgt) ||^2

The total derivative is one Jacobian-vector product of u_theta(z, r, t) with the tangent
(v_t, 0, 1) for (z, r, t) (:func:`total_derivative`, ``torch.func.jvp``; the official code's
``jax.jvp(u_fn, (z_t, t, r), (v, 1, 0))``); u_theta is the same evaluation's primal output.

What the paper's code does and this module follows (github:Gsunshine/meanflow, meanflow.py,
``MeanFlow.forward`` / ``sample_tr`` / ``solver_step``):
  * (t, r): two logit-normal draws sigmoid(N(-0.4, 1)) per sample, t the larger, r the
    smaller (``--time-dist uniform``: U[0, 1] draws); then r = t on the first
    int(B (1 - ratio)) samples of the batch (``--ratio``: the share with r != t, 0.25 as
    the paper's best and its code's data_proportion = 0.75) -- those are plain flow matching.
  * v_t: the conditional velocity eps - x (training from scratch on ``--data``).
  * adaptive loss weighting: with sq = || u_theta - u_tgt ||^2 summed over coordinates, the
    per-sample loss is sg(w) sq, w = 1 / (sq + c)^p (``--weight-p`` p = 1.0, the paper's
    choice; ``--weight-c`` c = 0.01, the code's norm_eps; p = 0 is the plain squared error).
    With the stop-gradient, p = 1 descends E log(sq + c): the mean-squared fit where sq
    concentrates (high dimension), but biased in 2-D with the noisy conditional velocity (ring
    of 8, 4000 steps: 1-step energy distance 0.011 at p = 1, 0.005 at p = 0.5, 0.0066 at p = 0;
    with a teacher's noise-free velocity p = 1 reaches 0.0021). Low-dimensional runs from data
    may want ``--weight-p 0``.
  * the net is conditioned on (t, t - r), the code's ``u_fn(z, t, h = t - r)``, both as they
    are, in [0, 1] (its sinusoidal embeddings of raw t and h): here t is the net's level input
    and t - r goes through its extra scalar input ``cond`` (use_cond=True,
    :mod:`fewstep.nets.embed`; :func:`fewstep.model.mean_velocity`). Not fewstep's flow level
    c_noise(t) = 1000 t: the identity differentiates u in t, and a level 1000 t makes the
    embedding (frequencies up to 1 per unit level) 1000x steeper in t; on Gaussian data
    (where u is known) 1500 steps left the long-interval u 2-5x further from the truth with
    it (rms 0.48-0.61 against 0.12-0.22). cond = 0 (r = t) is the instantaneous velocity, so
    the trained net is also a flow model: model.json's ``"denoiser": {"kind": "meanflow"}``
    loads it as :class:`fewstep.model.MeanFlowDenoiser`, D(y, sigma) = z_t - t v(z_t, t).
  * sampling: one step z_0 = z_1 - u(z_1, 0, 1) from z_1 = eps; k steps on the uniform grid
    t_i = 1 - i / k, z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z_{t_i}, t_{i+1}, t_i).
    model.json's ``"sampling": {"sampler": "meanflow"}`` makes ``fewstep.load(run).sample(n, k)``
    and ``fewstep sample RUN --nfe k`` run it (:func:`fewstep.model.meanflow_sample`); a named
    ``--sampler`` (euler, heun, ...) samples the flow u(z, t, t) = v(z, t) on its grid instead.

Distillation form (``--teacher RUN``): v_t is the teacher's marginal velocity v(z_t, t) in
place of the conditional one (the identity holds for the true v; the conditional velocity
is its unbiased stand-in), z_t still built from the teacher's data. A flow teacher (flow
prediction on the linear flow: ``fewstep train`` with the flow process, a reflow round) is
asked through its net, v = net(z_t, 1000 t), at any t; another teacher (an exact
``gmm:FILE.npz``, an EDM / VP run) through its denoiser, v = (y - D(y, sigma)) / sigma - D at
y = z_t / (1 - t), sigma = t / (1 - t) (reflow's :func:`~fewstep.methods.reflow.velocity`),
t clamped to the teacher's [sigma_min, sigma_max] (a network teacher) or to
[1e-6, 1 - 1e-6] (an exact mixture). With ``--init auto`` a flow teacher whose net is the
student's but for ``use_cond`` gives its weights: everything but the cond embedding is
copied, and the cond embedding's output layer is zeroed, so the student starts as the
teacher's velocity for every (r, t) (u_0(z, r, t) = v_teacher(z, t)); the student then keeps
the teacher's time inputs, level 1000 t and cond 1000 (t - r) (``time_scale`` 1000 in
model.json), for its weights to mean what they meant. Otherwise the student starts from
random weights with time_scale 1 (model.json ``"init"`` says which).

Class labels and guidance (the paper's Sec. 4.3, its ImageNet runs; the code's ``guidance_fn`` and
``cond_drop``): a class-conditional teacher, or ``--net`` with ``num_classes`` on labelled data,
trains u(z, r, t | c); ``--label-dropout`` p (the code's ``class_dropout_prob`` 0.1) replaces a share
p of the labels by the null label, whose rows learn the unconditional field from the plain v_t.
From data, ``--guidance`` omega and ``--kappa`` kappa replace v_t on the labelled rows with t in
[``--guidance-start``, ``--guidance-end``] by

    v~ = omega v_t + kappa u_theta(z_t, t, t | c) + (1 - omega - kappa) u_theta(z_t, t, t | null)

(no gradient through the u's; :func:`guided_velocity`), so the one-step student samples guided
at omega / (1 - kappa) (recorded as the model's built-in ``guidance``; the code's defaults are
omega 1, kappa 0.5). From a teacher, v~ is the teacher's own guided velocity v(null) + omega (v(c) -
v(null)) (exact for a mixture), so --kappa is refused there. A student distilled at omega = 1 with a
null branch can be guided at sampling instead (``--guidance w`` on ``sample``: u_null + w (u_c -
u_null) each step, two halves in one batched call).

Deviations (and why): the loop's
AdamW, learning rate and EMA (the shared runner's options) stand in for the paper's
Adam(beta2 = 0.95), lr 1e-4 and EMA 0.9999; the model.json process is ``LinearFlow()``
(t in [1e-3, 0.999]) for the other samplers, while training draws t in (0, 1) and the own
rule starts at t = 1 exactly, as the paper's.

``meanflow.json`` (written with the model): 1- and 2-step sliced-W2 and energy distance of
the EMA student's samples (fixed noise) to fresh data draws (exact samples for a mixture).
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import UserError
from ..io import write_json
from ..model import MEANFLOW, MeanFlowDenoiser, mean_velocity, meanflow_sample
from ..process import LinearFlow
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import N_DATA, bcast, check_student_net, conditioning, is_exact, load_teacher, cond_net_config, student_meta, \
    training_data

TIME_DISTS = ("logit_normal", "uniform")
OPTIONS = (
    Option("ratio", float, 0.25, "share of each batch with r != t (the others have r = t: plain flow matching); "
           "default 0.25, the paper's best", test=lambda v: 0.0 <= v <= 1.0, must="a number from 0 to 1",
           example=0.25),
    Option("time_dist", str, "logit_normal", "distribution of the two draws giving t (the larger) and r: "
           "logit_normal (default, the paper's) or uniform", choices=TIME_DISTS),
    Option("time_mu", float, -0.4, "mean of the logit-normal time draws (default -0.4, the paper's)"),
    Option("time_sigma", float, 1.0, "standard deviation of the logit-normal time draws (default 1.0, the paper's)",
           low=0.0, above=True),
    Option("weight_p", float, 1.0, "power p of the adaptive loss weight 1 / (||delta||^2 + c)^p; 0: plain squared "
           "error (default 1.0, the paper's)", low=0.0),
    Option("weight_c", float, 0.01, "constant c of the adaptive loss weight (default 0.01, the official code's)",
           low=0.0, above=True),
    Option("kappa", float, 0.0, "class-conditional runs from data: share kappa of the student's own conditional "
           "velocity in the guided target w v_t + kappa u(z, t, t | c) + (1 - w - kappa) u(z, t, t | null); the "
           "effective guidance is w / (1 - kappa) (default 0; the paper's ImageNet runs 0.5 with --guidance 1)",
           test=lambda v: 0.0 <= v < 1.0, must="a number in [0, 1)", example=0.5),
    Option("guidance_start", float, 0.0, "guidance (--guidance, --kappa) only for t in [start, end], else the plain "
           "velocity (default 0, the paper's code's t_start)", test=lambda v: 0.0 <= v <= 1.0,
           must="a number from 0 to 1", example=0.0),
    Option("guidance_end", float, 1.0, "end of the t interval with guidance (default 1, the paper's code's t_end)",
           test=lambda v: 0.0 <= v <= 1.0, must="a number from 0 to 1", example=1.0),
    Option("init", str, "auto", "student start: auto (a flow teacher's weights where the nets agree, else random) "
           "or random", choices=("auto", "random")),
    N_DATA,
    Option("eval_samples", int, 2000, "samples of the 1- and 2-step evaluation in meanflow.json (default 2000)",
           low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
EVAL_STEPS = (1, 2)


# ------------------------------------------------------------------------ the idea
def sample_times(n: int, gen: torch.Generator, dist: str = "logit_normal", mu: float = -0.4, sigma: float = 1.0,
                 ratio: float = 0.25):
    """(t, r), each [n]: two draws per sample (sigmoid(N(mu, sigma^2)) or U[0, 1]), t the larger
    and r the smaller; r = t on the first int(n (1 - ratio)) samples (the official code's
    ``sample_tr``)."""
    if dist == "logit_normal":
        a = torch.sigmoid(mu + sigma * torch.randn(2, n, generator=gen))
    elif dist == "uniform":
        a = torch.rand(2, n, generator=gen)
    else:
        raise UserError(f"--time-dist {dist}: use {' or '.join(TIME_DISTS)}")
    t, r = a.max(0).values, a.min(0).values
    same = int(n * (1.0 - float(ratio)))
    r[:same] = t[:same]
    return t, r


def total_derivative(net, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                     time_scale: float = 1.0, **cond):
    """(u_theta(z, r, t), d/dt u_theta = v du/dz + du/dt): one forward-mode JVP of u_theta
    (:func:`fewstep.model.mean_velocity`) with the tangent (v, 0, 1) for (z, r, t). u keeps its
    graph (the loss's gradient goes through it)."""
    def u_fn(z_, r_, t_):
        return mean_velocity(net, z_, r_, t_, time_scale, **cond)

    return torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))


def meanflow_target(net, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                    time_scale: float = 1.0, **cond):
    """(u_theta(z, r, t), u_tgt) with u_tgt = v - (t - r) d/dt u_theta (:func:`total_derivative`),
    detached: the paper's stop-gradient target of the MeanFlow identity."""
    u, dudt = total_derivative(net, z, r, t, v, time_scale, **cond)
    return u, (v - bcast(t - r, z) * dudt).detach()


def adaptive_loss(delta: torch.Tensor, p: float = 1.0, c: float = 0.01) -> torch.Tensor:
    """Per-sample sg(w) ||delta||^2 with w = 1 / (||delta||^2 + c)^p (squared norm summed over
    coordinates, as the official code); p = 0 is the squared error itself."""
    sq = delta.pow(2).flatten(1).sum(1)
    if float(p) == 0.0:
        return sq
    return sq * (sq.detach() + float(c)).pow(-float(p))


def _is_flow_net(teacher) -> bool:
    from ..denoiser import ModelDenoiser

    D = getattr(teacher, "denoiser", None)
    return isinstance(D, ModelDenoiser) and D.prediction == "flow" and isinstance(D.process, LinearFlow)


def teacher_velocity(teacher, guidance: float = 1.0):
    """v(z_t, t, labels=None) -> the teacher's marginal velocity of the linear flow at time t (module
    docstring): a flow teacher's net itself, else any denoiser's v = (y - D) / sigma - D; with
    labels and ``guidance`` w != 1, the guided v(null) + w (v(c) - v(null)) (classifier-free guidance
    on the velocity, which is affine in the denoiser)."""
    from ..model import guided_field

    D = teacher.denoiser
    if _is_flow_net(teacher):
        net, proc = D.net, D.process

        def field(z, t, labels=None):
            return net(z, proc.c_noise(t), **({"labels": labels} if labels is not None else {})).to(z.dtype)

        return guided_field(field, guidance)
    from . import get

    velocity = get("reflow").velocity
    if is_exact(teacher):
        lo, hi = 1e-6, 1.0 - 1e-6
    else:
        lo, hi = (s / (1.0 + s) for s in (float(teacher.sigma_min), float(teacher.sigma_max)))

    def field(z, t, labels=None):
        dt = teacher.dtype
        Dc = D if labels is None else (lambda y, sigma: D(y, sigma, labels=labels))
        return velocity(Dc, z.to(dt), t.to(dt).clamp(lo, hi)).to(z.dtype)

    return guided_field(field, guidance)


def _net_config(cfg: dict, teacher, data) -> dict:
    """The student's net: ``--net``, else the teacher's, else the data's default, with use_cond on
    (t - r goes through ``cond``)."""
    return cond_net_config(cfg["net"], teacher, data.shape, data.kind, "MeanFlow feeds t - r")


def guided_velocity(v: torch.Tensor, t: torch.Tensor, labels, u_cond, u_null, omega: float, kappa: float = 0.0,
                    start: float = 0.0, end: float = 1.0) -> torch.Tensor:
    """The paper's guided field v~ (its Sec. 4.3 and eq. with kappa; the official code's
    ``guidance_fn`` and ``cond_drop``): on rows with a class label and t in [start, end],

        v~ = omega v_t + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null),

    the u's the student's own instantaneous velocities without a gradient (``u_cond``, ``u_null``:
    callables of the row mask, evaluated only on those rows); elsewhere (null-label rows, t outside)
    v~ = v_t. At its fixed point the conditional student's velocity is u_null + omega / (1 - kappa)
    (E[v_t | c] - u_null): classifier-free guidance at omega / (1 - kappa), learned in one step."""
    if labels is None or (float(omega) == 1.0 and float(kappa) == 0.0):
        return v
    rows = (labels >= 0) & (t >= float(start)) & (t <= float(end))
    if not bool(rows.any()):
        return v
    out = v.clone()
    mix = float(omega) * v[rows] + (1.0 - float(omega) - float(kappa)) * u_null(rows)
    if float(kappa) != 0.0:
        mix = mix + float(kappa) * u_cond(rows)
    out[rows] = mix.to(v.dtype)
    return out


def init_from_teacher(net, teacher) -> bool:
    """Copy a flow teacher's weights into the student where the architectures agree (the
    teacher's net is the student's without use_cond): all but the cond embedding, whose output
    layer is zeroed so the student starts as the teacher's velocity for every (r, t). Returns
    whether it did."""
    from ..nets.embed import ConditionEmbedding

    if teacher is None or not _is_flow_net(teacher):
        return False
    tnet = teacher.denoiser.net
    if dict(getattr(tnet, "config", {})) != {**net.config, "use_cond": False}:
        return False
    missing, unexpected = net.load_state_dict(tnet.state_dict(), strict=False)
    if unexpected or any(".cond." not in k for k in missing):
        raise UserError(f"teacher {teacher.name}: its net's weights do not fit the student's (missing "
                        f"{missing[:2]}, unexpected {unexpected[:2]}); use --init random")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ConditionEmbedding) and m.cond is not None:
                m.cond.fc2.weight.zero_()
                m.cond.fc2.bias.zero_()
    return True


# ----------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(D, data, n: int, seed: int, device, conditional: bool = False) -> dict:
    """1- and 2-step samples of the MeanFlow rule from fixed noise against fresh data draws (a
    conditional student at the draws' labels): sliced-W2 and energy distance."""
    from ..metrics import energy_distance, sliced_w2

    g = torch.Generator().manual_seed(int(seed) + 424242)
    z = torch.randn((n,) + tuple(data.shape), generator=g).to(device)
    ref, labels = data.labelled(n, g) if conditional else (data.draw(n, g), None)
    ref = ref.to(device)
    extra = {"labels": labels.to(device)} if labels is not None else None
    out = {"sliced_w2": {}, "energy_distance": {}, "eval_samples": n}
    for k in EVAL_STEPS:
        x = meanflow_sample(D, z, torch.linspace(1.0, 0.0, k + 1, dtype=torch.float64), extra)
        out["sliced_w2"][str(k)] = sliced_w2(x, ref)
        out["energy_distance"][str(k)] = energy_distance(x.flatten(1), ref.flatten(1))
    return out


def _check_guidance(cond, kappa: float, window, teacher, data) -> None:
    """The rules of a class-conditional run, before anything is written (one line each)."""
    lo, hi = window
    if not cond.on:
        if kappa:
            raise UserError(f"--kappa {kappa:g}: this run is unconditional; --kappa mixes a class-conditional "
                            f"student's own velocities into its guided target")
        return
    if not data.num_classes:
        raise UserError(f"the run is class-conditional but the training data {data.name} has no labels; give "
                        f"labelled --data")
    if lo > hi:
        raise UserError(f"--guidance-start {lo:g} is after --guidance-end {hi:g}; give start <= end")
    if teacher is not None and kappa:
        raise UserError(f"--kappa {kappa:g} with --teacher: the teacher gives the guided velocity itself "
                        f"(--guidance); --kappa is for training from data; leave it out")
    if teacher is None and (cond.guidance != 1.0 or kappa) and not cond.label_dropout > 0:
        raise UserError(f"--guidance {cond.guidance:g} / --kappa {kappa:g} from data guide with the student's own "
                        f"unconditional velocity, which only --label-dropout trains; give --label-dropout 0.1 "
                        f"(the paper's)")


# ----------------------------------------------------------------------- the stage
def stages(job):
    """One stage in the top folder: the MeanFlow objective on the data (or the teacher's velocity)."""
    from ..nets import build_net

    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, required=False, cfg=cfg, method="meanflow")
    data = training_data(cfg, teacher)
    net_cfg = _net_config(cfg, teacher, data)
    cond = conditioning(cfg, teacher, data)  # classes, --guidance and --label-dropout checked in one line
    omega, kappa = cond.guidance, float(cfg["kappa"])
    window = (float(cfg["guidance_start"]), float(cfg["guidance_end"]))
    _check_guidance(cond, kappa, window, teacher, data)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = dict(getattr(net, "config", net_cfg))
    if cond.on:
        check_student_net(net, cond)
    init = "teacher" if cfg["init"] == "auto" and init_from_teacher(net, teacher) else "random"
    # the time inputs: t and t - r as the paper's code; a flow teacher's weights keep its level c_noise(t) = 1000 t
    scale = float(teacher.denoiser.process.c_noise(1.0)) if init == "teacher" else 1.0
    D = MeanFlowDenoiser(net, data.sigma_data, scale)
    process = D.process
    v_teacher = teacher_velocity(teacher, omega) if teacher is not None else None
    B = int(cfg["batch_size"])
    times = {"dist": cfg["time_dist"], "mu": float(cfg["time_mu"]), "sigma": float(cfg["time_sigma"]),
             "ratio": float(cfg["ratio"])}
    p, c = float(cfg["weight_p"]), float(cfg["weight_c"])

    effective = omega / (1.0 - kappa) if v_teacher is None else omega  # the built-in guidance (model.json)

    def plan(st):
        def draw(gen, step):
            x0, labels = data.labelled(B, gen) if cond.on else (data.draw(B, gen), None)
            eps = torch.randn(x0.shape, generator=gen)
            t, r = sample_times(B, gen, **times)
            batch = {"x0": x0, "eps": eps, "t": t, "r": r}
            if cond.on:
                batch["labels"] = cond.drop(labels, gen)
            return batch

        def loss(model, b):
            """The MeanFlow loss per sample: sg(w) || u_theta(z_t, r, t | c) - sg(u_tgt) ||^2, v_t guided
            (from data: :func:`guided_velocity`; from a teacher: its guided velocity)."""
            x0, eps, t, r, labels = b["x0"], b["eps"], b["t"], b["r"], b.get("labels")
            T = bcast(t, x0)
            z = (1 - T) * x0 + T * eps
            lab = {"labels": labels} if labels is not None else {}
            with torch.no_grad():
                if v_teacher is not None:
                    v = v_teacher(z, t, **lab)
                else:
                    def own(rows, null=False):  # the student's u(z, t, t | c or null) on those rows
                        lr = torch.full_like(labels[rows], -1) if null else labels[rows]
                        return mean_velocity(model, z[rows], t[rows], t[rows], scale, labels=lr)

                    v = guided_velocity(eps - x0, t, labels, own, lambda rows: own(rows, True), omega, kappa,
                                        *window)
            u, target = meanflow_target(model, z, r, t, v, scale, **lab)
            return adaptive_loss(u - target, p, c)

        def describe(ema_module):
            D_ema = MeanFlowDenoiser(ema_module, data.sigma_data, scale).eval()
            measures = evaluate(D_ema, data, int(cfg["eval_samples"]), int(cfg["seed"]), st.job.device, cond.on)
            write_json(st.folder / "meanflow.json", measures)
            return student_meta("meanflow", D, net_cfg, data.shape, data.kind, data.name, process.sigma_min,
                                process.sigma_max, {"sampler": MEANFLOW, "times": "uniform"}, cfg,
                                cond=dataclasses.replace(cond, guidance=effective),
                                denoiser={"kind": MEANFLOW, "sigma_data": float(data.sigma_data), "time_scale": scale},
                                velocity="teacher" if teacher is not None else "conditional", init=init,
                                meanflow={"ratio": times["ratio"], "time_dist": times["dist"],
                                          "time_mu": times["mu"], "time_sigma": times["sigma"],
                                          "weight_p": p, "weight_c": c, "time_scale": scale,
                                          **({"omega": omega, "kappa": kappa, "guidance_interval": list(window)}
                                             if cond.on else {})},
                                cost={"teacher_evals": int(cfg["steps"]) * B if teacher is not None else 0,
                                      "seconds": st.seconds})

        return Plan(Task(student=net, draw=draw, loss=loss), describe)

    job.stage("", plan)
