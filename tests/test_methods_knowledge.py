"""Knowledge distillation (Luhman & Luhman 2021) on the exact Gaussian-mixture teacher:
the one-step student learns the flow map far better than one DDIM step; pairs and
training resume after an interruption; the stochastic-generator form trains and loads."""
import json

import pytest
import torch

from _resume import interrupt, same_weights
from _exact import SMALL_MLP as NET
from _exact import gmm2
from fewstep.errors import UserError
from fewstep.methods import distill, resolve
from fewstep.methods.common import load_teacher
from fewstep.methods.knowledge import build_student
from fewstep.metrics import rms, sliced_w2
from fewstep.model import load


def _cfg(spec, **kw):
    return {"teacher": spec, "net": NET, "steps": 800, "pairs": 2000, "pair_nfe": 16, "pair_batch": 500,
            "lr": 3e-3, "batch_size": 256, "device": "cpu", "warmup": 20, "ema_decay": 0.99, **kw}


def _flow_error(model, spec, n=1000):
    teacher = load(spec)
    x_T = teacher.noise(n, seed=11)
    ref = gmm2().flow(x_T, teacher.sigma_max, 0.0, rtol=1e-7)
    return rms(model.sample(n, 1, x=x_T.float())[0], ref), rms(teacher.sample(n, 1, "euler", x=x_T, grid="karras")[0], ref), ref


def test_student_beats_ddim_and_its_initialisation(spec, tmp_path):
    out = distill("knowledge", _cfg(spec), str(tmp_path / "kd"), progress=False)
    student = load(out)
    err, err_ddim, ref = _flow_error(student, spec)
    D0, _, _ = build_student(load_teacher(spec), resolve("knowledge", _cfg(spec)))  # the initialisation
    x_T = load(spec).noise(1000, seed=11).float()
    err_init = rms(D0(x_T, torch.full((1000,), 80.0)), ref)
    # measured: student ~0.2, DDIM (one Euler step) and the initialisation (the mean) ~1.4
    assert err < 0.25 * err_ddim and err < 0.25 * err_init, (err, err_ddim, err_init)
    data = gmm2().sample(1000, generator=torch.Generator().manual_seed(3))
    sw_ddim = sliced_w2(load(spec).sample(1000, 1, "euler", seed=1, grid="karras")[0], data)
    assert sliced_w2(student.sample(1000, 1, seed=1)[0], data) < 0.35 * sw_ddim
    meta = json.loads((tmp_path / "kd" / "model.json").read_text())
    assert meta["cost"]["teacher_evals"] == 2000 * 15  # heun: 8 steps = 15 evaluations per pair
    assert meta["sampling"]["grids"] == {"1": [80.0, 0.0]} and meta["role"] == "student"


def test_interrupted_distillation_resumes_identically(spec, tmp_path, monkeypatch):
    cfg = _cfg(spec, steps=60, checkpoint_every=20, pairs=1000, pair_batch=250)
    full = distill("knowledge", cfg, str(tmp_path / "full"), progress=False)
    interrupt(monkeypatch, lambda seed, step: step == 45,
              lambda: distill("knowledge", cfg, str(tmp_path / "cut"), progress=False))
    assert (tmp_path / "cut" / "pairs" / "chunk_00003.json").is_file()
    assert not (tmp_path / "cut" / "model.json").exists()
    (tmp_path / "cut" / "pairs" / "chunk_00002.json").unlink()  # a chunk lost mid-write is made again
    for i in (0, 1, 3):  # the first process's chunks, as if each had taken 1000 s
        f = tmp_path / "cut" / "pairs" / f"chunk_{i:05d}.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "seconds": 1000.0}))
    cut = distill("knowledge", {"steps": 60}, str(tmp_path / "cut"), resume=True, progress=False)
    same_weights(full, cut)
    # the cost counts the earlier process's pairs and only this process's training (was: its seconds less
    # every chunk's, negative after such a resume)
    cost = json.loads((tmp_path / "cut" / "model.json").read_text())["cost"]
    assert cost["pair_seconds"] > 3000 and 0 <= cost["train_seconds"] < 1000
    assert cost["seconds"] == pytest.approx(cost["train_seconds"] + cost["pair_seconds"])


def test_pairs_of_another_spec_are_refused(spec, tmp_path):
    cfg = _cfg(spec, steps=2, pairs=100, pair_batch=100)
    distill("knowledge", cfg, str(tmp_path / "r"), progress=False)
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    stored["pair_nfe"] = 8
    (tmp_path / "r" / "config.json").write_text(json.dumps(stored))
    for f in ("model.json", "model.safetensors"):  # as if interrupted after the pairs: the stage is not done
        (tmp_path / "r" / f).unlink()
    with pytest.raises(UserError, match="holds pairs made with"):
        distill("knowledge", {}, str(tmp_path / "r"), resume=True, progress=False)


def test_stochastic_generator_form(spec, tmp_path):
    """A latent of its own dimension (4 > d = 2): trains, loads, samples from its latent."""
    out = distill("knowledge", _cfg(spec, latent_dim=4, steps=300), str(tmp_path / "gen"), progress=False)
    model = load(out)
    assert model.latent_shape == (4,) and model.noise(5).shape == (5, 4)
    x = model.sample(1000, 1, seed=2)[0]
    assert x.shape == (1000, 2)
    data = gmm2().sample(1000, generator=torch.Generator().manual_seed(3))
    assert sliced_w2(x, data) < 0.5 * sliced_w2(torch.zeros(1000, 2), data)


def test_command_line(spec, tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "cli"
    args = ["distill", "knowledge", "--teacher", spec, "--steps", "5", "--pairs", "64", "--pair-nfe", "4",
            "--net", json.dumps(NET), "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    assert main(["sample", str(out), "--nfe", "1", "--n", "16", "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["distill", "knowledge", "--out", str(out), "--resume", "--pairs", "9"]) == 2
    assert main(["distill", "progressive", "--teacher", spec, "--start-steps", "6", "--out", str(tmp_path / "p")]) == 2
    assert main(["distill", "consistency", "--mode", "training", "--out", str(tmp_path / "c")]) == 2
    assert main(["distill", "consistency", "--teacher", spec, "--solver", "ddpm", "--out", str(tmp_path / "c")]) == 2
    assert main(["distill", "knowledge", "--teacher", "nowhere", "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("fewstep distill: error:") for line in err), err
    assert not (tmp_path / "p").exists() and not (tmp_path / "c").exists() and not (tmp_path / "k").exists()
