"""Parametrizations: any network becomes the sigma-space denoiser D(y, sigma) -> x0.

A sampler sees one contract, ``D(y, sigma, **cond) -> x0`` with ``y = x0 + sigma * eps``
and ``sigma`` of shape [batch]. A network predicts something else under some process
(x_t = alpha (x0 + sigma eps), std_t = alpha * sigma); the converters below are pure,
keyword-only functions between that output and x0 (Salimans & Ho 2022 for v, Liu et al.
2022 for the flow velocity, Karras et al. 2022 Table 1 for EDM preconditioning):

    eps:   x0 = (x_t - std_t eps) / alpha
    x0:    x0
    v:     v = alpha eps - std_t x0          =>  x0 = (alpha x_t - std_t v) / (alpha^2 + std_t^2)
    score: s = grad_x log p_t = -eps / std_t =>  x0 = (x_t + std_t^2 s) / alpha
    flow:  u = dx_t/dt = alpha' x0 + std_t' eps
                                             =>  x0 = (std_t u - std_t' x_t) / (alpha' std_t - std_t' alpha)
    edm:   D = c_skip y + c_out F(c_in y, c_noise),  c_skip = sd^2/(s^2+sd^2),
           c_out = s sd / sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .checks import finite
from .errors import UserError, unknown_name
from .process import Process, _bcast

__all__ = ["PREDICTIONS", "to_x0", "from_x0", "ModelDenoiser", "CFGDenoiser", "cfg_halves", "NFECounter",
           "edm_precond", "Coefficients", "DiscriminatorGuided"]

PREDICTIONS = ("eps", "x0", "v", "score", "flow", "edm")


@dataclass
class Coefficients:
    """Per-sample x-space coefficients at time t, each shaped to broadcast with x."""

    alpha: Tensor
    std: Tensor
    dalpha: Optional[Tensor] = None
    dstd: Optional[Tensor] = None

    @classmethod
    def at(cls, process: Process, t: Tensor, like: Tensor, derivatives: bool = False) -> "Coefficients":
        a, sd = process.scale(t), process.std(t)
        c = cls(_bcast(a, like), _bcast(sd, like))
        if derivatives:
            c.dalpha = _bcast(process.dscale_dt(t), like)
            c.dstd = _bcast(process.dstd_dt(t), like)
        return c


def to_x0(out: Tensor, *, x_t: Tensor, c: Coefficients, prediction: str) -> Tensor:
    """Network output in ``prediction`` parametrization -> x0 (module docstring)."""
    if prediction == "x0":
        return out
    if prediction == "eps":
        return (x_t - c.std * out) / c.alpha
    if prediction == "v":
        return (c.alpha * x_t - c.std * out) / (c.alpha**2 + c.std**2)
    if prediction == "score":
        return (x_t + c.std**2 * out) / c.alpha
    if prediction == "flow":
        return (c.std * out - c.dstd * x_t) / (c.dalpha * c.std - c.dstd * c.alpha)
    raise unknown_name("prediction", prediction, PREDICTIONS)


def from_x0(x0: Tensor, *, x_t: Tensor, c: Coefficients, prediction: str) -> Tensor:
    """x0 -> the output a perfect network in ``prediction`` parametrization gives."""
    if prediction == "x0":
        return x0
    eps = (x_t - c.alpha * x0) / c.std
    if prediction == "eps":
        return eps
    if prediction == "v":
        return c.alpha * eps - c.std * x0
    if prediction == "score":
        return -eps / c.std
    if prediction == "flow":
        return c.dalpha * x0 + c.dstd * eps
    raise unknown_name("prediction", prediction, PREDICTIONS)


def edm_precond(sigma: Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1)."""
    s2, sd2 = sigma**2, sigma_data**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + sd2)
    c_in = torch.rsqrt(s2 + sd2)
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


class ModelDenoiser(nn.Module):
    """Wrap ``net(x, c_noise, **cond) -> prediction`` of ``process`` as D(y, sigma, **cond).

    For eps/x0/v/score/flow the network sees the process's own x_t = alpha * y and
    ``c_noise = process.c_noise(t)`` with t = process.t_of_sigma(sigma); for ``edm`` it
    sees c_in * y and ln(sigma)/4 whatever the process (EDM preconditioning).
    """

    def __init__(self, net: nn.Module, process: Process, prediction: str = "eps", sigma_data: float = 0.5):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise unknown_name("prediction", prediction, PREDICTIONS)
        self.net, self.process, self.prediction, self.sigma_data = net, process, prediction, sigma_data
        self._memo: dict = {}  # per-level quantities and the net's first parameter (see forward)

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / .cuda(): cached tensors are stale
        self._memo = {}
        return super()._apply(fn, *args, **kwargs)

    def _coefficients(self, y: Tensor, sigma: Tensor):
        """(in_scale, c_noise, coefficients) at level sigma: the net sees in_scale * y; the
        coefficients are (c_skip, c_out) for EDM preconditioning, else a :class:`Coefficients`."""
        sigma = sigma.to(y.dtype)
        if self.prediction == "edm":
            c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
            return _bcast(c_in, y), c_noise, (_bcast(c_skip, y), _bcast(c_out, y))
        t = self.process.t_of_sigma(sigma)
        if self.prediction == "flow":
            c = Coefficients.at(self.process, t, y, derivatives=True)
        else:  # alpha from sigma directly (closed forms), std = alpha * sigma
            a = _bcast(self.process.scale_of_sigma(sigma), y)
            c = Coefficients(a, a * _bcast(sigma, y))
        return c.alpha, self.process.c_noise(t), c

    def net_input(self, y: Tensor, sigma: Tensor):
        """(x_in, c_noise, coefficients) the network is called with at level sigma."""
        scale, c_noise, c = self._coefficients(y, sigma)
        return scale * y, c_noise, c

    def output_to_x0(self, out: Tensor, y: Tensor, sigma: Tensor, x_in: Tensor, c) -> Tensor:
        if self.prediction == "edm":
            c_skip, c_out = c if c is not None else self._coefficients(y, sigma)[2]
            return c_skip * y + c_out * out
        return to_x0(out, x_t=x_in, c=c, prediction=self.prediction)

    def target(self, x0: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
        """What the network should output for clean data x0 at noisy y (training target)."""
        if self.prediction == "edm":
            c_skip, c_out, _, _ = edm_precond(sigma.to(y.dtype), self.sigma_data)
            return (x0 - _bcast(c_skip, y) * y) / _bcast(c_out, y)
        x_in, _, c = self.net_input(y, sigma)
        return from_x0(x0, x_t=x_in, c=c, prediction=self.prediction)

    def _net_dtype(self, y: Tensor) -> torch.dtype:
        """The dtype the net runs in: its first floating parameter's (else y's)."""
        net = self.net
        if self._memo.get("net") is not net:  # first call, or a new net assigned
            self._memo = {"net": net, "param": next(net.parameters(), None) if isinstance(net, nn.Module) else None}
        p = self._memo["param"]
        return p.dtype if p is not None and p.is_floating_point() else y.dtype

    def _level(self, y: Tensor, sigma: Tensor, dt: torch.dtype, cache: bool = True):
        """(in_scale, c_noise, c) of level ``sigma``: the factor the net's input is y times,
        its noise input in dtype ``dt``, and what :meth:`output_to_x0` needs.

        Samplers call the denoiser again and again with the same level tensor (the
        samplers' ``batch_sigma`` hands out one tensor per level), so these are cached per
        sigma tensor (identity and in-place version, so a sigma changed in place is seen;
        no value is read back from the device). The arithmetic is that of :meth:`net_input`
        and :meth:`output_to_x0`, so results are bit-identical with and without the cache.
        """
        key = (id(sigma), sigma._version, y.dtype, y.ndim, y.device, dt)
        levels = self._memo.setdefault("levels", {})
        hit = levels.get(key)
        if hit is not None and hit[0] is sigma:
            return hit[1]
        scale, c_noise, c = self._coefficients(y, sigma)
        entry = (scale, c_noise.to(dt), c)
        if cache and not sigma.requires_grad:
            if len(levels) >= 256:  # bounded: per-sample levels (adaptive samplers) never hit
                levels.clear()
            levels[key] = (sigma, entry)
        return entry

    def forward(self, y: Tensor, sigma: Tensor, **cond) -> Tensor:
        given = sigma  # a number or 0-dim tensor becomes a new [batch] tensor: nothing to reuse
        sigma = _batch_sigma(sigma, y)
        dt = self._net_dtype(y)  # the net runs in its own dtype
        scale, c_noise, c = self._level(y, sigma, dt, cache=sigma is given)
        x_in = scale * y
        out = self.net(x_in.to(dt), c_noise, **cond).to(y.dtype)
        return self.output_to_x0(out, y, sigma, x_in, c)


def _batch_sigma(sigma, y: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
    return sigma.expand(y.shape[0]) if sigma.ndim == 0 else sigma


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper:

        D_w(y, sigma, c) = D(y, sigma, null) + w * (D(y, sigma, c) - D(y, sigma, null)).

    Conditional and unconditional halves run as one batched call (one NFE). ``labels``
    of -1 (or ``null_label``) mean unconditional.
    """

    def __init__(self, denoiser: Callable, scale: float, null_label: int = -1):
        super().__init__()
        self.inner, self.scale, self.null_label = denoiser, float(scale), null_label

    def forward(self, y: Tensor, sigma: Tensor, labels: Optional[Tensor] = None, **cond) -> Tensor:
        if labels is None or self.scale == 1.0:
            return self.inner(y, sigma, labels=labels, **cond)
        d_cond, d_uncond = cfg_halves(self.inner, y, sigma, labels, self.null_label, **cond)
        return d_uncond + self.scale * (d_cond - d_uncond)


def cfg_halves(denoiser: Callable, y: Tensor, sigma, labels: Tensor, null_label: int = -1, **cond):
    """(D(y, sigma, labels), D(y, sigma, null)) from one batched call on [y; y] with labels
    [labels; null] (per-sample tensors in ``cond`` are doubled too): the two halves of
    classifier-free guidance for the price of one network evaluation."""
    sigma = _batch_sigma(sigma, y)
    null = torch.full_like(labels, null_label)
    extra = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in cond.items()}
    both = denoiser(torch.cat([y, y]), torch.cat([sigma, sigma]), labels=torch.cat([labels, null]), **extra)
    return both.chunk(2)


class NFECounter:
    """Counts network evaluations: ``counter = NFECounter(D); sample(counter, ...);
    counter.nfe``. Each call of the wrapped denoiser counts once, whatever the batch."""

    def __init__(self, denoiser: Callable):
        self.inner, self.nfe = denoiser, 0

    def __call__(self, y, sigma, **cond):
        self.nfe += 1
        return self.inner(y, sigma, **cond)

    def reset(self) -> None:
        self.nfe = 0


class DiscriminatorGuided(nn.Module):
    """Discriminator guidance (Kim et al. 2022, "Refining generative process with discriminator
    guidance in score-based diffusion models") as a denoiser wrapper.

    A discriminator d(y, sigma) = sigmoid(logit(y, sigma)) trained to tell the data diffused to
    level sigma (1) from the model's samples diffused to it (0) is optimal at d* = p_data /
    (p_data + p_model), so logit* = log(d* / (1 - d*)) = log p_data(y; sigma) - log p_model(y;
    sigma), and the paper's correction c = grad_y log(d / (1 - d)) turns the model score into the
    data score: s_data = s_model + c (their correction term; the guided sampler adds w c to the
    score). In the sigma-space denoiser, score = (D - y) / sigma^2, so

        D_dg(y, sigma) = D(y, sigma) + weight * sigma^2 * grad_y logit(y, sigma)

    (the official code's EDM sampler adds the same term to dx/dsigma). ``logit_fn(y, sigma,
    **cond)`` returns one logit per sample (e.g. :class:`fewstep.model.Auxiliary` of a
    discriminator run); ``cond`` (``labels=``) goes to both. Each call costs one denoiser
    evaluation plus one discriminator forward and backward pass, under ``torch.enable_grad``
    even inside samplers that run without gradients (the result is detached). A module
    ``logit_fn`` runs in its parameters' dtype. ``weight`` 0 returns D exactly; the
    correction applies only where sigma >= ``guide_sigma_min`` (the code's ``time_min``; 0: at
    every level; not named ``sigma_min``, which samplers read as a denoiser's sigma range). A
    negative or non-finite weight is one UserError line."""

    def __init__(self, denoiser: Callable, logit_fn: Callable, weight: float = 1.0, guide_sigma_min: float = 0.0):
        super().__init__()
        self.inner, self.logit_fn = denoiser, logit_fn
        self.weight = finite(weight, "discriminator guidance weight (--dg-weight)", low=0.0)
        self.guide_sigma_min = finite(guide_sigma_min, "discriminator guidance guide_sigma_min", low=0.0)
        self.gradients = 0  # discriminator gradients taken (batch calls), the guidance's cost

    def correction(self, y: Tensor, sigma, **cond) -> Tensor:
        """weight * sigma^2 * grad_y logit(y, sigma), shaped and typed like y (zero where sigma
        < guide_sigma_min; no gradient is taken when that is every sample)."""
        sigma = _batch_sigma(sigma, y)
        on = sigma >= self.guide_sigma_min
        if self.weight == 0.0 or not bool(on.any()):
            return torch.zeros_like(y)
        dt = next((p.dtype for p in self.logit_fn.parameters() if p.is_floating_point()), y.dtype) \
            if isinstance(self.logit_fn, nn.Module) else y.dtype
        with torch.enable_grad():
            yg = y.detach().to(dt).requires_grad_(True)
            logit = self.logit_fn(yg, sigma.detach().to(dt), **cond)
            if not isinstance(logit, Tensor) or logit.shape != (y.shape[0],):
                got = list(logit.shape) if isinstance(logit, Tensor) else type(logit).__name__
                raise UserError(f"the discriminator must return one logit per sample, shape [{y.shape[0]}], got "
                                f"{got}; give a discriminator run (role discriminator, output logit)")
            grad = None
            if logit.requires_grad:
                grad = torch.autograd.grad(logit.sum(), yg, allow_unused=True)[0]
        self.gradients += 1
        if grad is None:  # a logit that does not depend on y (a constant discriminator)
            return torch.zeros_like(y)
        scale = torch.where(on, self.weight * sigma.to(y.dtype) ** 2, torch.zeros_like(sigma, dtype=y.dtype))
        return _bcast(scale, y) * grad.detach().to(y.dtype)

    def forward(self, y: Tensor, sigma, **cond) -> Tensor:
        x0 = self.inner(y, sigma, **cond)
        if self.weight == 0.0:
            return x0
        return x0 + self.correction(y, sigma, **cond).to(x0.dtype)
