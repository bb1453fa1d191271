"""Latent consistency distillation (Luo et al. 2023, "Latent consistency models", Algorithm 1;
LCM-LoRA, Luo et al. 2023b): one-stage guided consistency distillation with the guidance
scale w as a student input, on the skipping-step DDIM solver of the teacher.

Levels: the teacher's N DDIM levels (``--levels``, LCM's 50), uniform in the teacher
process's time, sigma_0 > ... > sigma_{N-1}, and the boundary sigma_N = the teacher's
sigma_min (where f(x, sigma_N) = x). Each sample draws a pair (n, n + k) (``--skip k``;
LCM's DDIM timesteps are already k = 20 of the 1000 DDPM steps apart, so one DDIM step
between adjacent levels is LCM's skipping step; k > 1 skips further), w ~ U[w_min, w_max],
and with x0 from the data and y_n = x0 + sigma_n z:

    y^_{n+k} = one DDIM (Euler) step of the guided teacher
               D_w = D(null) + w (D(c) - D(null))   from (y_n, sigma_n) to sigma_{n+k}
               (the augmented PF-ODE of eq. 8, in this project's w convention: w = 1 is
               the plain conditional teacher; LCM writes 1 + omega)
    L = d( f_theta(y_n, sigma_n, w, c), f_theta-(y^_{n+k}, sigma_{n+k}, w, c) )          (eq. 9)

with f the consistency function of :class:`fewstep.students.LCMDenoiser` (the teacher's own
parametrization under LCM's boundary scalings), theta- the EMA target (``--mu``, LCM 0.95),
d the squared L2 or the pseudo-Huber distance (``--loss``, ``--huber-c``; LCM's code: huber,
c = 0.001). The student starts as the teacher (its network and weights; a new input
embedding of w, zero-initialised so the starting student is exactly the teacher's D at every
w), as LCM initialises from the teacher UNet. Sampling is LCM's multistep rule (Algorithm 3
= multistep consistency sampling) on k evenly spaced training levels.

Deviations: LCM's w-embedding is a fixed sinusoidal code of w through the UNet's time-embedding
MLP (``time_cond_proj_dim``); here it is the nets' own ``cond`` input (sinusoidal features and
an MLP added to the time embedding: the same form). LCM runs in a latent space; this module
distils whatever space the teacher lives in.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ..denoiser import ModelDenoiser, cfg_halves
from ..errors import UserError
from ..students import LCMDenoiser
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import (bcast, call_denoiser, check_student_net, conditioning, cond_net_config, data_source,
                     fixed_grids, is_exact, level_grid, load_teacher, solve_rows, student_meta, teacher_net_state)

OPTIONS = (
    Option("w_min", float, 1.0, "smallest guidance w the student learns (1 = the plain conditional teacher)", low=0.0),
    Option("w_max", float, 8.0, "largest guidance w the student learns (LCM: 1 + 14 = 15 for Stable Diffusion)",
           low=0.0),
    Option("w_default", float, None, "w the student samples at without --guidance (default: the middle)", low=0.0,
           none="(w_min + w_max) / 2", example=4.0),
    Option("levels", int, 50, "N, the teacher's DDIM levels (LCM: 50)", low=2),
    Option("process", (str, dict), "vp_cosine", "process whose uniform time grid gives the levels (and LCM's "
           "timestep scale): vp_cosine (default), vp, ...", must="a process name or a process config object"),
    Option("skip", int, 1, "k: a pair is levels n and n + k, one DDIM step apart (LCM's skipping step is one step "
           "of its 50)", low=1),
    Option("mu", float, 0.95, "EMA rate of the target network (LCM: 0.95)", low=0.0, high=1.0),
    Option("loss", str, "pseudo_huber", "distance: l2 or pseudo_huber (LCM's code)", choices=("l2", "pseudo_huber")),
    Option("huber_c", float, 0.001, "pseudo-Huber c (LCM's code: 0.001)", low=0.0, above=True),
    Option("timestep_scaling", float, 10.0, "LCM's boundary scalings c_skip, c_out on 10 x the timestep", low=0.0,
           above=True),
    Option("level_groups", int, 8, "distinct level pairs per batch (teacher calls are grouped by level)", low=1),
    Option("lora_rank", int, 0, "LCM-LoRA: train rank-r adapters on the frozen teacher (and the w embedding) instead "
           "of the whole student (0: the whole student)", low=0),
    Option("lora_alpha", float, None, "LoRA scale alpha (the update is alpha / r B A; default r)", low=0.0,
           above=True, none="the rank", example=8.0),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
KINDS = ("points", "image")
MAX_RULE_NFE = 8


def check_options(cfg: dict) -> None:
    if float(cfg["w_min"]) > float(cfg["w_max"]):
        raise UserError(f"--w-min {cfg['w_min']} must not exceed --w-max {cfg['w_max']}")
    wd = cfg.get("w_default")
    if wd is not None and not float(cfg["w_min"]) <= float(wd) <= float(cfg["w_max"]):
        raise UserError(f"--w-default {wd} must lie in [--w-min, --w-max] = [{cfg['w_min']}, {cfg['w_max']}]")
    if int(cfg["skip"]) >= int(cfg["levels"]):
        raise UserError(f"--skip {cfg['skip']} must be below --levels {cfg['levels']}")
    if cfg.get("guidance") is not None:
        raise UserError("--guidance: lcm learns every w in [--w-min, --w-max] as an input; give those instead")


class InputGuided(nn.Module):
    """The guided teacher at a per-sample w given as ``cond``: D(null) + w (D(c) - D(null)),
    both halves in one batched call (the augmented PF-ODE's denoiser)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, y: Tensor, sigma: Tensor, labels: Tensor = None, cond: Tensor = None) -> Tensor:
        d_c, d_u = cfg_halves(self.inner, y, sigma, labels)
        return d_u + bcast(cond.to(y.dtype), y) * (d_c - d_u)


def training_levels(teacher, N: int, process) -> Tensor:
    """The N DDIM levels uniform in ``process``'s time up to the teacher's sigma_max and the
    boundary (float64, decreasing, N + 1 values; the last the teacher's sigma_min)."""
    grid = level_grid(process, N, teacher.sigma_max)
    grid[-1] = float(teacher.sigma_min)
    if not bool((grid[:-1] > grid[1:]).all()):
        raise UserError(f"--levels {N}: the teacher's levels are not decreasing down to its sigma_min "
                        f"{teacher.sigma_min:g}; give fewer levels")
    return grid


def build_student(teacher, cfg: dict, data, time_process):
    """(LoRA spec or None, the student LCMDenoiser, its net config): the teacher's net with a
    w input (its weights copied; the new embedding's last layer zero, so it starts as the
    teacher), or for an exact teacher a fresh net of the data's default with EDM
    preconditioning; with ``--lora-rank r`` the teacher's weights frozen under rank-r adapters
    (:mod:`fewstep.nets.lora`), the w embedding trained in full."""
    from ..nets import build_net
    from ..process import make_process

    if teacher.meta.get("role") == "diffusers-teacher":
        return _diffusers_student(teacher, cfg, data, time_process)
    net_cfg = cond_net_config(cfg["net"], teacher, data.shape, data.kind, "the guidance w comes in")
    if not net_cfg.get("context_dim"):
        net_cfg["num_classes"] = int(teacher.num_classes)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = getattr(net, "config", net_cfg)
    T = getattr(teacher, "denoiser", None)
    if not is_exact(teacher) and isinstance(T, ModelDenoiser):
        state = teacher_net_state(teacher, {**net_cfg, "use_cond": bool(teacher.meta["net"].get("use_cond", False))})
        if state is None:
            raise UserError("--net: lcm starts the student as its teacher; give no --net (the teacher's with a w "
                            "input) or the teacher's architecture")
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(".cond." not in k for k in missing):
            raise UserError(f"the teacher's weights do not fit its net with a w input ({(unexpected or missing)[0]})")
        inner = ModelDenoiser(net, T.process, T.prediction, T.sigma_data)
    else:
        inner = ModelDenoiser(net, make_process("edm", sigma_min=float(teacher.sigma_min),
                                                sigma_max=float(teacher.sigma_max)), "edm", float(data.sigma_data))
    cond_embed = getattr(getattr(net, "embed", None), "cond", None)
    if cond_embed is not None:
        nn.init.zeros_(cond_embed.fc2.weight)
        nn.init.zeros_(cond_embed.fc2.bias)
    lora = None
    if int(cfg["lora_rank"]):
        if is_exact(teacher):
            raise UserError("--lora-rank: an exact teacher has no network to adapt; train the whole student "
                            "(--lora-rank 0)")
        from ..nets.lora import add_lora

        lora = add_lora(net, int(cfg["lora_rank"]), cfg["lora_alpha"], train=["embed.cond"] if cond_embed else [])
    return lora, LCMDenoiser(inner, float(teacher.sigma_min), float(inner.sigma_data), float(cfg["timestep_scaling"]),
                       time_process), net_cfg


def _diffusers_student(teacher, cfg: dict, data, time_process):
    """A diffusers teacher's student: its own UNet (a copy; with ``--lora-rank`` the teacher's
    weights frozen under diffusers' LoRA adapters, as LCM-LoRA), w through the UNet's
    ``time_cond_proj_dim`` when it has one, else a fixed w (``--w-min`` = ``--w-max``: LCM-LoRA's
    student takes no w; its guidance is built in)."""
    from ..interop.diffusers_teacher import add_diffusers_lora

    if cfg["net"]:
        raise UserError("--net: the student of a diffusers teacher is the teacher's own UNet; leave --net out")
    T = teacher.denoiser
    T = getattr(T, "inner", T)  # a clipped denoiser: the model inside
    net = copy.deepcopy(T.net)
    takes_w = bool(getattr(net, "takes_w", False))
    if not takes_w and float(cfg["w_min"]) != float(cfg["w_max"]):
        raise UserError(f"{teacher.name} has no time_cond_proj_dim, so its student cannot take w as an input; give "
                        f"one w (--w-min = --w-max), which the student builds in (LCM-LoRA)")
    lora = add_diffusers_lora(net, int(cfg["lora_rank"]), cfg["lora_alpha"]) if int(cfg["lora_rank"]) else None
    if lora is None:
        net.requires_grad_(True)
    inner = ModelDenoiser(net, T.process, T.prediction, T.sigma_data)
    net_cfg = {"kind": "diffusers", "source": teacher.meta["source"], "takes_w": takes_w}
    return lora, LCMDenoiser(inner, float(teacher.sigma_min), float(inner.sigma_data), float(cfg["timestep_scaling"]),
                             time_process), net_cfg


def distance(a: Tensor, b: Tensor, kind: str, c: float) -> Tensor:
    """Per sample: squared L2 (mean over coordinates) or pseudo-Huber sqrt(|a-b|^2 + c^2) - c
    (LCM's code: over the mean of squares)."""
    sq = ((a - b) ** 2).flatten(1).mean(1)
    return sq if kind == "l2" else torch.sqrt(sq + c * c) - c


def sampling_rule(grid: Tensor, cfg: dict) -> dict:
    """LCM's multistep sampler for 1..MAX_RULE_NFE steps: k training levels evenly spaced
    from the top (LCM's scheduler takes every (N / k)-th of its DDIM timesteps), then 0."""
    N = len(grid) - 1
    grids = {}
    for k in range(1, MAX_RULE_NFE + 1):
        idx = [int(math.floor(i * N / k)) for i in range(k)]
        grids[k] = [float(grid[i]) for i in idx] + [0.0]
    return {"sampler": "consistency", "grids": fixed_grids(grids), "options": {"epsilon": float(grid[-1])}}


def lcm_task(D: LCMDenoiser, target: nn.Module, teacher, cfg: dict, data, grid: Tensor, student_w: bool = True
             ) -> Task:
    """Algorithm 1 as the loop's task (module docstring); ``student_w`` False: the student takes
    no w (a diffusers UNet without ``time_cond_proj_dim``; one w, built in)."""
    B, N, k = int(cfg["batch_size"]), int(cfg["levels"]), int(cfg["skip"])
    lo, hi, mu = float(cfg["w_min"]), float(cfg["w_max"]), float(cfg["mu"])
    guided = InputGuided(teacher.denoiser)
    groups = max(1, min(int(cfg["level_groups"]), B))

    def draw(gen, step):
        g = torch.randint(0, N + 1 - k, (groups,), generator=gen)
        n = g[torch.arange(B) * groups // B]
        x0, labels = data.labelled(B, gen)
        return {"x0": x0, "labels": labels, "z": torch.randn(x0.shape, generator=gen), "s_now": grid[n],
                "s_next": grid[n + k], "w": lo + (hi - lo) * torch.rand(B, generator=gen)}

    def loss(model, b):
        x0, labels, w = b["x0"], b["labels"], b["w"].to(b["x0"].dtype)
        y = x0 + bcast(b["s_now"], x0) * b["z"]
        y_next = solve_rows("euler", guided, y, torch.stack([b["s_now"], b["s_next"]], 1), labels, w)
        ws = w if student_w else None
        pred = call_denoiser(D, model, y, b["s_now"].to(x0.dtype), labels, ws)
        with torch.no_grad():
            tgt = call_denoiser(D, target, y_next, b["s_next"].to(x0.dtype), labels, ws)
        return distance(pred, tgt, cfg["loss"], float(cfg["huber_c"]))

    def after_step(model, step):
        """theta- <- mu theta- + (1 - mu) theta."""
        with torch.no_grad():
            dst = list(target.parameters())
            torch._foreach_lerp_(dst, [p.detach().to(dst[0].device) for p in model.parameters()], 1.0 - mu)

    frozen = {"teacher": teacher.denoiser} if isinstance(teacher.denoiser, nn.Module) else {}
    return Task(student=D.net, draw=draw, loss=loss, frozen=frozen, extra={"target": target}, after_step=after_step)


def stages(job):
    """One stage in the top folder: Algorithm 1, then LCM's multistep rule with w as an input."""
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, kinds=KINDS, method="lcm")
    cond = conditioning(cfg, teacher)
    if not cond.num_classes and not teacher.meta.get("text_encoder"):
        raise UserError(f"lcm distils a conditional teacher's guidance (w is the student's input); {teacher.name} is "
                        f"unconditional: use fewstep distill consistency")
    data = data_source(cfg["data"], teacher, int(cfg["seed"]))
    if not data.num_classes and data.draw_labelled is None:
        raise UserError(f"the teacher is class-conditional but its data {data.name} has no labels; give labelled --data")
    from ..process import process_from_config

    time_process = process_from_config(cfg["process"])
    grid = training_levels(teacher, int(cfg["levels"]), time_process)
    lora, D, net_cfg = build_student(teacher, cfg, data, time_process)
    check_student_net(D.net, cond)
    target = copy.deepcopy(D.net).requires_grad_(False)
    student_w = bool(net_cfg.get("takes_w", True))
    w_default = float(cfg["w_default"]) if cfg.get("w_default") is not None else \
        (float(cfg["w_min"]) + float(cfg["w_max"])) / 2

    def plan(st):
        def describe(ema_module):
            inner = D.inner
            den = {"kind": "lcm", "sigma_min": D.sigma_min, "sigma_data": D.sigma_data,
                   "timestep_scaling": D.timestep_scaling, "process": inner.process.config(),
                   "prediction": inner.prediction, "inner_sigma_data": float(inner.sigma_data),
                   "time_process": time_process.config()}
            meta = student_meta("lcm", D, net_cfg, data.shape, data.kind, data.name, float(grid[-2]),
                                float(grid[0]), sampling_rule(grid, cfg), cfg, denoiser=den, cond=cond,
                                w_input=[float(cfg["w_min"]), float(cfg["w_max"])], w_default=w_default,
                                cost={"teacher_evals": int(cfg["steps"]) * int(cfg["batch_size"]) * 2,
                                      "seconds": st.seconds})
            meta.pop("guidance", None)  # w is an input, not built in
            if not student_w:  # one w, built in (LCM-LoRA of a UNet without a w embedding)
                meta.pop("w_input", None)
                meta.pop("w_default", None)
                meta["guidance"] = float(cfg["w_min"])
            if teacher.meta.get("text_encoder"):
                meta["text_encoder"] = teacher.meta["text_encoder"]
            if lora is not None:
                from ..nets.lora import lora_parameters

                named = list(ema_module.named_parameters())
                meta["lora"] = lora
                meta["parameters"] = {"lora": lora_parameters(ema_module),
                                      "trained_in_full": sum(p.numel() for n, p in named
                                                             if any(n.startswith(t + ".") for t in lora.get("train", []))),
                                      "base": sum(p.numel() for n, p in named if ".lora_" not in n)}
            else:  # the whole student is trained
                meta["parameters"] = {"trained_in_full": sum(p.numel() for p in ema_module.parameters())}
            return meta

        return Plan(lcm_task(D, target, teacher, cfg, data, grid, student_w), describe)

    job.stage("", plan)
