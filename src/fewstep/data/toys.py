"""Two-dimensional toy distributions, written in torch.

Each generator draws ``n`` points from a fixed distribution using only the given
``torch.Generator``, so the same seed gives the same points. Every set is affinely mapped
by fixed constants (measured once on a large sample) so that it is centred with an overall
standard deviation of about 1 per coordinate; the map does not depend on ``n``.

``make_toy(name, n, generator) -> (x [n, 2] float32, labels [n] long or None, num_classes)``.
Labels name the natural component of a point (moon, mode, ring, arm); sets without a
natural split (swiss roll, checkerboard) have ``labels=None`` and ``num_classes=0``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..errors import UserError, unknown_name

Toy = tuple[torch.Tensor, Optional[torch.Tensor], int]


def _randn(n: int, g, d: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _rand(n: int, g) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def _standardise(x: torch.Tensor, mean: tuple[float, float], std: float) -> torch.Tensor:
    """``(x - mean) / std`` with fixed constants, as float32."""
    return ((x - torch.tensor(mean, dtype=x.dtype)) / std).float()


def moons(n: int, g=None) -> Toy:
    """Two interleaved half circles (label = moon), Gaussian noise of std 0.1.

    Upper moon ``(cos a, sin a)``, lower moon ``(1 - cos a, 1/2 - sin a)``, ``a ~ U[0, pi]``.
    """
    labels = torch.randint(0, 2, (n,), generator=g)
    a = math.pi * _rand(n, g)
    upper = torch.stack([a.cos(), a.sin()], 1)
    lower = torch.stack([1 - a.cos(), 0.5 - a.sin()], 1)
    x = torch.where(labels[:, None] == 0, upper, lower) + 0.1 * _randn(n, g)
    return _standardise(x, (0.5, 0.25), 0.71), labels, 2


def swiss_roll(n: int, g=None) -> Toy:
    """The 2-D Swiss roll: ``t (cos t, sin t)`` with ``t ~ U[1.5 pi, 4.5 pi]``, noise 0.5.

    Its mean is exactly ``(2, 2 / (3 pi))`` (integrate ``t cos t`` and ``t sin t``).
    """
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    x = torch.stack([t * t.cos(), t * t.sin()], 1) + 0.5 * _randn(n, g)
    return _standardise(x, (2.0, 2 / (3 * math.pi)), 6.81), None, 0


def eight_gaussians(n: int, g=None) -> Toy:
    """Eight Gaussians (std 0.1) at equal angles on a circle (label = mode).

    The radius ``sqrt(2 (1 - 0.1^2))`` makes the per-coordinate variance exactly 1:
    ``Var = r^2 / 2 + 0.1^2``.
    """
    std = 0.1
    labels = torch.randint(0, 8, (n,), generator=g)
    angle = labels.double() * (2 * math.pi / 8)
    radius = math.sqrt(2 * (1 - std**2))
    x = radius * torch.stack([angle.cos(), angle.sin()], 1) + std * _randn(n, g)
    return x.float(), labels, 8


def checkerboard(n: int, g=None) -> Toy:
    """Uniform on the 8 'black' squares of a 4x4 board over ``[-2, 2]^2`` (no labels).

    Each coordinate is uniform on ``[-2, 2]`` (variance 4/3), so we divide by ``sqrt(4/3)``.
    """
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + (col % 2)  # (row + col) even
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    x = torch.stack([col, row], 1).double() + u - 2
    return _standardise(x, (0.0, 0.0), math.sqrt(4 / 3)), None, 0


def rings(n: int, g=None, num_rings: int = 4) -> Toy:
    """Concentric rings of radius 1..4 with noise 0.08; ring ``k`` holds a share ``∝ k``
    of the points so the density along each ring is the same (label = ring).

    Per-coordinate variance is ``E[r^2]/2 + 0.08^2`` with ``E[r^2] = sum k^3 / sum k``.
    """
    weights = torch.arange(1, num_rings + 1, dtype=torch.float64)
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    radius = labels.double() + 1
    angle = 2 * math.pi * _rand(n, g)
    x = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1) + 0.08 * _randn(n, g)
    var = float((weights**3).sum() / weights.sum()) / 2 + 0.08**2
    return _standardise(x, (0.0, 0.0), math.sqrt(var)), labels, num_rings


def pinwheel(n: int, g=None, arms: int = 5) -> Toy:
    """Pinwheel of Johnson et al. (2016): Gaussian blobs sheared into spiral arms (label = arm).

    ``f ~ N((1, 0), diag(0.3^2, 0.05^2))``, angle ``= 2 pi k / arms + 0.25 exp(f_1)``,
    point ``= R(angle) f``.
    """
    labels = torch.randint(0, arms, (n,), generator=g)
    f = _randn(n, g) * torch.tensor([0.3, 0.05], dtype=torch.float64)
    f[:, 0] += 1
    angle = labels.double() * (2 * math.pi / arms) + 0.25 * f[:, 0].exp()
    c, s = angle.cos(), angle.sin()
    x = torch.stack([c * f[:, 0] - s * f[:, 1], s * f[:, 0] + c * f[:, 1]], 1)
    return _standardise(x, (0.0, 0.0), 0.74), labels, arms


TOYS: dict[str, Callable[..., Toy]] = {
    "moons": moons,
    "swiss_roll": swiss_roll,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "rings": rings,
    "pinwheel": pinwheel,
}


def make_toy(name: str, n: int, generator: Optional[torch.Generator] = None) -> Toy:
    """Draw ``n`` points of the toy set ``name``; returns ``(x, labels, num_classes)``."""
    if name not in TOYS:
        raise unknown_name("toy dataset", name, TOYS)
    if int(n) < 1:
        raise UserError(f"toy dataset '{name}': n must be a positive count, got {n}")
    return TOYS[name](int(n), generator)
