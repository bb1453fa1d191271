"""Shortcut fine-tuning with policy gradient (Fan & Lee 2023, "Optimizing DDPM sampling with
shortcut fine-tuning", ICML 2023, SFT-PG; official code github:UW-Madison-Lee-Lab/SFT-PG,
``finetune.py``, ``critic.py``, ``toy_exp/train.py``).

The teacher's network defines a few-step stochastic sampler, the DDPM-style Gaussian chain on a
fixed grid sigma_0 > ... > sigma_{T'-1} > 0 of T' steps (in sigma-space, y = x / sqrt(alpha_bar);
the registered ``ddpm`` sampler's transitions, :mod:`fewstep.samplers.ancestral`)

    p_theta(y_{i+1} | y_i) = N( D_theta(y_i) + (d_i / s_i)(y_i - D_theta(y_i)),  u_i^2 I ),
    (d_i, u_i) = the posterior's split of the step s_i -> s_{i+1} (``--variance small``, the
    FastDPM kappa = 1 chain of the paper's image runs) or beta_t (``large``, its toy chain),
    y_0 = s_0 z,   x_0 = D_theta(y_{T'-1}, s_{T'-1})  (the last step, to sigma = 0, is the mean),

and SFT fine-tunes theta, starting from the teacher's weights, to minimise an integral
probability metric between its samples and the data instead of following the backward
process. The IPM is the Wasserstein-1 distance in its dual form (the paper's problem statement)

    W(p_theta, q) = sup_{||f||_L <= 1}  E_{p_theta} f(x_0) - E_q f(x_0),

with the critic f_phi trained by ascending that difference (here with WGAN-GP's penalty, see
below). The paper's policy-gradient theorem (Sec. 4) writes the gradient of the IPM at the
optimal critic as a policy gradient of the chain with f as its terminal reward, and its
variance reduction subtracts a learned baseline, the value function V_omega(y_i, i)
regressed on f(x_0) (the code's ``v``):

    grad_theta W = E[ sum_i ( f(x_0) - V(y_i, i) ) grad_theta log p_theta(y_{i+1} | y_i) ],
    min_omega  E[ sum_i ( V(y_i, i) - f(x_0) )^2 ].

Training alternates (their Algorithm 1, SFT-PG; the loop's :class:`fewstep.train.loop.Critic`): every loop
step draws fresh trajectories of the current sampler and a data batch and takes one step of f
and V; every ``--n-critic`` steps (their 5) the sampler takes one step of the surrogate

    L(theta) = sum_{i stochastic} sg( f(x_0) - V(y_i, i) ) log p_theta(y_{i+1} | y_i)
               + f( D_theta(y_{T'-1}, s_{T'-1}) )                          (minimised),

on the same trajectories (the critic and value already updated on them, as in the code, whose
generator step follows its critic step). f is high on generated samples and low on data, so
the sampler lowers E f(x_0). ``--estimator path`` takes instead the reparametrised (path)
gradient of E f(x_0) through the whole chain (y_{i+1} = mean_theta(y_i) + u_i eps with the
same noise, the GAN-style alternative the paper argues against for memory: it backpropagates
through all T' network calls); both estimate the same gradient.

The saved student keeps the teacher's parametrization; its model.json holds the one fixed rule
(sampler ``ddpm``, the T'-step grid, the variance), so ``fewstep.load(RUN).sample(n, T')`` and
``fewstep sample RUN --nfe T'`` run exactly the chain that was trained. sft.json records the
energy distance and sliced W2 to the data of the untuned chain (the teacher's own weights) and
of the tuned one, from the same noise.

Deviations, and why:

- The last step. The ``ddpm`` rule returns the mean D_theta(y_{T'-1}) at sigma = 0 (no noise);
  the paper's chains add a tiny noise there (std 0.001 in its FastDPM chain, sqrt(beta_1) in the
  toy) and include that step in the policy gradient, whose variance grows as 1 / std^2. Here the
  last step's dependence on theta is taken by its exact path gradient, grad f(D_theta(y_{T'-1}))
  (one network call, the critic's weights frozen), the other T' - 1 Gaussian steps by the
  policy gradient: the sum is still an unbiased gradient of E f(x_0), and the sampler trained
  is exactly the saved rule. With T' = 1 there is no Gaussian step and this is plain path
  (GAN) training.
- The Lipschitz critic. The theory needs the optimal 1-Lipschitz critic; the public code trains
  an unconstrained MLP (toy) or conv net (images). Here the Lipschitz class is kept by WGAN-GP's
  two-sided gradient penalty (Gulrajani et al. 2017) on points between data and samples,
  weight ``--gp`` (default 10); ``--gp 0`` is the public code's unconstrained critic.
- On-policy batches. The code keeps the trajectories of the last n_critic critic steps in a
  buffer and takes ``n_generator`` minibatch steps on B random transitions of it (mixed steps
  i, a mean over them: 1/T' of the sum above); here each generator step uses the current
  step's B whole trajectories (all T' - 1 transitions, summed as in the theorem), drawn by the
  current theta, so the estimate is exactly on-policy and the run resumes bit for bit without a
  buffer in the checkpoints; one generator step per n_critic critic steps (the toy's
  n_generator = 1).
- The value's target. The code regresses V on f(x_0) without detaching it, so its value loss
  also moves the critic; here the target is detached (V is only the baseline, and the critic's
  objective stays the IPM).
- Log-densities are sums over coordinates (the toy's; the image code's mean differs by the
  constant 1/d). Networks: f is an MLP (points; 2 hidden ReLU layers of ``--critic-hidden``, the
  toy's 256) or a small strided conv net with a spatial mean (images, as the code's); V is an
  MLP on the flattened state, scaled by 1 / sqrt(s_i^2 + sigma_data^2), with a learned gain per
  step on each hidden layer (the code's step-conditioned linear layers). Optimisers: the loop's
  AdamW without weight decay (= the code's Adam); f and V share one (both at ``--critic-lr``,
  the toy's 1e-3); defaults otherwise the toy's (batch 128, no EMA, no warm-up, no gradient
  clipping) except the sampler's learning rate 1e-4 (the toy's 5e-5 is for its ~5000 sampler
  steps; pass ``--lr 5e-5``). The image code clips the sampler's gradient norm at 0.1, but the
  loop's ``--grad-clip`` clips the critic's as well, and clipping the penalised critic at 1
  made the sampler worse on the ring (the critic lagged behind), so the default is 0.
- Grid: ``--grid`` names any fewstep grid of the teacher's range (default karras), from
  ``--sigma-min`` (default the teacher's) to its sigma_max, then 0; the paper's toy trains a
  10-step DDPM directly and its image runs use FastDPM's VAR schedule. The step into the lowest
  level has noise of about that level: at the teacher's 0.002 its policy gradient (~1 / 0.002^2)
  is all noise, so a larger ``--sigma-min`` (e.g. 0.1 for data of scale 1) gives the Gaussian
  steps usable gradients and leaves the last denoising to the path-gradient step.
- Unconditional teachers with a network (the paper's setting): an exact mixture (no weights to
  tune) and class-conditional teachers are refused.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..io import write_json
from ..train.job import Critic, Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import GRID_NAMES, N_DATA, bcast, call_denoiser, conditioning, fine_tuned_teacher, fixed_grid, fixed_grids, \
    student_meta, training_data

KINDS = ("points", "image")
ESTIMATORS = ("pg", "path")
OPTIONS = (
    Option("timesteps", int, 10, "T': steps (= evaluations) of the fixed stochastic DDPM sampler the net is tuned "
           "for (default 10, the paper's)", low=1, high=1001),
    Option("grid", str, "karras", "its fixed sigma grid: karras (default), logsnr, polyexponential, vp-time, or "
           "time / time-leading / time-trailing", choices=GRID_NAMES),
    Option("sigma_min", float, None, "the grid's lowest positive level (sigma-range grids: karras, logsnr, "
           "polyexponential, vp-time)", low=0.0, above=True, none="the teacher's sigma_min", example=0.05),
    Option("variance", str, "small", "the chain's noise: small (the DDPM posterior's, FastDPM kappa 1, the paper's "
           "image runs) or large (beta_t, its toy chain)", choices=("small", "large")),
    Option("estimator", str, "pg", "the sampler's gradient: pg (policy gradient with the value baseline, SFT-PG; "
           "the last, noiseless step by its path gradient) or path (backpropagation through the whole chain)",
           choices=ESTIMATORS),
    Option("n_critic", int, 5, "critic (and value) steps per sampler step (the paper's 5)", low=1),
    Option("critic_lr", float, 1e-3, "learning rate of the critic f and the value V (the toy's 1e-3)", low=0.0,
           above=True),
    Option("gp", float, 10.0, "weight of the critic's gradient penalty (WGAN-GP, for the 1-Lipschitz critic of "
           "W1; 0: the public code's unconstrained critic)", low=0.0),
    Option("critic_hidden", int, 256, "width of the critic (hidden units; base channels / 4 for images)", low=4),
    Option("value_hidden", int, 256, "width of the value function's hidden layers", low=4),
    Option("eval_samples", int, 2000, "samples of the before / after evaluation in sft.json (0: none)", low=0),
    N_DATA,
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
# the toy run's settings (toy_exp/train.py: batch 128, Adam, no EMA), the sampler's lr as the docstring says
COMMON_OVERRIDES = {"lr": 1e-4, "batch_size": 128, "warmup": 0, "ema_decay": 0.0, "grad_clip": 0.0, "steps": 2000}


def check_options(cfg: dict) -> None:
    if int(cfg["n_critic"]) > int(cfg["steps"]):
        raise UserError(f"--n-critic {cfg['n_critic']} leaves no sampler step in --steps {cfg['steps']}; give "
                        f"more --steps or a smaller --n-critic")


# ------------------------------------------------------------------------ the chain
def transition_plan(grid: Sequence[float], variance: str = "small") -> list:
    """[(s_i, s_{i+1}, d_i, u_i)] of the T'-step chain: the mean's noise coefficient d_i and the
    noise std u_i, exactly those of the registered ``ddpm`` sampler (u = 0 on the step to 0)."""
    from ..samplers.ancestral import _ddpm_levels

    levels = _ddpm_levels(variance)
    g = [float(s) for s in grid]
    return [(s, sn, *map(float, levels(s, sn))) for s, sn in zip(g[:-1], g[1:])]


def stochastic_steps(plan) -> int:
    """Steps of the chain that add noise (all but the last, to sigma = 0)."""
    return sum(1 for *_, up in plan if up > 0)


def step_mean(den: Callable, y: Tensor, s: float, down: float) -> Tensor:
    """The transition's mean D(y) + d (y - D(y)) / s (``den(y, sigma [B])`` the denoiser)."""
    d = den(y, torch.full((y.shape[0],), s, dtype=y.dtype, device=y.device))
    return d + (down / s) * (y - d)


def rollout(den: Callable, z: Tensor, noise: Tensor, plan) -> list:
    """The chain's states [y_0 = s_0 z, ..., y_{T'-1}, x_0] from ``z`` and the per-step noise
    ``noise`` [B, stochastic steps, ...] (differentiable where ``den`` is: the path gradient)."""
    y, k, out = plan[0][0] * z, 0, []
    out.append(y)
    for s, _, down, up in plan:
        m = step_mean(den, y, s, down)
        if up > 0:
            m = m + up * noise[:, k]
            k += 1
        y = m
        out.append(y)
    return out


def log_prob(den: Callable, y: Tensor, y_next: Tensor, s: float, down: float, up: float) -> Tensor:
    """log p_theta(y_next | y) per sample, summed over coordinates, up to its theta-free constant."""
    m = step_mean(den, y, s, down)
    return -(y_next - m).pow(2).flatten(1).sum(1) / (2.0 * up * up)


def pg_loss(den: Callable, states: Sequence[Tensor], plan, f: Callable, value: Optional[Callable] = None) -> Tensor:
    """The SFT-PG surrogate per sample (module docstring): sum over the Gaussian steps of
    sg(f(x_0) - V(y_i, i)) log p_theta(y_{i+1} | y_i), plus f(D_theta(y_{T'-1})) for the last,
    noiseless step (its path gradient). Its gradient in theta estimates grad E f(x_0) without
    bias for any baseline ``value(y, i) -> [B]`` (None: no baseline). ``states`` from
    :func:`rollout` (detached)."""
    states = [y.detach() for y in states]
    with torch.no_grad():
        reward = f(states[-1]).reshape(-1)
    total = torch.zeros_like(reward)
    for i, (s, _, down, up) in enumerate(plan):
        if up > 0:
            adv = reward if value is None else reward - value(states[i], i).reshape(-1).detach()
            total = total + adv.detach() * log_prob(den, states[i], states[i + 1], s, down, up)
        else:  # the step to sigma = 0: x_0 = D_theta(y), the exact path gradient through the critic
            total = total + f(step_mean(den, states[i], s, down)).reshape(-1)
    return total


def path_loss(den: Callable, z: Tensor, noise: Tensor, plan, f: Callable) -> Tensor:
    """f(x_0) per sample with x_0 the chain reparametrised in its noise: the path gradient."""
    return f(rollout(den, z, noise, plan)[-1]).reshape(-1)


# ------------------------------------------------------------------------ the critic
def ipm(f: Callable, x_gen: Tensor, x_data: Tensor) -> Tensor:
    """The critic's IPM estimate E f(samples) - E f(data) (W1's dual, f high on samples)."""
    return f(x_gen).mean() - f(x_data).mean()


def gradient_penalty(f: Callable, x_gen: Tensor, x_data: Tensor, u: Tensor) -> Tensor:
    """WGAN-GP's (||grad f(x_hat)|| - 1)^2 per sample at x_hat = u x_data + (1 - u) x_gen."""
    x_hat = (bcast(u, x_data) * x_data + (1 - bcast(u, x_data)) * x_gen).detach().requires_grad_(True)
    g, = torch.autograd.grad(f(x_hat).sum(), x_hat, create_graph=True)
    return (g.flatten(1).norm(dim=1) - 1.0).pow(2)


def critic_rows(f: Callable, x_gen: Tensor, x_data: Tensor, u: Tensor, gp: float) -> Tensor:
    """The critic's per-row loss f(data) - f(sample) + gp (||grad f|| - 1)^2: its mean is -IPM
    plus the penalty, minimised by f."""
    rows = f(x_data).reshape(-1) - f(x_gen).reshape(-1)
    if gp > 0:
        rows = rows + float(gp) * gradient_penalty(f, x_gen, x_data, u)
    return rows


class MLPCritic(nn.Module):
    """f(x) for points: 2 hidden ReLU layers (the toy's critic)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, x):
        return self.body(x.flatten(1)).reshape(-1)


class ConvCritic(nn.Module):
    """f(x) for images [C, H, W]: strided 4x4 convolutions with leaky ReLU, then a 1x1 conv to one
    channel and the spatial mean (the shape of the code's image critic)."""

    def __init__(self, channels: int, size: int, width: int = 64):
        super().__init__()
        layers, c, n = [], channels, int(size)
        for mult in (1, 2, 4):
            if n < 4:
                break
            layers += [nn.Conv2d(c, width * mult, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c, n = width * mult, n // 2
        layers.append(nn.Conv2d(c, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x).mean(dim=(1, 2, 3))


class ValueNet(nn.Module):
    """V(y_i, i): an MLP on the flattened state scaled by 1 / sqrt(s_i^2 + sigma_data^2), each
    hidden layer multiplied by a learned per-step gain (initially 1)."""

    def __init__(self, dim: int, steps: int, levels: Sequence[float], sigma_data: float, hidden: int = 256):
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)
        self.g1, self.g2 = nn.Embedding(steps, hidden), nn.Embedding(steps, hidden)
        nn.init.ones_(self.g1.weight)
        nn.init.ones_(self.g2.weight)
        scale = torch.tensor([1.0 / (float(s) ** 2 + float(sigma_data) ** 2) ** 0.5 for s in levels])
        self.register_buffer("scale", scale)

    def forward(self, y, i: int):
        idx = torch.full((y.shape[0],), int(i), dtype=torch.long, device=y.device)
        h = y.flatten(1) * self.scale[int(i)].to(y.dtype)
        h = F.relu(self.l1(h) * self.g1(idx))
        h = F.relu(self.l2(h) * self.g2(idx))
        return self.out(h).reshape(-1)


class SFTCritic(nn.Module):
    """The critic f and the value V, trained together (one module for the loop's critic).
    ``forward(x)`` is f(x); with the data it is the whole per-row critic loss (one forward, so
    accelerate's DDP sees every parameter once): :func:`critic_rows` plus, over the Gaussian
    steps ``steps``, V's squared error against the detached f(x_0)."""

    def __init__(self, f: nn.Module, value: nn.Module):
        super().__init__()
        self.f, self.value = f, value

    def forward(self, x, x_data=None, u=None, gp: float = 0.0, states=None, steps=()):
        if x_data is None:
            return self.f(x)
        rows = critic_rows(self.f, x, x_data, u, gp)
        if states is not None and len(steps):
            with torch.no_grad():
                target = self.f(x).reshape(-1)
            rows = rows + sum((self.value(states[i], i) - target).pow(2) for i in steps)
        return rows


def build_critic(shape, kind: str, steps: int, levels, sigma_data: float, cfg: dict) -> SFTCritic:
    shape = tuple(int(s) for s in shape)
    dim = 1
    for s in shape:
        dim *= s
    if kind == "image":
        if len(shape) != 3:
            raise UserError(f"sft: image samples must be [C, H, W], got {list(shape)}")
        f = ConvCritic(shape[0], min(shape[1:]), max(1, int(cfg["critic_hidden"]) // 4))
    else:
        f = MLPCritic(dim, int(cfg["critic_hidden"]))
    return SFTCritic(f, ValueNet(dim, max(1, steps), levels, sigma_data, int(cfg["value_hidden"])))


# ----------------------------------------------------------------------------- stages
def stages(job):
    """One stage in the top folder: the teacher's net fine-tuned by SFT-PG for its T'-step chain."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net

    cfg = job.cfg
    teacher, net_cfg, state = fine_tuned_teacher(cfg, job.device, KINDS, "sft")
    cond = conditioning(cfg, teacher)  # unconditional (checked): no labels, recorded in model.json
    T = int(cfg["timesteps"])
    grid = fixed_grid(cfg["grid"], T, teacher, cfg["sigma_min"])
    plan_ = transition_plan(grid, cfg["variance"])
    K = stochastic_steps(plan_)
    data = training_data(cfg, teacher)
    B, shape = int(cfg["batch_size"]), tuple(teacher.shape)
    n_critic, gp, pg = int(cfg["n_critic"]), float(cfg["gp"]), cfg["estimator"] == "pg"
    Tt = teacher.denoiser

    def plan(st):
        torch.manual_seed(int(cfg["seed"]))
        net = build_net(net_cfg)
        net.load_state_dict(state)
        D = ModelDenoiser(net, Tt.process, Tt.prediction, Tt.sigma_data)
        critic_module = build_critic(shape, teacher.kind, T, grid[:-1], float(Tt.sigma_data), cfg)
        cache = {}
        gaussian = [i for i, step in enumerate(plan_) if step[3] > 0]

        def draw(gen, step):
            return {"z": torch.randn((B,) + shape, generator=gen),
                    "noise": torch.randn((B, K) + shape, generator=gen),
                    "x0": data.draw(B, gen).float(), "u": torch.rand(B, generator=gen), "step": int(step)}

        def den_of(model):
            return lambda y, s: call_denoiser(D, model, y, s)

        def trajectories(model, b):
            if cache.get("step") != b["step"]:
                with torch.no_grad():
                    cache.update(step=b["step"], states=rollout(den_of(model), b["z"], b["noise"], plan_))
            return cache["states"]

        def critic_loss(cmodel, model, b):
            """f: -IPM + gradient penalty on this step's samples and data; V: its regression on f(x_0)."""
            states = trajectories(model, b)
            x_gen = states[-1].detach()
            return cmodel(x_gen, b["x0"].to(x_gen.dtype), b["u"], gp, states, gaussian if pg else ())

        def loss(model, b):
            """The sampler: the SFT-PG surrogate (or the path gradient) of E f(x_0)."""
            c = critic_module
            if not pg:
                return path_loss(den_of(model), b["z"], b["noise"], plan_, c.f)
            return pg_loss(den_of(model), trajectories(model, b), plan_, c.f, c.value)

        def describe(ema_module):
            from ..metrics import energy_distance, sliced_w2

            steps = int(cfg["steps"])
            turns = sum(1 for s in range(steps) if critic.student_turn(s))
            measures = None
            n_eval = int(cfg["eval_samples"])
            if n_eval >= 2:
                dev = next(ema_module.parameters()).device
                g = torch.Generator().manual_seed(int(cfg["seed"]) + 4747)
                ref = data.draw(n_eval, g).float()
                z = torch.randn((n_eval,) + shape, generator=g).to(dev)
                noise = torch.randn((n_eval, K) + shape, generator=g).to(dev)
                measures = {"eval_samples": n_eval, "reference": "data", "energy_distance": {}, "sliced_w2": {}}
                for name, den in (("teacher", Tt), ("tuned", ModelDenoiser(ema_module, Tt.process, Tt.prediction,
                                                                          Tt.sigma_data).eval())):
                    with torch.no_grad():
                        x = rollout(den, z, noise, plan_)[-1].float().cpu()
                    measures["energy_distance"][name] = energy_distance(x.flatten(1), ref.flatten(1))
                    measures["sliced_w2"][name] = sliced_w2(x, ref)
                write_json(st.folder / "sft.json", measures)  # before model.json: a finished run has both
            sampling = {"sampler": "ddpm", "grids": fixed_grids({T: grid}), "options": {"variance": cfg["variance"]}}
            evals = steps * B * T + turns * B * (K + 1 if pg else T)  # each step's rollout, the sampler's steps
            info = {"timesteps": T, "grid": cfg["grid"], "levels": grid, "variance": cfg["variance"],
                    "estimator": cfg["estimator"], "n_critic": n_critic, "gp": gp, "generator_updates": turns}
            if measures is not None:
                info["energy_distance"] = measures["energy_distance"]
            return student_meta("sft", D, dict(getattr(net, "config", net_cfg)), teacher.shape, teacher.kind,
                                data.name, grid[-2], grid[0], sampling, cfg, cond=cond, sft=info,
                                cost={"teacher_evals": 0, "student_evals": evals, "seconds": st.seconds})

        critic = Critic(critic_module, critic_loss, lr=float(cfg["critic_lr"]), weight_decay=0.0,
                        student_every=n_critic, student_from=n_critic - 1, critic_first=True)
        return Plan(Task(student=net, draw=draw, loss=loss, critic=critic), describe)

    job.stage("", plan)
