"""Minimizing trajectory curvature (Lee, Kim & Ye 2023, "Minimizing trajectory curvature of
ODE-based generative models", ICML 2023): a learned forward coupling q_phi(z | x0) trained
jointly with the flow, so that the generative ODE's trajectories straighten.

The interpolant is rectified flow's, in fewstep's time (:class:`~fewstep.process.LinearFlow`:
t = 1 noise, t = 0 data; the paper's code uses the same direction)::

    x_t = (1 - t) x0 + t z,     d x_t / dt = z - x0        (the paper's eq. 3; its loss, eq. 4)

Where the independent coupling pairs x0 with z ~ N(0, I), this method draws z from a Gaussian
encoder q_phi(z | x0) = N(mu_phi(x0), diag exp(logvar_phi(x0))), reparametrised (z = mu + exp(
logvar / 2) eps, eps ~ N(0, I), so the flow-matching loss reaches phi), and minimises jointly in
(theta, phi) the paper's joint training objective (the one that follows its coupling-only
objective; the paper reads it as a time-conditional beta-VAE whose decoder is the flow; in the
code, ``train_reverse_img_ddp.py``: ``loss = loss_fm + weight_prior * loss_prior``)::

    L(theta, phi) = E_{x0, eps, t} || v_theta(x_t, t) - (z - x0) ||^2  +  beta E_{x0} KL(q_phi(z | x0) || N(0, I))

The first term is the flow-matching loss on the learned coupling; at its minimum in theta it is
the coupling's "degree of intersection" E || (z - x0) - E[z - x0 | x_t] ||^2, which bounds the
curvature of the flow's trajectories from above (the paper's argument); the KL term keeps the
aggregate of q_phi near the prior N(0, I), from which generation starts (the encoder is dropped
after training, as a VAE's; the paper's README: "you don't need the encoder for generating
samples"). Both terms are per coordinate as in the paper's code (``F.mse_loss`` / ``torch.mean``
of the flow loss; ``get_kl`` divides the KL by the data dimension): per sample, the mean over
coordinates of the squared error plus beta KL / d (:func:`kl_to_prior`). ``--beta`` defaults
to 10, the paper's code's ``--weight_prior`` default (both its 2-D and its image script; its
README's image commands use 20).

Curvature (the paper's definition, stated right after eq. 3-4, and its code's ``straightness``
in ``utils.py``, reported by ``generate.py``): of a generative trajectory Z = {x_t} started at
x_1 = z,

    C(Z) = E_z int_0^1 || (z - x_0(z)) - d x_t / dt ||^2 dt

the mean squared deviation of the velocity from the chord, here per coordinate (the code's
``torch.mean`` over the batch and every coordinate). Discretised as the code does it, on the
Euler path of the flow: velocities v_i at the grid's times t_i, chord = (x_start - x_end) /
(t_start - t_end) (for Euler the dt-weighted mean of the v_i), C = sum_i dt_i mean ||v_i -
chord||^2 / sum_i dt_i (:func:`trajectory_curvature`; on the grid t_i = 1 - i / N it is the
code's ``straightness`` exactly). A constant-velocity flow has C = 0. ``min_curvature.json``
reports it for the saved (EMA) flow on its own 128-step Euler path (``--curvature-steps``, the
N = 128 of the paper's runs, its README's ``N128`` folders) from prior noise, beside the 1, 2 and 4-step Euler energy distance and
sliced-W2 of the saved flow to fresh data, the flow-matching residual on the learned coupling
(``intersection``, 16 midpoint times), the encoder's KL per coordinate, and the first two
moments of the aggregate q_phi(z) = E_x0 q_phi(z | x0) (how near the prior generation starts:
rms of the coordinate means, mean of the coordinate variances).

The model: an ordinary flow model (the ``flow`` prediction of LinearFlow, as reflow's rounds and
flow-matching's linear path): ``fewstep.load(run).sample(n, k)`` (its own rule: Euler uniform in
t) and ``fewstep sample RUN --nfe k --sampler euler`` start from the prior N(0, I), as the paper
does at generation. The encoder's weights are in the checkpoints (resume is bit for bit) and are
written beside the model as ``encoder.safetensors`` / ``encoder.json`` (:func:`load_encoder`).

The encoder: two nets of ``--encoder-net`` (default: the student's net config, unconditional),
one for mu and one for logvar, each called on x0 at the fixed level c_noise = 1000 (t = 1: the
paper's code calls its time-conditional encoder at t = 1, ``forward_model(x, ones)``). fewstep's
nets end in a zero-initialised layer, so the untrained encoder is q = N(0, I) exactly: training
starts from the independent coupling (KL 0).

Measured (tests/test_methods_min_curvature.py: the ring of 8, radius 2, std 0.25; a 2-block MLP of
width 64, 300 steps, batch 256, lr 3e-3, seeds 0-2): curvature per coordinate of the 128-step
Euler path from prior noise 0.51-0.53 with independent pairs (fewstep distill flow-matching, same
net, seed and budget), 0.32-0.33 at beta 10, 0.015-0.017 at beta 1 (KL per coordinate 0.015-0.024
and 0.44-0.51); 1-step Euler energy distance to the ring 0.86-0.91, 0.57-0.61 and 0.020-0.023
(the untrained net's one step, the noise itself: 0.23); 4 steps 0.02-0.03, 0.01-0.02, 0.01-0.02.
At 1000 steps (seed 0): 0.65 independent, 0.42 at beta 10.

Equation numbers: the paper's text could not be read here (only its code, github:sangyun884/
fast-ode, and summaries of the text, which name eq. 3-4 as the linear interpolant and its loss);
the curvature and the objective are therefore cited by name and by the code's functions, and
their forms are the code's.

The loop's log (``metrics.jsonl``): ``loss`` is the objective at the flow's step, ``critic_loss``
the objective at the encoder's step (the encoder is the loop's second network, below).

Deviations, and why:
  * the update: the shared runner optimises one student; the encoder is trained beside it as
    the loop's second network (:class:`~fewstep.train.loop.Critic`, own AdamW at the run's lr,
    betas, weight decay, warm-up and clipping), on the same batch (same x0, eps, t) and the same
    objective, one step each per loop step, the flow first: theta's step is the paper's gradient
    at (theta_k, phi_k), phi's at (theta_{k+1}, phi_k) (block-alternating instead of one joint
    Adam step; Adam's state is per parameter, so the two optimisers are the joint one but for
    that order and per-block gradient clipping). Each step runs the flow net twice (once per
    block), so a step costs about twice a flow-matching step.
  * times: t ~ U[t_min, t_max] = U[0.001, 0.999] (LinearFlow's training range, as fewstep's other
    flow methods, and the range its samplers start from) instead of the code's U[1e-5, 1].
  * the encoder: two nets (mean, log-variance) instead of one net with twice the output
    channels (fewstep's nets return a tensor shaped like their input); no EMA of the encoder
    (only the flow is used at generation; the saved encoder is the last one).
  * the paper's 2-D example uses a wide prior N(0, diag(36, 1)); the prior here is N(0, I), the
    prior every fewstep flow model samples from (as the paper's image experiments).
  * unconditional only (as the paper); a class-conditional teacher or --net is refused.
  * curvature on the model's own Euler grid (t from t_max = 0.999, x = t_max z, as fewstep's
    samplers start) rather than from t = 1; the measure is the same.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..io import save_checkpoint, write_json
from ..process import LinearFlow
from ..train.job import Critic, Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import N_DATA, bcast, conditioning, fixed_grids, is_exact, load_teacher, net_config, student_meta, \
    training_data

OPTIONS = (
    Option("beta", float, 10.0, "weight of the encoder's KL(q(z|x0) || N(0, I)) per coordinate; >= 0 (default 10, "
           "the paper's code's --weight_prior)", low=0.0),
    Option("encoder_net", (dict, str), None, "the encoder's net (mean and log-variance nets of this config) as "
           "JSON or a .json file", none="the student's net config",
           must="a JSON net config object (or its text, or a .json file)"),
    Option("curvature_steps", int, 128, "Euler steps of the path the curvature is measured on (default 128, the N "
           "of the paper's runs)", low=2),
    N_DATA,
    Option("eval_samples", int, 2000, "evaluation samples of min_curvature.json (default 2000)", low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)

EVAL_NFES = (1, 2, 4)
RULE_NFES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128)  # NFE of the model's own Euler rule
ENCODER_LEVEL = 1000.0  # c_noise of t = 1: the level the encoder nets are called at
INTERSECTION_LEVELS = 16


def check_options(cfg: dict) -> None:
    """The rules between options, before anything is written: the encoder's net config."""
    if cfg.get("encoder_net") is not None:
        from ..train.options import check_net

        check_net(cfg["encoder_net"], "--encoder-net")


# ------------------------------------------------------------------------ the idea
class Encoder(nn.Module):
    """q_phi(z | x0) = N(mu(x0), diag exp(logvar(x0))): two nets of ``net_cfg`` on x0 at level
    c_noise = 1000; ``forward(x0) -> (mu, logvar)``, each shaped like x0."""

    def __init__(self, net_cfg: dict):
        from ..nets import build_net

        super().__init__()
        self.mean = build_net(net_cfg)
        self.logvar = build_net(net_cfg)
        self.config = dict(getattr(self.mean, "config", net_cfg))

    def forward(self, x0: Tensor):
        c = torch.full((len(x0),), ENCODER_LEVEL, dtype=x0.dtype, device=x0.device)
        return self.mean(x0, c), self.logvar(x0, c)


def kl_to_prior(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per sample KL(N(mu, diag exp(logvar)) || N(0, I)) / d (closed form; per coordinate as the
    paper's ``get_kl``): 1/2 mean_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).mean(1)


def reparametrise(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(logvar / 2) eps: a draw of q(z | x0) differentiable in mu and logvar."""
    return mu + torch.exp(0.5 * logvar) * eps


def objective(v_net, process, mu: Tensor, logvar: Tensor, x0: Tensor, eps: Tensor, t: Tensor, beta: float):
    """Per sample L = || v(x_t, t) - (z - x0) ||^2 (mean over coordinates) + beta KL / d, z =
    reparametrise(mu, logvar, eps), x_t = (1 - t) x0 + t z; returns (L, the flow-matching part)."""
    z = reparametrise(mu, logvar, eps)
    tb = bcast(t, x0)
    x_t = (1 - tb) * x0 + tb * z
    v = v_net(x_t, process.c_noise(t).to(x_t.dtype))
    fm = (v - (z - x0)).pow(2).flatten(1).mean(1)
    return fm + float(beta) * kl_to_prior(mu, logvar), fm


# ----------------------------------------------------------------------- curvature
@torch.no_grad()
def trajectory_curvature(velocity, x: Tensor, times: Tensor) -> float:
    """C = sum_i dt_i mean || v_i - chord ||^2 / sum_i dt_i on the Euler path from ``x`` at
    times[0] down the decreasing grid ``times`` (v_i = velocity(x_i, t_i), x_{i+1} = x_i + (t_{i+1}
    - t_i) v_i, chord = (x_0 - x_N) / (t_0 - t_N)); the mean over the batch and every coordinate
    (the paper's curvature, module docstring). ``velocity(x, t)`` takes t per sample."""
    times = torch.as_tensor(times, dtype=x.dtype, device=x.device)
    dts = times[:-1] - times[1:]
    if not bool((dts > 0).all()):
        raise ValueError("the curvature's times must decrease")
    vs, start = [], x
    for i in range(len(dts)):
        v = velocity(x, torch.full((len(x),), float(times[i]), dtype=x.dtype, device=x.device))
        vs.append(v)
        x = x - dts[i] * v
    chord = (start - x) / dts.sum()
    dev = torch.stack([(v - chord).pow(2).flatten(1).mean(1).mean() for v in vs])
    return float((dts * dev).sum() / dts.sum())


def flow_velocity(net, process):
    """v(x, t) = net(x, c_noise(t)): the velocity the flow prediction of the linear path trains
    (what every sampler integrates)."""
    return lambda x, t: net(x, process.c_noise(t).to(x.dtype))


def model_times(process, steps: int) -> Tensor:
    """The times of the model's own ``steps``-step Euler rule: t_max - i (t_max - t_min) / steps, then 0."""
    from . import get

    sig = get("reflow").euler_grid(process, int(steps)).double()
    return process.t_of_sigma(sig)


@torch.no_grad()
def flow_curvature(net, process, z: Tensor, steps: int = 128) -> float:
    """The curvature of the flow ``net``'s own ``steps``-step Euler path from prior noise z (x = t_max z
    at t_max, as the samplers start from sigma_max z)."""
    times = model_times(process, steps).to(z.device)
    return trajectory_curvature(flow_velocity(net, process), float(times[0]) * z, times)


# ----------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(net, encoder, process, data, sigma_data: float, n: int, seed: int, steps: int, beta: float,
             device) -> dict:
    """min_curvature.json's measures (module docstring) of the flow ``net`` and the ``encoder``."""
    from ..denoiser import ModelDenoiser
    from ..metrics import energy_distance, sliced_w2
    from ..samplers import get as sampler
    from . import get

    euler_grid = get("reflow").euler_grid
    D = ModelDenoiser(net, process, "flow", sigma_data).eval()
    g = torch.Generator().manual_seed(int(seed) + 424242)
    z = torch.randn((n,) + tuple(data.shape), generator=g).to(device)
    ref = data.draw(n, g).to(device)
    gc = torch.Generator().manual_seed(int(seed) + 77)
    x0 = data.draw(n, gc).to(device)
    eps = torch.randn(x0.shape, generator=gc).to(device)
    mu, logvar = encoder.eval()(x0)
    zq = reparametrise(mu, logvar, eps)
    intersection = 0.0
    for j in range(INTERSECTION_LEVELS):
        t = torch.full((n,), (j + 0.5) / INTERSECTION_LEVELS, dtype=x0.dtype, device=device)
        intersection += float(objective(net, process, mu, logvar, x0, eps, t, 0.0)[1].mean()) / INTERSECTION_LEVELS
    zf = zq.flatten(1)
    out = {"beta": float(beta), "curvature": flow_curvature(net, process, z, steps), "curvature_steps": int(steps),
           "intersection": intersection, "kl": float(kl_to_prior(mu, logvar).mean()),
           "aggregate": {"mean_rms": float(zf.mean(0).pow(2).mean().sqrt()), "var_mean": float(zf.var(0).mean())},
           "eval_samples": n, "energy_distance": {}, "sliced_w2": {}}
    for k in EVAL_NFES:
        x = sampler("euler")(D, process.sigma_max * z, euler_grid(process, k).to(device))
        out["energy_distance"][str(k)] = energy_distance(x.flatten(1), ref.flatten(1))
        out["sliced_w2"][str(k)] = sliced_w2(x, ref)
    return out


def load_encoder(run, device=None) -> Encoder:
    """The encoder q_phi(z | x0) saved beside a finished run's model (``encoder.safetensors``), frozen."""
    from pathlib import Path

    from ..io import load_weights, read_json

    folder = Path(str(run))
    if not (folder / "encoder.json").is_file():
        raise UserError(f"{run} holds no encoder (no encoder.json); give a finished min-curvature run folder")
    meta = read_json(folder / "encoder.json")
    enc = Encoder(meta["net"])
    enc.load_state_dict(load_weights(folder / "encoder.safetensors"))
    return enc.to(device or "cpu").eval().requires_grad_(False)


# ---------------------------------------------------------------------------- stages
def stages(job):
    """One stage in the top folder: the flow and the encoder on the paper's joint objective."""
    from ..nets import build_net

    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, required=False, cfg=cfg, method="min-curvature")
    data = training_data(cfg, teacher)
    conditioning(cfg, teacher, data)  # refuses --guidance / --label-dropout without classes
    src = teacher if teacher is not None and not is_exact(teacher) else None
    net_cfg = net_config(cfg["net"], src, data.shape, data.kind)
    if (teacher is not None and int(teacher.num_classes or 0)) or int(net_cfg.get("num_classes") or 0):
        raise UserError("min-curvature trains unconditional flows (as the paper); give an unconditional teacher or "
                        "--net without num_classes")
    enc_cfg = net_config(cfg["encoder_net"], src, data.shape, data.kind) if cfg["encoder_net"] else dict(net_cfg)
    enc_cfg.update({k: v for k, v in (("num_classes", 0), ("use_cond", False)) if k in enc_cfg})
    process, beta, B = LinearFlow(), float(cfg["beta"]), int(cfg["batch_size"])
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)  # first, so the flow starts as flow-matching's of the same seed
    full_cfg = dict(getattr(net, "config", net_cfg))
    encoder = Encoder(enc_cfg)
    enc_cfg = dict(encoder.config)

    def plan(st):
        from ..denoiser import ModelDenoiser
        from . import get

        def draw(gen, step):
            x0 = data.draw(B, gen)
            return {"x0": x0, "eps": torch.randn(x0.shape, generator=gen), "t": process.sample_t(B, generator=gen)}

        def loss(model, b):
            """theta's step: the objective with the encoder's draws fixed (its weights take no gradient)."""
            with torch.no_grad():
                mu, logvar = encoder(b["x0"])
            return objective(model, process, mu, logvar, b["x0"], b["eps"], b["t"], beta)[0]

        def encoder_loss(enc_model, model, b):
            """phi's step: the same objective, differentiated through z = mu + exp(logvar / 2) eps."""
            mu, logvar = enc_model(b["x0"])
            return objective(model, process, mu, logvar, b["x0"], b["eps"], b["t"], beta)[0]

        def describe(ema_module):
            measures = evaluate(ema_module, encoder, process, data, data.sigma_data, int(cfg["eval_samples"]),
                                int(cfg["seed"]), int(cfg["curvature_steps"]), beta, st.job.device)
            measures["cost"] = {"seconds": st.seconds, "flow_evals_per_step": 2}
            write_json(st.folder / "min_curvature.json", measures)
            save_checkpoint(st.folder, encoder.state_dict(), {"role": "encoder", "method": "min_curvature",
                                                               "net": enc_cfg, "level": ENCODER_LEVEL,
                                                               "q": "N(mean(x0), diag exp(logvar(x0)))"},
                            name="encoder")
            D = ModelDenoiser(ema_module, process, "flow", data.sigma_data)
            eg = get("reflow").euler_grid
            sampling = {"sampler": "euler", "grids": fixed_grids({k: eg(process, k) for k in RULE_NFES})}
            return student_meta("min_curvature", D, full_cfg, data.shape, data.kind, data.name, process.sigma_min,
                                process.sigma_max, sampling, cfg, cost=measures["cost"],
                                interpolant={"path": "linear", "gamma": 0.0, "coupling": "learned encoder",
                                             "ode_only": False},
                                min_curvature={"beta": beta, "encoder": "encoder.safetensors",
                                               "curvature": measures["curvature"]})

        critic = Critic(module=encoder, loss=encoder_loss, critic_first=False)
        return Plan(Task(student=net, draw=draw, loss=loss, critic=critic), describe)

    job.stage("", plan)
