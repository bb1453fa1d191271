"""Covariance networks (Bao, Li, Sun, Zhu, Zhang 2022a, "Estimating the optimal covariance with
imperfect mean in diffusion probabilistic models", ICML; survey sec. 4.1): SN-DPM and NPR-DPM.

The DDIM family's reverse step keeps the mean mu(y) = D(y) + (sigma_down / s)(y - D(y)) and
is KL-optimal with the per-dimension variance (their Thm. 1 / eq. 8 in sigma-space, see
:mod:`fewstep.samplers.ancestral`)

    var(y) = sigma_up^2 + (1 - sigma_down / s)^2 Cov[x0 | y],

whose one unknown, diag Cov[x0 | y], a head h trained beside the frozen teacher estimates in
one of the paper's two forms:

- ``sn`` (SN-DPM, "squared noise", their eq. 9): h(y, s) ~ E[eps^2 | y] by
  min E || eps^2 - h(x0 + s eps, s) ||^2 (no teacher call), so Cov = s^2 h - (y - D)^2
  (= s^2 (E[eps^2 | y] - eps_hat^2), exact when the teacher's D is);
- ``npr`` (NPR-DPM, "noise prediction residual", their eq. 11): h ~ E[(x0 - D(y))^2 | y] of
  the teacher's own, imperfect D by min E || (x0 - D(y))^2 / c^2 - h ||^2, so Cov = c^2 h:
  the optimal variance *for this mean* (their point: the imperfect mean's error is in it).

Levels are drawn log-uniformly over the teacher's [sigma_min, sigma_max] (the paper draws the
discrete timestep uniformly). One deviation, stated: NPR's target is in units of
c^2 = s^2 sd^2 / (s^2 + sd^2) (the posterior variance of Gaussian data of variance sd^2)
instead of the paper's eps units (s^2 (eps - eps_hat)^2 = (x0 - D)^2): the same minimiser at
every level, but the net's output stays O(1) from s -> 0 (where c ~ s, the paper's units) to
s >> sd (where the paper's eps-residual is ~ sd^2 / s^2 and its errors are multiplied by s^2
in Cov). SN keeps the paper's units; it inherits their cancellation at high noise
(s^2 (h - eps_hat^2) with h, eps_hat^2 ~ 1), which the measurements show.

The paper trains a new last layer on the frozen pretrained network. Here the head is a whole
network: by default the teacher's own architecture started from its weights and fed the
teacher's input convention (its features, all of them trained), else the default net for the
data (``--init random`` / an exact teacher). The run folder is an auxiliary run (``"role":
"covariance"``): ``fewstep sample TEACHER --sampler ddpm --covariance RUN`` (also ``ddim`` with
``eta``, ``analytic_dpm``) uses it; :func:`fewstep.model.load_covariance` in Python.
``eval.json`` holds the head's error per level: against the exact posterior covariance for an
exact teacher, against the measured mean residual E (x0 - D)^2 (Analytic-DPM's statistic,
averaged per level) otherwise.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..model import COVARIANCE_FORMS, Auxiliary, CovarianceHead, npr_unit
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import bcast, check_student_net, conditioning, data_source, is_exact, load_teacher, log_uniform, \
    net_config, teacher_net_state

OPTIONS = (
    Option("form", str, "npr", "what the head learns: npr (the teacher's residual (x0 - D)^2, NPR-DPM; default) or sn "
           "(the squared noise eps^2, SN-DPM)", choices=COVARIANCE_FORMS),
    Option("init", str, "auto", "head start: auto (the teacher's weights when its net has the head's architecture), "
           "teacher or random", choices=("auto", "teacher", "random")),
    Option("eval_samples", int, 2000, "samples per level of the head's error in eval.json (default 2000)", low=1),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
KINDS = ("points", "image")


def head_target(form: str, x0, eps, y, sigma, D_y, sigma_data: float):
    """What the head regresses on, per coordinate: eps^2 (sn) or (x0 - D(y))^2 / c^2 (npr)."""
    if form == "sn":
        return eps**2
    return (x0 - D_y) ** 2 / bcast(npr_unit(sigma, sigma_data), x0)


def _head(teacher, cfg: dict, sigma_data: float):
    """(net, net config, "input" of model.json or None): the teacher's architecture and weights
    (its input convention) for init auto/teacher where it has a net of that architecture, else
    a fresh net under EDM input scaling."""
    from ..nets import build_net

    net_cfg = net_config(cfg["net"], teacher, teacher.shape, teacher.kind)
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    net_cfg = dict(getattr(net, "config", net_cfg))
    state = None if cfg["init"] == "random" or is_exact(teacher) else teacher_net_state(teacher, net_cfg)
    if cfg["init"] == "teacher" and state is None:
        raise UserError("--init teacher: the teacher has no network of the head's architecture; use --init random "
                        "or give --net the teacher's")
    if state is None:
        return net, net_cfg, None
    net.load_state_dict(state)
    T = teacher.denoiser
    return net, net_cfg, {"process": T.process.config(), "prediction": T.prediction}


def stages(job):
    """One stage in the top folder: the head trained on (x0, eps, level) draws beside the
    frozen teacher, saved as an auxiliary run with its errors in ``eval.json``."""
    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, cfg=cfg, kinds=KINDS, method="covariance")
    cond = conditioning(cfg, teacher)
    data = data_source(cfg["data"], teacher, int(cfg["seed"]))
    if cond.on and not data.num_classes:
        raise UserError(f"the teacher is class-conditional but the data {data.name} has no labels; give labelled "
                        f"--data")
    exact = is_exact(teacher)
    sd = float(data.sigma_data) if exact else float(teacher.meta.get("sigma_data", data.sigma_data))
    net, net_cfg, inp = _head(teacher, cfg, sd)
    if cond.on:
        check_student_net(net, cond)
    form = cfg["form"]
    lo, hi = float(teacher.sigma_min), float(teacher.sigma_max)
    if not 0 < lo < hi:
        raise UserError(f"covariance: the teacher's sigma range [{lo}, {hi}] must be above 0 and not a single level")
    head_meta = {"role": "covariance", "form": form, "output": "map", "sigma_data": sd}
    if inp is not None:
        head_meta["input"] = inp
    T = cond.teacher(teacher.denoiser)
    B = int(cfg["batch_size"])

    def plan(st):
        def draw(gen, step):
            x0, labels = data.labelled(B, gen) if cond.on else (data.draw(B, gen), None)
            batch = {"x0": x0, "eps": torch.randn(x0.shape, generator=gen), "sigma": log_uniform(B, lo, hi, gen)}
            if labels is not None:
                batch["labels"] = cond.drop(labels, gen)
            return batch

        def loss(model, b):
            """Per sample: mean over coordinates of (target - h(y, s))^2 (module docstring)."""
            x0, eps, s, labels = b["x0"], b["eps"], b["sigma"].to(b["x0"].dtype), b.get("labels")
            y = x0 + bcast(s, x0) * eps
            D_y = None
            if form == "npr":
                with torch.no_grad():
                    D_y = T(y, s) if labels is None else T(y, s, labels=labels)
                D_y = D_y.to(x0.dtype)
            h = Auxiliary(model, head_meta)(y, s, labels)
            return (head_target(form, x0, eps, y, s, D_y, sd) - h).pow(2).flatten(1).mean(1)

        def describe(ema_module):
            from ..io import write_json

            ev = evaluate(Auxiliary(ema_module, head_meta), teacher, data, cond, int(cfg["eval_samples"]),
                          int(cfg["seed"]) + 1)
            if st.main:
                write_json(st.folder / "eval.json", ev)
            calls = int(cfg["steps"]) * B * (0 if form == "sn" else (2 if T is not teacher.denoiser else 1))
            return {"format": "fewstep-model-1", **head_meta, "method": "covariance", "teacher": cfg["teacher"],
                    "net": net_cfg, "sigma_min": lo, "sigma_max": hi,
                    "data": {"name": data.name, "kind": teacher.kind, "shape": list(teacher.shape),
                             "num_classes": cond.num_classes},
                    **cond.meta(), "eval": ev["summary"],
                    "cost": {"teacher_evals": calls, "seconds": st.seconds}}

        frozen = {"teacher": teacher.denoiser} if isinstance(teacher.denoiser, torch.nn.Module) else {}
        return Plan(Task(student=net, draw=draw, loss=loss, frozen=frozen), describe)

    job.stage("", plan)


EVAL_LEVELS = 9


@torch.no_grad()
def evaluate(aux, teacher, data, cond, n: int, seed: int) -> dict:
    """The head's diag Cov[x0 | y] against the truth, per level (``EVAL_LEVELS`` log-spaced over
    the teacher's range), on y = x0 + s eps from the data: for an exact teacher the relative
    error E|Cov_head - Cov_exact| / E Cov_exact (the exact posterior covariance); for any
    teacher the ratio E Cov_head / E (x0 - D)^2 (1 when the head is calibrated on average)."""
    head = CovarianceHead(aux)
    gen = torch.Generator().manual_seed(seed)
    dev = next(aux.parameters()).device
    D = cond.teacher(teacher.denoiser)
    levels = torch.logspace(math.log10(teacher.sigma_min), math.log10(teacher.sigma_max), EVAL_LEVELS,
                            dtype=torch.float64)
    rows = []
    for s in levels.tolist():
        x0, labels = data.labelled(n, gen) if cond.on else (data.draw(n, gen), None)
        eps = torch.randn(x0.shape, generator=gen)
        x0, eps = x0.to(dev), eps.to(dev)
        y = x0 + s * eps
        sig = torch.full((n,), s, dtype=y.dtype, device=dev)
        kw = {} if labels is None else {"labels": labels.to(dev)}
        den = D(y, sig, **kw).to(y.dtype)
        cov = head(y, sig, den, **kw).clamp_min(0)
        row = {"sigma": s, "head_mean": float(cov.mean()), "residual_mean": float(((x0 - den) ** 2).mean())}
        row["calibration"] = row["head_mean"] / max(row["residual_mean"], 1e-30)
        if is_exact(teacher):
            true = teacher.denoiser.posterior_variance(y.double(), s, kw.get("labels")).to(y.dtype)
            row["exact_mean"] = float(true.mean())
            row["relative_error"] = float((cov - true).abs().mean() / true.mean().clamp_min(1e-30))
        rows.append(row)
    key = "relative_error" if is_exact(teacher) else "calibration"
    summary = {"levels": EVAL_LEVELS, key: [round(r[key], 4) for r in rows]}
    return {"per_level": rows, "summary": summary}
