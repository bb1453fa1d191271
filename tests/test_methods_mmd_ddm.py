"""MMD-DDM (Aiello, Valsesia & Magli 2023): the MMD^2 estimators against closed forms; the
gradient of the loss reaching every step of the fixed DDIM chain; fine-tuning a small ring
teacher lowers its own MMD objective and the energy distance of its 4-step sampler to exact
samples, and the saved model samples exactly the trained chain; resume bit for bit; bad input
one line and no folder; the command line; an image teacher tuned in classifier features."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _exact import SMALL_MLP, gmm2
from _refusals import one_line, refused_leaving_no_folder
from _resume import full_and_resumed, same_weights
from fewstep.errors import UserError
from fewstep.methods import distill, resolve
from fewstep.methods.common import fixed_grid
from fewstep.methods.mmd_ddm import mmd2, poly_kernel, rbf_kernel, sampler_chain
from fewstep.metrics import energy_distance
from fewstep.model import load


@pytest.fixture(scope="module")
def ring_teacher(spec, tmp_path_factory):
    """A small MLP teacher of the ring of 8, 400 steps (about 4 s on one CPU thread); its 4-step
    Euler sampler on the karras grid is far from the data (energy distance ~0.16, ~0.016 at 32)."""
    from fewstep.train.teacher import train_teacher

    return train_teacher({"data": spec, "steps": 400, "net": SMALL_MLP, "device": "cpu", "batch_size": 256,
                          "lr": 3e-3, "seed": 0}, str(tmp_path_factory.mktemp("mmd") / "teacher"), progress=False,
                         evaluate=False)


def _cfg(teacher, **kw):
    return {"teacher": teacher, "steps": 300, "lr": 1e-4, "batch_size": 64, "device": "cpu", **kw}


@pytest.fixture(scope="module")
def tuned(ring_teacher, tmp_path_factory):
    """The teacher fine-tuned for 4 Euler steps (300 steps of batch 64: about 3 s)."""
    return distill("mmd_ddm", _cfg(ring_teacher), str(tmp_path_factory.mktemp("mmdrun") / "s"), progress=False)


# ---------------------------------------------------------------------------- the estimator
def test_biased_estimate_is_exactly_zero_on_identical_sets():
    x = torch.randn(17, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (rbf_kernel([0.5, 1.0, 2.0]), poly_kernel(3)):
        assert float(mmd2(x, x.clone(), k, "biased")) == 0.0  # a + a - 2a, every sum the same numbers


def test_unbiased_estimate_on_hand_computed_sets():
    X = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    Y = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    # rbf h = 1: k(0,1) = e^-1/2, k(0,2) = e^-2, k(1,2) = e^-1/2, k(0,0) = 1;
    # within X: e^-1/2, within Y: e^-2, cross: (1 + e^-2 + 2 e^-1/2) / 4  ->  (e^-2 - 1) / 2 < 0
    got = float(mmd2(X, Y, rbf_kernel([1.0])))
    assert abs(got - (math.exp(-2) - 1) / 2) < 1e-15, got
    # polynomial (xy/d + 1)^3, d = 1, X = {0, 1}, Y = {1, 2}: within X k(0,1) = 1, within Y k(1,2) = 27,
    # cross (1 + 1 + 8 + 27) / 4 = 37/4  ->  1 + 27 - 37/2 = 9.5
    got = float(mmd2(X, torch.tensor([[1.0], [2.0]], dtype=torch.float64), poly_kernel(3)))
    assert abs(got - 9.5) < 1e-12, got
    # the biased one keeps the diagonals: (1 + 2 e^-1/2)/4 ... on the rbf case, by hand
    want_b = (2 + 2 * math.exp(-0.5)) / 4 + (2 + 2 * math.exp(-2)) / 4 - 2 * (1 + math.exp(-2) + 2 * math.exp(-0.5)) / 4
    assert abs(float(mmd2(X, Y, rbf_kernel([1.0]), "biased")) - want_b) < 1e-15


def test_unbiased_estimate_is_zero_in_expectation():
    """4000 independent pairs of sets of 8 from one law: the mean of eq. 4 is 0 within 4 standard
    errors (a 6e-5 chance of failing for a true 0), while the biased one's mean is clearly positive."""
    g = torch.Generator().manual_seed(1)
    k = rbf_kernel([0.5, 1.0, 2.0])
    u, b = [], []
    for _ in range(4000):
        x, y = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
        u.append(float(mmd2(x, y, k)))
        b.append(float(mmd2(x, y, k, "biased")))
    u, b = np.array(u), np.array(b)
    se = u.std() / math.sqrt(len(u))
    assert abs(u.mean()) < 4 * se, (u.mean(), se)
    assert b.mean() > 10 * (b.std() / math.sqrt(len(b))), (b.mean(), b.std())


# -------------------------------------------------------------------------- the gradient
def test_the_gradient_reaches_every_step_of_the_chain(ring_teacher):
    teacher = load(ring_teacher)
    D = teacher.denoiser
    grid = fixed_grid("karras", 4, teacher)
    outputs = []

    class Spy(torch.nn.Module):
        """The net, its output of every call kept with its gradient."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *a, **kw):
            out = self.net(*a, **kw)
            out.retain_grad()
            outputs.append(out)
            return out

    D.net.requires_grad_(True)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    data = gmm2().sample(32, generator=torch.Generator().manual_seed(1)).float()
    k = rbf_kernel([0.5, 1.0, 2.0])
    mmd2(sampler_chain(D, Spy(D.net), z, grid), data, k).backward()
    assert len(outputs) == 4
    for i, out in enumerate(outputs):  # each of the 4 evaluations gets a gradient
        assert out.grad is not None and float(out.grad.abs().sum()) > 0, i
    grads = {n: p.grad.clone() for n, p in D.net.named_parameters()}
    assert all(float(g.abs().sum()) > 0 for g in grads.values()), [n for n, g in grads.items() if not g.abs().sum()]
    # gradient checkpointing recomputes the same graph: the same gradient (to float rounding)
    D.net.zero_grad(set_to_none=True)
    mmd2(sampler_chain(D, D.net, z, grid, checkpoint=True), data, k).backward()
    for n, p in D.net.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-7), n


# ------------------------------------------------------------------------------ training
def test_fine_tuning_lowers_its_mmd_and_the_energy_distance_at_its_grid(ring_teacher, tuned):
    teacher, student = load(ring_teacher), load(tuned)
    meta = json.loads((Path(tuned) / "model.json").read_text())
    grid = meta["sampling"]["grids"]["4"]
    assert meta["method"] == "mmd_ddm" and meta["role"] == "student" and len(grid) == 5 and grid[-1] == 0.0
    assert grid == fixed_grid("karras", 4, teacher) and meta["mmd"]["kernel"] == "rbf"
    assert student.rule_nfes() == [4]

    ref = gmm2().sample(2000, generator=torch.Generator().manual_seed(7)).float()
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        x_t = sampler_chain(teacher.denoiser, teacher.denoiser.net, z, grid)
        x_s = sampler_chain(student.denoiser, student.denoiser.net, z, grid)
    # the saved rule is the trained chain: fewstep.load(run).sample(n, 4) from the same noise
    same = student.sample(2000, 4, x=float(grid[0]) * z)[0]
    assert torch.allclose(same, x_s, rtol=0, atol=1e-5)
    # the teacher's own euler sampler on that grid is the untuned chain
    assert torch.allclose(teacher.sample(2000, 4, "euler", x=float(grid[0]) * z, grid=torch.tensor(grid))[0], x_t,
                          rtol=0, atol=1e-5)
    k = rbf_kernel(meta["mmd"]["bandwidths"])
    m_t, m_s = float(mmd2(x_t.double(), ref.double(), k)), float(mmd2(x_s.double(), ref.double(), k))
    ed_t, ed_s = energy_distance(x_t, ref), energy_distance(x_s, ref)
    print(f"ring: MMD^2 {m_t:.4f} -> {m_s:.4f}, energy distance {ed_t:.4f} -> {ed_s:.4f}")
    # measured: MMD^2 0.198 -> 0.0016, energy distance 0.159 -> 0.0037 (the teacher at 32 Euler steps:
    # 0.016); the 3x margins (the measured gains are 40-100x) leave room for other CPUs' rounding over
    # 300 steps
    assert m_s < m_t / 3, (m_s, m_t)
    assert ed_s < ed_t / 3, (ed_s, ed_t)


def test_resume_is_bit_for_bit(ring_teacher, tmp_path, monkeypatch):
    cfg = _cfg(ring_teacher, steps=30, checkpoint_every=10, batch_size=16)
    full, cut = full_and_resumed(monkeypatch, "mmd_ddm", cfg, tmp_path, at=15)
    same_weights(full, cut)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("key, value, needle", [
    ("timesteps", 0, "--timesteps"), ("grid", "zigzag", "--grid"), ("kernel_on", "pixels", "--kernel-on"),
    ("kernel", "laplace", "--kernel"), ("bandwidths", "1,-2", "--bandwidths"), ("bandwidths", [], "--bandwidths"),
    ("estimator", "median", "--estimator"), ("degree", 0, "--degree"),
])
def test_bad_options_are_one_line(key, value, needle):
    with pytest.raises(UserError) as e:
        resolve("mmd_ddm", {"teacher": "gmm:x.npz", key: value})
    assert needle in one_line(e)


def test_poly_kernel_with_bandwidths_is_refused():
    with pytest.raises(UserError) as e:
        resolve("mmd_ddm", {"teacher": "gmm:x.npz", "kernel": "poly", "bandwidths": "1,2"})
    assert "--bandwidths" in one_line(e)


def test_bad_teachers_and_spaces_are_one_line_and_leave_no_folder(spec, ring_teacher, tmp_path):
    cases = [({"teacher": spec}, "exact mixture"),
             ({"teacher": ring_teacher, "kernel_on": "features"}, "--kernel-on features"),
             ({"teacher": ring_teacher, "classifier": "a"}, "--classifier"),
             ({"teacher": ring_teacher, "net": {**SMALL_MLP, "hidden": 32}}, "--net"),
             ({"teacher": ring_teacher, "batch_size": 1}, "--batch-size")]
    refused_leaving_no_folder("mmd_ddm", {"steps": 2, "device": "cpu"}, cases, tmp_path)


def test_the_command_line_runs(ring_teacher, tmp_path):
    from fewstep.cli import main

    out = tmp_path / "cli"
    assert main(["distill", "mmd-ddm", "--teacher", ring_teacher, "--steps", "3", "--batch-size", "8",
                 "--timesteps", "2", "--bandwidths", "0.5,1,2", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert list(meta["sampling"]["grids"]) == ["2"] and meta["mmd"]["bandwidths"] == [0.5, 1.0, 2.0]
    assert main(["sample", str(out), "--nfe", "2", "--n", "10", "--out", str(tmp_path / "x.npz")]) == 0
    assert np.load(tmp_path / "x.npz")["samples"].shape == (10, 2)


# ------------------------------------------------------------------------------- images
def test_images_tune_in_classifier_features(tmp_path):
    """A tiny 8x8-digits MLP teacher (300 steps) tuned 100 steps for 4 Euler steps with the paper's
    polynomial kernel on the project's digit-classifier features (the default for images)."""
    from fewstep.methods.common import data_source
    from fewstep.metrics import frechet_distance
    from fewstep.metrics.features import classifier_for
    from fewstep.train.teacher import train_teacher

    net = {"kind": "mlp", "dim": 64, "hidden": 64, "depth": 2, "emb_dim": 32}
    teacher_dir = train_teacher({"data": "digits", "steps": 300, "batch_size": 64, "device": "cpu", "net": net,
                                 "seed": 0}, str(tmp_path / "teacher"), progress=False, evaluate=False)
    out = distill("mmd_ddm", {"teacher": teacher_dir, "steps": 100, "lr": 1e-3, "batch_size": 64, "device": "cpu"},
                  str(tmp_path / "s"), progress=False)
    meta = json.loads((tmp_path / "s" / "model.json").read_text())
    assert meta["mmd"]["kernel_on"] == "features" and meta["mmd"]["kernel"] == "poly"
    assert meta["mmd"]["classifier"]["data"] == "digits" and meta["cost"]["classifier_evals"] == 100 * 2 * 64
    teacher, student = load(teacher_dir), load(out)
    grid = meta["sampling"]["grids"]["4"]
    ref = data_source("digits", None, 0).draw(1000, torch.Generator().manual_seed(3))
    z = torch.randn((1000,) + tuple(teacher.shape), generator=torch.Generator().manual_seed(4))
    clf, k = classifier_for("digits"), poly_kernel(3)
    with torch.no_grad():
        x_t = sampler_chain(teacher.denoiser, teacher.denoiser.net, z, grid)
        x_s = sampler_chain(student.denoiser, student.denoiser.net, z, grid)
        m_t = float(mmd2(clf.features(x_t).double(), clf.features(ref).double(), k))
        m_s = float(mmd2(clf.features(x_s).double(), clf.features(ref).double(), k))
    fd_t, fd_s = frechet_distance(x_t, ref, "digits"), frechet_distance(x_s, ref, "digits")
    print(f"digits: feature MMD^2 {m_t:.1f} -> {m_s:.1f}, FD {fd_t:.1f} -> {fd_s:.1f}")
    # measured: feature MMD^2 64018 -> 1784, classifier FD 1000 -> 156 (gains of 36x and 6x); 3x margins
    # for other CPUs' rounding
    assert m_s < m_t / 3, (m_s, m_t)
    assert fd_s < fd_t / 3, (fd_s, fd_t)
