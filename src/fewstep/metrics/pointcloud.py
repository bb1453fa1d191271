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

The Earth Mover's distance between clouds of equal size N (PointFlow's convention: the
mean Euclidean length of the optimal one-to-one matching),

    EMD(a, b) = min over permutations pi of 1/N sum_i |a_i - b_pi(i)|,

is solved exactly by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``,
O(N^3), already a dependency; Sinkhorn libraries such as geomloss or POT give only an
entropic approximation). ``*_loss`` are the differentiable forms used for training: for
EMD the matching is found without gradient and the matched lengths carry it (the
gradient of a minimum over a finite set of permutations, valid wherever the optimum is
unique). The set metrics take either ground distance (``distance="emd"``: MMD-EMD, ...).

All pairwise distances are computed in float64, one block of cloud pairs at a time.
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


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """|a_i - b_j|^2 for clouds a [B, N, D], b [B, M, D]: [B, N, M], differentiable (no
    square root, so no infinite gradient at coinciding points)."""
    d2 = a.square().sum(-1)[:, :, None] + b.square().sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)
    return d2.clamp_min(0)


def _cd_of(d2: Tensor) -> Tensor:
    """Chamfer distances from squared distances [B, N, M]: [B]."""
    return d2.min(2).values.mean(1) + d2.min(1).values.mean(1)


def chamfer_loss(a: Tensor, b: Tensor) -> Tensor:
    """CD(a_k, b_k) of paired clouds a [B, N, D], b [B, M, D] in their own dtype; [B],
    differentiable (the training form of :func:`chamfer`)."""
    return _cd_of(squared_distances(a, b))


def chamfer(a: Tensor, b: Tensor) -> Tensor:
    """CD(a_k, b_k) for paired clouds a [B, N, D], b [B, M, D] (or single clouds [N, D]); [B]."""
    single = torch.as_tensor(a).ndim == 2
    a = _clouds(a[None] if single else a, "a")
    b = _clouds(b[None] if single else b, "b")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise UserError(f"chamfer: clouds {list(a.shape)} and {list(b.shape)} do not pair up")
    cd = _cd_of(torch.cdist(a, b).square())  # [B, N, M] -> [B]
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
            out[i, j0:j0 + cols] = _cd_of(torch.cdist(x[i].expand(len(yb), -1, -1), yb).square())
    return out


# ------------------------------------------------------------------------------- EMD
def emd_matching(a: Tensor, b: Tensor) -> Tensor:
    """The optimal matching pi [B, N] (b[k, pi[k, i]] goes with a[k, i]) of paired clouds
    of equal size, by the Hungarian algorithm on the Euclidean lengths (no gradient)."""
    from scipy.optimize import linear_sum_assignment

    if a.shape != b.shape or a.ndim != 3:
        raise UserError(f"EMD: clouds {list(a.shape)} and {list(b.shape)} must be [B, N, D] of the same size")
    cost = torch.cdist(a.detach().double(), b.detach().double()).cpu().numpy()
    return torch.stack([torch.as_tensor(linear_sum_assignment(c)[1]) for c in cost]).to(a.device)


def emd_loss(a: Tensor, b: Tensor) -> Tensor:
    """EMD(a_k, b_k) of paired clouds [B, N, D] in their own dtype; [B], differentiable
    through the matched lengths (module docstring)."""
    pi = emd_matching(a, b)
    matched = b.gather(1, pi[..., None].expand_as(b))
    return ((a - matched).square().sum(-1) + 1e-20).sqrt().mean(1)


def emd(a: Tensor, b: Tensor) -> Tensor:
    """Exact EMD of paired clouds a, b [B, N, D] (or single clouds [N, D]); float64."""
    single = torch.as_tensor(a).ndim == 2
    a = _clouds(a[None] if single else a, "a")
    b = _clouds(b[None] if single else b, "b")
    out = emd_loss(a, b)
    return out[0] if single else out


def pairwise_emd(x: Tensor, y: Tensor) -> Tensor:
    """EMD(x_i, y_j) for all pairs of clouds x [n, N, D], y [m, N, D]; [n, m] float64."""
    x, y = _clouds(x, "x"), _clouds(y, "y")
    if x.shape[1:] != y.shape[1:]:
        raise UserError(f"pairwise_emd: clouds {list(x.shape[1:])} and {list(y.shape[1:])} must have the same size")
    return torch.stack([emd_loss(x[i].expand_as(y), y) for i in range(len(x))])


PAIRWISE = {"chamfer": (pairwise_chamfer, "cd"), "emd": (pairwise_emd, "emd")}


def cloud_set_metrics(fake: Tensor, real: Tensor, distance: str = "chamfer",
                      real_pairwise: Tensor | None = None) -> dict[str, float]:
    """MMD, COV and 1-NNA of generated clouds ``fake`` against ``real`` with the Chamfer
    (keys ``mmd_cd``, ``cov_cd``, ``nna_cd``) or EMD (``mmd_emd``, ...) ground distance.

    ``real_pairwise``: the [n, n] distances among ``real`` when already known (scoring
    several models against one reference set computes them once)."""
    if distance not in PAIRWISE:
        from fewstep.errors import unknown_name

        raise unknown_name("point-cloud distance", distance, PAIRWISE)
    pairwise, tag = PAIRWISE[distance]
    fake, real = _clouds(fake, "fake"), _clouds(real, "real")
    if len(fake) < 2 or len(real) < 2:
        raise UserError("point-cloud set metrics need at least 2 clouds in each set")
    d_fr = pairwise(fake, real)
    mmd_cd = float(d_fr.min(0).values.mean())
    cov_cd = len(set(d_fr.argmin(1).tolist())) / len(real)
    d_ff = pairwise(fake, fake)
    d_rr = (pairwise(real, real) if real_pairwise is None else real_pairwise).clone()
    d_ff.fill_diagonal_(float("inf"))
    d_rr.fill_diagonal_(float("inf"))
    # a sample is classified correctly when its nearest other cloud comes from its own set
    fake_ok = d_ff.min(1).values < d_fr.min(1).values
    real_ok = d_rr.min(1).values < d_fr.min(0).values
    nna = float(torch.cat([fake_ok, real_ok]).double().mean())
    return {f"mmd_{tag}": mmd_cd, f"cov_{tag}": cov_cd, f"nna_{tag}": nna}
