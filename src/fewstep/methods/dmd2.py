"""DMD2: improved distribution matching distillation (Yin et al. 2024, "Improved distribution
matching distillation for fast image synthesis").

A generator G_theta (the teacher's architecture, a sigma-space denoiser evaluated at its own
levels) is trained so that the distribution of its samples matches the teacher's, not its
flow map: for a generated x = G_theta(sigma_0 z, sigma_0), diffused to x_t = x + sigma_t eps,
the gradient of KL(p_fake || p_real) in x is (their eq. 2, DMD's eq. 7, in x0 form)

    grad = ( mu_fake(x_t, t) - mu_real(x_t, t) ) / mean |x - mu_real(x_t, t)|

with mu_real the frozen teacher's denoiser and mu_fake a "fake" score network trained online
on the generator's samples with the denoising loss (EDM weighting, their eq. 3). The generator
minimises 1/2 || x - sg(x - grad) ||^2, whose gradient in x is ``grad`` (the U-Net Jacobians
omitted, as in DMD). DMD2's changes to DMD, all here:
  * no regression loss (no teacher pairs at all);
  * the two time-scale update rule: the fake score takes ``--update-ratio`` updates per
    generator update (their 5), each step of the shared loop one fake-score update
    (:class:`fewstep.train.loop.Critic`);
  * an optional GAN head on the fake score's features (``--gan``): a small classifier on the
    bottleneck features of the fake-score net (an MLP's last hidden layer, a UNet's middle
    block) telling real data from generated samples, both diffused to a random level (their
    "diffusion GAN"); the critic adds ``--gan-critic-weight`` (softplus(D(fake)) +
    softplus(-D(real))), the generator ``--gan-weight`` softplus(-D(G(z))) (the
    non-saturating loss; their 1e-2 and 3e-3). Needs real data (``--data``, or the teacher's);
  * multi-step generators with backward simulation (``--gen-steps K``): the generator is
    trained at K levels sigma_0 > ... > sigma_{K-1} (the teacher's Karras grid of K steps);
    its input at level k is made the way sampling makes it, by running the current generator
    k steps from noise (denoise, then fresh noise at the next level), not from noised data
    (``--gen-inputs data`` takes noised real data instead, their ablation). Sampling is the
    consistency-style multistep rule on those levels (the registered ``consistency`` sampler:
    denoise, re-noise, denoise); its first k levels are a k-step rule for every k <= K.

Levels: the DM loss draws t uniformly among the teacher's Karras levels (``--levels`` 1000,
indices in [0.02, 0.98] of them: the code's min/max_step_percent), the fake score among all
of them. Like the official code, the generator and the fake score both start from the teacher's
weights where the teacher has a net of their architecture (``--init``); an exact mixture has
none, so both start fresh and the fake score first trains alone for ``--fake-warmup`` steps
(default: a tenth of the steps there, 0 when it starts from the teacher: the paper has no such
start since its fake score begins as the teacher).

Where this differs from the official code (github:tianweiy/DMD2, ``main/edm/edm_guidance.py``,
``train_edm.py``): within a generator step the fake score trains on the same z's samples of the
generator *before* its update, as there; the backward-simulation step k is drawn once per
batch (the code: once per iteration, shared across GPUs); the GAN head is an MLP / small conv
head of our nets, not their 768-channel conv stack; the generator and the fake score use
AdamW with the run's (``--lr``, ``--fake-lr``), the code 2e-6 for both with weight decay 0.01.
DMD2 matches the teacher's distribution, not its flow map: its samples are not the teacher's
ODE solution from the same noise, so an RMS error against the flow map does not measure it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..grids import karras
from ..io import write_json
from ..train.job import Critic, Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import FAKE_SCORE_OPTIONS, bcast, call_denoiser, check_fake_warmup, conditioning, \
    consistency_rule_measures, edm_dsm_loss, evaluation_data, fixed_grids, generator_and_fake_score, load_teacher, \
    reference_samples, student_meta

GEN_INPUTS = ("backward", "data")
OPTIONS = (
    Option("gen_steps", int, 1, "K: levels the generator is trained at (1: one step from sigma_max; K > 1: "
           "sigma_0 > ... > sigma_{K-1} of the teacher's Karras grid of K steps)", low=1, high=64),
    Option("gen_inputs", str, "backward", "inputs of a multi-step generator at level k: backward (the current "
           "generator run k steps from noise: backward simulation, DMD2) or data (noised real data)",
           choices=GEN_INPUTS),
    Option("update_ratio", int, 5, "fake-score updates per generator update (the two time-scale rule; DMD2: 5)",
           low=1),
    Option("levels", int, 1000, "Karras levels of the teacher's sigma range the losses draw from (DMD2: 1000)",
           low=2),
    Option("dm_min", float, 0.02, "lowest share of the levels the distribution-matching loss draws (DMD2: 0.02)",
           low=0.0, high=1.0),
    Option("dm_max", float, 0.98, "highest share of the levels the distribution-matching loss draws (DMD2: 0.98)",
           low=0.0, high=1.0),
    Option("gan", bool, False, "the GAN head on the fake score's features (needs real data: --data or the "
           "teacher's)"),
    Option("gan_weight", float, 3e-3, "weight of the generator's GAN loss (DMD2 ImageNet: 3e-3)", low=0.0),
    Option("gan_critic_weight", float, 1e-2, "weight of the head's classification loss in the critic's (DMD2: "
           "1e-2)", low=0.0),
    *FAKE_SCORE_OPTIONS,
    Option("eval_samples", int, 2000, "samples of the k-step evaluation in dmd2.json (default 2000)", low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)


def check_options(cfg: dict) -> None:
    if float(cfg["dm_min"]) >= float(cfg["dm_max"]):
        raise UserError(f"--dm-min {cfg['dm_min']} must be below --dm-max {cfg['dm_max']}")
    check_fake_warmup(cfg)


# ------------------------------------------------------------------------ the idea
def dm_gradient(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching gradient in x: (fake - real) / mean|x - real| per sample
    (``real``, ``fake``: the two denoisers' x0 predictions at the same noisy x_t)."""
    w = (x - real).abs().flatten(1).mean(1).clamp_min(1e-12)
    return torch.nan_to_num((fake - real) / bcast(w, x))


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample 1/2 || x - sg(x - grad) ||^2 (mean over coordinates): its gradient in x is grad / d."""
    return 0.5 * (x - (x - grad).detach()).pow(2).flatten(1).mean(1)


def feature_module(net: nn.Module) -> nn.Module:
    """The layer whose output the GAN head reads: an MLP's last hidden layer (``out_norm``), a
    UNet's middle block; other nets are refused in one line."""
    kind = getattr(net, "config", {}).get("kind")
    if kind == "mlp":
        return net.out_norm
    if kind == "unet":
        return net.mid[-1]
    raise UserError(f"--gan reads the fake score's features, which fewstep finds in mlp and unet nets, not "
                    f"{kind!r}; leave out --gan or give an mlp or unet --net")


def gan_head(net: nn.Module, shape) -> nn.Module:
    """A small real/fake classifier on :func:`feature_module`'s output ([B, H] or [B, C, h, w])."""
    cfg = getattr(net, "config", {})
    if cfg.get("kind") == "mlp":
        h = int(cfg["hidden"])
        return nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))
    with torch.no_grad():  # the middle block's channels, from one tiny call
        feats = []
        hook = feature_module(net).register_forward_hook(lambda m, i, o: feats.append(o))
        try:
            net(torch.zeros((1,) + tuple(shape)), torch.zeros(1))
        finally:
            hook.remove()
    c = int(feats[-1].shape[1])
    groups = max(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c, 1))


class FakeScore(nn.Module):
    """The fake-score net (the critic) and, with the GAN head, its classifier: ``forward(x_in,
    c_noise, labels)`` is the net's output; ``both=True`` also returns the head's logits on the
    same call's features (one forward, so accelerate's DDP sees one)."""

    def __init__(self, net: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.net, self.head = net, head
        self.features = feature_module(net) if head is not None else None

    def forward(self, x, c_noise, labels=None, cond=None, both: bool = False):
        kw = {} if labels is None else {"labels": labels}
        if not both:
            return self.net(x, c_noise, **kw)
        feats = []
        hook = self.features.register_forward_hook(lambda m, i, o: feats.append(o))
        try:
            out = self.net(x, c_noise, **kw)
        finally:
            hook.remove()
        return out, self.head(feats[-1]).reshape(-1)


def gen_levels(teacher, K: int) -> torch.Tensor:
    """The K generator levels sigma_0 = sigma_max > ... > sigma_{K-1} (the Karras grid of K steps)."""
    return karras(K, teacher.sigma_min, teacher.sigma_max).double()[:K]


# ----------------------------------------------------------------------- the stage
def stages(job):
    """One stage in the top folder: the generator and its fake score, alternately."""
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, method="dmd2")
    cond = conditioning(cfg, teacher)
    gan, K = bool(cfg["gan"]), int(cfg["gen_steps"])
    needs_data = gan or (K > 1 and cfg["gen_inputs"] == "data")
    data = evaluation_data(cfg, teacher, needs_data)
    Dg, gen_net, Df, fake_net, net_cfg, warm = generator_and_fake_score(teacher, cfg, cond)
    critic_module = FakeScore(fake_net, gan_head(fake_net, teacher.shape) if gan else None)
    levels = karras(int(cfg["levels"]), teacher.sigma_min, teacher.sigma_max, final_zero=False).flip(0).float()
    n_lv = len(levels)
    lo, hi = int(float(cfg["dm_min"]) * n_lv), min(int(float(cfg["dm_max"]) * n_lv) + 1, n_lv)
    sig_k = gen_levels(teacher, K).float()
    T = cond.teacher(teacher.denoiser)
    B, shape = int(cfg["batch_size"]), tuple(teacher.shape)
    ratio = int(cfg["update_ratio"])
    cache = {}

    def plan(st):
        def draw(gen, step):
            b = {"z": torch.randn((B,) + shape, generator=gen), "step": int(step),
                 "dm_eps": torch.randn((B,) + shape, generator=gen), "dm_idx": torch.randint(lo, hi, (B,), generator=gen),
                 "fake_eps": torch.randn((B,) + shape, generator=gen),
                 "fake_idx": torch.randint(0, n_lv, (B,), generator=gen)}
            if cond.on:
                b["labels"] = cond.draw(B, gen)
            if K > 1:
                if cfg["gen_inputs"] == "backward":  # one k per batch; the noise of each simulated step
                    b["k"] = torch.full((B,), int(torch.randint(0, K, (1,), generator=gen)))
                    b["sim_eps"] = torch.randn((B, K - 1) + shape, generator=gen)
                else:
                    b["k"] = torch.randint(0, K, (B,), generator=gen)
                    b["x_real_in"], _ = data.labelled(B, gen)
            if gan:
                x_real, y_real = data.labelled(B, gen)
                b["x_real"] = x_real
                if cond.on:
                    b["real_labels"] = y_real if y_real is not None else b["labels"]
                for part in ("gan_fake", "gan_real"):
                    b[part + "_eps"] = torch.randn((B,) + shape, generator=gen)
                    b[part + "_idx"] = torch.randint(0, n_lv, (B,), generator=gen)
            return b

        def gen_input(model, b):
            """(y, sigma) at which the generator is evaluated for this batch."""
            z, lab = b["z"], b.get("labels")
            s0 = sig_k[0].to(z.device)
            if K == 1:
                return s0 * z, s0.expand(len(z))
            k = b["k"]
            if cfg["gen_inputs"] == "data":
                sig = sig_k.to(z.device)[k]
                y = b["x_real_in"] + bcast(sig, z) * z
                return torch.where(bcast(k == 0, z) > 0, s0 * z, y), sig
            y = s0 * z
            with torch.no_grad():  # backward simulation: the current generator's own k steps from noise
                for j in range(int(k[0])):
                    s = sig_k[j].to(z.device).expand(len(z))
                    x = call_denoiser(Dg, model, y, s, lab)
                    y = x + sig_k[j + 1].to(z.device) * b["sim_eps"][:, j]
            return y, sig_k.to(z.device)[k]

        def logits(model, x, eps, idx, lab):
            sig = levels.to(x.device)[idx]
            y = x + bcast(sig, x) * eps
            x_in, c_noise, _ = Df.net_input(y, sig)
            return model(x_in, c_noise.to(y.dtype), labels=lab, both=True)[1]

        def loss(model, b):
            """The generator: DMD's gradient through 1/2 || x - sg(x - grad) ||^2 (+ the GAN term)."""
            lab = b.get("labels")
            y, s = gen_input(model, b)
            x = call_denoiser(Dg, model, y, s, lab)
            cache.update(step=b["step"], x=x.detach())
            with torch.no_grad():
                sig = levels.to(x.device)[b["dm_idx"]]
                x_t = x + bcast(sig, x) * b["dm_eps"]
                real = (T(x_t, sig, labels=lab) if lab is not None else T(x_t, sig)).to(x.dtype)
                fake = call_denoiser(Df, critic_module, x_t, sig, lab)
            out = dm_loss(x, dm_gradient(x, real, fake))
            if gan:
                out = out + float(cfg["gan_weight"]) * F.softplus(
                    -logits(critic_module, x, b["gan_fake_eps"], b["gan_fake_idx"], lab))
            return out

        def critic_loss(cmodel, model, b):
            """The fake score: denoising loss on the generator's samples (+ the head's classification)."""
            lab = b.get("labels")
            if cache.get("step") == b["step"]:
                x = cache["x"]  # this step's samples, from before the generator's update (as the code)
            else:
                with torch.no_grad():
                    y, s = gen_input(model, b)
                    x = call_denoiser(Dg, model, y, s, lab)
            sig = levels.to(x.device)[b["fake_idx"]]
            if not gan:
                return edm_dsm_loss(Df, cmodel, x, sig, b["fake_eps"], lab)
            n = len(x)
            sig_f = levels.to(x.device)[b["gan_fake_idx"]]
            sig_r = levels.to(x.device)[b["gan_real_idx"]]
            y_all = torch.cat([x + bcast(sig, x) * b["fake_eps"], x + bcast(sig_f, x) * b["gan_fake_eps"],
                               b["x_real"] + bcast(sig_r, x) * b["gan_real_eps"]])
            s_all = torch.cat([sig, sig_f, sig_r])
            lab_all = torch.cat([lab, lab, b["real_labels"]]) if lab is not None else None
            x_in, c_noise, c = Df.net_input(y_all, s_all)
            out, logit = cmodel(x_in, c_noise.to(y_all.dtype), labels=lab_all, both=True)
            pred = Df.output_to_x0(out.to(y_all.dtype), y_all, s_all, x_in, c)[:n]
            from ..train.losses import x0_weight

            dsm = x0_weight("edm", sig, Df.process, float(Df.sigma_data)) * (pred - x).pow(2).flatten(1).mean(1)
            cls = F.softplus(logit[n:2 * n]) + F.softplus(-logit[2 * n:])
            return dsm + float(cfg["gan_critic_weight"]) * cls

        def describe(ema_module):
            from ..denoiser import ModelDenoiser

            D_ema = ModelDenoiser(ema_module, Dg.process, Dg.prediction, Dg.sigma_data).eval()
            ref, what = reference_samples(teacher, data, int(cfg["eval_samples"]), int(cfg["seed"]))
            grids = {k: [float(v) for v in sig_k[:k]] + [0.0] for k in range(1, K + 1)}
            measures = {**consistency_rule_measures(D_ema, grids, shape, cond, ref, int(cfg["seed"]), st.job.device),
                        "reference": what}
            write_json(st.folder / "dmd2.json", measures)  # before model.json: a finished run has both
            turns = sum(1 for s in range(int(cfg["steps"])) if critic.student_turn(s))
            sampling = {"sampler": "consistency", "grids": fixed_grids(grids)}
            return student_meta("dmd2", Dg, net_cfg, shape, teacher.kind,
                                teacher.meta.get("data", {}).get("name", teacher.name), teacher.sigma_min,
                                float(sig_k[0]), sampling, cfg, cond=cond,
                                dmd2={"gen_steps": K, "gen_inputs": cfg["gen_inputs"] if K > 1 else None,
                                      "update_ratio": ratio, "fake_warmup": warm, "gan": gan,
                                      "generator_updates": turns},
                                cost={"teacher_evals": turns * B, "seconds": st.seconds})

        critic = Critic(critic_module, critic_loss, lr=cfg["fake_lr"], student_every=ratio, student_from=warm,
                        critic_first=False)
        return Plan(Task(student=gen_net, draw=draw, loss=loss, critic=critic), describe)

    job.stage("", plan)
