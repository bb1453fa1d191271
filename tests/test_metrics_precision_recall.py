"""Improved precision/recall (Kynkaanniemi et al. 2019) on sets with known defects."""
import pytest
import torch

from fewstep import GaussianMixture
from fewstep.errors import UserError
from fewstep.metrics import precision_recall
from fewstep.metrics.precision_recall import knn_radii

N = 1000


def ring_samples(n, seed, modes=None):
    gmm = GaussianMixture.ring(8, std=0.15)
    x, k = gmm.sample(4 * n, generator=torch.Generator().manual_seed(seed), return_labels=True)
    if modes is not None:
        x = x[torch.isin(k, torch.tensor(modes))]
    return x[:n]


def test_same_distribution_has_high_precision_and_recall():
    pr = precision_recall(ring_samples(N, 1), ring_samples(N, 2))
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9


def test_mode_dropping_keeps_precision_and_halves_recall():
    pr = precision_recall(ring_samples(N, 1, modes=[0, 1, 2, 3]), ring_samples(N, 2))
    assert pr["precision"] > 0.9
    assert 0.4 < pr["recall"] < 0.6


def test_truncation_keeps_precision_and_loses_recall():
    real = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fake = torch.randn(4 * N, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fake = fake[fake.norm(dim=1) < 0.8][:N]  # the truncation trick: only the most typical samples
    pr = precision_recall(fake, real)
    assert pr["precision"] > 0.95
    assert pr["recall"] < 0.6


def test_over_dispersed_samples_lose_precision_and_keep_recall():
    real = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fake = 4.0 * torch.randn(N, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pr = precision_recall(fake, real)
    assert pr["precision"] < 0.5
    assert pr["recall"] > 0.9


def test_matches_brute_force_definition():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(60, 3, generator=g, dtype=torch.float64)
    fake = 1.3 * torch.randn(50, 3, generator=g, dtype=torch.float64) + 0.3
    k = 3

    def radii(a):
        d = torch.cdist(a, a)
        return d.sort(1).values[:, k]  # column 0 is the point itself

    assert torch.allclose(knn_radii(real, k).sqrt(), radii(real), atol=1e-9)
    r_real, r_fake = radii(real), radii(fake)
    prec = (torch.cdist(fake, real) <= r_real[None]).any(1).double().mean()
    rec = (torch.cdist(real, fake) <= r_fake[None]).any(1).double().mean()
    pr = precision_recall(fake, real, k=k)
    assert pr["precision"] == pytest.approx(float(prec)) and pr["recall"] == pytest.approx(float(rec))


def test_bad_k_and_shapes_are_user_errors():
    x = torch.randn(5, 2)
    with pytest.raises(UserError, match="k=5"):
        precision_recall(x, x, k=5)
    with pytest.raises(UserError, match="shape"):
        precision_recall(x, torch.randn(5, 3))
