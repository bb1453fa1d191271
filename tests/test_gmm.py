"""The exact teacher: closed forms, Tweedie, and the flow map's accuracy."""
import math

import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.errors import UserError


def test_denoiser_is_tweedie_and_score_is_grad_log_prob():
    gmm = GaussianMixture.random(k=3, dim=5, seed=1)
    y = gmm.sample(16, generator=torch.Generator().manual_seed(0)) * 1.3
    sigma = torch.full((16,), 0.7, dtype=torch.float64)
    yy = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(yy, sigma).sum(), yy)
    assert torch.allclose(gmm.score(y, sigma), grad, atol=1e-10)
    assert torch.allclose(gmm.denoise(y, sigma), y + 0.49 * grad, atol=1e-10)


def test_log_prob_of_single_gaussian():
    mu, cov = torch.tensor([[1.0, -2.0]]), torch.tensor([[[2.0, 0.5], [0.5, 1.0]]])
    gmm = GaussianMixture(torch.ones(1), mu, cov)
    y = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(mu[0].double(), cov[0].double() + 0.25 * torch.eye(2, dtype=torch.float64))
    assert float(gmm.log_prob(y, torch.tensor([0.5]))) == pytest.approx(float(ref.log_prob(y[0])), abs=1e-12)


def test_denoiser_is_posterior_mean_by_monte_carlo():
    """E[x0 | y] = sum_i x0_i N(y; x0_i, s^2) / sum_i N(y; x0_i, s^2) over x0_i ~ p (self-normalised)."""
    gmm = GaussianMixture.ring(4, std=0.3)
    x0 = gmm.sample(400000, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[1.0, 0.5], [-0.3, 2.5]], dtype=torch.float64)
    logw = -0.5 * ((y[:, None, :] - x0[None]) ** 2).sum(-1) / 1.0**2
    mc = torch.einsum("bn,nd->bd", torch.softmax(logw, 1), x0)
    assert torch.allclose(mc, gmm.denoise(y, 1.0), atol=0.01)


def test_flow_two_tolerances_agree():
    gmm = GaussianMixture.random(k=4, dim=16, seed=2)
    g = torch.Generator().manual_seed(0)
    y = gmm.sample(32, generator=g) + 80 * torch.randn(32, 16, generator=g, dtype=torch.float64)
    a, b = gmm.flow(y, 80.0, 0.0, rtol=1e-8), gmm.flow(y, 80.0, 0.0, rtol=1e-10)
    assert float((a - b).abs().max()) < 1e-7


def test_flow_of_single_gaussian_is_closed_form():
    """N(mu, S): y(s) = mu + (S + s^2)^(1/2) (S + s0^2)^(-1/2) (y0 - mu), in S's eigenbasis."""
    gmm1 = GaussianMixture.random(k=1, dim=6, seed=3)
    g = torch.Generator().manual_seed(1)
    y = gmm1.sample(32, generator=g) + 20 * torch.randn(32, 6, generator=g, dtype=torch.float64)
    lam, U, mu = gmm1.lam[0], gmm1.U[0], gmm1.means[0]
    for s_to in (0.0, 0.3):
        exact = mu + (((y - mu) @ U) * ((lam + s_to**2) / (lam + 400)).sqrt()) @ U.T
        assert float((gmm1.flow(y, 20.0, s_to, rtol=1e-9) - exact).abs().max()) < 1e-9 * float(y.abs().max())
    back = gmm1.flow(gmm1.flow(y, 20.0, 0.5, rtol=1e-10), 0.5, 20.0, rtol=1e-10)
    assert float((back - y).abs().max()) < 1e-6


def test_sample_moments():
    gmm = GaussianMixture.random(k=2, dim=3, seed=4)
    x = gmm.sample(200000, generator=torch.Generator().manual_seed(0))
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.02)


def test_bad_specs_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="covs"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 3), torch.eye(3)[None])
    with pytest.raises(UserError, match="not found"):
        GaussianMixture.load(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.npz"):
        GaussianMixture.load(tmp_path / "bad.npz")
    gmm = GaussianMixture.ring(3)
    gmm.save(tmp_path / "g.npz")
    assert torch.allclose(GaussianMixture.load(tmp_path / "g.npz").means, gmm.means)
