"""Distances between two sample sets: pure statistics on samples (or on features).

Every function takes two sets ``x`` [n, ...] and ``y`` [m, ...] with the same trailing
shape, flattens each sample to a vector, computes in float64 and returns a Python float.
Pairwise sums are taken in row chunks, so n = m = 10000 needs a few tens of MB.

- :func:`sliced_w2`: sliced Wasserstein-2 (Rabin et al. 2011; Bonneel et al. 2015).
- :func:`mmd`: squared maximum mean discrepancy, unbiased (Gretton et al. 2012, eq. 3).
- :func:`energy_distance`: Szekely & Rizzo (2004, 2013).
- :func:`rms`: root-mean-square error between paired samples (e.g. sampler vs exact flow).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from fewstep.errors import UserError

MEDIAN_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
_CHUNK_BYTES = 2**25  # size of one float64 block of pairwise values
_MEDIAN_SUBSAMPLE = 1000


def _flat64(x: Tensor, name: str, min_n: int = 1) -> Tensor:
    """``x`` [n, ...] -> float64 [n, d]; UserError if empty, scalar or not finite."""
    x = torch.as_tensor(x)
    if x.ndim == 0 or x.shape[0] < min_n:
        raise UserError(f"metric input '{name}' has shape {tuple(x.shape)}; "
                        f"pass a batch [n, ...] with n >= {min_n}")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    if not torch.isfinite(x).all():
        raise UserError(f"metric input '{name}' contains NaN or inf; check the samples")
    return x


def _pair(x: Tensor, y: Tensor, min_n: int = 1) -> tuple[Tensor, Tensor]:
    """Flatten both sets and check that their samples have the same shape."""
    if tuple(torch.as_tensor(x).shape[1:]) != tuple(torch.as_tensor(y).shape[1:]):
        raise UserError(f"metric inputs have sample shapes {tuple(x.shape[1:])} and "
                        f"{tuple(y.shape[1:])}; both sets must hold samples of one shape")
    x, y = _flat64(x, "x", min_n), _flat64(y, "y", min_n)
    return x, y.to(x.device)


# --------------------------------------------------------------------------- sliced W2
def _w2_sq_sorted(px: Tensor, py: Tensor) -> Tensor:
    """Squared 1-D W2 per row between sorted empirical samples px [P, n], py [P, m].

    W2^2 = int_0^1 (F_x^-1(t) - F_y^-1(t))^2 dt, with the step quantile functions
    F_x^-1(t) = px[ceil(t n) - 1]. For n == m this is mean_i (px_i - py_i)^2; otherwise
    the integral is summed exactly over the merged breakpoints {i/n} U {j/m}.
    """
    n, m = px.shape[1], py.shape[1]
    if n == m:
        return (px - py).square().mean(1)
    kw = dict(dtype=torch.float64, device=px.device)
    t = torch.unique(torch.cat([torch.arange(1, n + 1, **kw) / n,
                                torch.arange(1, m + 1, **kw) / m]))
    w = torch.diff(t, prepend=t.new_zeros(1))
    mid = t - w / 2
    ix = (mid * n).floor().long().clamp_(max=n - 1)
    iy = (mid * m).floor().long().clamp_(max=m - 1)
    return ((px[:, ix] - py[:, iy]).square() * w).sum(1)


def _directions(d: int, n_projections: int, generator: torch.Generator | None) -> Tensor:
    """``n_projections`` random unit vectors in R^d (columns of a [d, P] matrix)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    u = torch.randn(d, n_projections, generator=generator, dtype=torch.float64,
                    device=generator.device)
    return u / u.norm(dim=0, keepdim=True)


def sliced_w2(x: Tensor, y: Tensor, n_projections: int = 512,
              generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between sample sets x [n, ...] and y [m, ...].

    SW2(x, y) = sqrt( E_u W2^2(u.x, u.y) ),  u uniform on the unit sphere S^{d-1},
    estimated with ``n_projections`` directions; each 1-D W2 is exact for the empirical
    measures (sorted samples, quantile functions merged when n != m). For isotropic
    Gaussians differing by a mean shift m, E_u (u.m)^2 = |m|^2 / d, so SW2 ~ |m|/sqrt(d).
    Deterministic: directions come from ``generator`` (default: a fresh one seeded 0).
    """
    if int(n_projections) < 1:
        raise UserError(f"sliced_w2: n_projections={n_projections}; pass an integer >= 1")
    x, y = _pair(x, y)
    u = _directions(x.shape[1], int(n_projections), generator).to(x.device)
    px, _ = torch.sort(u.T @ x.T, dim=1)  # [P, n]: sort along contiguous rows
    py, _ = torch.sort(u.T @ y.T, dim=1)
    return math.sqrt(max(float(_w2_sq_sorted(px, py).mean()), 0.0))


# --------------------------------------------------------------------- pairwise sums
def _pairwise_sum(a: Tensor, b: Tensor, fn: Callable[[Tensor], Tensor],
                  exclude_diagonal: bool = False) -> float:
    """sum_{i,j} fn(|a_i - b_j|^2), in row chunks; ``exclude_diagonal`` drops i == j."""
    a2, b2 = a.square().sum(1), b.square().sum(1)
    rows = max(1, _CHUNK_BYTES // (8 * b.shape[0]))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i0 in range(0, a.shape[0], rows):
        blk = a[i0:i0 + rows]
        d2 = torch.addmm(b2[None, :], blk, b.T, alpha=-2.0)  # |b|^2 - 2 a.b
        d2.add_(a2[i0:i0 + rows, None]).clamp_min_(0.0)
        v = fn(d2)
        if exclude_diagonal:
            idx = torch.arange(blk.shape[0], device=a.device)
            v[idx, i0 + idx] = 0.0
        total += v.sum()
    return float(total)


def _centered(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Shift both sets by their pooled mean (distances unchanged, less cancellation)."""
    c = torch.cat([x, y]).mean(0)
    return x - c, y - c


def _mean_pairwise(a: Tensor, b: Tensor, fn: Callable[[Tensor], Tensor]) -> float:
    """E fn(|A - B|^2) over independent pairs: all n m pairs, or the n(n-1) with i != j
    when ``a is b`` (the unbiased within-set average)."""
    if a is b:
        n = a.shape[0]
        return _pairwise_sum(a, a, fn, exclude_diagonal=True) / (n * (n - 1))
    return _pairwise_sum(a, b, fn) / (a.shape[0] * b.shape[0])


# -------------------------------------------------------------------------------- MMD
def median_distance(x: Tensor, y: Tensor) -> float:
    """Median pairwise Euclidean distance of the pooled set (a fixed-seed subsample of
    at most 1000 points); the median heuristic for the kernel bandwidth."""
    z = torch.cat(_pair(x, y, min_n=1))
    if z.shape[0] > _MEDIAN_SUBSAMPLE:
        g = torch.Generator().manual_seed(0)
        z = z[torch.randperm(z.shape[0], generator=g)[:_MEDIAN_SUBSAMPLE].to(z.device)]
    d = torch.nn.functional.pdist(z)
    d = d[d > 0]
    return float(d.median()) if d.numel() else 1.0


def _rbf_sum(gammas: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """d2 -> sum_g exp(-g d2). Gammas a power-of-two ratio apart (the default 4x steps)
    reuse the previous term by squaring: exp(-4 g d2) = (exp(-g d2))^2^2."""
    gammas = sorted(gammas)

    def kernel(d2: Tensor) -> Tensor:
        term = torch.exp(d2 * -gammas[0])
        total = term.clone()
        for g_prev, g in zip(gammas, gammas[1:]):
            k = math.log2(g / g_prev)
            if abs(k - round(k)) < 1e-9 and 0 <= round(k) <= 6:
                for _ in range(round(k)):
                    term.square_()
            else:
                term = torch.exp(d2 * -g)
            total += term
        return total

    return kernel


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None) -> float:
    """Squared MMD with a sum of RBF kernels, unbiased (Gretton et al. 2012, eq. 3).

    k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)),
    MMD_u^2 = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
              - 2/(n m) sum_{i,j} k(x_i, y_j).
    Default bandwidths h: (0.25, 0.5, 1, 2, 4) x the median pairwise distance of the
    pooled samples. The unbiased estimate can be slightly negative when x ~ y.
    """
    x, y = _pair(x, y, min_n=2)
    if bandwidths is None:
        med = median_distance(x, y)
        bandwidths = [c * med for c in MEDIAN_MULTIPLES]
    hs = [float(h) for h in bandwidths]
    if not hs or min(hs) <= 0 or not all(map(math.isfinite, hs)):
        raise UserError(f"mmd: bandwidths {list(bandwidths)} must be a non-empty list of "
                        "positive numbers; leave them out for the median heuristic")
    kernel = _rbf_sum([1.0 / (2.0 * h * h) for h in hs])
    x, y = _centered(x, y)
    return (_mean_pairwise(x, x, kernel) + _mean_pairwise(y, y, kernel)
            - 2.0 * _mean_pairwise(x, y, kernel))


# -------------------------------------------------------------------- energy distance
def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance (Szekely & Rizzo 2013, eq. 2.1), unbiased within-set terms.

    E(x, y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|,
    with E|X - X'| = 1/(n(n-1)) sum_{i!=j} |x_i - x_j| (likewise for Y). It is >= 0 in
    the population and 0 iff X and Y have the same law.
    """
    x, y = _pair(x, y, min_n=2)
    x, y = _centered(x, y)
    return (2.0 * _mean_pairwise(x, y, torch.sqrt) - _mean_pairwise(x, x, torch.sqrt)
            - _mean_pairwise(y, y, torch.sqrt))


# -------------------------------------------------------------------------------- RMS
def rms(a: Tensor, b: Tensor) -> float:
    """Root-mean-square error between paired samples a, b [n, ...]:

    rms = sqrt( 1/n sum_i 1/D sum_k (a_ik - b_ik)^2 ),  D = entries per sample.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise UserError(f"rms: shapes {tuple(a.shape)} and {tuple(b.shape)} differ; "
                        "pass paired samples of one shape")
    a, b = _flat64(a, "a"), _flat64(b, "b").to(a.device)
    return math.sqrt(float((a - b).square().mean(1).mean()))
