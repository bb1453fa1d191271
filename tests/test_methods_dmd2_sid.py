"""DMD2 (Yin et al. 2024) and SiD (Zhou et al. 2024): the distribution-matching gradient and
the score-identity loss against exact Gaussian denoisers (zero when the generator's distribution
is the teacher's, the closed form for two Gaussians, SiD's identity E[(f_phi - f_psi).(f_psi -
x_g)] = 0), the loop's critic (two time-scale updates, a fake-score-only start, bit-for-bit
resume with the critic and its optimizer), quality that improves on the exact ring, the
multi-step (backward simulation), GAN and conditional forms, and bad input in one line."""
import json

import pytest
import torch

from _resume import full_and_resumed, same_weights
from _exact import SMALL_MLP as NET
from _exact import gmm2
from fewstep.data.gmm import GaussianMixture
from fewstep.errors import UserError
from fewstep.methods import distill
from fewstep.methods.dmd2 import dm_gradient, dm_loss
from fewstep.methods.sid import generator_sigmas, sid_loss
from fewstep.metrics import energy_distance
from fewstep.model import load


def _cfg(**kw):
    return {"net": NET, "steps": 300, "batch_size": 128, "lr": 2e-3, "warmup": 20, "ema_decay": 0.95,
            "device": "cpu", "eval_samples": 500, **kw}


def _gauss(mean, std=0.5, dim=2):
    return GaussianMixture(torch.ones(1), torch.tensor([mean], dtype=torch.float64),
                           (std**2 * torch.eye(dim, dtype=torch.float64))[None])


def _noisy(gmm, n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = gmm.sample(n, generator=g)
    return x, x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)


# ------------------------------------------------------------------ DMD2's gradient
def test_dm_gradient_vanishes_when_the_generator_is_the_teacher():
    """Generator = exact sampler of the teacher's mixture, fake score = the exact denoiser of the
    generator's distribution (the same mixture): the gradient is zero at every level."""
    gmm = gmm2()
    for sigma in (0.05, 0.5, 3.0, 40.0):
        x, x_t = _noisy(gmm, 512, sigma)
        real = fake = gmm.denoise(x_t, sigma)
        assert torch.equal(dm_gradient(x, real, fake), torch.zeros_like(x))


@pytest.mark.parametrize("sigma", [0.3, 1.0, 5.0])
def test_dm_gradient_of_two_gaussians_is_the_closed_form(sigma):
    """Generator N(m_g, s^2 I), teacher N(m_t, s^2 I): mu_fake - mu_real = sigma^2 / (s^2 + sigma^2)
    (m_g - m_t) at every x_t, so the gradient pushes each sample toward the teacher's mean."""
    s, m_g, m_t = 0.5, [1.0, -0.5], [0.0, 0.0]
    G, T = _gauss(m_g, s), _gauss(m_t, s)
    x, x_t = _noisy(G, 256, sigma)
    real, fake = T.denoise(x_t, sigma), G.denoise(x_t, sigma)
    w = (x - real).abs().mean(1, keepdim=True)
    want = sigma**2 / (s**2 + sigma**2) * torch.tensor([m_g], dtype=torch.float64) - 0.0
    assert torch.allclose(dm_gradient(x, real, fake), want.expand_as(x) / w, rtol=1e-10, atol=1e-12)


def test_dm_loss_has_the_gradient_as_its_gradient():
    x = torch.randn(16, 3, requires_grad=True)
    grad = torch.randn(16, 3)
    dm_loss(x, grad).sum().backward()
    assert torch.allclose(x.grad, grad / 3, atol=1e-7)


# ------------------------------------------------------------------ SiD's loss
def test_sid_loss_and_its_gradient_vanish_at_the_teacher():
    """fake = real (the same function of x_t): the loss is 0 and so is its gradient in x_g."""
    gmm = gmm2()
    x_g = gmm.sample(256, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    x_t = x_g + 0.7 * torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    real = gmm.denoise(x_t, 0.7)
    loss = sid_loss(x_g, real, gmm.denoise(x_t, 0.7), 1.2)
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(x_g.grad.abs() < 1e-12)


def test_score_identity_makes_the_cross_term_vanish_in_expectation():
    """SiD's identity (Tweedie: f_psi(x_t) = E[x_g | x_t] under the generator): E[(f_phi - f_psi) .
    (f_psi - x_g)] = 0, so E[loss * w] = (1 - alpha) E||f_phi - f_psi||^2. Checked by Monte Carlo
    with the generator N(m_g, s^2 I) and the teacher the ring mixture, to 5 standard errors."""
    G, T = _gauss([0.8, 0.3], 0.6), gmm2()
    n, sigma = 200000, 0.8
    x_g, x_t = _noisy(G, n, sigma, seed=5)
    real, fake = T.denoise(x_t, sigma), G.denoise(x_t, sigma)
    cross = ((real - fake) * (fake - x_g)).sum(1)
    se = cross.std() / n**0.5
    assert abs(cross.mean()) < 5 * se, (float(cross.mean()), float(se))
    assert abs(cross.mean()) < 0.02 * (real - fake).pow(2).sum(1).mean()  # small beside the first term


def test_generator_levels_span_the_karras_ramp():
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    s = generator_sigmas(u, 0.002, 80.0, 1000.0, 7.0)
    assert abs(float(s[0]) - 0.002) < 1e-12 and abs(float(s[2]) - 80.0) < 1e-9 and s[0] < s[1] < s[2]
    assert float(generator_sigmas(torch.tensor([1.0]), 0.002, 80.0, 800.0, 7.0)[0]) < 80.0 * 0.5


# ------------------------------------------------------------------ training on the exact ring
@pytest.fixture(scope="module", params=["dmd2", "sid"])
def trained(request, spec, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    kw = {"update_ratio": 2} if request.param == "dmd2" else {}
    return request.param, distill(request.param, _cfg(teacher=spec, **kw), str(out), progress=False)


def test_training_improves_the_one_step_samples(trained, spec):
    """Energy distance to 2000 exact samples (the estimator's noise is ~0.002): the untrained
    generator (its MLP's output is 0: samples near the origin) is ~0.5 from the ring; 300 steps
    measured DMD2 0.05 and SiD 0.01 on this machine; a factor 3 is asserted."""
    method, run = trained
    ref = gmm2().sample(2000, generator=torch.Generator().manual_seed(11)).float()
    model = load(run)
    x = model.sample(2000, 1, seed=1)[0]
    untrained = energy_distance(torch.zeros(2000, 2) + 0.01 * torch.randn(2000, 2), ref)
    assert energy_distance(x, ref) < untrained / 3
    summary = json.loads(open(f"{run}/{method}.json").read())
    assert summary["reference"] == "data" and summary["energy_distance"]["1"] < untrained / 3
    meta = model.meta
    assert meta["sampling"]["sampler"] == "consistency" and list(meta["sampling"]["grids"]) == ["1"]
    warm = 30  # a tenth of the steps: the exact teacher has no net to start the fake score from
    turns = len(range(warm, 300, 2)) if method == "dmd2" else 300 - warm
    assert meta[method]["fake_warmup"] == warm and meta[method]["generator_updates"] == turns
    assert meta["cost"]["teacher_evals"] == turns * 128
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert all("critic_loss" in r for r in rows) and "loss" in rows[-1]


@pytest.mark.parametrize("method", ["dmd2", "sid"])
def test_interrupted_run_resumes_identically(method, spec, tmp_path, monkeypatch):
    """Generator, its EMA, the fake score (the critic) and both optimizers are in the checkpoints:
    the generator's and the critic's weights equal bit for bit."""
    extra = {"update_ratio": 3, "fake_warmup": 4} if method == "dmd2" else {"fake_warmup": 4}
    cfg = _cfg(teacher=spec, steps=20, checkpoint_every=10, batch_size=32, eval_samples=20, **extra)
    full, cut = full_and_resumed(monkeypatch, method, cfg, tmp_path, at=15)
    same_weights(full, cut)
    from safetensors.torch import load_file

    ca, cb = (load_file(tmp_path / r / "checkpoints" / "step_00000020" / "critic.safetensors") for r in ("full", "cut"))
    assert set(ca) == set(cb) and all(torch.equal(ca[k], cb[k]) for k in ca)


def test_multistep_backward_simulation_gan_and_labels(cspec, tmp_path):
    """A 2-level DMD2 generator with backward simulation and the GAN head on the fake score's
    features, on the exact 3-class mixture with its labels: its rule has grids for 1 and 2 steps
    (the Karras levels of 2 steps), and it samples per label."""
    run = distill("dmd2", _cfg(teacher=cspec, steps=12, batch_size=32, gen_steps=2, gan=True, eval_samples=50,
                               fake_warmup=2, net=None), str(tmp_path / "r"), progress=False)
    model = load(run)
    grids = model.meta["sampling"]["grids"]
    assert set(grids) == {"1", "2"} and grids["1"][0] == grids["2"][0] == pytest.approx(80.0)
    assert grids["2"][-1] == 0.0 and 0.002 < grids["2"][1] < 80.0
    x, labels = model.sample(16, 2, seed=0, labels=torch.arange(16) % 3)
    assert x.shape == (16, 2) and torch.isfinite(x).all() and labels.tolist() == (torch.arange(16) % 3).tolist()
    assert model.meta["dmd2"]["gan"] is True and model.meta["data"]["num_classes"] == 3


def test_data_inputs_for_a_multistep_generator(spec, tmp_path):
    run = distill("dmd2", _cfg(teacher=spec, steps=6, batch_size=16, gen_steps=3, gen_inputs="data",
                               eval_samples=20, fake_warmup=0), str(tmp_path / "r"), progress=False)
    assert set(load(run).meta["sampling"]["grids"]) == {"1", "2", "3"}


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method, bad, match", [
    ("dmd2", {"dm_min": 0.5, "dm_max": 0.4}, "--dm-min 0.5 must be below --dm-max"),
    ("dmd2", {"fake_warmup": 300}, "--fake-warmup 300 leaves no generator step"),
    ("dmd2", {"update_ratio": 0}, "--update-ratio"),
    ("dmd2", {"gen_inputs": "noise"}, "--gen-inputs"),
    ("sid", {"init_sigma": 100.0}, "--init-sigma 100 lies above the teacher's sigma_max 80"),
    ("sid", {"init_sigma": -1.0}, "--init-sigma"),
    ("sid", {"beta1": 1.0}, "--beta1"),
    ("sid", {"guidance": 2.0}, "--guidance 2.0: the teacher is unconditional"),
])
def test_bad_options_fail_before_any_work(method, bad, match, spec, tmp_path):
    with pytest.raises(UserError, match=match):
        distill(method, {**_cfg(teacher=spec), **bad}, str(tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()


def test_command_line(spec, tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "cli"
    assert main(["distill", "sid", "--teacher", spec, "--steps", "3", "--net", json.dumps(NET), "--batch-size", "16",
                 "--eval-samples", "20", "--fake-warmup", "1", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert main(["sample", str(out), "--nfe", "1", "--n", "8", "--out", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    assert main(["distill", "dmd2", "--teacher", spec, "--update-ratio", "-1", "--out", str(tmp_path / "x")]) == 2
    assert main(["distill", "sid", "--teacher", spec, "--alpha", "nan", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("fewstep distill: error:") for line in err), err
    assert not any((tmp_path / n).exists() for n in "xy")


def test_a_true_or_false_option_is_also_a_bare_flag():
    """``--gan`` is ``--gan true``; ``--gan false`` and leaving it out (the method's default) still work."""
    from fewstep.cli import build_parser

    ap = build_parser()
    base = ["distill", "dmd2", "--teacher", "gmm:x.npz", "--out", "o"]
    assert ap.parse_args(base + ["--gan"]).gan is True
    assert ap.parse_args(base[:4] + ["--gan"] + base[4:]).gan is True  # followed by another option
    assert ap.parse_args(base + ["--gan", "false"]).gan is False
    assert ap.parse_args(base).gan is None  # not given: the method's default applies
