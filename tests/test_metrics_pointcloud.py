"""Chamfer distance and MMD-CD / COV-CD / 1-NNA-CD against brute-force definitions."""
import pytest
import torch

from fewstep.errors import UserError
from fewstep.metrics.pointcloud import chamfer, cloud_set_metrics, pairwise_chamfer


def brute_cd(a, b):
    fwd = sum(min(float(((p - q) ** 2).sum()) for q in b) for p in a) / len(a)
    bwd = sum(min(float(((p - q) ** 2).sum()) for p in a) for q in b) / len(b)
    return fwd + bwd


def spheres(n, pts, seed, radius=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, pts, 3, generator=g, dtype=torch.float64)
    return radius * x / x.norm(dim=2, keepdim=True)


def test_chamfer_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g)
    assert float(chamfer(a, b)) == pytest.approx(brute_cd(a.double(), b.double()), rel=1e-10)
    assert float(chamfer(a, a)) == 0.0
    x, y = torch.randn(4, 6, 3, generator=g), torch.randn(3, 9, 3, generator=g)
    d = pairwise_chamfer(x, y)
    for i in range(4):
        for j in range(3):
            assert float(d[i, j]) == pytest.approx(brute_cd(x[i].double(), y[j].double()), rel=1e-10)


def test_set_metrics_same_distribution_vs_collapsed_and_shifted():
    real = spheres(30, 64, 0)
    same = cloud_set_metrics(spheres(30, 64, 1), real)
    assert same["cov_cd"] > 0.5 and 0.3 <= same["nna_cd"] <= 0.75
    # radius-1 spheres vs radius-1.5 spheres: 1-NNA near 100%, larger MMD
    far = cloud_set_metrics(spheres(30, 64, 1, radius=1.5), real)
    assert far["nna_cd"] > 0.95 and far["mmd_cd"] > 5 * same["mmd_cd"]
    # mode collapse: 30 copies of one cloud cover one reference cloud only
    collapsed = cloud_set_metrics(spheres(1, 64, 1).expand(30, -1, -1), real)
    assert collapsed["cov_cd"] == pytest.approx(1 / 30)


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="clouds"):
        cloud_set_metrics(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(UserError, match="pair up"):
        chamfer(torch.zeros(2, 4, 3), torch.zeros(3, 4, 3))
