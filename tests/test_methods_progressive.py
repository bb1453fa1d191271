"""Progressive distillation (Salimans & Ho 2022) on the exact Gaussian-mixture teacher: the
target equals two hand-computed DDIM steps; the students beat DDIM at their NFE and their
own initialisation; every round is saved and sampleable; an interrupted run resumes."""
import json

import pytest
import torch

from _resume import interrupt, same_weights
from _exact import SMALL_MLP as NET
from _exact import gmm2
from fewstep.methods import distill
from fewstep.methods.progressive import level_grid, target
from fewstep.metrics import rms
from fewstep.model import load
from fewstep.process import VP


def _cfg(spec, **kw):
    return {"teacher": spec, "net": NET, "steps": 400, "start_steps": 4, "lr": 3e-3, "batch_size": 256,
            "device": "cpu", "warmup": 20, "ema_decay": 0.99, **kw}


@pytest.mark.parametrize("i", [0, 1, 3])
def test_target_is_two_hand_computed_ddim_steps(i):
    """x~ of Algorithm 2 in the paper's x-space (z_t = alpha_t x + sigma_t eps, cosine VP)
    against :func:`target` in sigma-space, on the exact teacher, float64."""
    gmm, P = gmm2(), VP.cosine()
    grid = level_grid(P, 8, 80.0)  # the teacher's 8 levels + 0; the student's are grid[::2]
    s, s1, s2 = (float(grid[2 * i + j]) for j in range(3))
    t, t1, t2 = (P.t_of_sigma(torch.tensor(v, dtype=torch.float64)) for v in (s, s1, s2))
    alpha = {v: float(P.scale(tt)) if v > 0 else 1.0 for v, tt in ((s, t), (s1, t1), (s2, t2))}
    std = {v: alpha[v] * v for v in (s, s1, s2)}
    g = torch.Generator().manual_seed(i)
    x = gmm.sample(64, generator=g)
    z = alpha[s] * x + std[s] * torch.randn(x.shape, generator=g, dtype=torch.float64)

    def ddim(z, a, b):  # DDIM eq. 12 with eta = 0, x-prediction by the exact denoiser
        x_hat = gmm.denoise(z / alpha[a], a)
        return alpha[b] * x_hat + std[b] / std[a] * (z - alpha[a] * x_hat)

    z2 = ddim(ddim(z, s, s1), s1, s2)
    by_hand = (z2 - std[s2] / std[s] * z) / (alpha[s2] - std[s2] / std[s] * alpha[s])
    rows = torch.tensor([[s, s1, s2]], dtype=torch.float64).expand(64, 3)
    assert torch.allclose(target(gmm, z / alpha[s], rows), by_hand, rtol=1e-10, atol=1e-10)


def test_students_beat_ddim_and_their_initialisation(spec, tmp_path):
    out = distill("progressive", _cfg(spec), str(tmp_path / "pd"), progress=False)
    top, teacher, gmm = load(out), load(spec), gmm2()
    rounds = json.loads((tmp_path / "pd" / "model.json").read_text())["rounds"]
    assert [r["student_steps"] for r in rounds] == [4, 2, 1]  # the copy round, then 4 -> 2 -> 1
    for k in (1, 2):
        x_T = top.noise(1000, seed=7).double()
        ref = gmm.flow(x_T, top.sigma_max, 0.0, rtol=1e-7)
        err = rms(top.sample(1000, k, x=x_T.float())[0], ref)
        ddim_own_grid = rms(teacher.sample(1000, k, "euler", x=x_T, grid=load(out).variant(k).sampling["grids"]
                                           [str(k)])[0], ref)
        xk = teacher.noise(1000, seed=7)
        ddim = rms(teacher.sample(1000, k, "euler", x=xk, grid="karras")[0], gmm.flow(xk, 80.0, 0.0, rtol=1e-7))
        init = load(str(tmp_path / "pd" / "rounds" / f"steps_{2 * k:04d}"))  # where round k started
        init_err = rms(init.sample(1000, k, "euler", x=x_T.float(), grid=top.variant(k).sampling["grids"][str(k)])[0],
                       ref)
        # measured (k = 1, 2): student 0.21, 0.21; its initialisation 1.05, 0.50; DDIM on the
        # student's grid 1.41, 0.49 (on the Karras grid 1.42, 1.41)
        assert err < 0.6 * min(ddim, ddim_own_grid) and err < 0.8 * init_err, (k, err, ddim, ddim_own_grid, init_err)


def test_interrupted_run_resumes_identically(spec, tmp_path, monkeypatch):
    cfg = _cfg(spec, steps=40, checkpoint_every=10, start_steps=2)
    full = distill("progressive", cfg, str(tmp_path / "full"), progress=False)
    interrupt(monkeypatch, lambda seed, step: seed == 1000 and step == 25,
              lambda: distill("progressive", cfg, str(tmp_path / "cut"), progress=False))
    assert (tmp_path / "cut" / "rounds" / "steps_0002" / "model.json").is_file()
    assert not (tmp_path / "cut" / "rounds" / "steps_0001" / "model.json").exists()
    cut = distill("progressive", {}, str(tmp_path / "cut"), resume=True, progress=False)
    same_weights(full, cut)
    x = load(cut).sample(10, 2, seed=0)[0]  # the 2-step round through the top folder
    assert x.shape == (10, 2) and bool(torch.isfinite(x).all())


def test_a_trained_teacher_is_copied_not_refit(tmp_path):
    """A run-folder teacher (EDM net) is its first student's start: no copy round, the
    student keeps the teacher's net, process and parametrization; levels stop at its sigma_max."""
    from fewstep.train.teacher import train_teacher

    teacher = train_teacher({"data": "moons", "steps": 20, "batch_size": 64, "n_data": 500, "device": "cpu",
                             "net": NET}, str(tmp_path / "teacher"), progress=False, evaluate=False)
    out = distill("progressive", {"teacher": teacher, "steps": 3, "start_steps": 4, "end_steps": 2, "device": "cpu"},
                  str(tmp_path / "pd"), progress=False)
    meta = json.loads((tmp_path / "pd" / "model.json").read_text())
    assert [r["student_steps"] for r in meta["rounds"]] == [2] and meta["prediction"] == "edm"
    assert meta["process"]["kind"] == "edm" and abs(meta["sigma_max"] - 80.0) < 1e-9
    assert load(out).sample(5, 2, seed=0)[0].shape == (5, 2)


def test_students_train_on_the_teachers_own_subset(tmp_path):
    """A teacher trained on --n-data 40 digits (seed 3): a method's data source (no --data) draws
    only those 40, never the digits held out from the teacher."""
    from fewstep.data.registry import load_dataset
    from fewstep.methods.common import data_source
    from fewstep.train.teacher import train_teacher

    teacher = train_teacher({"data": "digits", "steps": 2, "batch_size": 8, "n_data": 40, "seed": 3, "device": "cpu"},
                            str(tmp_path / "t"), progress=False, evaluate=False)
    src = data_source(None, load(teacher))
    x = src.draw(2000, torch.Generator().manual_seed(0)).reshape(2000, -1)
    subset = load_dataset("digits", n=40, seed=3).x.float().reshape(40, -1)
    assert torch.cdist(x, subset).min(dim=1).values.max() == 0  # every draw is one of the teacher's 40
    assert len(torch.unique(x, dim=0)) == 40
