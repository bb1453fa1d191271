"""Discriminator guidance (Kim et al. 2022): the wrapper D_dg = D + w sigma^2 grad_y logit against
closed forms, and ``fewstep distill discriminator`` end to end on exact mixtures.

Truth: with a teacher mixture A and a data mixture B the optimal discriminator's logit is
log p_B(y; sigma) - log p_A(y; sigma) (both in closed form), and A guided by it at weight 1 is
B's denoiser exactly. The end-to-end run trains a discriminator between the samples of A (the
ring with alternating 3:1 weights, the "imperfect teacher") and B (the true ring) and checks that
guiding A's samplers with it lowers the energy distance to B at equal NFE."""
import json

import pytest
import torch

from _exact import SMALL_MLP as NET
from fewstep.data.gmm import GaussianMixture
from fewstep.denoiser import DiscriminatorGuided
from fewstep.errors import UserError
from fewstep.methods import distill, resolve
from fewstep.methods.common import quiet_sample
from fewstep.metrics import energy_distance
from fewstep.model import Auxiliary, load, load_auxiliary
from fewstep.nets import build_net


def _true() -> GaussianMixture:
    return GaussianMixture.ring(8, radius=2.0, std=0.25)


def _teacher(true: GaussianMixture) -> GaussianMixture:
    """The imperfect teacher: the true modes with alternating 3:1 weights."""
    return GaussianMixture(torch.tensor([3.0, 1.0] * 4), true.means, true.covs, labels=true.labels)


def _optimal_logit(A, B):
    """logit* = log(d* / (1 - d*)) = log p_B(y; sigma) - log p_A(y; sigma), d* = p_B / (p_A + p_B)."""
    return lambda y, sigma, labels=None: B.log_prob(y, sigma, labels) - A.log_prob(y, sigma, labels)


def _points(n=400, seed=0, dim=2):
    g = torch.Generator().manual_seed(seed)
    y = 3.0 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    sigma = torch.exp(2.0 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(0.002, 80.0)
    return y, sigma


def _sample(D, n, seed, sampler="heun", nfe=32, labels=None, dim=2):
    x = 80.0 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    extra = {"extra_args": {"labels": labels}} if labels is not None else {}
    return quiet_sample(D, x, sampler=sampler, nfe=nfe, grid="karras", sigma_min=0.002, sigma_max=80.0, **extra)


# ------------------------------------------------------------------------- the wrapper
def test_a_discriminator_of_one_half_everywhere_changes_nothing():
    """d = 1/2 (logit 0): no correction, whether the logit is a constant or an untrained net whose
    zero-initialised output layer gives 0 (its input gradient is exactly 0); weight 0 is D itself."""
    A = _teacher(_true())
    y, s = _points()
    D = A.denoise(y, s)
    with torch.no_grad():
        const = DiscriminatorGuided(A, lambda y, sigma: torch.zeros(len(y), dtype=y.dtype), 3.0)
        assert torch.equal(const(y, s), D)
        torch.manual_seed(0)
        net = Auxiliary(build_net(NET), {"role": "discriminator", "output": "logit", "sigma_data": 1.0})
        assert torch.equal(net(y.float(), s.float()), torch.zeros(len(y)))
        fresh = DiscriminatorGuided(A, net, 2.0)
        assert torch.equal(fresh(y, s), D) and fresh.gradients == 1
        off = DiscriminatorGuided(A, _optimal_logit(A, _true()), 0.0)
        assert torch.equal(off(y, s), D) and off.gradients == 0  # weight 0: D exactly, no gradient taken


def test_optimal_discriminator_turns_the_teacher_into_the_data():
    """A guided by logit* = log p_B - log p_A at weight 1 is B's denoiser, to float64 round-off,
    under torch.no_grad (as samplers call it); with class labels passed to both."""
    B = _true()
    A = _teacher(B)
    y, s = _points(seed=1)
    with torch.no_grad():
        got = DiscriminatorGuided(A, _optimal_logit(A, B), 1.0)(y, s)
    assert got.dtype == torch.float64 and not got.requires_grad
    torch.testing.assert_close(got, B.denoise(y, s), rtol=0, atol=1e-10)
    Bc = GaussianMixture.labelled_ring()
    Ac = GaussianMixture(Bc.weights.flip(0), Bc.means, Bc.covs, labels=Bc.labels)  # other weights in each class
    labels = torch.randint(-1, 3, (len(y),), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = DiscriminatorGuided(Ac, _optimal_logit(Ac, Bc), 1.0)(y, s, labels=labels)
    torch.testing.assert_close(got, Bc.denoise(y, s, labels), rtol=0, atol=1e-10)
    # and in a sampler: the guided teacher's samples are the data's (the same map, to round-off)
    ref = _sample(B, 500, seed=3)
    torch.testing.assert_close(_sample(DiscriminatorGuided(A, _optimal_logit(A, B), 1.0), 500, seed=3), ref,
                               rtol=0, atol=1e-8)


def test_guidance_moves_samples_toward_the_data_in_1d():
    """1-D: teacher N(0, 1), data N(1, 1). A linear discriminator logit a*y moves D by exactly
    w sigma^2 a (toward the data for a > 0, away for a < 0); the optimal one, whose gradient is
    1 / (1 + sigma^2) > 0, moves the teacher's samples' mean from 0 to the data's 1."""
    A = GaussianMixture([1.0], [[0.0]], [[[1.0]]])
    B = GaussianMixture([1.0], [[1.0]], [[[1.0]]])
    y, s = _points(dim=1, seed=4)
    with torch.no_grad():
        for a in (0.7, -0.7):
            moved = DiscriminatorGuided(A, lambda y, sigma, a=a: a * y[:, 0], 1.5)(y, s) - A.denoise(y, s)
            torch.testing.assert_close(moved, (1.5 * a * s**2)[:, None], rtol=1e-12, atol=1e-12)
        cut = DiscriminatorGuided(A, lambda y, sigma: 0.7 * y[:, 0], 1.5, guide_sigma_min=1.0)  # the code's time_min
        want = torch.where(s >= 1.0, 1.5 * 0.7 * s**2, torch.zeros_like(s))[:, None]
        torch.testing.assert_close(cut(y, s) - A.denoise(y, s), want, rtol=1e-12, atol=1e-12)
    n = 4000  # mean of n samples of unit variance: standard error 0.016
    plain = _sample(A, n, seed=5, dim=1)
    guided = _sample(DiscriminatorGuided(A, _optimal_logit(A, B), 1.0), n, seed=5, dim=1)
    assert abs(float(plain.mean())) < 0.06 and abs(float(guided.mean()) - 1.0) < 0.06, (plain.mean(), guided.mean())
    # B is A shifted by 1 and the flows are linear: every sample moves by the same ~1 (0.987: Heun's
    # error at 32 NFE, the same for B's own denoiser)
    shift = guided - plain
    assert float(shift.max() - shift.min()) < 1e-9 and abs(float(shift.mean()) - 1.0) < 0.03, shift.mean()


def test_bad_weights_and_logits_are_one_line():
    A = _teacher(_true())
    for w in (-1.0, float("nan")):
        with pytest.raises(UserError, match="guidance weight"):
            DiscriminatorGuided(A, _optimal_logit(A, _true()), w)
    y, s = _points(n=8)
    with pytest.raises(UserError, match="one logit per sample"):
        DiscriminatorGuided(A, lambda y, sigma: y.sum(), 1.0)(y, s)


# --------------------------------------------------------------------------- the method
def _cfg(teacher, data, **kw):
    return {"teacher": teacher, "data": data, "net": NET, "steps": 400, "batch_size": 2048, "lr": 3e-3, "warmup": 20,
            "ema_decay": 0.99, "pairs": 4000, "pair_batch": 2000, "pair_nfe": 32, "eval_samples": 1000,
            "device": "cpu", **kw}


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("dg")
    B = _true()
    _teacher(B).save(root / "A.npz")
    B.save(root / "B.npz")
    return f"gmm:{root / 'A.npz'}", f"gmm:{root / 'B.npz'}"


def test_trained_discriminator_lowers_the_energy_distance(mixtures, tmp_path):
    """400 steps on the teacher's 4000 samples vs the true ring; then the teacher guided at the run's
    weight (1) beats the plain teacher at 32 NFE. Measured over training seeds 0-7 (n = 2000, the
    mean of two noise seeds): plain Heun 0.0152, DPM-Solver++(2M) 0.0141, Euler 0.0131; guided Heun
    -0.0002..0.0039, DPM-Solver++ 0.0004..0.0048, Euler 0.0046..0.0108 (the exact discriminator:
    0.0003, 0.0002, 0.0012). One distance's noise-seed spread is ~0.002, the paired difference's
    less: the margins asked (0.007 for Heun and DPM-Solver++, >= 3 spreads; Euler, whose gain is
    smaller and seed-dependent, only below the plain teacher) hold for every training seed tried."""
    A, B = mixtures
    out = distill("discriminator", _cfg(A, B), str(tmp_path / "dg"), progress=False)
    meta = json.loads((tmp_path / "dg" / "model.json").read_text())
    assert meta["role"] == "discriminator" and meta["output"] == "logit" and meta["format"] == "fewstep-model-1"
    assert meta["dg_weight"] == 1.0 and meta["teacher"] == A and meta["data"]["name"] == B
    assert meta["data"]["shape"] == [2] and meta["net"]["kind"] == "mlp" and meta["cost"]["teacher_evals"] == 4000 * 31
    d = load_auxiliary(out, "discriminator", device="cpu")
    with pytest.raises(UserError, match="not a covariance run"):
        load_auxiliary(out, "covariance")
    with pytest.raises(UserError, match="discriminator run"):
        load(out)
    # held-out accuracy per band: near the optimal discriminator's (same held-out samples) in every band
    ev = json.loads((tmp_path / "dg" / "eval.json").read_text())
    for band in ev["bands"]:
        assert abs(band["accuracy"] - band["optimal_accuracy"]) < 0.04, band
        assert band["bce"] < band["optimal_bce"] + 0.01, band
    assert ev["bands"][0]["optimal_accuracy"] > 0.58  # the low levels tell 3:1 weights apart (0.625 at sigma 0)
    n = 2000
    ref = GaussianMixture.load(B[4:]).sample(n, generator=torch.Generator().manual_seed(99))
    teacher = load(A).denoiser
    for sampler, margin in (("heun", 0.007), ("dpmpp_2m", 0.007), ("euler", None)):
        plain = sum(energy_distance(_sample(teacher, n, k, sampler), ref) for k in (0, 1)) / 2
        guided_D = DiscriminatorGuided(teacher, d, meta["dg_weight"])
        guided = sum(energy_distance(_sample(guided_D, n, k, sampler), ref) for k in (0, 1)) / 2
        if margin is None:
            assert guided < plain, (sampler, plain, guided)
        else:
            assert guided < plain - margin and guided < 0.5 * plain, (sampler, plain, guided)
        assert guided_D.gradients == 2 * (31 if sampler == "heun" else 32)  # one gradient per evaluation


def test_conditional_teacher_gives_labels_to_the_discriminator(cspec, tmp_path):
    """A class-conditional teacher: the discriminator net takes its classes, the run loads, and a
    guided sampler passes each sample's label to both the teacher and the discriminator."""
    cfg = {"teacher": cspec, "net": {**NET, "num_classes": 3}, "steps": 10, "batch_size": 64, "pairs": 200,
           "pair_batch": 100, "pair_nfe": 8, "eval_samples": 50, "device": "cpu"}
    out = distill("discriminator", cfg, str(tmp_path / "c"), progress=False)
    meta = json.loads((tmp_path / "c" / "model.json").read_text())
    assert meta["net"]["num_classes"] == 3 and meta["data"]["num_classes"] == 3
    d = load_auxiliary(out, "discriminator", device="cpu")
    teacher = load(cspec).denoiser
    labels = torch.arange(30) % 3
    x = _sample(DiscriminatorGuided(teacher, d, 1.0), 30, 0, "euler", 8, labels=labels)
    assert x.shape == (30, 2) and bool(torch.isfinite(x).all())


def test_bad_inputs_are_one_line(mixtures, tmp_path):
    A, _ = mixtures
    other = tmp_path / "three.npz"
    GaussianMixture.ring(4, dim=3).save(other)
    with pytest.raises(UserError, match=r"shape \[3\].*teacher") as e:
        distill("discriminator", _cfg(A, f"gmm:{other}", steps=2), str(tmp_path / "bad"), progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--dg-weight"):
        resolve("discriminator", _cfg(A, None, dg_weight=-1.0))
    with pytest.raises(UserError, match="--eval-samples"):
        resolve("discriminator", _cfg(A, None, pairs=100, eval_samples=80))


def test_run_folder_teacher_its_data_and_its_weights(tmp_path):
    """A trained teacher (a run folder): the real side defaults to its training data, and ``--init
    teacher`` starts the discriminator from its weights, fed as the teacher is (its process and
    prediction, recorded as "input" so that loading sees the same inputs)."""
    from fewstep.io import load_weights
    from fewstep.train.teacher import train_teacher

    run = train_teacher({"data": "moons", "steps": 30, "device": "cpu", "eval_samples": 100, "eval_nfe": 5},
                        str(tmp_path / "teacher"), progress=False)
    cfg = {"teacher": run, "steps": 1, "lr": 1e-30, "ema_decay": 0.0, "warmup": 0, "batch_size": 64,
           "pairs": 200, "pair_batch": 200, "pair_nfe": 4, "eval_samples": 50, "device": "cpu"}
    out = distill("discriminator", {**cfg, "init": "teacher"}, str(tmp_path / "d"), progress=False)
    meta = json.loads((tmp_path / "d" / "model.json").read_text())
    tmeta = json.loads((tmp_path / "teacher" / "model.json").read_text())
    assert meta["data"]["name"] == "moons" and meta["net"] == tmeta["net"]
    assert meta["input"] == {"process": tmeta["process"], "prediction": tmeta["prediction"]}
    got = load_weights(tmp_path / "d" / "model.safetensors")
    want = load_weights(tmp_path / "teacher" / "model.safetensors")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
    d = load_auxiliary(out, "discriminator", device="cpu")
    y = torch.randn(16, 2)
    assert d(y, torch.full((16,), 0.5)).shape == (16,)
    with pytest.raises(UserError, match="--init teacher"):
        distill("discriminator", {**cfg, "init": "teacher", "net": NET}, str(tmp_path / "bad"), progress=False)


def test_sample_and_bench_take_the_discriminator(mixtures, tmp_path, capsys):
    """``fewstep sample --discriminator RUN`` guides the teacher (weight 0: the plain samples bit
    for bit; the run's weight: other samples), ``--dg-weight`` alone is refused in one line, and
    ``fewstep bench --discriminator RUN`` adds a "SAMPLER + DG" row beside each sampler's."""
    import numpy as np

    from fewstep.cli import main
    from fewstep.report.bench import run_bench

    A, B = mixtures
    run = distill("discriminator", _cfg(A, B, steps=40, pairs=400, pair_batch=400, eval_samples=100),
                  str(tmp_path / "dg"), progress=False)
    common = ["sample", A, "--sampler", "heun", "--nfe", "15", "--n", "64"]
    assert main(common + ["--out", str(tmp_path / "plain.npz")]) == 0
    assert main(common + ["--discriminator", run, "--dg-weight", "0", "--out", str(tmp_path / "w0.npz")]) == 0
    assert main(common + ["--discriminator", run, "--out", str(tmp_path / "w1.npz")]) == 0
    plain, w0, w1 = (np.load(tmp_path / f)["samples"] for f in ("plain.npz", "w0.npz", "w1.npz"))
    assert np.array_equal(plain, w0) and not np.allclose(plain, w1)
    capsys.readouterr()
    assert main(common + ["--dg-weight", "1", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--discriminator" in err and "\n" not in err
    assert main(common + ["--discriminator", A[4:], "--out", str(tmp_path / "y.npz")]) == 2  # not a run folder
    res, _ = run_bench(A, samplers="heun", students="none", nfe=[15], out=str(tmp_path / "bench"), n=200,
                       nll_n=0, reference=False, progress=False, discriminator=run)
    methods = {r["method"] for r in res.rows} if hasattr(res, "rows") else {r["method"] for r in res["rows"]}
    assert {"heun", "heun + DG"} <= methods
