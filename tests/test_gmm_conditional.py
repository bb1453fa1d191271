"""The exact class-conditional teacher: p(x | c) against its own closed forms.

``gmm_cond()`` has 8 components in 3 classes (labels [0,0,0,1,1,2,2,2], unequal weights);
conditioning on c must be exactly the mixture of class c alone (``conditional(c)``),
label -1 the whole mixture, and guidance the flow of D_null + w (D_c - D_null).
"""
import re

import numpy as np
import pytest
import torch

import fewstep
from fewstep.data.gmm import GaussianMixture
from fewstep.denoiser import CFGDenoiser, ModelDenoiser
from fewstep.errors import UserError
from fewstep.process import EDM, VP

from _exact import gmm_cond, gmm2, save_gmm_cond

F64 = torch.float64


def _points(n: int, scale: float, seed: int = 0) -> torch.Tensor:
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_classes_and_prior():
    gmm = gmm_cond()
    assert gmm.num_classes == 3 and gmm.labels.dtype == torch.long
    assert gmm.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    w = gmm.weights
    assert torch.allclose(gmm.class_weights, torch.stack([w[:3].sum(), w[3:5].sum(), w[5:].sum()]), atol=1e-15)
    assert float(gmm.class_weights.sum()) == pytest.approx(1.0, abs=1e-15)
    assert gmm2().labels is None and gmm2().num_classes == 0 and gmm2().class_weights is None
    sub = gmm.conditional(1)
    assert sub.K == 2 and sub.labels is None
    assert torch.allclose(sub.weights, w[3:5] / w[3:5].sum(), atol=1e-15)
    assert torch.equal(sub.means, gmm.means[3:5]) and torch.equal(sub.covs, gmm.covs[3:5])


@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0, 40.0])
def test_denoise_given_class_is_the_class_mixture(sigma):
    gmm = gmm_cond()
    y = _points(60, 3.0 + sigma)
    lab = torch.arange(60) % 3
    d = gmm.denoise(y, sigma, labels=lab)
    for c in range(3):
        m = lab == c
        assert float((d[m] - gmm.conditional(c).denoise(y[m], sigma)).abs().max()) < 1e-12
    assert torch.equal(gmm.denoise(y, sigma, labels=torch.full((60,), -1)), gmm.denoise(y, sigma))
    mixed = torch.where(torch.arange(60) % 2 == 0, lab, torch.full_like(lab, -1))  # -1 per sample
    dm = gmm.denoise(y, sigma, labels=mixed)
    assert torch.equal(dm[1::2], gmm.denoise(y[1::2], sigma))
    assert float((dm[0::2] - d[0::2]).abs().max()) < 1e-15
    assert torch.equal(gmm.denoise(y, sigma, labels=2), gmm.denoise(y, sigma, labels=torch.full((60,), 2)))
    yf = y.float()  # the denoiser contract: float64 inside, y's dtype out
    assert torch.equal(gmm(yf, sigma, labels=lab), gmm.denoise(yf, sigma, labels=lab).float())


def test_class_densities_mix_to_the_marginal():
    """sum_c pi_c p(y | c) = p(y), in log space (the densities underflow far out at small sigma)."""
    gmm = gmm_cond()
    y = _points(50, 3.5, seed=1)
    for sigma in (0.1, 1.0, 10.0):
        cond = torch.stack([gmm.log_prob(y, sigma, labels=torch.full((50,), c)) for c in range(3)], 1)
        mix = torch.logsumexp(cond + gmm.class_weights.log(), 1)
        assert torch.allclose(mix, gmm.log_prob(y, sigma), rtol=1e-14, atol=1e-14)
        assert torch.allclose((cond.exp() * gmm.class_weights).sum(1), gmm.log_prob(y, sigma).exp(), rtol=1e-12, atol=0)
        for c in range(3):
            assert torch.allclose(cond[:, c], gmm.conditional(c).log_prob(y, sigma), rtol=1e-14, atol=1e-14)
        assert torch.equal(gmm.log_prob(y, sigma, labels=torch.full((50,), -1)), gmm.log_prob(y, sigma))


def test_conditional_score_is_grad_of_conditional_log_prob():
    gmm = gmm_cond()
    y = _points(45, 3.0, seed=2)
    lab = torch.tensor([0, 1, 2, -1, 1] * 9)
    sigma = torch.linspace(0.05, 5.0, 45, dtype=F64)
    yy = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(yy, sigma, labels=lab).sum(), yy)
    assert torch.isfinite(grad).all()
    assert torch.allclose(gmm.score(y, sigma, labels=lab), grad, atol=1e-10)
    assert torch.allclose(gmm.denoise(y, sigma, labels=lab), y + sigma[:, None] ** 2 * grad, atol=1e-10)


def test_samples_per_class_have_the_class_moments():
    gmm, n = gmm_cond(), 40000
    lab = torch.arange(3).repeat_interleave(n)
    x, k = gmm.sample(3 * n, generator=torch.Generator().manual_seed(0), return_labels=True, labels=lab)
    assert torch.equal(gmm.labels[k], lab)  # every draw from its own class's components
    for c in range(3):
        sub, xc = gmm.conditional(c), x[lab == c]
        mean = (sub.weights[:, None] * sub.means).sum(0)
        second = (sub.weights[:, None, None] * (sub.covs + sub.means[:, :, None] * sub.means[:, None, :])).sum(0)
        cov = second - mean[:, None] * mean[None, :]
        d = xc - xc.mean(0)
        se_mean = xc.std(0) / n**0.5
        se_cov = (d[:, :, None] * d[:, None, :]).std(0) / n**0.5
        assert ((xc.mean(0) - mean).abs() < 5 * se_mean).all()
        assert ((torch.cov(xc.T) - cov).abs() < 5 * se_cov + 5 * se_mean.max() ** 2).all()
    one = gmm.sample(500, generator=torch.Generator().manual_seed(1), return_labels=True, labels=1)[1]
    assert set(gmm.labels[one].tolist()) == {1}


def test_sample_labels_follow_the_class_prior():
    gmm, n = gmm_cond(), 60000
    lab = gmm.sample_labels(n, torch.Generator().manual_seed(0))
    assert lab.dtype == torch.long and lab.shape == (n,)
    freq = torch.bincount(lab, minlength=3).double() / n
    p = gmm.class_weights
    assert ((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all()
    with pytest.raises(UserError, match="no classes"):
        gmm2().sample_labels(4)


def test_unlabelled_sampling_keeps_its_draws():
    """sample(n) without labels draws exactly as before (fingerprints depend on it)."""
    for gmm in (gmm2(), gmm_cond()):
        g = torch.Generator().manual_seed(7)
        k = torch.multinomial(gmm.weights, 300, replacement=True, generator=g)
        z = torch.randn(300, gmm.dim, generator=g, dtype=F64)
        ref = gmm.means[k] + torch.einsum("nij,nj->ni", gmm.U[k], gmm.lam[k].sqrt() * z)
        x, kk = gmm.sample(300, generator=torch.Generator().manual_seed(7), return_labels=True)
        assert torch.equal(x, ref) and torch.equal(kk, k)


def test_conditional_flow_is_the_class_flow_and_lands_in_the_class():
    gmm, n = gmm_cond(), 48
    x = _points(n, 80.0, seed=3)
    lab = torch.arange(n) % 3
    out = gmm.flow(x, 80.0, 0.0, rtol=1e-10, labels=lab)
    for c in range(3):
        m = lab == c
        assert float((out[m] - gmm.conditional(c).flow(x[m], 80.0, 0.0, rtol=1e-10)).abs().max()) < 1e-8
    # in the class's support: the nearest component (responsibility at tiny sigma) is the class's
    _, _, _, logp = gmm._terms(out, 1e-3)
    assert torch.equal(gmm.labels[logp.argmax(1)], lab)
    # partial flow too, and in the other direction
    mid = gmm.flow(x, 80.0, 0.5, rtol=1e-10, labels=lab)
    assert float((mid[lab == 2] - gmm.conditional(2).flow(x[lab == 2], 80.0, 0.5, rtol=1e-10)).abs().max()) < 1e-8
    back = gmm.flow(mid, 0.5, 80.0, rtol=1e-10, labels=lab)
    assert float((back - x).abs().max()) < 1e-6


def test_guided_flow_endpoints_and_cfg_wrapper():
    gmm, n = gmm_cond(), 30
    x = _points(n, 20.0, seed=4)
    lab = torch.arange(n) % 3
    cond = gmm.flow(x, 20.0, 0.0, rtol=1e-10, labels=lab)
    uncond = gmm.flow(x, 20.0, 0.0, rtol=1e-10)
    assert float((gmm.flow(x, 20.0, 0.0, rtol=1e-10, labels=lab, guidance=1.0) - cond).abs().max()) < 1e-8
    assert float((gmm.flow(x, 20.0, 0.0, rtol=1e-10, labels=lab, guidance=0.0) - uncond).abs().max()) < 1e-8
    assert torch.equal(gmm.flow(x, 20.0, 0.0, rtol=1e-8, guidance=3.0), gmm.flow(x, 20.0, 0.0, rtol=1e-8))
    # the guided field is the CFG wrapper's: D_w = y + sigma^2 score_w
    y, sigma, w = _points(n, 2.0, seed=5), torch.full((n,), 0.8, dtype=F64), 2.5
    dn, dc = gmm.denoise(y, sigma), gmm.denoise(y, sigma, labels=lab)
    assert torch.allclose(CFGDenoiser(gmm, w)(y, sigma, labels=lab), dn + w * (dc - dn), atol=1e-12)
    s_w = gmm.score(y, sigma) + w * (gmm.score(y, sigma, labels=lab) - gmm.score(y, sigma))
    assert torch.allclose(y + sigma[:, None] ** 2 * s_w, dn + w * (dc - dn), atol=1e-12)
    # stronger guidance lands deeper inside the class (higher log p(x | c) at the end)
    strong = gmm.flow(x, 20.0, 0.0, rtol=1e-9, labels=lab, guidance=3.0)
    assert torch.isfinite(strong).all()
    _, _, _, logp = gmm._terms(strong, 1e-3)
    assert torch.equal(gmm.labels[logp.argmax(1)], lab)


@pytest.mark.parametrize("prediction", ["eps", "v", "edm"])
def test_gmm_model_passes_labels_through(prediction):
    gmm = gmm_cond()
    proc = EDM() if prediction == "edm" else VP()
    D = ModelDenoiser(gmm.as_model(proc, prediction), proc, prediction)
    y, lab = _points(24, 2.0, seed=6), torch.arange(24) % 4 - 1
    sigma = torch.full((24,), 0.6, dtype=F64)
    assert torch.allclose(D(y, sigma, labels=lab), gmm.denoise(y, sigma, labels=lab), atol=1e-9)
    assert torch.allclose(D(y, sigma), gmm.denoise(y, sigma), atol=1e-9)


def test_load_as_a_conditional_model_and_sample(tmp_path):
    path = save_gmm_cond(tmp_path / "cond.npz")
    model = fewstep.load(f"gmm:{path}")
    assert model.num_classes == 3
    gmm, n = model.denoiser, 30
    lab = torch.arange(n) % 3
    x = model.noise(n, seed=0)
    exact = gmm.flow(x, model.sigma_max, 0.0, rtol=1e-9, labels=lab)
    out, got = model.sample(n, 79, labels=lab, x=x)
    assert torch.equal(got, lab) and out.shape == (n, 2)
    assert float((out - exact).abs().max()) < 0.05
    guided = gmm.flow(x, model.sigma_max, 0.0, rtol=1e-9, labels=lab, guidance=2.0)
    out_w, _ = model.sample(n, 79, labels=lab, x=x, guidance=2.0)
    assert float((out_w - guided).abs().max()) < 0.05
    out_r, got_r = model.sample(8, 9, seed=1)  # labels drawn by the model
    assert got_r.shape == (8,) and ((got_r >= 0) & (got_r < 3)).all() and torch.isfinite(out_r).all()


def test_save_load_round_trip(tmp_path):
    gmm = gmm_cond()
    gmm.save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as f:
        assert np.issubdtype(f["labels"].dtype, np.integer)
    back = GaussianMixture.load(tmp_path / "c.npz")
    assert torch.equal(back.labels, gmm.labels) and back.num_classes == 3
    assert torch.equal(back.weights, gmm.weights) and torch.equal(back.means, gmm.means)
    y, lab = _points(20, 3.0), torch.arange(20) % 3
    assert torch.allclose(back.denoise(y, 0.4, labels=lab), gmm.denoise(y, 0.4, labels=lab), atol=1e-14)
    gmm2().save(tmp_path / "u.npz")  # unconditional files stay without labels
    with np.load(tmp_path / "u.npz", allow_pickle=False) as f:
        assert "labels" not in f.files
    assert GaussianMixture.load(tmp_path / "u.npz").num_classes == 0


@pytest.mark.parametrize("labels, what", [
    (np.array([0, 0, 1, 1, 2, 2, 2]), "one integer per component"),          # wrong length
    (np.array([0, 0, 0, 1, 1, 2, 2, 2], dtype=np.float64), "one integer per component"),  # float
    (np.array([[0, 0, 0, 1], [1, 2, 2, 2]]), "one integer per component"),  # 2-D
    (np.array([0, 0, 0, 1, 1, 2, 2, -1]), ">= 0"),                            # negative
    (np.array([0, 0, 0, 2, 2, 3, 3, 3]), "class 1 with no component"),       # empty class
    (np.array([0, 0, 0, 1, 1, 2, 2, 9]), "some class has none"),             # beyond K
])
def test_bad_labels_in_a_file_raise_user_errors_naming_it(tmp_path, labels, what):
    gmm = gmm_cond()
    path = tmp_path / "bad_labels.npz"
    np.savez(path, weights=gmm.weights.numpy(), means=gmm.means.numpy(), covs=gmm.covs.numpy(), labels=labels)
    with pytest.raises(UserError, match=re.escape(what)) as e:
        GaussianMixture.load(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    with pytest.raises(UserError, match=re.escape(str(path))):
        fewstep.load(f"gmm:{path}")


def test_bad_labels_in_the_constructor():
    gmm = gmm_cond()
    with pytest.raises(UserError, match="labels must be one integer per component"):
        GaussianMixture(gmm.weights, gmm.means, gmm.covs, labels=[0.0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(UserError, match="no component"):
        GaussianMixture(gmm.weights, gmm.means, gmm.covs, labels=torch.tensor([0, 0, 0, 1, 1, 3, 3, 3]))


def test_labels_given_where_they_do_not_fit():
    y = _points(4, 1.0)
    for call in (lambda: gmm2().denoise(y, 0.5, labels=torch.zeros(4, dtype=torch.long)),
                 lambda: gmm2()(y, 0.5, labels=torch.zeros(4, dtype=torch.long)),
                 lambda: gmm2().flow(y, 1.0, 0.0, labels=torch.zeros(4, dtype=torch.long)),
                 lambda: gmm2().sample(4, labels=0)):
        with pytest.raises(UserError, match="unconditional") as e:
            call()
        assert "\n" not in str(e.value)
    gmm = gmm_cond()
    for bad, what in ((torch.tensor([0, 1, 3, 0]), "label 3 is not a class"),
                      (torch.tensor([0, -2, 1, 0]), "label -2 is not a class"),
                      (torch.tensor([0.0, 1.0, 2.0, 0.0]), "must be integers"),
                      (torch.tensor([0, 1, 2]), "one per sample")):
        for call in (gmm.denoise, gmm.score, gmm.log_prob):
            with pytest.raises(UserError, match=what):
                call(y, 0.5, labels=bad)
    with pytest.raises(UserError, match="class 3 is not in"):
        gmm.conditional(3)
    with pytest.raises(UserError, match="no classes"):
        gmm2().conditional(0)
