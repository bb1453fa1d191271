"""Negative log-likelihood through the probability-flow ODE (instantaneous change of
variables: Chen et al. 2018, eq. 4; Song et al. 2021, eq. 39; Grathwohl et al. 2019 for
the Hutchinson trace estimator).

In sigma-space (``y = x0 + sigma * eps``) the probability-flow ODE, written in
``t = log sigma``, is

    dy/dt = v(y, t) = y - D(y, e^t),

and along its solution the log-density of the marginal p(.; sigma) changes as
d log p / dt = -div_y v. So for a point x at level sigma_min,

    log p(x; sigma_min) = log N(y(T); 0, sigma_max^2 I) + int_{t0}^{T} div_y v(y(t), t) dt,
    div_y v = d - Tr(dD/dy),     t0 = log sigma_min,  T = log sigma_max,

with the prior N(0, sigma_max^2 I) standing in for p(.; sigma_max); its error per sample
is about (y(T) . E[x0]) / sigma_max^2 ~ |E[x0]| sqrt(d) / sigma_max nats (pass the exact
``log_prior`` where one is known). The trace is

- exact (``divergence='exact'``): d vector-Jacobian products, one per coordinate;
- Hutchinson (``'hutchinson'``): Tr(J) ~ mean_j eps_j^T J eps_j with Rademacher probes
  eps_j drawn once per sample and kept fixed along the trajectory (unbiased; the
  per-sample variance is 2 sum_{i!=k} J_ik^2 / n_probes for symmetric J);
- ``'auto'``: exact for d <= 16, Hutchinson otherwise.

The augmented ODE [y, Delta] is solved by torchdiffeq's adaptive Dormand-Prince (dopri5),
its error controlled per sample (the largest per-sample RMS of the scaled error).
This gives the density of p(.; sigma_min), the data convolved with N(0, sigma_min^2):
for a GaussianMixture it equals ``GaussianMixture.log_prob(x, sigma_min)``.

Bits per dimension: ``bpd = (nll / d - log(bin_width)) / log 2`` for data quantised to
bins of ``bin_width`` (8-bit images scaled to [-1, 1]: bin_width = 2/255, i.e. the usual
``+ log 127.5``; dequantise with :func:`dequantize` first), ``nll / (d log 2)`` for
continuous data.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from fewstep.errors import UserError

EXACT_MAX_DIM = 16


def trace_exact(D: Tensor, y: Tensor, create_graph: bool = False) -> Tensor:
    """Tr(dD/dy) per sample, one backward pass per coordinate (D: [B, d], y: [B, ...] with d
    values per sample); ``create_graph`` keeps it differentiable (score matching's loss)."""
    tr = torch.zeros(y.shape[0], dtype=D.dtype, device=y.device)
    for i in range(D.shape[1]):
        (g,) = torch.autograd.grad(D[:, i].sum(), y, retain_graph=True, create_graph=create_graph)
        tr = tr + g.reshape(g.shape[0], -1)[:, i]
    return tr


def _trace_hutchinson(D: Tensor, y: Tensor, probes: Tensor) -> Tensor:
    """mean_j eps_j^T (dD/dy) eps_j per sample, probes [P, B, d]."""
    tr = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    for eps in probes:
        (g,) = torch.autograd.grad(D, y, grad_outputs=eps, retain_graph=True)  # eps^T J
        tr = tr + (g * eps).sum(1)
    return tr / probes.shape[0]


def _nll_batch(denoiser: Callable, x: Tensor, t0: float, t1: float, exact: bool, probes: Optional[Tensor],
               rtol: float, atol: float, method: str, cond: dict, log_prior: Optional[Callable]) -> Tensor:
    from torchdiffeq import odeint

    shape, n = x.shape, x.shape[0]
    d = x[0].numel()

    def f(t, state):
        y_flat = state[:, :d]
        with torch.enable_grad():
            y = y_flat.detach().requires_grad_(True)
            sigma = torch.exp(t).to(y.dtype).expand(n)
            D = denoiser(y.reshape(shape), sigma, **cond).reshape(n, d)
            tr = trace_exact(D, y) if exact else _trace_hutchinson(D, y, probes)
        v = (y - D).detach()
        return torch.cat([v, (d - tr).detach()[:, None]], 1)

    state0 = torch.cat([x.reshape(n, d), torch.zeros(n, 1, dtype=x.dtype, device=x.device)], 1)
    ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    # error control per sample (the worst sample's RMS), not the RMS of the whole batch
    options = {"norm": lambda e: e.reshape(n, -1).square().mean(1).sqrt().max()}
    yT = odeint(f, state0, ts, rtol=rtol, atol=atol, method=method, options=options)[-1]
    y_end, delta = yT[:, :d].double(), yT[:, d].double()
    if log_prior is not None:
        return -(log_prior(y_end.reshape(shape)).double() + delta)
    sigma_max = math.exp(t1)
    log_normal = -0.5 * (y_end.square().sum(1) / sigma_max**2 + d * math.log(2 * math.pi * sigma_max**2))
    return -(log_normal + delta)


def nll(denoiser: Callable, x: Tensor, sigma_min: float, sigma_max: float, divergence: str = "auto",
        n_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, batch_size: int = 500,
        generator: Optional[torch.Generator] = None, method: str = "dopri5", progress: bool = False,
        log_prior: Optional[Callable[[Tensor], Tensor]] = None, **cond) -> Tensor:
    """-log p(x; sigma_min) in nats for each sample of ``x`` [n, ...], float64 [n].

    ``denoiser(y, sigma) -> x0`` is the sigma-space denoiser (e.g. ``fewstep.load(RUN).denoiser``
    or a :class:`~fewstep.GaussianMixture`); ``divergence`` is ``'exact'``, ``'hutchinson'``
    or ``'auto'`` (exact for d <= 16); ``generator`` seeds the Hutchinson probes (default
    seed 0). ``log_prior(y) -> [n]`` replaces the Gaussian prior at sigma_max (e.g. an exact
    ``lambda y: gmm.log_prob(y, sigma_max)``). ``cond`` (e.g. ``labels=``) is passed to the denoiser with each batch's slice.
    """
    x = torch.as_tensor(x)
    if x.ndim < 2 or len(x) < 1:
        raise UserError(f"nll: give a batch [n, ...] of samples, got shape {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise UserError("nll: the samples contain NaN or inf")
    if not (0 < float(sigma_min) < float(sigma_max)):
        raise UserError(f"nll: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if divergence not in ("auto", "exact", "hutchinson"):
        raise UserError(f"nll: divergence '{divergence}' is not one of auto, exact, hutchinson")
    if int(n_probes) < 1:
        raise UserError(f"nll: n_probes={n_probes} must be >= 1")
    d = x[0].numel()
    exact = divergence == "exact" or (divergence == "auto" and d <= EXACT_MAX_DIM)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    t0, t1 = math.log(float(sigma_min)), math.log(float(sigma_max))
    out = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(x), batch_size), desc="nll (probability-flow ODE)", disable=not progress,
                  leave=False):
        xb = x[i:i + batch_size]
        probes = None
        if not exact:
            probes = (torch.randint(0, 2, (int(n_probes), len(xb), d), generator=g) * 2 - 1).to(xb.device, xb.dtype)
        cb = {k: (v[i:i + batch_size] if torch.is_tensor(v) and v.ndim > 0 and len(v) == len(x) else v)
              for k, v in cond.items()}
        out.append(_nll_batch(denoiser, xb, t0, t1, exact, probes, rtol, atol, method, cb, log_prior))
    return torch.cat(out)


def dequantize(x: Tensor, bin_width: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """x + u, u ~ U(-bin_width/2, bin_width/2) per value: uniform dequantisation
    (Theis et al. 2016), so that -log p of the result bounds -log P of the bins."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    u = torch.rand(x.shape, generator=g, dtype=torch.float64) - 0.5
    return x + (bin_width * u).to(x.device, x.dtype)


def bits_per_dim(nll_nats: Tensor | float, dim: int, bin_width: Optional[float] = None) -> float:
    """Mean bits per dimension: (nll / d - log(bin_width)) / log 2, or nll / (d log 2)."""
    v = float(torch.as_tensor(nll_nats, dtype=torch.float64).mean()) / int(dim)
    if bin_width is not None:
        if not bin_width > 0:
            raise UserError(f"bits_per_dim: bin_width={bin_width} must be positive")
        v -= math.log(bin_width)
    return v / math.log(2)


# ------------------------------------------------------------------- the chain's bound
CHAIN_VARIANCES = ("small", "large", "analytic", "covariance")


def _chain_variances(variance: str, sig: list, gamma, covariance, data_range):
    """variance(i, y, den, cond) of the reverse Gaussian of step i (sig[i] -> sig[i+1]; the last,
    to 0, is the decoder p(x0 | y_1)): a float or a per-dimension tensor."""
    from fewstep.samplers._common import ancestral_levels

    K = len(sig) - 1
    post = [ancestral_levels(s, sn, 1.0)[1] ** 2 for s, sn in zip(sig[:-1], sig[1:])]  # beta_tilde / a_prev
    if variance == "small":  # Ho et al.'s decoder: the posterior variance of the step before (their clip)
        fixed = post[:-1] + [post[-2] if K > 1 else sig[-2] ** 2 / (1 + sig[-2] ** 2)]
        return lambda i, y, den, cb: fixed[i]
    if variance == "large":  # the ddpm sampler's beta_t / a_prev; at the decoder beta_1 = s_1^2 / (1 + s_1^2)
        from fewstep.samplers.ancestral import _ddpm_levels

        large = _ddpm_levels("large")
        fixed = [large(s, sn)[1] ** 2 for s, sn in zip(sig[:-2], sig[1:-1])] + [sig[-2] ** 2 / (1 + sig[-2] ** 2)]
        return lambda i, y, den, cb: fixed[i]
    if variance == "analytic":
        from fewstep.samplers.analytic_dpm import _gamma_at, _variances

        if gamma is None:
            raise UserError("chain_elbo: variance='analytic' needs gamma= (analytic_dpm_stats at the chain's "
                            "levels, or a {'sigmas', 'gamma'} table)")
        fixed = [std**2 for _, std in _variances(sig, _gamma_at(gamma, sig[:-1]), 1.0, data_range, True)]
        return lambda i, y, den, cb: fixed[i]
    if variance == "covariance":
        from fewstep.samplers.ancestral import optimal_std

        if covariance is None:
            raise UserError("chain_elbo: variance='covariance' needs covariance= (a head from load_covariance, "
                            "or GaussianMixture.posterior_variance)")
        levels = [ancestral_levels(s, sn, 1.0) for s, sn in zip(sig[:-1], sig[1:])]
        return lambda i, y, den, cb: optimal_std(covariance, y, sig[i], den, *levels[i], data_range, cb).double() ** 2
    raise UserError(f"chain_elbo: variance '{variance}' is not one of {', '.join(CHAIN_VARIANCES)}")


@torch.no_grad()
def chain_elbo(denoiser: Callable, x0: Tensor, sigmas, variance: str = "small", *, covariance=None, gamma=None,
               data_range=None, prior_var: Optional[float] = None, batch_size: int = 1000,
               generator: Optional[torch.Generator] = None, **cond) -> Tensor:
    """-ELBO in nats per sample of ``x0`` [n, ...] under the K-step DDPM chain on ``sigmas``
    (descending, ending at 0), float64 [n]: the variational bound of Ho et al. 2020 (eq. 5)
    that Analytic-DPM and its covariance extension (Bao et al. 2022a, their NLL tables) report,
    in sigma-space (y = x0 + sigma eps; every KL is invariant under the per-level scaling of
    a VP process):

        -ELBO = KL(q(y_K | x0) || N(0, prior_var))
                + sum_{k = K..2} KL(q(y_{k-1} | y_k, x0) || p(y_{k-1} | y_k))
                - log p(x0 | y_1),

    q(y_{k-1} | y_k, x0) = N(x0 + r (y_k - x0), s_{k-1}^2 (s_k^2 - s_{k-1}^2) / s_k^2), r =
    s_{k-1}^2 / s_k^2; p the DDPM step of :func:`fewstep.samplers.ancestral.sample_ddpm`: mean
    D + r (y_k - D) (D at y_k) and the reverse variance of ``variance``: ``small`` (the
    posterior's; the decoder takes the step before's, as Ho et al.'s clipped log variance),
    ``large`` (beta_t / a_prev), ``analytic`` (Analytic-DPM's optimal scalar, ``gamma`` =
    :func:`~fewstep.samplers.analytic_dpm.analytic_dpm_stats` at ``sigmas[:-1]`` or a table;
    its last step s_1^2 (1 - Gamma_1)) or ``covariance`` (the per-dimension optimum of a
    learned or exact diag Cov[x0 | y], ``covariance(y, sigma, D) -> Cov``, the decoder's
    variance Cov itself); ``data_range`` clips as the samplers do. The decoder p(x0 | y_1) is
    the Gaussian N(D(y_1), var) (a density: for quantised data dequantise x0 first and read
    bits/dim with :func:`bits_per_dim`). ``prior_var`` defaults to s_K^2, the start noise
    of fewstep's samplers (a VP process's N(0, I) is 1 + s_K^2). Each term draws its own y_k ~
    q(y_k | x0) (one draw per sample and level: an unbiased estimate; average over samples).
    A reverse variance of 0 anywhere (a covariance clipped at 0 at the decoder) gives +inf.
    Costs K denoiser evaluations per sample (and K covariance evaluations).
    """
    x0 = torch.as_tensor(x0)
    sig = [float(s) for s in torch.as_tensor(sigmas).flatten().tolist()]
    if x0.ndim < 2 or len(x0) < 1:
        raise UserError(f"chain_elbo: give a batch [n, ...] of samples, got shape {list(x0.shape)}")
    if len(sig) < 2 or sig[-1] != 0 or min(sig[:-1]) <= 0 or any(a <= b for a, b in zip(sig[:-1], sig[1:])):
        raise UserError(f"chain_elbo: the levels must be strictly descending and positive, ending at 0; got {sig}")
    var_of = _chain_variances(variance, sig, gamma, covariance, data_range)
    pv = float(prior_var) if prior_var is not None else sig[0] ** 2
    if not pv > 0:
        raise UserError(f"chain_elbo: prior_var={prior_var} must be positive")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    for b0 in range(0, len(x0), int(batch_size)):
        xb = x0[b0:b0 + int(batch_size)].double()
        cb = {k: (v[b0:b0 + len(xb)] if torch.is_tensor(v) and v.ndim > 0 and len(v) == len(x0) else v)
              for k, v in cond.items()}
        sK = sig[0]
        terms = 0.5 * (math.log(pv / sK**2) + (sK**2 + xb**2) / pv - 1.0)
        total = terms.flatten(1).sum(1)
        for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
            z = torch.randn(xb.shape, generator=g, dtype=torch.float64, device=g.device).to(xb.device)
            y = xb + s * z
            den = denoiser(y.to(x0.dtype), torch.full((len(xb),), s, dtype=x0.dtype, device=xb.device), **cb).double()
            var_p = torch.as_tensor(var_of(i, y.to(x0.dtype), den.to(x0.dtype), cb), dtype=torch.float64).to(xb.device)
            var_p = var_p.expand_as(xb)
            if sn > 0:
                var_q = sn**2 * (s**2 - sn**2) / s**2
                diff2 = ((1.0 - sn**2 / s**2) * (xb - den)) ** 2
                kl = 0.5 * (torch.log(var_p / var_q) + (var_q + diff2) / var_p - 1.0)
            else:
                kl = 0.5 * (torch.log(2 * math.pi * var_p) + (xb - den) ** 2 / var_p)
            # a zero reverse variance (e.g. a covariance clipped at 0) is a point mass: the bound is +inf
            kl = torch.where(var_p > 0, kl, torch.full_like(kl, math.inf))
            total = total + kl.flatten(1).sum(1)
        out.append(total.cpu())
    return torch.cat(out)
