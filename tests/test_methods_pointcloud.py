"""PSF (Wu et al. 2022): the training distances against brute force, and the three-stage
pipeline on tiny clouds -- every stage loadable, the one-step student better than its
initialisation (the reflowed flow's one Euler step), resume after an interruption,
bad input refused before any work, the command line."""
import itertools
import json

import pytest
import torch

from _resume import interrupt, same_weights
from fewstep.errors import UserError
from fewstep.methods import distill
from fewstep.metrics.pointcloud import (chamfer, chamfer_loss, cloud_set_metrics, emd, emd_loss, pairwise_chamfer,
                                        pairwise_emd)
from fewstep.model import load

DATA = "pointclouds:points=32,classes=sphere+cube,pose=none"
NET = {"kind": "pointnet", "dim": 3, "hidden": 32, "depth": 2, "emb_dim": 32}


def _cfg(**kw):
    return {"data": DATA, "net": NET, "n_data": 256, "teacher_steps": 300, "reflow_steps": 100, "steps": 200,
            "pairs": 128, "pair_batch": 64, "pair_nfe": 8, "eval_clouds": 24, "eval_nfe": 8, "renders": 2,
            "batch_size": 16, "lr": 2e-3, "warmup": 10, "ema_decay": 0.9, "device": "cpu",
            "checkpoint_every": 100, **kw}


def brute_chamfer(a, b):
    fwd = sum(min(sum((p[k] - q[k]) ** 2 for k in range(3)) for q in b.tolist()) for p in a.tolist()) / len(a)
    bwd = sum(min(sum((p[k] - q[k]) ** 2 for k in range(3)) for p in a.tolist()) for q in b.tolist()) / len(b)
    return fwd + bwd


def brute_emd(a, b):
    n = len(a)
    return min(sum(float((a[i] - b[p[i]]).norm()) for i in range(n)) for p in itertools.permutations(range(n))) / n


def test_training_distances_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 9, 3, generator=g, dtype=torch.float64), torch.randn(3, 7, 3, generator=g, dtype=torch.float64)
    cd = chamfer_loss(a, b)
    for k in range(3):
        assert float(cd[k]) == pytest.approx(brute_chamfer(a[k], b[k]), rel=1e-12, abs=1e-12)
    assert torch.allclose(chamfer(a, b), cd, rtol=1e-12)
    a6, b6 = torch.randn(2, 6, 3, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    e = emd(a6, b6)
    for k in range(2):
        assert float(e[k]) == pytest.approx(brute_emd(a6[k], b6[k]), rel=1e-12)
    assert float(emd(a6[0], a6[0, torch.randperm(6, generator=g)])) == pytest.approx(0.0, abs=1e-9)
    # the set metrics with the reference set's own distances given are the same
    x, y = torch.randn(5, 6, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    for d, pairwise in (("chamfer", pairwise_chamfer), ("emd", pairwise_emd)):
        assert cloud_set_metrics(x, y, d, real_pairwise=pairwise(y, y)) == cloud_set_metrics(x, y, d)


def test_training_distances_have_the_right_gradients():
    """d CD / d a_i = 2 (a_i - b_nn(i)) / N + sum over b_j whose nearest is a_i of 2 (a_i - b_j) / M;
    EMD's gradient is that of the optimal matching's mean length."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64)
    chamfer_loss(a[None], b[None]).sum().backward()
    d2 = ((a[:, None] - b[None]) ** 2).sum(-1).detach()
    nn_ab, nn_ba = d2.argmin(1), d2.argmin(0)
    want = 2 * (a.detach() - b[nn_ab]) / 8
    for j in range(5):
        want[nn_ba[j]] += 2 * (a.detach()[nn_ba[j]] - b[j]) / 5
    assert torch.allclose(a.grad, want, rtol=1e-10, atol=1e-12)
    x = torch.randn(1, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 6, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: emd_loss(x, y), (x,))


@pytest.fixture(scope="module")
def psf(tmp_path_factory):
    out = tmp_path_factory.mktemp("psf") / "run"
    return distill("pointcloud", _cfg(), str(out), progress=False)


def test_stages_are_models_and_the_student_beats_its_initialisation(psf):
    from pathlib import Path

    root = Path(psf)
    teacher, reflowed, student = load(root / "round1"), load(root / "round2"), load(psf)
    assert teacher.meta["round"]["couplings"] == "independent" and reflowed.meta["round"]["couplings"] == "reflow"
    assert student.meta["role"] == "student" and student.meta["sampling"]["grids"] == {"1": [reflowed.sigma_max, 0.0]}
    assert teacher.kind == student.kind == "clouds" and student.shape == (32, 3)
    z = teacher.noise(64, seed=5)
    target = reflowed.sample(64, 8, sampler="euler", grid="time", x=z)[0]   # what the student distils
    init = reflowed.sample(64, 1, sampler="euler", x=z, grid="karras")[0]                  # the student's start: one Euler step
    one = student.sample(64, 1, x=z)[0]
    cd_student, cd_init = float(chamfer(one, target).mean()), float(chamfer(init, target).mean())
    assert cd_student < 0.25 * cd_init, (cd_student, cd_init)  # measured: ~0.0003 against ~0.013
    ev = json.loads((root / "eval.json").read_text())
    m = ev["models"]
    assert set(m) == {"teacher", "teacher_1", "reflow", "reflow_1", "student_1"}
    assert m["student_1"]["mmd_cd"] < m["reflow_1"]["mmd_cd"] and m["student_1"]["mmd_cd"] < m["teacher_1"]["mmd_cd"]
    assert ev["student_over_teacher"]["mmd_cd"] == pytest.approx(m["student_1"]["mmd_cd"] / m["teacher"]["mmd_cd"])
    assert (root / "samples.png").stat().st_size > 1000
    # eval.json is what cloud_set_metrics says on the same clouds
    from fewstep.data.registry import load_dataset

    real = load_dataset(DATA, n=24, seed=ev["reference_seed"]).x
    x = student.sample(24, 1, x=teacher.noise(24, seed=104729))[0]
    assert cloud_set_metrics(x, real)["mmd_cd"] == pytest.approx(m["student_1"]["mmd_cd"], rel=1e-6)


def test_interrupted_pipeline_resumes_identically(tmp_path, monkeypatch):
    cfg = _cfg(n_data=64, teacher_steps=20, reflow_steps=20, steps=20, pairs=32, pair_batch=16, pair_nfe=4,
               eval_clouds=4, checkpoint_every=10, eval_emd=True, distance="emd",
               net={**NET, "hidden": 16, "emb_dim": 16})
    full = distill("pointcloud", cfg, str(tmp_path / "full"), progress=False)
    interrupt(monkeypatch, lambda seed, step: seed == 1000 and step == 15,  # round 2 (seed + 1000)
              lambda: distill("pointcloud", cfg, str(tmp_path / "cut"), progress=False))
    assert (tmp_path / "cut" / "round1" / "model.json").is_file()
    assert (tmp_path / "cut" / "round2" / "pairs" / "chunk_00001.json").is_file()
    assert not (tmp_path / "cut" / "round2" / "model.json").exists()
    cut = distill("pointcloud", {}, str(tmp_path / "cut"), resume=True, progress=False)
    same_weights(full, cut)
    ev = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert json.loads((tmp_path / "cut" / "eval.json").read_text()) == ev
    assert {"mmd_cd", "mmd_emd", "cov_emd", "nna_emd"} <= set(ev["models"]["student_1"])


@pytest.mark.parametrize("over, match", [
    ({"data": "moons"}, "not point clouds"),
    ({"distance": "hausdorff"}, "point-cloud distance 'hausdorff'"),
    ({"eval_clouds": 1}, "eval-clouds"),
    ({"pair_sampler": "nope"}, "sampler"),
    ({"net": {"kind": "pointnet", "width": 3}}, "unknown option"),
    ({"data": "pointclouds:points=16,classes=donut"}, "point-cloud class"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, over, match):
    with pytest.raises(UserError, match=match):
        distill("pointcloud", _cfg(**over), str(tmp_path / "bad"), progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_teacher_that_is_not_a_cloud_flow_is_refused(tmp_path):
    from fewstep.data.gmm import GaussianMixture

    GaussianMixture.ring(4).save(tmp_path / "ring.npz")
    with pytest.raises(UserError, match="point-cloud flow teacher"):
        distill("pointcloud", _cfg(teacher=f"gmm:{tmp_path / 'ring.npz'}"), str(tmp_path / "bad"), progress=False)
    assert not (tmp_path / "bad").exists()


def test_command_line_distills_and_samples(psf, tmp_path, capsys):
    import numpy as np

    from fewstep.cli import main

    assert main(["sample", psf, "--nfe", "1", "--n", "5", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["samples"].shape == (5, 32, 3) and (tmp_path / "s.png").is_file()
    # a teacher given on the command line skips stage 1 and is reused as is
    out = tmp_path / "cli"
    args = ["distill", "pointcloud", "--teacher", f"{psf}/round1", "--data", DATA, "--net", json.dumps(NET),
            "--reflow-steps", "3", "--steps", "3", "--pairs", "16", "--pair-nfe", "2", "--eval-clouds", "4",
            "--eval-nfe", "2", "--n-data", "16", "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    stages = json.loads((out / "model.json").read_text())["stages"]
    assert not (out / "round2").exists() and stages["teacher"].endswith("round1") and stages["reflow"] == "round1"
    assert main(["distill", "pointcloud", "--data", "moons", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip().startswith("fewstep distill: error:") and not (tmp_path / "m").exists()
