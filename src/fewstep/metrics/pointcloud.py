"""Point-cloud metrics: the Chamfer distance and the set metrics of the point-cloud
generation literature (Achlioptas et al. 2018; Yang et al. 2019, PointFlow, section 5.2).

A cloud is [N, 3] (any trailing point dimension works); a set of clouds is [n, N, 3].

Chamfer distance between clouds a [N, D] and b [M, D] (PointFlow's convention: squared
distances, a mean over each cloud):

    CD(a, b) = 1/N sum_i min_j |a_i - b_j|^2 + 1/M sum_j min_i |a_i - b_j|^2

Between a generated set S_g and a reference set S_r, with CD as the ground distance:

    MMD-CD = 1/|S_r| sum_{y in S_r} min_{x in S_g} CD(x, y)              (fidelity, lower is better)
    COV-CD = |{argmin_{y in S_r} CD(x, y) : x in S_g}| / |S_r|           (coverage, higher is better)
    1-NNA-CD = leave-one-out accuracy of the 1-nearest-neighbour classifier telling S_g
               from S_r in S_g U S_r                                       (50% is ideal)

All pairwise CDs are computed in float64, one block of cloud pairs at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fewstep.errors import UserError

_BLOCK = 2**24  # point pairs per block


def _clouds(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1:
        raise UserError(f"point-cloud metric: '{name}' has shape {list(x.shape)}; give clouds [n, N, D]")
    if not torch.isfinite(x).all():
        raise UserError(f"point-cloud metric: '{name}' contains NaN or inf")
    return x.detach().to(torch.float64)


def chamfer(a: Tensor, b: Tensor) -> Tensor:
    """CD(a_k, b_k) for paired clouds a [B, N, D], b [B, M, D] (or single clouds [N, D]); [B]."""
    single = torch.as_tensor(a).ndim == 2
    a = _clouds(a[None] if single else a, "a")
    b = _clouds(b[None] if single else b, "b")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise UserError(f"chamfer: clouds {list(a.shape)} and {list(b.shape)} do not pair up")
    d2 = torch.cdist(a, b).square()  # [B, N, M]
    cd = d2.min(2).values.mean(1) + d2.min(1).values.mean(1)
    return cd[0] if single else cd


def pairwise_chamfer(x: Tensor, y: Tensor) -> Tensor:
    """CD(x_i, y_j) for all pairs of clouds x [n, N, D], y [m, M, D]; [n, m] float64."""
    x, y = _clouds(x, "x"), _clouds(y, "y")
    if x.shape[2] != y.shape[2]:
        raise UserError(f"pairwise_chamfer: points of dimension {x.shape[2]} and {y.shape[2]}")
    n, m = len(x), len(y)
    out = torch.empty(n, m, dtype=torch.float64)
    per_pair = x.shape[1] * y.shape[1]
    cols = max(1, min(m, _BLOCK // per_pair))
    for i in range(n):
        for j0 in range(0, m, cols):
            yb = y[j0:j0 + cols]
            d2 = torch.cdist(x[i].expand(len(yb), -1, -1), yb).square()
            out[i, j0:j0 + cols] = d2.min(2).values.mean(1) + d2.min(1).values.mean(1)
    return out


def cloud_set_metrics(fake: Tensor, real: Tensor) -> dict[str, float]:
    """MMD-CD, COV-CD and 1-NNA-CD of generated clouds ``fake`` against ``real``."""
    fake, real = _clouds(fake, "fake"), _clouds(real, "real")
    if len(fake) < 2 or len(real) < 2:
        raise UserError("point-cloud set metrics need at least 2 clouds in each set")
    d_fr = pairwise_chamfer(fake, real)
    mmd_cd = float(d_fr.min(0).values.mean())
    cov_cd = len(set(d_fr.argmin(1).tolist())) / len(real)
    d_ff, d_rr = pairwise_chamfer(fake, fake), pairwise_chamfer(real, real)
    d_ff.fill_diagonal_(float("inf"))
    d_rr.fill_diagonal_(float("inf"))
    # a sample is classified correctly when its nearest other cloud comes from its own set
    fake_ok = d_ff.min(1).values < d_fr.min(1).values
    real_ok = d_rr.min(1).values < d_fr.min(0).values
    nna = float(torch.cat([fake_ok, real_ok]).double().mean())
    return {"mmd_cd": mmd_cd, "cov_cd": cov_cd, "nna_cd": nna}
