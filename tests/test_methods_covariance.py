"""Covariance networks (Bao et al. 2022a, SN-DPM / NPR-DPM): the exact posterior covariance of
a mixture, the heads' targets, the optimal-variance DDPM/DDIM step, and a trained head."""
import json
import math

import pytest
import torch

import fewstep
from fewstep.errors import UserError
from fewstep.methods import distill
from fewstep.methods.covariance import head_target
from fewstep.metrics.distances import energy_distance
from fewstep.model import load_covariance, npr_unit


def _gauss(v=(0.5, 2.0), mu=(0.3, -1.0)):
    d = len(v)
    return fewstep.GaussianMixture(torch.ones(1), torch.tensor([mu], dtype=torch.float64),
                                   torch.diag(torch.tensor(v, dtype=torch.float64))[None])


def test_posterior_variance_of_one_gaussian_is_the_closed_form():
    """Var[x0 | y] = s^2 v / (v + s^2) per coordinate for x0 ~ N(mu, diag v), whatever y."""
    g = _gauss()
    y = torch.randn(7, 2, dtype=torch.float64) * 3
    for s in (0.01, 0.7, 20.0):
        v = torch.tensor([0.5, 2.0], dtype=torch.float64)
        want = s**2 * v / (v + s**2)
        torch.testing.assert_close(g.posterior_variance(y, s), want.expand(7, 2), rtol=1e-12, atol=0)


def test_posterior_variance_of_a_mixture_obeys_the_law_of_total_variance():
    """E_y Var[x0 | y] + Var_y E[x0 | y] = Var x0 (exact), estimated on n draws of y: the
    tolerance is 5 standard errors of the Monte-Carlo mean of the two terms."""
    g = fewstep.GaussianMixture.random(k=4, dim=3, seed=2)
    gen = torch.Generator().manual_seed(0)
    n, s = 200000, 0.8
    x0 = g.sample(n, generator=gen).double()
    y = x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    total = g.posterior_variance(y, s) + (g.denoise(y, s) - x0.mean(0)) ** 2
    est, se = total.mean(0), total.std(0) / math.sqrt(n)
    var_x0 = (g.weights[:, None] * (g.covs.diagonal(dim1=1, dim2=2) + g.means**2)).sum(0) - \
        ((g.weights[:, None] * g.means).sum(0)) ** 2
    assert ((est - var_x0).abs() < 5 * se + 1e-3 * var_x0).all(), (est, var_x0, se)


def test_npr_and_sn_targets_have_the_residual_and_posterior_variance_as_expectation():
    """On a Gaussian at a fixed y: E[c^2 * npr target | y] = Var[x0|y] + (E[x0|y] - D)^2 for an
    imperfect D (the paper's point: the optimal variance of *this* mean), and
    s^2 E[sn target | y] - (y - D*)^2 = Var[x0|y] with the exact D*; x0 drawn from the exact
    posterior, 5 standard errors of tolerance."""
    v, s, sd, n = 1.5, 0.9, 1.0, 400000
    y = torch.tensor([[1.2]], dtype=torch.float64)
    post_m, post_v = y * v / (v + s**2), s**2 * v / (v + s**2)
    gen = torch.Generator().manual_seed(1)
    x0 = post_m + math.sqrt(post_v) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    eps = (y - x0) / s
    sig = torch.full((n,), s, dtype=torch.float64)
    bias = 0.3
    npr = head_target("npr", x0, eps, y.expand(n, 1), sig, post_m + bias, sd) * npr_unit(s, sd)
    assert abs(float(npr.mean()) - (post_v + bias**2)) < 5 * float(npr.std()) / math.sqrt(n)
    sn = head_target("sn", x0, eps, y.expand(n, 1), sig, None, sd) * s**2 - (y - post_m) ** 2
    assert abs(float(sn.mean()) - post_v) < 5 * float(sn.std()) / math.sqrt(n)


def _ed(g, out, ref):
    return float(energy_distance(out[:4000], ref[:4000]))


def test_exact_covariance_step_beats_ddpm_and_zero_covariance_is_ddpm():
    """With the exact diag Cov[x0|y] DDPM at 10 NFE is far closer to the data than plain DDPM
    (the measured gap is 10x; the energy distance's seed noise at 4000 samples is ~1e-3);
    a zero covariance is DDPM's posterior variance itself, the same draws bit for bit."""
    g = fewstep.GaussianMixture.ring(8, radius=2.0, std=0.3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=gen, dtype=torch.float64) * 80
    ref = g.sample(4000, generator=gen).double()
    kw = dict(nfe=10, grid="karras", sigma_min=0.002, sigma_max=80.0)
    plain = fewstep.sample(g, x, sampler="ddpm", generator=torch.Generator().manual_seed(3), **kw)
    zero = fewstep.sample(g, x, sampler="ddpm", covariance=lambda y, s, d, **c: torch.zeros_like(y),
                          generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-12)
    exact = fewstep.sample(g, x, sampler="ddpm", covariance=lambda y, s, d, **c: g.posterior_variance(y, s),
                           generator=torch.Generator().manual_seed(3), **kw)
    assert _ed(g, exact, ref) < 0.3 * _ed(g, plain, ref)
    assert _ed(g, exact, ref) < 0.01


def test_covariance_bad_input_is_one_line():
    g = fewstep.GaussianMixture.ring(4, radius=2.0, std=0.3)
    x = torch.randn(8, 2, dtype=torch.float64) * 80
    with pytest.raises(UserError, match="one variance per coordinate"):
        fewstep.sample(g, x, sampler="ddpm", nfe=10, grid="karras", sigma_min=0.002,
                       sigma_max=80.0, covariance=lambda y, s, d, **c: torch.zeros(8))
    with pytest.raises(UserError, match="variance small"):
        fewstep.sample(g, x, sampler="ddpm", nfe=10, grid="karras", sigma_min=0.002,
                       sigma_max=80.0, variance="large", covariance=lambda y, s, d, **c: y * 0)


@pytest.fixture(scope="module")
def npr_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cov")
    fewstep.GaussianMixture.ring(8, radius=2.0, std=0.3).save(root / "ring.npz")
    out = distill("covariance", {"teacher": f"gmm:{root / 'ring.npz'}", "steps": 400, "batch_size": 256,
                                 "ema_decay": 0.98, "device": "cpu", "eval_samples": 1000}, out=str(root / "npr"), progress=False)
    return root, out


def test_trained_npr_head_tracks_the_exact_covariance_and_helps_ddpm(npr_run):
    """400 steps on the exact ring: the head's relative error to the exact Cov[x0|y] is small at
    the ends of the range (where Cov is smooth in y; measured 0.01, 0.30-0.46 at the middle
    level where the posterior switches between modes) and DDPM with it at 10 NFE is much closer
    to the data than plain DDPM (exact head: 10x; a half-trained head must still give 3x)."""
    root, out = npr_run
    ev = json.loads((fewstep.model.Path(out) / "eval.json").read_text())
    err = ev["summary"]["relative_error"]
    assert err[0] < 0.1 and err[-1] < 0.1, err
    head = load_covariance(out, device="cpu")
    g = fewstep.GaussianMixture.load(root / "ring.npz")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4000, 2, generator=gen, dtype=torch.float64) * 80
    ref = g.sample(4000, generator=gen).double()
    kw = dict(nfe=10, grid="karras", sigma_min=0.002, sigma_max=80.0)
    plain = fewstep.sample(g, x, sampler="ddpm", generator=torch.Generator().manual_seed(3), **kw)
    learned = fewstep.sample(g, x, sampler="ddpm", covariance=head, generator=torch.Generator().manual_seed(3), **kw)
    assert _ed(g, learned, ref) < 0.33 * _ed(g, plain, ref)


def test_covariance_run_is_not_a_model_to_sample(npr_run):
    root, out = npr_run
    with pytest.raises(UserError, match="covariance run .* use it as"):
        fewstep.load(out)
    with pytest.raises(UserError, match="not a discriminator run"):
        fewstep.model.load_auxiliary(out, "discriminator")


def test_sample_command_takes_the_covariance_head(npr_run, tmp_path, capsys):
    """``fewstep sample TEACHER --sampler ddpm --covariance RUN`` samples with the head; a sampler
    without a variance to set, ``--eta`` on ddpm, or a head of another shape is one line, exit 2."""
    import numpy as np

    from fewstep.cli import main

    root, out = npr_run
    spec = f"gmm:{root / 'ring.npz'}"
    base = ["sample", spec, "--nfe", "10", "--n", "50", "--grid", "karras"]
    assert main(base + ["--sampler", "ddpm", "--covariance", out, "--out", str(tmp_path / "a.npz")]) == 0
    assert main(base + ["--sampler", "ddpm", "--out", str(tmp_path / "b.npz")]) == 0
    a, b = (np.load(tmp_path / f)["samples"] for f in ("a.npz", "b.npz"))
    assert a.shape == (50, 2) and np.isfinite(a).all() and not np.allclose(a, b)
    assert main(base + ["--sampler", "ddim", "--eta", "1", "--covariance", out, "--out", str(tmp_path / "c.npz")]) == 0
    other = tmp_path / "d3.npz"
    fewstep.GaussianMixture.ring(4, dim=3).save(other)
    capsys.readouterr()
    for bad in (["--sampler", "heun", "--covariance", out], ["--sampler", "ddpm", "--eta", "1"]):
        assert main(base + bad + ["--out", str(tmp_path / "x.npz")]) == 2
    assert main(["sample", f"gmm:{other}", "--nfe", "10", "--n", "5", "--grid", "karras", "--sampler", "ddpm",
                 "--covariance", out, "--out", str(tmp_path / "y.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "shape" in err[-1]
