"""SiD: score identity distillation (Zhou et al. 2024, "Score identity distillation:
exponentially fast distillation of pretrained diffusion models for one-step generation").

A data-free one-step generator x_g = G_theta(sigma_init z, sigma_init) (the teacher's
architecture, a sigma-space denoiser at the fixed level ``--init-sigma``, their 2.5) and a
fake-score denoiser f_psi trained alternately on its samples. In x0 form (f_phi the frozen
teacher's denoiser, x_t = x_g + sigma_t eps):

    fake score (their eq. 9)   min_psi  lambda(sigma) || f_psi(x_t, sigma) - sg(x_g) ||^2
                               sigma ~ exp(N(P_mean, P_std^2)) (-1.2, 1.2), EDM weighting lambda
    generator (their eq. 13)   min_theta  (1 - alpha) || f_phi(x_t) - f_psi(x_t) ||^2
                                          + (f_phi(x_t) - f_psi(x_t))^T (f_psi(x_t) - x_g)

divided per sample by mean|x_g - f_phi(x_t)| (the code's weight_factor, clipped at 1e-5),
alpha = 1.2 (``--alpha``; alpha = 1 drops the first term, alpha = 0.5 is their "fake-score-free"
ablation's balance), t ~ U[0, tmax/1000] mapped through the teacher's Karras ramp, sigma_t =
(sigma_max^(1/rho) + (1 - t)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (the code's, tmax 800).
Unlike DMD, the generator's gradient goes through both score networks' input Jacobians (their
weights frozen), as the code's autograd does; each step of the shared loop is one fake-score
update then one generator update (:class:`fewstep.train.loop.Critic`, ``critic_first``).

Following the official code (github:mingyuanzhou/SiD, ``training/sid_loss.py``,
``sid_training_loop.py``): G and f_psi start from the teacher's weights where the teacher has
a net of their architecture; both use Adam with beta1 = 0 (betas (0, 0.999)). Where this
differs: squared errors and the inner product are means over coordinates, not sums (a constant
factor, which Adam's updates do not see, as they do not see the code's loss scaling 100);
AdamW with the run's ``--weight-decay`` (0 by default: the code's Adam); the EMA is the loop's
``--ema-decay``, not a half-life in images; NaN rows are not dropped (a NaN loss stops the run
with the loop's one line instead). An exact mixture has no net: G and f_psi start fresh and
f_psi trains alone for ``--fake-warmup`` steps first (default a tenth of the steps; 0 from the
teacher's weights). SiD matches the distribution, not the flow map (no RMS against it).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..io import write_json
from ..train.job import Critic, Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import FAKE_SCORE_OPTIONS, bcast, call_denoiser, check_fake_warmup, conditioning, \
    consistency_rule_measures, edm_dsm_loss, evaluation_data, fixed_grids, generator_and_fake_score, load_teacher, \
    reference_samples, student_meta

OPTIONS = (
    Option("alpha", float, 1.2, "alpha of the score-identity loss (SiD: 1.2; 1 drops its first term)", low=-10.0,
           high=10.0),
    Option("init_sigma", float, 2.5, "the generator's fixed input level: x_g = G(sigma z, sigma) (SiD: 2.5)",
           low=0.0, above=True),
    Option("tmax", float, 800.0, "the generator loss draws t in [0, tmax/1000] of the Karras ramp (SiD: 800)",
           low=0.0, above=True, high=1000.0),
    Option("rho", float, 7.0, "rho of that Karras ramp (default 7)", low=0.0, above=True),
    Option("p_mean", float, -1.2, "mean of log sigma for the fake score's loss (SiD / EDM: -1.2)", low=-20.0,
           high=20.0),
    Option("p_std", float, 1.2, "standard deviation of log sigma for the fake score's loss (SiD / EDM: 1.2)",
           low=0.0, above=True),
    Option("beta1", float, 0.0, "Adam beta1 of both networks (SiD: 0)", low=0.0, high=1.0),
    *FAKE_SCORE_OPTIONS,
    Option("eval_samples", int, 2000, "samples of the 1-step evaluation in sid.json (default 2000)", low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)


def check_options(cfg: dict) -> None:
    check_fake_warmup(cfg)
    if float(cfg["beta1"]) >= 1.0:
        raise UserError(f"--beta1 must lie in [0, 1), got {cfg['beta1']}")


# ------------------------------------------------------------------------ the idea
def sid_loss(x_g: torch.Tensor, real: torch.Tensor, fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss (module docstring): (real - fake) . ((real - x_g) - alpha
    (real - fake)) / mean|x_g - real|, means over coordinates; ``real`` and ``fake`` are the
    two denoisers at x_t = x_g + sigma eps (differentiable in x_g)."""
    w = (x_g - real).detach().abs().flatten(1).mean(1).clamp_min(1e-5)
    d = real - fake
    return (d * ((real - x_g) - float(alpha) * d)).flatten(1).mean(1) / w


def generator_sigmas(u: torch.Tensor, sigma_min: float, sigma_max: float, tmax: float, rho: float) -> torch.Tensor:
    """sigma_t of the generator loss from u ~ U[0, 1): t = u tmax / 1000 on the Karras ramp,
    t = 0 at sigma_min, t = 1 at sigma_max."""
    t = u * float(tmax) / 1000.0
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return (hi + (1 - t) * (lo - hi)) ** rho


# ----------------------------------------------------------------------- the stage
def stages(job):
    """One stage in the top folder: the fake score, then the generator, every step."""
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, method="sid")
    cond = conditioning(cfg, teacher)
    data = evaluation_data(cfg, teacher)
    s_init = float(cfg["init_sigma"])
    if s_init > teacher.sigma_max:
        raise UserError(f"--init-sigma {s_init:g} lies above the teacher's sigma_max {teacher.sigma_max:g}")
    Dg, gen_net, Df, fake_net, net_cfg, warm = generator_and_fake_score(teacher, cfg, cond)
    T = cond.teacher(teacher.denoiser)
    B, shape = int(cfg["batch_size"]), tuple(teacher.shape)
    alpha, betas = float(cfg["alpha"]), (float(cfg["beta1"]), 0.999)

    def plan(st):
        def draw(gen, step):
            b = {"z": torch.randn((B,) + shape, generator=gen),
                 "fake_eps": torch.randn((B,) + shape, generator=gen),
                 "fake_sigma": (float(cfg["p_mean"]) + float(cfg["p_std"]) * torch.randn(B, generator=gen)).exp(),
                 "eps": torch.randn((B,) + shape, generator=gen),
                 "sigma": generator_sigmas(torch.rand(B, generator=gen, dtype=torch.float64), teacher.sigma_min,
                                           teacher.sigma_max, float(cfg["tmax"]), float(cfg["rho"])).float()}
            if cond.on:
                b["labels"] = cond.draw(B, gen)
            return b

        def generate(model, b):
            z = b["z"]
            return call_denoiser(Dg, model, s_init * z, torch.full((len(z),), s_init, device=z.device), b.get("labels"))

        def loss(model, b):
            """The generator: the score-identity loss through both denoisers' input Jacobians."""
            lab = b.get("labels")
            x_g = generate(model, b)
            sig = b["sigma"]
            x_t = x_g + bcast(sig, x_g) * b["eps"]
            real = (T(x_t, sig, labels=lab) if lab is not None else T(x_t, sig)).to(x_g.dtype)
            fake = call_denoiser(Df, fake_net, x_t, sig, lab)
            return sid_loss(x_g, real, fake, alpha)

        def critic_loss(cmodel, model, b):
            """The fake score: denoising loss on the generator's (detached) samples."""
            with torch.no_grad():
                x_g = generate(model, b)
            return edm_dsm_loss(Df, cmodel, x_g, b["fake_sigma"], b["fake_eps"], b.get("labels"))

        def describe(ema_module):
            from ..denoiser import ModelDenoiser

            D_ema = ModelDenoiser(ema_module, Dg.process, Dg.prediction, Dg.sigma_data).eval()
            ref, what = reference_samples(teacher, data, int(cfg["eval_samples"]), int(cfg["seed"]))
            grids = {1: [s_init, 0.0]}
            measures = {**consistency_rule_measures(D_ema, grids, shape, cond, ref, int(cfg["seed"]), st.job.device),
                        "reference": what}
            write_json(st.folder / "sid.json", measures)  # before model.json: a finished run has both
            turns = int(cfg["steps"]) - warm
            return student_meta("sid", Dg, net_cfg, shape, teacher.kind,
                                teacher.meta.get("data", {}).get("name", teacher.name), teacher.sigma_min, s_init,
                                {"sampler": "consistency", "grids": fixed_grids(grids)}, cfg, cond=cond,
                                sid={"alpha": alpha, "init_sigma": s_init, "tmax": float(cfg["tmax"]),
                                     "fake_warmup": warm, "generator_updates": turns},
                                cost={"teacher_evals": turns * B, "seconds": st.seconds})

        critic = Critic(fake_net, critic_loss, lr=cfg["fake_lr"], betas=betas, student_from=warm, critic_first=True)
        return Plan(Task(student=gen_net, draw=draw, loss=loss, critic=critic, betas=betas), describe)

    job.stage("", plan)
