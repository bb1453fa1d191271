"""The samplers' loop overhead fixes change no number: ModelDenoiser's per-level cache and
the samplers' shared level tensors give bit-identical results, see in-place changes and
dtype moves, and really skip the per-call schedule work."""
import pytest
import torch

from fewstep import grids as G
from fewstep import samplers as S
from fewstep.data.gmm import GaussianMixture
from fewstep.denoiser import PREDICTIONS, ModelDenoiser
from fewstep.process import EDM, VP, LinearFlow, VPDiscrete
from fewstep.samplers._common import batch_sigma

GMM = GaussianMixture.random(k=3, dim=4, seed=0)
PROCS = [VPDiscrete.diffusers(), VP.cosine(), EDM(), LinearFlow()]


def uncached(D):
    """The adapter without its cache: the public net_input / output_to_x0 composition."""
    def call(y, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=y.dtype).expand(y.shape[0]) if torch.as_tensor(sigma).ndim == 0 \
            else sigma
        x_in, c_noise, c = D.net_input(y, sigma)
        return D.output_to_x0(D.net(x_in, c_noise).to(y.dtype), y, sigma, x_in, c)
    return call


@pytest.mark.parametrize("process", PROCS, ids=lambda p: p.name)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_cached_adapter_is_bit_identical_along_a_sampler_run(process, prediction):
    D = ModelDenoiser(GMM.as_model(process, prediction), process, prediction)
    sig = G.karras(6, process.sigma_min * 1.01, process.sigma_max * 0.99)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sig[0]
    for name in ("euler", "heun", "dpmpp_2m"):
        ref = S.get(name)(uncached(D), x, sig)
        first = S.get(name)(D, x, sig)   # fills the cache
        again = S.get(name)(D, x, sig)   # every level a cache hit
        assert torch.equal(first, ref) and torch.equal(again, ref), name
    # and it is the exact denoiser (the adapter is right, not only self-consistent)
    s = batch_sigma(float(sig[2]), x)
    assert torch.allclose(D(x, s), GMM.denoise(x, s), rtol=1e-6, atol=1e-6)


def test_second_run_does_no_schedule_work(monkeypatch):
    """Per level, t_of_sigma runs once; a second run on the same grid does none."""
    from fewstep.samplers import _common

    # the samplers' level tensors live in a bounded process-wide table (cleared when full);
    # start it empty so that the other tests this worker ran cannot make it overflow mid-test
    monkeypatch.setattr(_common, "_LEVELS", {})
    proc = VPDiscrete.diffusers()
    D = ModelDenoiser(GMM.as_model(proc, "eps"), proc, "eps")
    calls = []
    orig = proc.t_of_sigma
    monkeypatch.setattr(proc, "t_of_sigma", lambda s: calls.append(1) or orig(s))
    sig = G.time_uniform(proc, 10, "trailing")
    x = torch.randn(3, 4, dtype=torch.float64) * sig[0]
    S.get("euler")(D, x, sig)
    assert len(calls) == 10
    S.get("euler")(D, x, sig)
    assert len(calls) == 10


def test_cache_sees_in_place_changes_new_batches_and_dtype_moves():
    proc = VP.linear()
    D = ModelDenoiser(GMM.as_model(proc, "v"), proc, "v")
    y = torch.randn(4, 4, dtype=torch.float64)
    s = torch.full((4,), 2.0, dtype=torch.float64)
    D(y, s)
    s.fill_(0.5)  # same tensor object, new value
    assert torch.equal(D(y, s), D(y, torch.full((4,), 0.5, dtype=torch.float64)))
    assert torch.allclose(D(y, s), GMM.denoise(y, s), rtol=1e-6, atol=1e-6)
    # per-sample levels are fine too (no scalar assumption)
    s2 = torch.tensor([0.1, 1.0, 3.0, 20.0], dtype=torch.float64)
    assert torch.allclose(D(y, s2), GMM.denoise(y, s2), rtol=1e-6, atol=1e-6)
    # numbers and 0-dim levels make a new tensor per call: computed, not cached
    n = len(D._memo["levels"])
    for _ in range(3):
        assert torch.allclose(D(y, 0.7), GMM.denoise(y, torch.full((4,), 0.7, dtype=torch.float64)), rtol=1e-6)
        D(y, torch.tensor(0.7, dtype=torch.float64))
    assert len(D._memo["levels"]) == n
    # a level tensor from batch_sigma is shared, and replaced once changed in place
    a = batch_sigma(1.5, y)
    assert batch_sigma(1.5, y) is a
    assert batch_sigma(1.5, y[:2]) is not a and batch_sigma(1.5, y.float()).dtype == torch.float32


def test_net_dtype_follows_module_moves():
    """A net moved to float64 after float32 calls gets float64 inputs (cache invalidated)."""
    proc = EDM()
    net = torch.nn.Linear(4, 4)
    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = net

        def forward(self, x, c):
            seen.append((x.dtype, c.dtype))
            return self.lin(x)

    D = ModelDenoiser(Net(), proc, "edm")
    y = torch.randn(2, 4, dtype=torch.float64)
    s = batch_sigma(1.0, y)
    D(y, s)
    D.to(torch.float64)
    out = D(y, s)
    assert seen == [(torch.float32, torch.float32), (torch.float64, torch.float64)]
    c_skip, c_out, c_in = 0.25 / 1.25, 0.5 / 1.25**0.5, 1 / 1.25**0.5
    assert torch.allclose(out, c_skip * y + c_out * net(c_in * y), rtol=1e-12, atol=1e-12)
