"""Shared test helpers: exact Gaussian-mixture teachers and convergence-order measurement."""
from __future__ import annotations

import functools
import math

import torch

from fewstep import grids
from fewstep.data.gmm import GaussianMixture


@functools.lru_cache(maxsize=None)
def gmm2() -> GaussianMixture:
    """d = 2, eight well separated modes on a circle."""
    return GaussianMixture.ring(8, radius=2.0, std=0.25)


@functools.lru_cache(maxsize=None)
def gmm16() -> GaussianMixture:
    """d = 16, four components with random full covariances."""
    return GaussianMixture.random(k=4, dim=16, seed=3)


def start(gmm: GaussianMixture, n: int, sigma_max: float, seed: int = 0) -> torch.Tensor:
    """x at level sigma_max in sigma-space: x0 + sigma_max * eps (float64)."""
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, generator=g)
    return x0 + sigma_max * torch.randn(x0.shape, generator=g, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _reference(which: str, n: int, sigma_max: float, sigma_end: float, seed: int):
    gmm = {"gmm2": gmm2, "gmm16": gmm16}[which]()
    x = start(gmm, n, sigma_max, seed)
    return x, gmm.flow(x, sigma_max, sigma_end, rtol=1e-10)


def reference(which: str, n: int = 128, sigma_max: float = 80.0, sigma_end: float = 0.0, seed: int = 0):
    """(x_start, exact flow map of x_start to sigma_end), cached across tests."""
    return _reference(which, n, float(sigma_max), float(sigma_end), seed)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def errors(sampler, which: str, steps, sigma_min: float = 0.02, sigma_max: float = 20.0,
           grid=grids.karras, n: int = 128, **options):
    """RMS error against the exact flow for each step count, on grids ending at sigma_min."""
    gmm = {"gmm2": gmm2, "gmm16": gmm16}[which]()
    x, ref = reference(which, n, sigma_max, sigma_min)
    out = []
    for s in steps:
        sig = grid(s, sigma_min, sigma_max, final_zero=False)
        out.append(rms(sampler(gmm, x.clone(), sig, **options), ref))
    return out


def orders(errs):
    """Observed orders log2(e_n / e_2n) for step counts that double."""
    return [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]


# the small student/teacher MLP of the method tests (2-D data)
SMALL_MLP = {"kind": "mlp", "dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32}


@functools.lru_cache(maxsize=None)
def gmm_cond() -> GaussianMixture:
    """d = 2, 3 classes of 3, 2 and 3 components (GaussianMixture.labelled_ring)."""
    return GaussianMixture.labelled_ring()


def save_gmm_cond(path) -> str:
    """Write :func:`gmm_cond` to ``path`` (an .npz) for ``fewstep.load("gmm:PATH")``; returns str(path)."""
    gmm_cond().save(path)
    return str(path)
