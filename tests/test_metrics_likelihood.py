"""NLL through the probability-flow ODE against the exact GaussianMixture log-density."""
import math

import pytest
import torch

from fewstep import GaussianMixture
from fewstep.errors import UserError
from fewstep.metrics import bits_per_dim, dequantize, nll

SIGMA_MAX = 80.0


def _data(gmm, n, seed=1):
    return gmm.sample(n, generator=torch.Generator().manual_seed(seed))


def test_exact_divergence_matches_gmm_log_density_2d():
    gmm = GaussianMixture.ring(8, std=0.2)
    x = _data(gmm, 120)
    exact = -gmm.log_prob(x, 0.002)
    est = nll(gmm, x, 0.002, SIGMA_MAX, divergence="exact", rtol=1e-5, atol=1e-5,
              log_prior=lambda y: gmm.log_prob(y, SIGMA_MAX))
    # the only error left is the ODE solver's (measured ~1.5e-4 at tol 1e-5)
    assert (est - exact).abs().max() < 2e-3


def test_default_gaussian_prior_costs_little_for_centred_data():
    gmm = GaussianMixture.ring(8, std=0.2)
    x = _data(gmm, 60, seed=2)
    exact = -gmm.log_prob(x, 0.002)
    est = nll(gmm, x, 0.002, SIGMA_MAX)  # auto -> exact for d = 2, prior N(0, 80^2 I)
    # prior error ~ |E x0| sqrt(d) / sigma_max (0 here) plus Var(x0) d / (2 sigma_max^2)
    assert (est - exact).abs().max() < 5e-3


def test_exact_divergence_in_16_dimensions():
    gmm = GaussianMixture.random(k=3, dim=16, seed=0)
    x = _data(gmm, 40)
    exact = -gmm.log_prob(x, 0.01)
    est = nll(gmm, x, 0.01, SIGMA_MAX, divergence="exact", log_prior=lambda y: gmm.log_prob(y, SIGMA_MAX))
    assert (est - exact).abs().max() < 1e-2


def test_hutchinson_is_unbiased_within_its_standard_error():
    gmm = GaussianMixture.random(k=3, dim=16, seed=0)
    x = _data(gmm, 150)
    exact = -gmm.log_prob(x, 0.01)
    est = nll(gmm, x, 0.01, SIGMA_MAX, divergence="hutchinson", n_probes=2,
              generator=torch.Generator().manual_seed(3), log_prior=lambda y: gmm.log_prob(y, SIGMA_MAX))
    diff = est - exact
    stderr = float(diff.std()) / math.sqrt(len(diff))
    assert float(diff.std()) > 1e-3  # it is a stochastic estimate...
    assert abs(float(diff.mean())) < 4 * stderr + 1e-2  # ...centred on the exact value
    assert stderr < 0.5


def test_nll_follows_batches_and_probes_are_seeded():
    gmm = GaussianMixture.random(k=2, dim=20, seed=1)
    x = _data(gmm, 30)
    a = nll(gmm, x, 0.01, SIGMA_MAX, batch_size=7, rtol=1e-4, atol=1e-4)  # auto -> hutchinson (d > 16)
    b = nll(gmm, x, 0.01, SIGMA_MAX, batch_size=7, rtol=1e-4, atol=1e-4)
    assert a.shape == (30,) and a.dtype == torch.float64
    assert torch.equal(a, b)


def test_bits_per_dim_closed_forms():
    d = 4
    nats = torch.tensor([d * 0.5 * math.log(2 * math.pi * math.e)] * 3)  # N(0, I) entropy
    assert bits_per_dim(nats, d) == pytest.approx(0.5 * math.log2(2 * math.pi * math.e))
    # 8-bit data mapped to [-1, 1]: bins of 2/255 add log2(127.5) bits per dimension
    assert bits_per_dim(nats, d, bin_width=2 / 255) == pytest.approx(
        0.5 * math.log2(2 * math.pi * math.e) + math.log2(127.5))


def test_dequantize_stays_in_its_bin():
    x = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    y = dequantize(x, 2 / 255, torch.Generator().manual_seed(0))
    assert (y - x).abs().max() <= 1 / 255 + 1e-7 and not torch.equal(x, y)


@pytest.mark.parametrize("kwargs, match", [
    (dict(divergence="trace"), "divergence"),
    (dict(n_probes=0), "n_probes"),
    (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
])
def test_bad_input_is_a_user_error(kwargs, match):
    gmm = GaussianMixture.ring(4)
    args = dict(sigma_min=0.01, sigma_max=SIGMA_MAX)
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        nll(gmm, _data(gmm, 4), **args)
    with pytest.raises(UserError, match="NaN"):
        nll(gmm, torch.full((2, 2), float("nan"), dtype=torch.float64), 0.01, SIGMA_MAX)
    with pytest.raises(UserError, match="bin_width"):
        bits_per_dim(torch.ones(2), 2, bin_width=0.0)
