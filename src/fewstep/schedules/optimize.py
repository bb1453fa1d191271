"""Direct optimisation of the levels: the grid as parameters, the sampler's final error
against the reference solution as the loss (the idea of learning the sampler's time steps
end to end; Watson et al. 2022b "DDSS" learn more than the steps, here only they are).

Parametrisation (monotone, end points fixed): with logits theta in R^P, w = softmax(theta)
and the log range Lambda = log sigma_max - log sigma_min,

    log sigma_k = log sigma_max - Lambda * sum_{m < k} w_m ,   k = 0 .. n,

so every grid is strictly decreasing inside [sigma_min, sigma_max] and starts at sigma_max.
Ending at 0 (``final_zero``), the n = K - 1 free positive levels use P = K logits (the last
weight is the slack between sigma_{K-1} and sigma_min) and 0 is appended; otherwise
n = K, P = K and the grid ends at sigma_min.

Loss: l(theta) = mean ||sampler(x_T; sigma(theta)) - x*(end)||^2 / d on the training
starts, minimised by Adam. The gradient comes from autograd where the sampler computes
with the levels as tensors (checked against central differences by :func:`differentiable`);
the registered samplers compute their step coefficients in Python floats (``sigmas.tolist()``,
numpy for the exponential integrators), which autograd does not see, so for them the
gradient is a central difference in each logit (2P sampler runs per Adam step; P <= 11 at
NFE <= 10). The best theta seen is kept.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
from torch import Tensor

from ..errors import UserError
from .problem import Problem


def to_sigmas(theta: Tensor, sigma_min: float, sigma_max: float, final_zero: bool) -> Tensor:
    """The grid of the module docstring from logits ``theta`` (differentiable)."""
    w = torch.softmax(theta, 0)
    span = math.log(sigma_max) - math.log(sigma_min)
    n = len(theta) - 1 if final_zero else len(theta)
    csum = torch.cat([theta.new_zeros(1), torch.cumsum(w, 0)[:n]])
    log_s = math.log(sigma_max) - span * csum
    if not final_zero:  # the last weight is exactly the remainder: end at sigma_min
        log_s = torch.cat([log_s[:-1], log_s.new_full((1,), math.log(sigma_min))])
    sig = torch.exp(log_s)
    sig = torch.cat([sig.new_full((1,), sigma_max), sig[1:]])  # exactly sigma_max, not exp(log(sigma_max))
    return torch.cat([sig, sig.new_zeros(1)]) if final_zero else sig


def from_sigmas(sigmas: Tensor, sigma_min: float, sigma_max: float, final_zero: bool, floor: float = 1e-3) -> Tensor:
    """Logits whose grid is ``sigmas`` (its first level taken as sigma_max; positive levels
    clamped into [sigma_min, sigma_max]; gaps below ``floor`` of the range raised to it)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    pos = s[s > 0].clamp(sigma_min, sigma_max)
    logs = torch.log(pos)
    logs[0] = math.log(sigma_max)
    if final_zero:
        logs = torch.cat([logs, logs.new_full((1,), math.log(sigma_min))])
    else:
        logs[-1] = math.log(sigma_min)
    gaps = (logs[:-1] - logs[1:]).clamp_min(0)
    span = math.log(sigma_max) - math.log(sigma_min)
    gaps = torch.maximum(gaps / span, torch.full_like(gaps, floor))
    return torch.log(gaps / gaps.sum())


def differentiable(problem: Problem, theta: Tensor, rel_tol: float = 1e-3) -> bool:
    """Whether autograd's gradient of the loss agrees with central differences at theta
    (samplers that turn the levels into Python floats give no or partial gradients)."""
    try:
        g = _grad_autograd(problem, theta)[1]
    except Exception:
        return False
    fd = _grad_fd(problem, theta, 1e-5)[1]
    return bool(torch.isfinite(g).all()) and float((g - fd).norm()) <= rel_tol * max(float(fd.norm()), 1e-12)


def _loss(problem: Problem, sigmas: Tensor, grad: bool = False, levels=None) -> Tensor:
    out = problem.run(sigmas, grad=grad, levels=levels)
    return (out.to(torch.float64) - problem.target.to(torch.float64)).pow(2).mean()


def _grad_autograd(problem: Problem, theta: Tensor):
    th = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = _loss(problem, to_sigmas(th, problem.sigma_min, problem.sigma_max, problem.final_zero), grad=True)
        if not loss.requires_grad:
            raise RuntimeError("no gradient reaches the levels")
        (g,) = torch.autograd.grad(loss, th)
    return float(loss), g


def _fd(f, v: Tensor, h: float):
    """(f(v), central-difference gradient of f at v)."""
    with torch.no_grad():
        base = f(v)
        g = torch.zeros_like(v)
        for k in range(len(v)):
            e = torch.zeros_like(v)
            e[k] = h
            g[k] = (f(v + e) - f(v - e)) / (2 * h)
    return base, g


def _grid_loss(problem: Problem):
    """theta -> the training loss (a float) of the grid sigma(theta)."""
    return lambda t: float(_loss(problem, to_sigmas(t, problem.sigma_min, problem.sigma_max, problem.final_zero)))


def _grad_fd(problem: Problem, theta: Tensor, h: float = 1e-4):
    return _fd(_grid_loss(problem), theta, h)


def optimize_grid(problem: Problem, init: Tensor, iters: int = 150, lr: float = 0.05, grad: str = "auto",
                  log=None, val: Optional[Problem] = None, patience: Optional[int] = None,
                  deadline: Optional[float] = None) -> tuple[Tensor, dict]:
    """Adam on the logits from the grid ``init`` (``problem.steps`` steps); returns the
    best grid seen (by the held-out error on ``val``'s starts when given, with early
    stopping after ``patience`` steps without improvement) and info (initial / final
    training loss as RMS, gradient used)."""
    say = log or (lambda *_: None)
    if len(init) - 1 != problem.steps:
        raise UserError(f"the initial grid has {len(init) - 1} steps, the budget buys {problem.steps}")
    theta = from_sigmas(init, problem.sigma_min, problem.sigma_max, problem.final_zero)
    if grad == "auto":
        grad = "autograd" if differentiable(problem, theta) else "fd"
    if grad not in ("autograd", "fd"):
        raise UserError(f"unknown gradient '{grad}'; valid: auto, autograd, fd")
    step = _grad_autograd if grad == "autograd" else _grad_fd
    val_of = None if val is None else _grid_loss(val)
    best_theta, first, best_loss = _adam(lambda t: step(problem, t), _grid_loss(problem), theta, iters, lr, say,
                                         "optimise", val_of, patience, deadline)
    sig = to_sigmas(best_theta, problem.sigma_min, problem.sigma_max, problem.final_zero).detach()
    return sig, {"gradient": grad, "iters": iters, "lr": lr, "rms_init": math.sqrt(first),
                 "rms_train": math.sqrt(best_loss)}


def _adam(value_and_grad, loss_of, v: Tensor, iters: int, lr: float, say, what: str, val_of=None,
          patience: Optional[int] = None, deadline: Optional[float] = None):
    """Adam on a mean squared error from ``value_and_grad(v) -> (loss, gradient)``; stops at
    a non-finite gradient. Returns the best v seen and the (first, best) losses.

    With ``val_of`` (v -> held-out loss) the best v is the one with the lowest held-out
    loss, and the run stops once it has not improved for ``patience`` steps (early
    stopping on starts the gradient never saw); ``deadline`` (time.monotonic()) ends it in
    any case. The losses returned are then the training loss at the start and at that v."""
    v = v.clone()
    opt = torch.optim.Adam([v], lr=lr)
    best_loss, best_v, first = math.inf, v.clone(), None
    best_val, since = math.inf, 0
    for it in range(iters):
        loss, g = value_and_grad(v)
        first = loss if first is None else first
        if val_of is not None:
            lv = val_of(v)
            if math.isfinite(lv) and lv < best_val:
                best_val, best_v, best_loss, since = lv, v.detach().clone(), loss, 0
            else:
                since += 1
            if patience is not None and since >= patience:
                say(f"[schedule] {what}: held-out RMS has not improved for {patience} steps; stopped at {it}")
                break
        elif math.isfinite(loss) and loss < best_loss:
            best_loss, best_v = loss, v.detach().clone()
        if deadline is not None and time.monotonic() > deadline:
            say(f"[schedule] {what}: time budget spent at step {it}")
            break
        if not bool(torch.isfinite(g).all()):
            break
        v.grad = g
        opt.step()
        if it % 25 == 0:
            extra = f", held-out {math.sqrt(best_val):.4g}" if val_of is not None and math.isfinite(best_val) else ""
            say(f"[schedule] {what} {it}/{iters}: training RMS {math.sqrt(loss):.4g}{extra}")
    if val_of is not None:
        return best_v, first, loss_of(best_v)
    return best_v, first, min(best_loss, loss_of(best_v))


def levels_of(problem: Problem, v: Tensor) -> tuple[Tensor, Tensor]:
    """(sigmas, eval_sigmas) of the joint parameters v = [grid logits theta, shifts delta]
    (:func:`optimize_levels`)."""
    p = problem.steps  # the grid's logits come first
    sig = to_sigmas(v[:p], problem.sigma_min, problem.sigma_max, problem.final_zero)
    pos = sig[sig > 0]
    return sig, pos * torch.exp(v[p:])


def optimize_levels(problem: Problem, init: Tensor, init_levels=None, iters: int = 150, lr: float = 0.05,
                    h: float = 1e-4, log=None, val: Optional[Problem] = None, patience: Optional[int] = None,
                    deadline: Optional[float] = None) -> tuple[Tensor, Tensor, dict]:
    """The grid and decoupled evaluation levels (:mod:`.levels`) learned jointly: parameters
    v = [theta, delta], the grid sigma(theta) of the module docstring and the evaluation
    levels sigma'_k = sigma_k exp(delta_k) at its positive levels, the loss the final error
    l(v) = mean ||sampler(D o sigma'; x_T; sigma(theta)) - x*(end)||^2 / d, Adam with
    central-difference gradients (2 (K + #positive levels) sampler runs per step). From
    ``init`` (a grid with ``problem.steps`` steps) and ``init_levels`` (default: the grid's
    own levels, delta = 0, i.e. the plain sampler). Returns the best (sigmas, eval_sigmas)
    seen and info."""
    say = log or (lambda *_: None)
    if len(init) - 1 != problem.steps:
        raise UserError(f"the initial grid has {len(init) - 1} steps, the budget buys {problem.steps}")
    theta = from_sigmas(init, problem.sigma_min, problem.sigma_max, problem.final_zero)
    sig0 = to_sigmas(theta, problem.sigma_min, problem.sigma_max, problem.final_zero)
    pos = sig0[sig0 > 0]
    delta = torch.zeros_like(pos) if init_levels is None else \
        torch.log(torch.as_tensor(init_levels, dtype=torch.float64)) - torch.log(pos)
    v0 = torch.cat([theta, delta])

    def loss_on(prob):
        def f(v):
            sig, ev = levels_of(prob, v)
            return float(_loss(prob, sig, levels=ev))
        return f

    f = loss_on(problem)
    best, first, loss = _adam(lambda v: _fd(f, v, h), f, v0, iters, lr, say, "optimise grid + evaluation levels",
                              None if val is None else loss_on(val), patience, deadline)
    sig, ev = levels_of(problem, best)
    return sig.detach(), ev.detach(), {"gradient": "fd", "iters": iters, "lr": lr, "rms_init": math.sqrt(first),
                                       "rms_train": math.sqrt(loss)}
