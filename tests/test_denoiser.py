"""Parametrizations: every (process, prediction) pair is the same sigma-space denoiser."""
import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.denoiser import PREDICTIONS, CFGDenoiser, ModelDenoiser, NFECounter
from fewstep.process import EDM, VE, VP, LinearFlow, VPDiscrete

PROCS = [VP.linear(), VP.cosine(), VPDiscrete.diffusers(), VE(), EDM(), LinearFlow()]


@pytest.mark.parametrize("process", PROCS, ids=lambda p: p.name + getattr(p, "schedule", ""))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_gmm_as_any_model_gives_exact_denoiser(process, prediction):
    gmm = GaussianMixture.random(k=3, dim=4, seed=0)
    g = torch.Generator().manual_seed(0)
    n = 64
    sig = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-3, 3, generator=g))
    sig = sig.clamp(process.sigma_min * 1.001, process.sigma_max * 0.999)
    y = gmm.sample(n, generator=g) + sig[:, None] * torch.randn(n, 4, generator=g, dtype=torch.float64)
    D = ModelDenoiser(gmm.as_model(process, prediction), process, prediction)
    exact = gmm.denoise(y, sig)
    assert torch.allclose(D(y, sig), exact, atol=1e-6, rtol=1e-6)
    # the training target of a perfect model is its own output
    x_in, c_noise, _ = D.net_input(y, sig)
    assert torch.allclose(D.target(exact, y, sig), D.net(x_in, c_noise), atol=1e-6, rtol=1e-6)


def test_cfg_combines_conditional_and_unconditional():
    calls = []

    def D(y, sigma, labels=None):
        calls.append(len(y))
        return torch.where(labels[:, None] >= 0, torch.ones_like(y), torch.zeros_like(y))

    cfg = CFGDenoiser(D, scale=3.0)
    out = cfg(torch.zeros(5, 2), torch.ones(5), labels=torch.arange(5))
    assert torch.allclose(out, torch.full((5, 2), 3.0)) and calls == [10]


def test_nfe_counter_counts_calls():
    gmm = GaussianMixture.ring(4)
    c = NFECounter(gmm)
    for _ in range(3):
        c(torch.zeros(7, 2), torch.ones(7))
    assert c.nfe == 3
