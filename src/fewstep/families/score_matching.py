"""Score matching: one score network s_theta(x), sampled by Langevin dynamics (survey sec. 1.3,
eq. 15-19).

A score-based model learns the data score grad_x log p(x) directly, so it never needs the
normaliser an energy model has. It is trained by minimising the Fisher divergence
(eq. 15-16) ``1/2 E_p ||s_theta(x) - grad log p(x)||^2``, which integration by parts turns
into an objective without the unknown data score (``--sm-objective``):

``exact``
    Hyvarinen 2005, eq. 18: ``J(s) = E_p[ 1/2 ||s(x)||^2 + tr(grad_x s(x)) ]``, with the exact
    trace of the Jacobian (one backward pass per coordinate, ``create_graph=True`` so that
    the trace is differentiated in training). ``J(s) = 1/2 E||s - s_p||^2 - 1/2 E||s_p||^2``,
    so its minimiser is the data score. d backward passes: refused above d = 64.
``sliced`` (the default)
    Sliced score matching (Song, Garg, Shi & Ermon 2019): the trace by random projections,
    ``E_v[v^T (grad_x s) v] = tr(grad_x s)`` for ``E[v v^T] = I``; ``v ~ N(0, I)``,
    ``--sm-slices`` of them per sample, one vector-Jacobian product ``v^T grad_x s`` by
    autograd for all of them. The default is their variance-reduced form SSM-VR,
    ``v^T (grad_x s) v + 1/2 ||s||^2`` (the exact expectation of the plain form's
    ``1/2 (v^T s)^2`` over v); ``--sm-sliced-vr false`` gives the plain SSM loss
    ``v^T (grad_x s) v + 1/2 (v^T s)^2``. Both are unbiased estimates of eq. 18.
``dsm``
    Denoising score matching at one level sigma = ``--sm-sigma`` (Vincent 2011, eq. 19 with
    the kernel N(x~; x, sigma^2 I)): ``1/2 E ||s(x + sigma z) + z / sigma||^2`` weighted by
    sigma^2, i.e. ``1/2 E ||sigma s(x + sigma z) + z||^2``; its minimiser is the score of the
    noised density p_sigma = p * N(0, sigma^2 I) (Vincent's identity: the loss is
    ``sigma^2 / 2 E||s - s_sigma||^2`` plus a constant).

Parametrisation: for ``exact``/``sliced`` the network's output IS the score; for ``dsm`` the
output is ``sigma * s`` (``s = net(x) / sigma``, the noise conditioning by division of
NCSNv2, Song & Ermon 2020), which keeps the regression target ``-z`` of unit scale. The net
(:func:`fewstep.nets.build_net`, an MLP for points, a UNet for images) gets the constant
``c_noise = log(level) / 4``.

The model's level: ``sm_sigma`` for ``dsm``; for ``exact``/``sliced`` the model is the data
score itself (sigma = 0), and its level for sampling is taken as :data:`DATA_LEVEL` = 0.01
(the denoiser ``D = x + sigma^2 s`` needs a sigma; Langevin at that level on an exact-SM
model samples the data distribution itself, up to the step's bias).

Sampling (the own rule): unadjusted Langevin dynamics at the model's level (survey eq. 14
discretised, sampler ``langevin``: ``x <- x + eps s(x) + sqrt(2 eps) z``) from
``N(0, sigma_max^2 I)`` with ``sigma_max`` = twice the data's root-mean-square (about the
origin, where the start noise is centred), :data:`DEFAULT_NFE` = 1000 steps. The default
step ``eps = 1e-3 rms^2`` (``--sm-step-size`` overrides): the step scales with the data's
square (Langevin is invariant under x -> a x with eps -> a^2 eps), and ULA's stationary
variance in a mode of variance v is v / (1 - eps / 2v), so modes of std >= 0.1 rms (the
finest structure of the standardised toys: moons' noise is 0.14) come out at most ~5% too
wide, while 1000 steps still cover a diffusion length sqrt(2 * 1000 eps) ~ 1.4 rms (on the
exact ring-of-8 score: radial std 0.104 for 0.1, equal mode weights). Langevin at one
level does not fix the relative weights of separated modes (Song & Ermon 2019, sec. 3.2):
that is NCSN's reason for annealing (:mod:`.ncsn`).

The Model's denoiser is :class:`fewstep.families.ScoreDenoiser` (``D = x + sigma^2 s``) with
process ``EDM(level, sigma_max)``: every sampler runs on it and bench counts its
evaluations, but only samplers that stay at the model's level (langevin, mala when an
energy exists) are meaningful; a single-level score is no diffusion model.

:func:`score_error` is the relative L2 error of a score against a Gaussian mixture's exact
one, ``E||s_theta - s_sigma||^2 / E||s_sigma||^2`` under p_sigma (used by :func:`evaluate`,
by :mod:`.ncsn` per level, and by benchmark scripts).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import UserError
from . import Objective, ScoreDenoiser, option_flag, option_number

OBJECTIVES = ("exact", "sliced", "dsm")
EXACT_MAX_DIM = 64     # exact-trace score matching costs one backward pass per coordinate
DATA_LEVEL = 0.01      # the sampling level of a data-score model (exact / sliced)
DEFAULT_NFE = 1000     # Langevin steps of the own rule
STEP_PER_RMS2 = 1e-3   # default Langevin step = STEP_PER_RMS2 * rms(data)^2
START_PER_RMS = 2.0    # sigma_max (start std) = START_PER_RMS * rms(data)
EVAL_N = 2000          # samples of the score error in evaluate()

DEFAULTS = {
    "sm_objective": "sliced",
    "sm_sigma": 0.1,
    "sm_slices": 1,
    "sm_sliced_vr": True,
    "sm_step_size": None,
}

HELP = {
    "sm_objective": "exact (Hyvarinen 2005, eq. 18; d <= 64), sliced (Song et al. 2019) or dsm (Vincent 2011, eq. 19)",
    "sm_sigma": "the noise level of --sm-objective dsm (the model is the score of the data noised at it)",
    "sm_slices": "random projections v ~ N(0, I) per sample for --sm-objective sliced",
    "sm_sliced_vr": "sliced: the variance-reduced loss SSM-VR (1/2 ||s||^2 for 1/2 (v^T s)^2); false: plain SSM",
    "sm_step_size": "Langevin step of the own sampling rule; null: 1e-3 * rms(data)^2",
}


# ------------------------------------------------------------------------ the objectives
def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def exact_sm_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, create_graph: bool = True) -> Tensor:
    """Hyvarinen's score-matching loss (survey eq. 18) per sample, ``[b]``:
    ``1/2 ||s(x)||^2 + tr(grad_x s(x))``, the trace exact (one backward pass per coordinate).

    ``score_fn(x) -> s`` shaped like x; ``create_graph`` keeps the trace differentiable (for
    training)."""
    from ..metrics.likelihood import trace_exact

    x = x.detach().requires_grad_(True)
    s = _flat(score_fn(x))
    return 0.5 * s.pow(2).sum(1) + trace_exact(s, x, create_graph=create_graph)


def sliced_sm_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, variance_reduced: bool = True,
                   create_graph: bool = True) -> Tensor:
    """Sliced score matching (Song et al. 2019) per sample, ``[b]``, averaged over the
    projections ``v`` ``[b, M, *x.shape[1:]]``:

        SSM-VR: v^T (grad_x s) v + 1/2 ||s||^2      plain SSM: v^T (grad_x s) v + 1/2 (v^T s)^2

    Both are unbiased for eq. 18 when E[v v^T] = I. The M copies of each sample go through
    the score in one batch, and one vector-Jacobian product ``v^T grad_x s`` (autograd)
    serves all of them."""
    b, m = v.shape[0], v.shape[1]
    if v.shape[0] != x.shape[0] or v.shape[2:] != x.shape[1:]:
        raise ValueError(f"sliced_sm_loss: projections of shape {list(v.shape)} do not fit samples {list(x.shape)}")
    xr = x.detach().repeat_interleave(m, dim=0).requires_grad_(True)
    vr = v.reshape(b * m, *x.shape[1:]).to(xr.dtype)
    s = score_fn(xr)
    (g,) = torch.autograd.grad((s * vr).sum(), xr, create_graph=create_graph)  # v^T grad_x s, per copy
    vjv = (_flat(g) * _flat(vr)).sum(1)
    half = 0.5 * _flat(s).pow(2).sum(1) if variance_reduced else 0.5 * (_flat(s) * _flat(vr)).sum(1).pow(2)
    return (vjv + half).reshape(b, m).mean(1)


def dsm_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, z: Tensor, sigma) -> Tensor:
    """Denoising score matching (Vincent 2011; survey eq. 19) with the Gaussian kernel at
    level sigma (a number or one per sample), weighted by lambda(sigma) = sigma^2, per
    sample ``[b]``:

        sigma^2 * 1/2 ||s(x + sigma z) + z / sigma||^2 = 1/2 ||sigma s(x + sigma z) + z||^2

    (grad log N(x~; x, sigma^2 I) = -z / sigma). ``score_fn(x~)`` is the score at that level."""
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    sig = sig.expand(x.shape[0]).reshape(-1, *([1] * (x.dim() - 1)))
    s = score_fn(x + sig * z)
    return 0.5 * _flat(sig * s + z).pow(2).sum(1)


# ------------------------------------------------------------------------ the score error
@torch.no_grad()
def score_error(score_fn: Callable, gmm, sigma: float, n: int = EVAL_N, seed: int = 0,
                batch: int = 1024) -> float:
    """Relative L2 error ``E||s_theta(y) - s_sigma(y)||^2 / E||s_sigma(y)||^2`` of a score
    against the exact score s_sigma of the Gaussian mixture ``gmm`` (a
    :class:`fewstep.data.gmm.GaussianMixture`) noised at ``sigma`` (0: the data score), under
    y ~ p_sigma: n samples x ~ gmm plus sigma z, drawn with ``seed``.

    ``score_fn(y, sigma) -> score`` gets float32 batches of ``batch`` points (on the CPU;
    wrap it to move them) and a python float; 0 is a perfect score, 1 that of s = 0."""
    if int(n) < 1:
        raise UserError(f"score_error: n must be a positive count, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    x = gmm.sample(int(n), generator=gen)
    y = x + float(sigma) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    exact = gmm.score(y, float(sigma))
    est = torch.cat([_flat(score_fn(y[i:i + batch].float(), float(sigma))).double().cpu()
                     for i in range(0, len(y), batch)])
    return float((est - exact).pow(2).sum() / exact.pow(2).sum())


def mixture_of(cfg: dict, shape) -> Optional[object]:
    """The exact :class:`~fewstep.data.gmm.GaussianMixture` behind ``cfg['data']`` when it is
    ``gmm:FILE.npz`` (and fits the model's ``shape``), else None."""
    spec = str(cfg.get("data", ""))
    if not spec.startswith("gmm:"):
        return None
    from ..data.gmm import GaussianMixture

    gmm = GaussianMixture.load(spec[len("gmm:"):])
    return gmm if math.prod(shape) == gmm.dim else None


# ------------------------------------------------------------------------ the module
class ScoreNet(nn.Module):
    """A score ``s(x, sigma)`` from a net called as ``net(x, c_noise)``.

    ``level`` given: a single-level model, c_noise = log(level) / 4 constant and sigma
    ignored; ``level`` None: noise-conditional (NCSN), c_noise = log(sigma) / 4 per sample.
    ``divide``: ``s = net(...) / sigma`` (NCSNv2's noise conditioning by division, Song &
    Ermon 2020; the net predicts sigma * s = -E[z | x~]); else the output is the score."""

    def __init__(self, net: nn.Module, level: Optional[float], divide: bool):
        super().__init__()
        self.net, self.level, self.divide = net, None if level is None else float(level), bool(divide)

    def forward(self, x: Tensor, sigma=None) -> Tensor:
        if self.level is not None:
            sig = torch.full((x.shape[0],), self.level, dtype=x.dtype, device=x.device)
        elif sigma is None:
            raise ValueError("a noise-conditional score net needs sigma")
        else:
            sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        out = self.net(x, 0.25 * torch.log(sig))
        return out / sig.reshape(-1, *([1] * (x.dim() - 1))) if self.divide else out


def build_score_net(cfg: dict, data, level: Optional[float], divide: bool) -> ScoreNet:
    """The :class:`ScoreNet` of ``cfg['net']`` (None: :func:`fewstep.nets.net_config_defaults`
    for the data, unconditional)."""
    from ..nets import build_net, net_config_defaults

    net_cfg = cfg.get("net") or net_config_defaults(data.kind, data.shape)
    return ScoreNet(build_net(net_cfg), level, divide)


def net_meta(module: nn.Module) -> dict:
    """The fields of ``model.json`` that :func:`rebuild` needs."""
    m = getattr(module, "module", module)
    return {"net": m.net.config, "parametrization": {"level": m.level, "divide": m.divide}}


def rebuild(meta: dict) -> ScoreNet:
    """A fresh :class:`ScoreNet` from ``model.json`` (the caller loads the weights)."""
    from ..nets import build_net

    p = meta["parametrization"]
    return ScoreNet(build_net(meta["net"]), p["level"], p["divide"])


def score_model(module: nn.Module, meta: dict, name: str, device, sampler: str):
    """The :class:`fewstep.model.Model` of a score module: ``ScoreDenoiser`` (D = x + sigma^2 s),
    process ``EDM(sigma_min, sigma_max)`` of ``meta``, its own rule in ``meta['sampling']``."""
    from ..model import Model
    from ..process import EDM

    lo, hi = float(meta["sigma_min"]), float(meta["sigma_max"])
    data = meta.get("data") or {}
    if "shape" not in data:
        raise UserError(f"{name or 'the model'}: model.json has no data shape; write it with 'fewstep train'")
    D = ScoreDenoiser(module, lambda x, sigma: module(x, sigma))
    return Model(D, EDM(lo, hi), data["shape"], lo, hi, num_classes=0, default_sampler=sampler,
                 kind=data.get("kind", "points"), name=name, meta=meta, device=device)


def data_rms(data) -> float:
    """Root-mean-square of the data's values about the origin (where samplers' noise is centred)."""
    return float(data.x.double().pow(2).mean().sqrt())


# ------------------------------------------------------------------------ option checks
def check_unconditional(cfg: dict, family: str) -> None:
    if cfg.get("conditional"):
        raise UserError(f"--family {family} learns an unconditional score; drop --conditional "
                        f"(class-conditional models: --family diffusion)")


# ------------------------------------------------------------------------ the contract
def _options(cfg: dict) -> dict:
    obj = cfg.get("sm_objective")
    if obj not in OBJECTIVES:
        raise UserError(f"--sm-objective {obj!r} is not one of {', '.join(OBJECTIVES)}")
    return {"objective": obj, "sigma": option_number(cfg, "sm_sigma"), "slices": option_number(cfg, "sm_slices", 1, integer=True),
            "vr": option_flag(cfg, "sm_sliced_vr"), "step": option_number(cfg, "sm_step_size", none_ok=True)}


def _level(o: dict) -> float:
    return o["sigma"] if o["objective"] == "dsm" else DATA_LEVEL


def check(cfg: dict, data) -> None:
    """Refuse options that cannot work on ``data`` (before anything is written)."""
    o = _options(cfg)
    check_unconditional(cfg, "sm")
    if o["objective"] == "exact" and data.kind == "image":
        raise UserError(f"--sm-objective exact on images ('{data.name}', {data.dim} values per sample) takes one "
                        f"backward pass per pixel through the UNet; use --sm-objective sliced or dsm")
    if o["objective"] == "exact" and data.dim > EXACT_MAX_DIM:
        raise UserError(f"--sm-objective exact takes one backward pass per coordinate: {data.dim} values per sample "
                        f"is too many (at most {EXACT_MAX_DIM}); use --sm-objective sliced or dsm")


def objective(cfg: dict, data) -> Objective:
    """The score net and its loss (exact / sliced / dsm, see the module docstring). Each
    step draws the batch indices, and the projections v (sliced) or the noise z (dsm),
    from the step's generator."""
    o = _options(cfg)
    obj, sigma, m = o["objective"], o["sigma"], o["slices"]
    module = build_score_net(cfg, data, _level(o), divide=obj == "dsm")
    x_all, B, shape = data.x, int(cfg["batch_size"]), tuple(data.shape)

    def draw(gen, step):
        batch = {"x": x_all[torch.randint(0, len(x_all), (B,), generator=gen)]}
        if obj == "sliced":
            batch["v"] = torch.randn((B, m) + shape, generator=gen)
        elif obj == "dsm":
            batch["z"] = torch.randn((B,) + shape, generator=gen)
        return batch

    def loss(model, b):
        score = lambda y: model(y)  # noqa: E731  (the wrapped module's forward)
        if obj == "exact":
            return exact_sm_loss(score, b["x"])
        if obj == "sliced":
            return sliced_sm_loss(score, b["x"], b["v"], variance_reduced=o["vr"])
        return dsm_loss(score, b["x"], b["z"], sigma)

    return Objective(module=module, draw=draw, loss=loss)


def meta(cfg: dict, module: nn.Module, data) -> dict:
    """``model.json`` fields: the net, the objective, the level, the start std and the own rule."""
    o = _options(cfg)
    rms = data_rms(data)
    level = _level(o)
    step = o["step"] if o["step"] is not None else STEP_PER_RMS2 * rms ** 2
    return {
        "family": "sm",
        **net_meta(module),
        "objective": o["objective"],
        "sliced_vr": o["vr"],
        "slices": o["slices"],
        "trained_sigma": o["sigma"] if o["objective"] == "dsm" else 0.0,  # the level of the learned score
        "sigma_min": level,
        "sigma_max": max(START_PER_RMS * rms, 2.0 * level),
        "default_nfe": DEFAULT_NFE,
        "sampling": {"sampler": "langevin", "options": {"step_size": float(step)}},
    }


def build(meta: dict) -> nn.Module:
    return rebuild(meta)


def as_model(module: nn.Module, meta: dict, name: str, device):
    return score_model(module, meta, name, device, "langevin")


def evaluate(model, data, cfg: dict) -> dict:
    """The sampling cost of the own rule and, for ``gmm:`` data, the relative score error
    against the exact mixture's score at the level the model learned (the noised data's
    for dsm; the data's own, sigma = 0, for exact/sliced, or the sampling level 0.01 where
    a component is singular)."""
    out = {"sampling_rule": model.meta["sampling"]["sampler"], "sampling_nfe": int(model.meta["default_nfe"])}
    gmm = mixture_of(cfg, model.shape)
    if gmm is None:
        return out
    sigma = float(model.meta.get("trained_sigma", model.sigma_min))
    if sigma == 0.0 and float(gmm.lam.min()) <= 0.0:
        sigma = float(model.sigma_min)
    fn = lambda y, s: model.denoiser.score(y.to(model.device), s)  # noqa: E731
    n = min(int(cfg.get("eval_samples") or EVAL_N), 20000)
    out.update(score_rel_error=score_error(fn, gmm, sigma, n, int(cfg.get("seed", 0)) + 17), score_sigma=sigma,
               score_n=n)
    return out
