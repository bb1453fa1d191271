"""Tests for fewstep.metrics.distances: the statistics, checked against closed forms."""
import math

import pytest
import torch

from fewstep.errors import UserError
from fewstep.metrics import energy_distance, mmd, rms, sliced_w2


def gauss(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def test_sliced_w2_identical_sets_is_exactly_zero():
    x = gauss(500, 3, 0).reshape(500, 3, 1)
    assert sliced_w2(x, x.clone()) == 0.0


def test_sliced_w2_is_deterministic_and_uses_generator():
    x, y = gauss(300, 4, 0), gauss(300, 4, 1)
    assert sliced_w2(x, y) == sliced_w2(x, y)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert sliced_w2(x, y, generator=g1) == sliced_w2(x, y, generator=g2)


@pytest.mark.parametrize("m", [0.5, -2.0])
def test_sliced_w2_1d_gaussians_equals_shift(m):
    x = gauss(10000, 1, 0)
    # a pure translation: the 1-D W2 is exactly |m|
    assert sliced_w2(x, x + m) == pytest.approx(abs(m), rel=1e-9)
    # independent samples of N(0,1) and N(m,1)
    assert sliced_w2(x, gauss(10000, 1, 1, shift=m)) == pytest.approx(abs(m), abs=0.04)


def test_sliced_w2_unequal_sizes_uses_quantiles():
    x = gauss(4000, 1, 0)
    y = gauss(3000, 1, 1, shift=1.0)
    assert sliced_w2(x, y) == pytest.approx(1.0, abs=0.05)
    # n != m with identical empirical laws (each point repeated twice): zero
    assert sliced_w2(x, torch.cat([x, x])) == pytest.approx(0.0, abs=1e-12)
    # exact value for a tiny case: {0, 1} vs {0, 1, 2}: quantile functions differ on
    # (1/3, 1/2) by 1 and on (2/3, 1) by 1 -> W2^2 = 1/6 + 1/3 = 1/2
    a = torch.tensor([[0.0], [1.0]])
    b = torch.tensor([[0.0], [1.0], [2.0]])
    assert sliced_w2(a, b) == pytest.approx(math.sqrt(0.5), rel=1e-12)


def test_sliced_w2_isotropic_shift_scales_as_norm_over_sqrt_d():
    d = 8
    shift = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    expected = shift.norm().item() / math.sqrt(d)
    x = gauss(2000, d, 0)
    # translation: exactly sqrt(mean_u (u.m)^2); only the directions are random
    # (relative std of the estimate ~ 0.6 / sqrt(n_projections) for d = 8)
    assert sliced_w2(x, x + shift, n_projections=2048) == pytest.approx(expected, rel=0.05)
    # independent samples
    y = gauss(2000, d, 1) + shift
    assert sliced_w2(x, y, n_projections=2048) == pytest.approx(expected, rel=0.07)


def test_same_distribution_is_near_zero_and_grows_with_shift():
    x, y = gauss(1500, 2, 0), gauss(1500, 2, 1)
    base = {"sw2": sliced_w2(x, y), "mmd": mmd(x, y), "energy": energy_distance(x, y)}
    assert base["sw2"] < 0.08
    assert abs(base["mmd"]) < 5e-3
    assert abs(base["energy"]) < 1e-2
    prev = base
    for s in (0.25, 0.5, 1.0, 2.0):
        ys = y + s
        cur = {"sw2": sliced_w2(x, ys), "mmd": mmd(x, ys, bandwidths=[0.5, 1.0, 2.0]),
               "energy": energy_distance(x, ys)}
        for k in cur:
            assert cur[k] > prev[k] and cur[k] > 0, (k, s, cur[k], prev[k])
        prev = cur


def _cdist(a, b):
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


@pytest.mark.parametrize("hs", [[1.0, 2.0], [0.7, 1.5, 6.0]])
@pytest.mark.parametrize("chunk_bytes", [2**25, 64])
def test_mmd_and_energy_match_brute_force(hs, chunk_bytes, monkeypatch):
    from fewstep.metrics import distances
    monkeypatch.setattr(distances, "_CHUNK_BYTES", chunk_bytes)  # 64 B: 1-row chunks
    x, y = gauss(40, 3, 0), gauss(30, 3, 1, shift=0.7)
    dxx, dyy, dxy = _cdist(x, x), _cdist(y, y), _cdist(x, y)
    off = lambda m: m.sum() / (m.shape[0] * (m.shape[0] - 1))  # noqa: E731 (diag is 0)
    energy = 2 * dxy.mean() - off(dxx) - off(dyy)
    assert energy_distance(x, y) == pytest.approx(energy.item(), rel=1e-9)
    k = lambda d: sum(torch.exp(-d**2 / (2 * h * h)) for h in hs)  # noqa: E731
    expected = off(k(dxx) - len(hs) * torch.eye(40)) + off(k(dyy) - len(hs) * torch.eye(30))
    expected = expected - 2 * k(dxy).mean()
    assert mmd(x, y, bandwidths=hs) == pytest.approx(expected.item(), rel=1e-9)


def test_large_sets_fit_in_memory():
    x, y = gauss(10000, 2, 0), gauss(10000, 2, 1, shift=0.3)
    assert energy_distance(x, y) > 0
    assert mmd(x[:4000], y[:4000]) > 0


def test_rms():
    a = torch.zeros(4, 2, 3)
    b = torch.ones(4, 2, 3)
    b[0] = 3.0  # per-sample mse: 9, 1, 1, 1 -> mean 3
    assert rms(a, b) == pytest.approx(math.sqrt(3.0))
    assert rms(a, a) == 0.0


def test_user_errors():
    x = gauss(10, 2, 0)
    with pytest.raises(UserError, match="sample shapes"):
        sliced_w2(x, gauss(10, 3, 0))
    with pytest.raises(UserError, match="NaN"):
        mmd(x, torch.full((10, 2), float("nan")))
    with pytest.raises(UserError, match="bandwidths"):
        mmd(x, x, bandwidths=[0.0])
    with pytest.raises(UserError, match="n >= 2"):
        energy_distance(x[:1], x)
    with pytest.raises(UserError, match="shapes"):
        rms(x, x[:5])
