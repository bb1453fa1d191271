"""Discriminator guidance (Kim, Na, Kim, Kang & Moon 2022, "Refining generative process with
discriminator guidance in score-based diffusion models", ICML 2023; official code
github:alsdudrla10/DG, ``train.py``, ``classifier_lib.py``, ``generate.py``).

A frozen teacher with score s_theta samples from p_theta, not from the data p_r. Diffuse both
to level sigma (sigma-space, y = x0 + sigma eps): the gap between the two scores is the
paper's correction term

    c(y, sigma) = grad_y log p_r(y; sigma) - grad_y log p_theta(y; sigma) = grad_y log (p_r / p_theta),

so s_theta + c is the data score. A time-dependent discriminator d_phi(y, sigma) trained with
the paper's cross-entropy (its discriminator loss, Sec. 3)

    L(phi) = int lambda(sigma) ( E_{x0 ~ p_r} [ -log d_phi(x0 + sigma eps, sigma) ]
                               + E_{x0 ~ p_theta} [ -log(1 - d_phi(x0 + sigma eps, sigma)) ] ) dsigma

is optimal at d* = p_r / (p_r + p_theta) (at every level), where log(d* / (1 - d*)) = log p_r -
log p_theta: the correction is c = grad_y log(d / (1 - d)), the gradient of the
discriminator's logit. Sampling adds w_DG c to the teacher's score (the guided generative
SDE / ODE); in the sigma-space denoiser this is :class:`fewstep.denoiser.DiscriminatorGuided`,
D_dg = D + w sigma^2 grad_y logit, so every sampler uses it unchanged (one discriminator
gradient per evaluation).

Here: the fake samples are the teacher's own (``make_pairs``: the x0 side of resumable
chunks of (x_T, sampler(x_T)) made with ``--pair-sampler`` at ``--pair-nfe``), the real ones
``--data`` (else the teacher's training data or mixture); each training row holds one real
and one fake sample, each diffused to its own level, and the per-row loss is the mean of the
two binary cross-entropies on the logit (softplus(-l_real) + softplus(l_fake)) / 2. The
discriminator is any net of the project (``--net``; default: the teacher's architecture, an
MLP for points), trained from fresh weights (``--init random``: EDM input scaling c_in y,
c_noise = ln(sigma) / 4 with the real data's sigma_data) or from the teacher's weights
(``--init teacher``: then fed as the teacher is, its process and prediction, recorded as
``"input"``), and evaluated through :class:`fewstep.model.Auxiliary` (the logit is the mean of
the net's output), so training and loading see the same inputs. A class-conditional teacher's
labels go to the discriminator too (the paper's conditional CIFAR-10 / ImageNet discriminators
take the class); the real data must then be labelled. The run's model.json (``"role": "discriminator"``) is loaded with
:func:`fewstep.model.load_auxiliary`; eval.json holds its held-out accuracy per level band
(and, where the teacher and the data are both exact mixtures, the accuracy of the optimal
discriminator logit* = log p_r - log p_theta beside it).

Levels and weighting: the official code draws the VP time by importance sampling
proportional to the likelihood weighting g^2 / sigma^2 (``vpsde.get_diffusion_time``), which
is exactly log sigma uniform between sigma(t = 1e-5) ~ 1e-3 and sigma(t = 1) ~ 152 (VE-
equivalent, data in [-1, 1]) with the loss then unweighted; here sigma is log-uniform on the
teacher's own range [sigma_min, sigma_max] (the levels its samplers visit), unweighted.

Where this differs from the paper and its code: (1) their discriminator is a small head on the
frozen features of a pretrained noise-aware ADM classifier; here it is a whole net of the
project, trained from scratch or fine-tuned whole from the teacher's weights (no frozen
feature extractor, no separate head); (2) they clip d to
[1e-5, 1 - 1e-5] before the log ratio (zero gradient for saturated samples); here the logit is
used as is; (3) AdamW with the run's ``--lr`` / EMA of the loop instead of Adam (3e-4, weight
decay 1e-7) and no EMA; (4) the recorded default weight ``dg_weight`` is 1 (the theory's weight,
at which the corrected score is the data score, applied at every evaluation); the official
unconditional CIFAR-10 run uses 2 on the first (Euler) evaluation of each Heun step and 0 on
the second, about 1 on the step's average, and cuts the correction below VP time 0.01 (the
wrapper's ``guide_sigma_min``; not used here: the discriminator is trained on every level sampled).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import N_DATA, check_student_net, conditioning, data_source, is_exact, load_teacher, log_uniform, \
    net_config, teacher_net_state
from .pairs import make_pairs, pair_spec, stage_cost

DG_WEIGHT = 1.0  # the theory's w (paper: s_theta + w c with c = grad log(d / (1 - d)); exact at w = 1)
BANDS = 4        # level bands (log-spaced over the teacher's range) of the held-out accuracy
OPTIONS = (
    Option("pair_sampler", str, None, "sampler that makes the teacher's samples (default: the teacher's own, else "
           "heun)", none="the teacher's own sampler", example="heun"),
    Option("pair_nfe", int, 64, "teacher evaluations per sample (default 64)", low=1),
    Option("pair_grid", str, "karras", "sigma grid of the teacher's sampler (default karras)"),
    Option("pairs", int, 20000, "teacher samples (the discriminator's fake side; default 20000)", low=2),
    Option("pair_batch", int, 1000, "teacher samples per batch, one resumable chunk each (default 1000)", low=1),
    N_DATA,
    Option("dg_weight", float, DG_WEIGHT, "the guidance weight recorded in model.json as the run's default "
           "(default 1: the theory's weight, at which an optimal discriminator gives the data score)", low=0.0),
    Option("init", str, "random", "discriminator start: random (fresh weights, EDM input scaling) or teacher (the "
           "teacher's weights, where its net has the discriminator's architecture, and its input convention)",
           choices=("random", "teacher")),
    Option("eval_samples", int, 1000, "teacher samples held out of training (and real ones) for the held-out "
           "accuracy per level band in eval.json (default 1000; 0: none)", low=0),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)


def check_options(cfg: dict) -> None:
    if 2 * int(cfg["eval_samples"]) > int(cfg["pairs"]):
        raise UserError(f"--eval-samples {cfg['eval_samples']} would hold out more than half of the --pairs "
                        f"{cfg['pairs']} teacher samples; give fewer --eval-samples or more --pairs")


# ------------------------------------------------------------------------ the idea
def bce_rows(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Per-row binary cross-entropy of the paper's discriminator loss, real = 1 and fake = 0, on
    logits: (-log sigmoid(l_r) - log(1 - sigmoid(l_f))) / 2 = (softplus(-l_r) + softplus(l_f)) / 2."""
    return 0.5 * (F.softplus(-logit_real) + F.softplus(logit_fake))


def aux_meta(sigma_data: float) -> dict:
    """What :class:`fewstep.model.Auxiliary` reads: the role, a logit output, the input scale."""
    return {"role": "discriminator", "output": "logit", "sigma_data": float(sigma_data)}


def real_data(cfg: dict, teacher, cond):
    """The real side: ``--data`` (else the teacher's data), checked against the teacher: the
    same per-sample shape and kind, and labels with the teacher's classes when it is conditional."""
    data = data_source(cfg["data"], teacher, int(cfg["seed"]), n=cfg["n_data"])
    where = f"--data {cfg['data']}" if cfg["data"] else f"the teacher's data {data.name}"
    if tuple(data.shape) != tuple(teacher.shape) or data.kind != teacher.kind:
        raise UserError(f"{where} has {data.kind} samples of shape {list(data.shape)}, the teacher {teacher.name} "
                        f"{teacher.kind} of shape {list(teacher.shape)}; give data of the teacher's shape")
    if cond.on and (data.num_classes != cond.num_classes or data.draw_labelled is None):
        raise UserError(f"{where} has {data.num_classes or 'no'} labelled classes, the class-conditional teacher "
                        f"{cond.num_classes}: its discriminator takes the class; give the teacher's labelled data")
    return data


def band_edges(sigma_min: float, sigma_max: float, bands: int = BANDS) -> list:
    """Log-spaced edges of ``bands`` level bands over [sigma_min, sigma_max]."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [math.exp(lo + (hi - lo) * i / bands) for i in range(bands + 1)]


@torch.no_grad()
def band_accuracy(logit_fn, real, fake, labels_real, labels_fake, edges, seed: int, exact=None) -> list:
    """Per level band: accuracy (real logit > 0, fake logit < 0; the mean of the two sides) and the
    cross-entropy of ``logit_fn(y, sigma, labels=)`` on held-out samples, each diffused to a level
    drawn log-uniform in the band; ``exact`` (a second logit function: the optimal one) beside it."""
    g = torch.Generator().manual_seed(int(seed) + 6007)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        row = {"sigma_low": float(lo), "sigma_high": float(hi)}
        ys, ss = [], []
        for x in (real, fake):
            s = log_uniform(len(x), lo, hi, g)
            ys.append(x + s.reshape((-1,) + (1,) * (x.ndim - 1)) * torch.randn(x.shape, generator=g))
            ss.append(s)
        lab = None if labels_real is None else (labels_real, labels_fake)
        for name, fn in (("", logit_fn), ("optimal_", exact)):
            if fn is None:
                continue
            lr = fn(ys[0], ss[0], **({"labels": lab[0]} if lab else {})).float().cpu()
            lf = fn(ys[1], ss[1], **({"labels": lab[1]} if lab else {})).float().cpu()
            row[name + "accuracy"] = 0.5 * (float((lr > 0).float().mean()) + float((lf < 0).float().mean()))
            row[name + "bce"] = float(bce_rows(lr.double(), lf.double()).mean())
        out.append(row)
    return out


def exact_logit(teacher, data_spec):
    """logit* = log p_r(y; sigma) - log p_theta(y; sigma) when the teacher and the real data are
    both exact mixtures (``gmm:``), else None."""
    from ..data.gmm import GaussianMixture

    if not is_exact(teacher) or not (isinstance(data_spec, str) and data_spec.startswith("gmm:")):
        return None
    A, B = teacher.denoiser, GaussianMixture.load(data_spec[4:])

    def logit(y, sigma, labels=None):
        y = y.double().cpu()
        lab = None if labels is None else labels.cpu()
        return B.log_prob(y, sigma.double().cpu(), lab) - A.log_prob(y, sigma.double().cpu(), lab)

    return logit


# ----------------------------------------------------------------------------- stages
def stages(job):
    """One stage in the top folder: the teacher's samples, then the discriminator's loss."""
    from ..model import Auxiliary
    from ..nets import build_net

    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, method="discriminator")
    cond = conditioning(cfg, teacher)
    data = real_data(cfg, teacher, cond)  # bad options fail before any work
    net_cfg = net_config(cfg["net"], teacher, teacher.shape, teacher.kind, cond.num_classes)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = dict(getattr(net, "config", net_cfg))
    check_student_net(net, cond)
    pair_spec(cfg, teacher, cond)
    smin, smax = float(teacher.sigma_min), float(teacher.sigma_max)
    if not 0 < smin < smax:
        raise UserError(f"teacher {teacher.name} has the level range [{smin}, {smax}]; the discriminator needs "
                        f"0 < sigma_min < sigma_max")
    meta_aux = aux_meta(data.sigma_data)
    if cfg["init"] == "teacher":  # start from the teacher's net, fed as the teacher is (its process, prediction)
        state = teacher_net_state(teacher, net_cfg)
        if state is None:
            raise UserError("--init teacher: the teacher has no network of the discriminator's architecture (--net); "
                            "use --init random or leave out --net")
        net.load_state_dict(state)
        T = teacher.denoiser
        meta_aux.update(sigma_data=float(T.sigma_data),
                        input={"process": T.process.config(), "prediction": T.prediction})
    n_eval = int(cfg["eval_samples"])
    shape = tuple(teacher.shape)

    def plan(st):
        _, fakes, pinfo = make_pairs(teacher, cfg, st, cond)
        fake_labels = pinfo.pop("labels")
        n = len(fakes) - n_eval  # the last eval_samples teacher samples are held out
        B = int(cfg["batch_size"])

        def draw(gen, step):
            idx = torch.randint(0, n, (B,), generator=gen)
            real, real_labels = data.labelled(B, gen)
            batch = {"real": real.float(), "fake": fakes[idx],
                     "s_real": log_uniform(B, smin, smax, gen), "s_fake": log_uniform(B, smin, smax, gen),
                     "e_real": torch.randn((B,) + shape, generator=gen),
                     "e_fake": torch.randn((B,) + shape, generator=gen)}
            if cond.on:
                batch["l_real"], batch["l_fake"] = cond.drop(real_labels.long(), gen), fake_labels[idx]
            return batch

        def loss(model, b):
            """The paper's cross-entropy: real data (1) and teacher samples (0), both diffused."""
            d = Auxiliary(model, meta_aux)
            s = torch.cat([b["s_real"], b["s_fake"]])
            x0 = torch.cat([b["real"], b["fake"]])
            y = x0 + s.reshape((-1,) + (1,) * (x0.ndim - 1)) * torch.cat([b["e_real"], b["e_fake"]])
            labels = torch.cat([b["l_real"], b["l_fake"]]) if cond.on else None
            logit = d(y, s, labels)
            return bce_rows(*logit.float().chunk(2))

        def describe(ema_module):
            from ..io import write_json

            ev = None
            if n_eval:
                dev = next(ema_module.parameters()).device
                d = Auxiliary(ema_module, meta_aux).eval()

                def logit_fn(y, sigma, labels=None):
                    return d(y.to(dev), sigma.to(dev), None if labels is None else labels.to(dev))

                g = torch.Generator().manual_seed(int(cfg["seed"]) + 31337)
                real, real_labels = held_out_real(cfg, data, n_eval, g, cond.on)
                fake_l = fake_labels[n:] if cond.on else None
                bands = band_accuracy(logit_fn, real, fakes[n:], real_labels, fake_l, band_edges(smin, smax),
                                      int(cfg["seed"]), exact_logit(teacher, cfg["data"]))
                ev = {"held_out": n_eval, "real": data.name, "bands": bands}
                write_json(st.folder / "eval.json", ev)  # before model.json: a finished run has both
            meta = {
                "format": "fewstep-model-1",
                "role": "discriminator",
                "method": "discriminator",
                "output": "logit",
                "teacher": cfg["teacher"],
                "net": net_cfg,
                "data": {"name": data.name, "kind": teacher.kind, "shape": list(shape),
                         "num_classes": cond.num_classes},
                "sigma_data": meta_aux["sigma_data"],
                "sigma_min": smin,
                "sigma_max": smax,
                "levels": "log-uniform",
                "dg_weight": float(cfg["dg_weight"]),
                "pairs": {k: pinfo[k] for k in ("sampler", "nfe", "grid", "pairs")},
                "config": {k: v for k, v in cfg.items()},
                "cost": stage_cost(st, pinfo),
            }
            if "input" in meta_aux:
                meta["input"] = meta_aux["input"]
            if cond.on:
                meta.update(cond.meta())
            if ev is not None:
                meta["eval"] = {"accuracy": [round(r["accuracy"], 4) for r in ev["bands"]],
                                "sigma_bands": [[r["sigma_low"], r["sigma_high"]] for r in ev["bands"]]}
            return meta

        return Plan(Task(student=net, draw=draw, loss=loss), describe)

    job.stage("", plan)


def held_out_real(cfg: dict, data, n: int, gen: torch.Generator, labelled: bool):
    """n real samples the discriminator did not train on where the data allows: fresh draws of
    a mixture or generated set, a data set's test split or the samples after its training
    subset (:func:`fewstep.data.registry.held_out`), else training samples; (x, their labels
    when ``labelled``, else None)."""
    spec = cfg["data"] or data.name
    if str(spec).startswith("gmm:"):
        x, labels = data.labelled(n, gen)
        return x.float(), (labels.long() if labelled else None)
    from ..data.registry import held_out

    try:
        ds, _ = held_out(spec, n, int(cfg["seed"]) + 7919, cfg["n_data"], int(cfg["seed"]))
    except UserError:
        x, labels = data.labelled(n, gen)
        return x.float(), (labels.long() if labelled else None)
    if labelled and ds.labels is None:
        x, labels = data.labelled(n, gen)
        return x.float(), labels.long()
    return ds.x.float(), (ds.labels.long() if labelled else None)
