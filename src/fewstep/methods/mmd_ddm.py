"""MMD fine-tuning of a teacher for a fixed few-step sampler (Aiello, Valsesia & Magli 2023,
"Fast inference in denoising diffusion models via MMD finetuning", MMD-DDM, arXiv 2301.07969;
official code github.com/diegovalsesia/MMD-DDM, ``runners/diffusion.py`` and
``functions/losses.py``).

The teacher's network is fine-tuned so that the samples of ONE fixed sampler, DDIM (eta = 0)
on a fixed grid of T' steps, match the data in maximum mean discrepancy. The sampler is the
map G_theta: x_T -> x_0 made of the T' steps (written here in sigma-space, where DDIM is the
Euler step of :mod:`fewstep.samplers.euler`)

    y_{i+1} = y_i + (s_{i+1} - s_i) (y_i - D_theta(y_i, s_i)) / s_i,   y_0 = s_0 z,  z ~ N(0, I),

and the loss is the squared MMD between a batch of its outputs and a batch of data, in the
space of a feature map phi (the paper: Inception-V3 pool features; here the project's own
classifier features for images, :func:`fewstep.metrics.features.classifier_for`, or the data
coordinates themselves for points), the gradient backpropagated through every step of the
chain (the paper's eq. 3 population MMD and its unbiased estimate, eq. 4):

    MMD^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y)                                   (eq. 3)
    MMD_u^2     = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j)
                  - 2/(m n) sum_{i,j} k(x_i, y_j),                                         (eq. 4)

x_i = phi(G_theta(z_i)), y_j = phi(data_j); with ``--estimator biased`` the V-statistic (the
diagonals kept, every sum divided by its count of pairs), >= 0 and exactly 0 for equal sets.
The kernel is the paper's polynomial kernel (the KID kernel of Binkowski et al. 2018, as the
official ``KID(degree=3)``)

    k(a, b) = (a.b / d + 1)^3,        d = the feature dimension,

on features; on data coordinates a sum of Gaussian RBF kernels
k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) (``--kernel`` chooses either anywhere). Each training
step draws fresh noise z and a fresh data batch of the same size (the official loop: one
data-loader batch and ``randn_like`` of it). The student starts as the teacher (its net and
weights) and keeps its parametrization; its model.json carries the one fixed rule (sampler
``euler``, the T'-step grid), so ``fewstep sample RUN --nfe T'`` and ``fewstep.load(RUN).sample(n,
T')`` run exactly the chain that was trained.

Deviations, and why:

- Features: the project has no Inception weights (:mod:`fewstep.metrics.features`), so images
  are compared in its classifier's pooled features (the features of its Frechet distance), with
  the input clamped to [-1, 1] as that classifier sees it everywhere (a pixel outside the range
  gets no gradient from it). Points have no feature network: the kernel acts on the coordinates
  (``--kernel-on data``, the default there), where the polynomial kernel would match only the
  first three moments, so the default there is the RBF sum; its bandwidths default to
  (0.25, 0.5, 1, 2, 4) x the median pairwise distance of a fixed draw of 1000 data samples in
  the kernel's space (the median heuristic of :func:`fewstep.metrics.mmd`), fixed for the run
  and recorded in model.json. The official RBF option (its CLIP variant) used one width,
  gamma = 1/d; a sum over widths keeps a gradient at every scale of a toy.
- Grid: the paper skips uniformly through the 1000 discrete DDPM steps (DDIM's "uniform"
  sequence). Here ``--grid`` names any fewstep grid of the teacher's sigma range; ``time``
  (uniform in the teacher's process time) is the closest to the paper's, ``karras`` (default)
  the project's rule for a student's own grid. Only the deterministic DDIM / Euler chain is
  offered (the paper's runs use eta = 0).
- Optimiser: the loop's AdamW with weight decay 0 (= the paper's Adam) with the official
  settings as this method's defaults (gradient-norm clip 0.5, no warm-up, no EMA: the official
  code saves the fine-tuned weights themselves; batch 64) except the learning rate: the paper's
  5e-6 is for a large pretrained UNet and moves the project's small networks too little in a
  short run, so the default is 1e-4 (pass ``--lr 5e-6`` for the paper's).
- Several processes: each computes eq. 4 on its own slice of the global batch (the gradients
  then averaged), i.e. the mean of per-process MMD estimates, each still unbiased.
- Unconditional teachers only (the paper's setting): a class-conditional teacher is refused, and
  so is an exact mixture (it has no network to fine-tune; train a teacher on it first).

The loop takes a per-sample loss: every sample of a process's slice carries that slice's eq. 4
value, so the batch mean the loop minimises is eq. 4 itself. model.json records the kernel and
its settings (``mmd``) and the cost (``student_evals`` = steps x batch x T'; with features also
``classifier_evals`` = steps x 2 x batch).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from ..train.job import Plan, Task
from ..train.options import Option, table_defaults, table_help
from .common import GRID_NAMES, N_DATA, call_denoiser, check_student_net, conditioning, fine_tuned_teacher, fixed_grid, \
    fixed_grids, student_meta, training_data

KINDS = ("points", "image")
MEDIAN_SAMPLES = 1000  # data samples whose median pairwise distance sets the default RBF bandwidths


def _bandwidths_ok(v) -> bool:
    try:
        return len(parse_bandwidths(v)) > 0
    except UserError:
        return False


OPTIONS = (
    Option("timesteps", int, 4, "T': steps (= evaluations) of the fixed DDIM / Euler sampler the net is tuned for "
           "(default 4)", low=1),
    Option("grid", str, "karras", "its fixed sigma grid: karras (default), logsnr, polyexponential, vp-time, or "
           "time / time-leading / time-trailing (uniform in the teacher's process time, the paper's DDIM skip)",
           choices=GRID_NAMES),
    Option("kernel_on", str, None, "the kernel's space: features (the classifier's pooled features, the paper's "
           "Inception stand-in; images only) or data (the samples' coordinates)", choices=("data", "features"),
           none="features for images, data for points", example="data"),
    Option("kernel", str, None, "the kernel: poly ((a.b/d + 1)^degree, the paper's) or rbf (a sum of Gaussians "
           "over --bandwidths)", choices=("poly", "rbf"), none="poly on features, rbf on data", example="rbf"),
    Option("degree", int, 3, "degree of the polynomial kernel (default 3, the paper's)", low=1),
    Option("bandwidths", (list, str), None, "RBF bandwidths h, a list or comma-separated text of positive numbers",
           none="(0.25, 0.5, 1, 2, 4) x the median pairwise distance of 1000 data samples in the kernel's space",
           must="a non-empty list of positive numbers (or their comma-separated text)", test=_bandwidths_ok,
           example="0.5,1,2"),
    Option("estimator", str, "unbiased", "MMD^2 estimate: unbiased (eq. 4, the paper's) or biased (the V-statistic)",
           choices=("unbiased", "biased")),
    Option("classifier", str, None, "the feature network of --kernel-on features: a saved classifier file "
           "(.safetensors), or a or b (the project's two architectures for the data)",
           none="the project's classifier for the teacher's data (that of its Frechet distance)", example="a"),
    Option("grad_checkpoint", bool, False, "recompute each step's network activations in the backward pass "
           "(less memory, one more forward per step; the same gradient)"),
    N_DATA,
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
# the official fine-tuning settings (runners/diffusion.py, configs/*.yml), except the learning rate (docstring)
COMMON_OVERRIDES = {"lr": 1e-4, "batch_size": 64, "grad_clip": 0.5, "warmup": 0, "ema_decay": 0.0, "steps": 1000}


def parse_bandwidths(v) -> list:
    """A list of positive finite bandwidths from a list or comma-separated text."""
    items = [s for s in v.split(",")] if isinstance(v, str) else list(v)
    out = []
    for s in items:
        try:
            h = float(s.strip()) if isinstance(s, str) else float(s)
        except (TypeError, ValueError):
            raise UserError(f"--bandwidths: {s!r} is not a number") from None
        if isinstance(s, bool) or not math.isfinite(h) or h <= 0:
            raise UserError(f"--bandwidths: {s!r} is not a positive number")
        out.append(h)
    if not out:
        raise UserError("--bandwidths must hold at least one positive number")
    return out


def check_options(cfg: dict) -> None:
    """Rules between options, before anything is written."""
    if cfg.get("kernel") == "poly" and cfg.get("bandwidths") is not None:
        raise UserError("--bandwidths sets the widths of the rbf kernel; --kernel poly has none: drop one of them")


# ------------------------------------------------------------------------------ the MMD
def poly_kernel(degree: int = 3, coef0: float = 1.0, gamma: Optional[float] = None) -> Callable:
    """(a [m, d], b [n, d]) -> [m, n] of (gamma a.b + coef0)^degree, gamma = 1/d by default
    (the KID kernel, the paper's)."""
    def k(a: Tensor, b: Tensor) -> Tensor:
        g = 1.0 / a.shape[1] if gamma is None else float(gamma)
        return (g * (a @ b.T) + coef0).pow(int(degree))

    return k


def rbf_kernel(bandwidths: Sequence[float]) -> Callable:
    """(a [m, d], b [n, d]) -> [m, n] of sum_h exp(-|a - b|^2 / (2 h^2)), from squared
    distances (no square root: a smooth gradient where points meet)."""
    hs = [float(h) for h in bandwidths]

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)).clamp_min(0.0)
        return sum(torch.exp(d2 * (-0.5 / (h * h))) for h in hs)

    return k


def mmd2(x: Tensor, y: Tensor, kernel: Callable, estimator: str = "unbiased") -> Tensor:
    """The squared MMD of samples x [m, ...] and y [n, ...] (flattened per sample) under
    ``kernel``: the unbiased eq. 4 (within-set sums over i != j) or the biased V-statistic;
    a differentiable scalar."""
    x, y = x.flatten(1), y.flatten(1)
    m, n = x.shape[0], y.shape[0]
    if x.shape[1] != y.shape[1]:
        raise UserError(f"MMD of samples of {x.shape[1]} and {y.shape[1]} coordinates; compare samples of one shape")
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    if estimator == "biased":
        return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    if estimator != "unbiased":
        raise UserError(f"MMD estimator {estimator!r}: use unbiased or biased")
    if m < 2 or n < 2:
        raise UserError(f"the unbiased MMD needs at least 2 samples in each set, got {m} and {n}")
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2.0 * kxy.mean()


# ------------------------------------------------------------------------- the sampler
def sampler_chain(D, net, z: Tensor, grid: Sequence[float], checkpoint: bool = False) -> Tensor:
    """The fixed T'-step DDIM / Euler chain from y_0 = grid[0] z, differentiable in ``net``'s
    weights (``net``: D's net or its accelerate wrapper); the same update as the registered
    ``euler`` sampler, so the saved rule samples exactly this map."""
    levels = [float(s) for s in grid]
    y = levels[0] * z
    for s, s_next in zip(levels[:-1], levels[1:]):
        sig = torch.full((y.shape[0],), s, dtype=y.dtype, device=y.device)
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as ckpt

            den = ckpt(lambda v, sg=sig: call_denoiser(D, net, v, sg), y, use_reentrant=False)
        else:
            den = call_denoiser(D, net, y, sig)
        y = y + (s_next - s) * (y - den) / s
    return y


# ------------------------------------------------------------------------------- stages
def _settings(cfg: dict, teacher) -> dict:
    """(kernel space, kernel name) with the defaults of the data's kind; bad pairs are one line."""
    space = cfg["kernel_on"] or ("features" if teacher.kind == "image" else "data")
    if space == "features" and teacher.kind != "image":
        raise UserError(f"--kernel-on features: the teacher's samples are {teacher.kind}, and only images have a "
                        f"feature network; use --kernel-on data")
    if cfg["classifier"] is not None and space != "features":
        raise UserError("--classifier gives the feature network of --kernel-on features; drop it, or give "
                        "--kernel-on features")
    kernel = cfg["kernel"] or ("poly" if space == "features" else "rbf")
    return space, kernel


def stages(job):
    """One stage in the top folder: the teacher's net fine-tuned on eq. 4 through its T'-step chain."""
    from ..denoiser import ModelDenoiser
    from ..metrics import median_distance
    from ..metrics.distances import MEDIAN_MULTIPLES
    from ..nets import build_net

    cfg = job.cfg
    teacher, net_cfg, state = fine_tuned_teacher(cfg, job.device, KINDS, "mmd-ddm")
    cond = conditioning(cfg, teacher)  # unconditional (checked): no labels, recorded in model.json
    space, kernel_name = _settings(cfg, teacher)
    T = int(cfg["timesteps"])
    grid = fixed_grid(cfg["grid"], T, teacher)
    data = training_data(cfg, teacher)
    B = int(cfg["batch_size"])
    if B < 2 * job.acc.num_processes:
        raise UserError(f"--batch-size {B}: the MMD needs at least 2 samples on each of the "
                        f"{job.acc.num_processes} processes")
    clf, clf_info = None, None
    if space == "features":  # CFD's classifier choice (--classifier), reached through the registry
        from . import get

        cfd = get("cfd")
        clf, clf_info = cfd.resolve_classifier(cfg, teacher)
        clf.to(job.device)

    def phi(x: Tensor) -> Tensor:
        """The kernel's space: the classifier's pooled features (gradient kept) or the coordinates."""
        if clf is None:
            return x.flatten(1)
        return cfd.classifier_outputs(clf, x)[0]

    if kernel_name == "poly":
        kernel, kinfo = poly_kernel(int(cfg["degree"])), {"kernel": "poly", "degree": int(cfg["degree"]),
                                                         "gamma": "1/d", "coef0": 1.0}
    else:
        if cfg["bandwidths"] is not None:
            hs, how = parse_bandwidths(cfg["bandwidths"]), "given"
        else:
            ref = data.draw(MEDIAN_SAMPLES, torch.Generator().manual_seed(int(cfg["seed"]) + 4242))
            with torch.no_grad():
                f = phi(ref.to(job.device)).double().cpu()
            med = median_distance(f[: len(f) // 2], f[len(f) // 2:])
            hs, how = [c * med for c in MEDIAN_MULTIPLES], f"median heuristic ({med:.6g})"
        kernel, kinfo = rbf_kernel(hs), {"kernel": "rbf", "bandwidths": [float(h) for h in hs], "bandwidth_rule": how}
    estimator = cfg["estimator"]

    def plan(st):
        torch.manual_seed(int(cfg["seed"]))
        net = build_net(net_cfg)
        net.load_state_dict(state)
        Tt = teacher.denoiser
        D = ModelDenoiser(net, Tt.process, Tt.prediction, Tt.sigma_data)
        check_student_net(net, cond)
        shape = tuple(teacher.shape)

        def draw(gen, step):
            x0 = data.draw(B, gen)
            z = torch.randn((B,) + shape, generator=gen)
            return {"x0": x0, "z": z}

        def loss(model, b):
            """Eq. 4 between phi(chain(z)) and phi(x0) of this process's slice, as every sample's loss."""
            x = sampler_chain(D, model, b["z"], grid, bool(cfg["grad_checkpoint"]))
            with torch.no_grad():
                fy = phi(b["x0"]).double()
            value = mmd2(phi(x).double(), fy, kernel, estimator)
            return value.to(x.dtype).reshape(1).expand(x.shape[0])

        def describe(ema_module):
            sampling = {"sampler": "euler", "grids": fixed_grids({T: grid})}
            steps = int(cfg["steps"])
            cost = {"teacher_evals": 0, "student_evals": steps * B * T, "seconds": st.seconds}
            if clf is not None:
                cost["classifier_evals"] = steps * 2 * B
            mmd = {"timesteps": T, "grid": cfg["grid"], "levels": grid, "kernel_on": space, **kinfo,
                   "estimator": estimator}
            if clf_info is not None:
                mmd["classifier"] = clf_info
            return student_meta("mmd_ddm", D, dict(getattr(net, "config", net_cfg)), teacher.shape, teacher.kind,
                                data.name, grid[-2], grid[0], sampling, cfg, cond=cond, mmd=mmd, cost=cost)

        frozen = {"classifier": clf} if clf is not None else {}
        return Plan(Task(student=net, draw=draw, loss=loss, frozen=frozen), describe)

    job.stage("", plan)
