"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall
metric for assessing generative models", eq. 1-3).

Each set's manifold is the union of balls around its points, each ball reaching the
point's k-th nearest neighbour within the same set:

    f(phi, Phi) = 1  if  |phi - phi'| <= |phi' - NN_k(phi', Phi)|  for some phi' in Phi,
    precision   = 1/|Phi_g| sum_{phi_g in Phi_g} f(phi_g, Phi_r)
    recall      = 1/|Phi_r| sum_{phi_r in Phi_r} f(phi_r, Phi_g)

Precision is the share of generated samples that fall on the real manifold (quality),
recall the share of real samples that fall on the generated manifold (coverage). The
paper uses k = 3 on VGG-16 features; here the features are the image set's classifier
features (:mod:`fewstep.metrics.features`) or, for points, the coordinates themselves.
Pure statistics on features: inputs [n, ...] are flattened; computed in float64 with
pairwise distances in row chunks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fewstep.errors import UserError
from fewstep.metrics.distances import _pair

_CHUNK = 2**22  # pairwise distances per block


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """|a_i - b_j|^2 for one block of rows of ``a``, float64, >= 0."""
    d2 = torch.addmm((b * b).sum(1)[None, :], a, b.T, alpha=-2.0)
    return d2.add_((a * a).sum(1)[:, None]).clamp_min_(0.0)


def _rows(n_cols: int) -> int:
    return max(1, _CHUNK // max(1, n_cols))


def knn_radii(x: Tensor, k: int) -> Tensor:
    """Squared distance from each point of ``x`` [n, d] to its k-th nearest other point."""
    out = []
    for i in range(0, len(x), _rows(len(x))):
        d2 = _sq_dists(x[i:i + _rows(len(x))], x)
        # the point itself is at distance 0: the (k+1)-th smallest is the k-th neighbour
        out.append(d2.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _coverage(points: Tensor, centres: Tensor, radii2: Tensor) -> Tensor:
    """For each point: 1.0 if it lies in some ball (centre, radius), else 0.0."""
    out = []
    for i in range(0, len(points), _rows(len(centres))):
        d2 = _sq_dists(points[i:i + _rows(len(centres))], centres)
        out.append((d2 <= radii2[None, :]).any(1).double())
    return torch.cat(out)


def precision_recall(fake: Tensor, real: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall of generated ``fake`` against ``real`` (k-NN balls).

    Returns ``{"precision": float, "recall": float}``, both in [0, 1]. Use sets of equal
    size (the paper uses 50000 each); the values depend on n through the ball radii.
    """
    k = int(k)
    fake, real = _pair(fake, real, min_n=2)
    if k < 1 or k >= min(len(fake), len(real)):
        raise UserError(f"precision_recall: k={k} must be in 1..{min(len(fake), len(real)) - 1} "
                        f"for sets of {len(fake)} and {len(real)} samples")
    c = real.mean(0)
    fake, real = fake - c, real - c
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    return {"precision": float(_coverage(fake, real, r_real).mean()),
            "recall": float(_coverage(real, fake, r_fake).mean())}
