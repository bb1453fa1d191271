"""Noise Conditional Score Networks (Song & Ermon 2019, "Generative Modeling by Estimating
Gradients of the Data Distribution"): scores at a geometric ladder of noise levels, sampled
by annealed Langevin dynamics.

One score network at one level (:mod:`.score_matching`) fails where the data has little
mass: the score is learned only near the data, and Langevin between separated modes
neither crosses nor weighs them. NCSN perturbs the data at L levels
sigma_1 > sigma_2 > ... > sigma_L, a geometric sequence (``--ncsn-levels`` L,
``--ncsn-sigma-max`` sigma_1, ``--ncsn-sigma-min`` sigma_L), and learns one
noise-conditional score s(x, sigma) for all of them by their weighted denoising score
matching (eq. 5-6 of the paper; survey eq. 19 at each level):

    L(theta) = 1/L sum_i lambda(sigma_i) 1/2 E ||s(x + sigma_i z, sigma_i) + z / sigma_i||^2,
    lambda(sigma) = sigma^2,

with lambda = sigma^2 making every level's term of order one (their choice, since
||sigma s|| ~ 1). Each sample of a batch draws its level index uniformly (an unbiased
estimate of the sum). Parametrisation ``s(x, sigma) = net(x, c_noise = log(sigma) / 4) /
sigma``: NCSNv2's noise conditioning by division (Song & Ermon 2020, "Improved
Techniques", technique 3) rather than NCSN's conditional instance norm, so the net's
target is -z at every level.

sigma_1, when not given, is Song & Ermon 2020's technique 1: the largest pairwise
Euclidean distance of the training data, estimated on at most :data:`SIGMA_MAX_SUBSET`
points (seeded by ``--seed``), so that Langevin at sigma_1 can move between any two data
points. sigma_L = 0.01 and L = 10 are the paper's.

Sampling (the own rule): their Algorithm 1, sampler ``annealed_langevin`` over the grid
``logsnr`` on [sigma_L, sigma_1] (exactly the training ladder, :func:`fewstep.grids.logsnr_uniform`,
which also builds it here): T = ``--ncsn-steps-per-level`` Langevin steps per level with
step alpha_i = eps sigma_i^2 / sigma_L^2 (``--ncsn-eps``, the paper's 2e-5; the update
x <- x + alpha_i / 2 s + sqrt(alpha_i) z), then (``--ncsn-denoise-last``) one Tweedie
denoising step x + sigma_L^2 s(x, sigma_L) (Jolicoeur-Martineau et al. 2021; Song & Ermon
2020); cost L * T + 1 evaluations (``default_nfe``). T = 100 is the paper's (for images):
on the exact scores of the labelled ring of 8 (d = 2, sigma_1 = its largest pairwise
distance, L = 10) it gives sliced-W2 0.11 to the data against 0.23 at T = 20 (0.09
between two data sets of the same size, 8000), and 1001 evaluations of the small MLP are
cheap on a CPU.

NCSN is a VE diffusion model on a discrete ladder of levels: its denoiser
D(x, sigma) = x + sigma^2 s(x, sigma) (:class:`fewstep.families.ScoreDenoiser`) with process
``EDM(sigma_L, sigma_1)`` is a sigma-space denoiser over the whole range, so the diffusion
samplers (euler, heun, dpm-solver, ...) run on it too, between the trained levels by the
net's interpolation in c_noise.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from . import Objective, option_flag, option_number
from .score_matching import (check_unconditional, build_score_net, dsm_loss, mixture_of, net_meta,
                             rebuild, score_error, score_model, EVAL_N)

SIGMA_MAX_SUBSET = 2000  # points on which the largest pairwise distance is estimated

DEFAULTS = {
    "ncsn_levels": 10,
    "ncsn_sigma_max": None,
    "ncsn_sigma_min": 0.01,
    "ncsn_steps_per_level": 100,
    "ncsn_eps": 2e-5,
    "ncsn_denoise_last": True,
}

HELP = {
    "ncsn_levels": "L, the number of noise levels (a geometric ladder from sigma_max down to sigma_min)",
    "ncsn_sigma_max": "sigma_1, the largest level; null: the data's largest pairwise distance (Song & Ermon 2020)",
    "ncsn_sigma_min": "sigma_L, the smallest level",
    "ncsn_steps_per_level": "T, annealed Langevin steps per level of the own sampling rule",
    "ncsn_eps": "annealed Langevin step constant: step alpha_i = eps * sigma_i^2 / sigma_L^2 (paper: 2e-5)",
    "ncsn_denoise_last": "end the own rule with one denoising step x + sigma_L^2 s(x, sigma_L)",
}


def _options(cfg: dict) -> dict:
    o = {"L": option_number(cfg, "ncsn_levels", 2, integer=True), "sigma_min": option_number(cfg, "ncsn_sigma_min"),
         "sigma_max": option_number(cfg, "ncsn_sigma_max", none_ok=True),
         "T": option_number(cfg, "ncsn_steps_per_level", 1, integer=True), "eps": option_number(cfg, "ncsn_eps"),
         "denoise_last": option_flag(cfg, "ncsn_denoise_last")}
    if o["sigma_max"] is not None and not o["sigma_max"] > o["sigma_min"]:
        raise UserError(f"--ncsn-sigma-max {o['sigma_max']:g} must lie above --ncsn-sigma-min {o['sigma_min']:g}")
    return o


def max_pairwise_distance(x: torch.Tensor, seed: int = 0, subset: int = SIGMA_MAX_SUBSET) -> float:
    """The largest Euclidean distance between two of the samples ``x`` [n, ...], on a random
    subset of at most ``subset`` of them (drawn with ``seed``; all of them when n <= subset)."""
    flat = x.reshape(x.shape[0], -1).double()
    if len(flat) > subset:
        flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(int(seed)))[:subset]]
    return float(torch.cdist(flat, flat).max()) if len(flat) > 1 else 0.0  # matrix products: fast for images


def ladder(cfg: dict, data) -> torch.Tensor:
    """The L levels sigma_1 > ... > sigma_L (float64), geometric: the grid ``logsnr`` without
    its final 0."""
    from ..grids import logsnr_uniform

    o = _options(cfg)
    hi = o["sigma_max"]
    if hi is None:
        hi = max_pairwise_distance(data.x, int(cfg.get("seed", 0)))
        if not hi > o["sigma_min"]:
            raise UserError(f"the data's largest pairwise distance ({hi:g}) is not above --ncsn-sigma-min "
                            f"{o['sigma_min']:g}; give --ncsn-sigma-max")
    return logsnr_uniform(o["L"], o["sigma_min"], hi)[:-1]


def check(cfg: dict, data) -> None:
    """Refuse options that cannot work (before anything is written)."""
    _options(cfg)
    check_unconditional(cfg, "ncsn")
    if len(data) < 2 and cfg.get("ncsn_sigma_max") is None:
        raise UserError("--ncsn-sigma-max null estimates sigma_1 from pairwise distances: the data has one sample; "
                        "give --ncsn-sigma-max")


def objective(cfg: dict, data) -> Objective:
    """The noise-conditional score net and its weighted DSM over the ladder: each step draws
    the batch indices, one level index per sample (uniform) and the noise z."""
    levels = ladder(cfg, data).float()
    module = build_score_net(cfg, data, None, divide=True)
    x_all, B, shape = data.x, int(cfg["batch_size"]), tuple(data.shape)

    def draw(gen, step):
        idx = torch.randint(0, len(x_all), (B,), generator=gen)
        level = torch.randint(0, len(levels), (B,), generator=gen)
        z = torch.randn((B,) + shape, generator=gen)
        return {"x": x_all[idx], "sigma": levels[level], "z": z}

    def loss(model, b):
        return dsm_loss(lambda y: model(y, b["sigma"]), b["x"], b["z"], b["sigma"])

    return Objective(module=module, draw=draw, loss=loss)


def meta(cfg: dict, module: nn.Module, data) -> dict:
    o = _options(cfg)
    levels = ladder(cfg, data)
    return {
        "family": "ncsn",
        **net_meta(module),
        "levels": levels.tolist(),
        "sigma_min": float(levels[-1]),
        "sigma_max": float(levels[0]),
        "default_nfe": o["L"] * o["T"] + int(o["denoise_last"]),
        "sampling": {"sampler": "annealed_langevin", "grid": "logsnr",
                     "options": {"steps_per_level": o["T"], "eps": o["eps"], "denoise_last": o["denoise_last"]}},
    }


def build(meta: dict) -> nn.Module:
    return rebuild(meta)


def as_model(module: nn.Module, meta: dict, name: str, device):
    return score_model(module, meta, name, device, "annealed_langevin")


def evaluate(model, data, cfg: dict) -> dict:
    """The own rule's cost and, for ``gmm:`` data, the relative score error at each level
    against the exact mixture noised there (:func:`.score_matching.score_error`)."""
    out = {"sampling_rule": model.meta["sampling"]["sampler"], "sampling_nfe": int(model.meta["default_nfe"])}
    gmm = mixture_of(cfg, model.shape)
    if gmm is None:
        return out
    fn = lambda y, s: model.denoiser.score(y.to(model.device), s)  # noqa: E731
    n = min(int(cfg.get("eval_samples") or EVAL_N), 20000)
    seed = int(cfg.get("seed", 0)) + 17
    errs = [score_error(fn, gmm, s, n, seed + i) for i, s in enumerate(model.meta["levels"])]
    out.update(score_levels=list(model.meta["levels"]), score_rel_error_per_level=errs,
               score_rel_error_mean=sum(errs) / len(errs), score_n=n)
    return out
