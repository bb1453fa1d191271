"""Rectified flow and reflow (Liu et al. 2022) on exact Gaussian-mixture data and teachers:
the straightness measures against closed forms, reflow straightens the flow and makes its
one Euler step close to the exact flow map, the one-step student improves on its
initialisation, rounds load as flow teachers, runs resume, bad options fail cleanly."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from _resume import interrupt, same_weights
from _exact import SMALL_MLP as NET
from _exact import gmm2
from fewstep.data.gmm import GaussianMixture
from fewstep.errors import UserError
from fewstep.methods import distill
from fewstep.methods.common import quiet_sample
from fewstep.methods.reflow import coupling_straightness, flow_straightness, velocity
from fewstep.metrics import rms, sliced_w2
from fewstep.model import load
from fewstep.process import LinearFlow


def _cfg(**kw):
    return {"net": NET, "steps": 400, "pairs": 2000, "pair_batch": 1000, "lr": 3e-3, "batch_size": 256,
            "device": "cpu", "warmup": 20, "ema_decay": 0.99, "distill_steps": 400, "eval_samples": 500,
            "reflow_nfe": 32, **kw}


@pytest.fixture(scope="module")
def two_rounds(spec, tmp_path_factory):
    """1-rectified flow on (data x noise) of the ring mixture, one reflow, a one-step student."""
    out = tmp_path_factory.mktemp("reflow") / "run"
    return distill("reflow", _cfg(data=spec), str(out), progress=False)


def _noise(n=1000, seed=5):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def _exact_map(z):
    """The exact probability-flow map of the ring from the flow's sigma_max: the 1-rectified
    flow of (data x noise) is the mixture's probability-flow ODE (same marginals in sigma-space)."""
    s = LinearFlow().sigma_max
    return gmm2().flow(s * z.double(), s, 0.0, rtol=1e-7)


def test_straightness_measures_against_closed_forms():
    """Data N(m, I), noise N(0, I): independent couplings leave the residual variance of
    x1 - x0 given x_t, S(t) = d / ((1-t)^2 + t^2); the 1-rectified flow's paths are
    x_t = (1-t) m + r(t) z with r = sqrt((1-t)^2 + t^2), so v - (Z_1 - Z_0) = r'(t) z and
    S(Z) = |z|^2 int_0^1 r'^2 dt = (2 - pi/2) |z|^2; its velocity is -m + (r'/r)(x_t - (1-t) m)."""
    d, gen = 3, torch.Generator().manual_seed(0)
    single = GaussianMixture([1.0], torch.full((1, d), 0.7), torch.eye(d)[None])
    x0 = single.sample(40000, generator=gen)
    x1 = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    closed = d * float((1 / ((1 - t) ** 2 + t**2)).mean())
    assert coupling_straightness(single, x0, x1) == pytest.approx(closed, rel=0.02)
    z = x1[:2000]
    exact = (2 - math.pi / 2) * float(z.pow(2).sum(1).mean())
    assert flow_straightness(single, LinearFlow(), z, steps=256) == pytest.approx(exact, rel=0.01)
    t, r, dr = 0.3, math.sqrt(0.7**2 + 0.3**2), (2 * 0.3 - 1) / math.sqrt(0.7**2 + 0.3**2)
    xt = 0.7 * 0.7 + r * z
    v = velocity(single, xt, torch.full((2000,), t, dtype=torch.float64))
    assert torch.allclose(v, -0.7 + dr / r * (xt - 0.7 * 0.7), atol=1e-7)


def test_reflow_straightens_and_its_one_euler_step_approaches_the_exact_map(two_rounds, spec):
    summary = json.loads(open(f"{two_rounds}/reflow.json").read())
    r1, r2 = summary["rounds"]
    assert (r1["couplings"], r2["couplings"], r1["reference"]) == ("independent", "reflow", "exact")
    # measured: S 3.97 -> 0.0008, S(Z) 1.22 -> 0.0003
    assert r2["straightness"] < 0.02 * r1["straightness"], (r1["straightness"], r2["straightness"])
    assert r2["flow_straightness"] < 0.02 * r1["flow_straightness"]
    # round 1 reaches the exact minimum of eq. 43 for independent couplings (the mixture's own v)
    gen = torch.Generator().manual_seed(8)
    x0 = gmm2().sample(2000, generator=gen).float()
    x1 = torch.randn(x0.shape, generator=gen)
    s_exact = coupling_straightness(gmm2(), x0.double(), x1.double())
    s_net = coupling_straightness(load(f"{two_rounds}/round1").denoiser, x0, x1)
    assert 0.97 * s_exact < s_net < 1.15 * s_exact, (s_net, s_exact)
    # one Euler step (each round's own rule at 1 NFE), checked here against the exact map
    z = _noise()
    ref = _exact_map(z)
    e1, e2 = (rms(load(f"{two_rounds}/round{r}").sample(1000, 1, x=999 * z)[0], ref) for r in (1, 2))
    assert e2 < 0.25 * e1, (e1, e2)  # measured: 1.24 -> 0.17
    assert r2["euler_error"]["1"] < 0.25 * r1["euler_error"]["1"]
    assert r2["euler_sliced_w2"]["1"] < 0.25 * r1["euler_sliced_w2"]["1"]
    assert all(r2["euler_self_error"][k] < r1["euler_self_error"][k] for k in ("1", "2", "4"))


def test_one_step_student_improves_on_its_initialisation(two_rounds):
    student, flow = load(two_rounds), load(f"{two_rounds}/round2")
    z = _noise(seed=6)
    x_T = flow.sigma_max * z
    target = quiet_sample(flow.denoiser, x_T, sampler="dpmpp_2m", nfe=32, grid="time-trailing",
                          sigma_min=flow.sigma_min, sigma_max=flow.sigma_max, process=flow.process)
    init = flow.sample(1000, 1, x=x_T)[0]  # where the student starts: the flow's one Euler step
    err_student, err_init = rms(student.sample(1000, 1, x=x_T)[0], target), rms(init, target)
    assert err_student < 0.5 * err_init, (err_student, err_init)  # measured: 0.024 -> 0.008
    s = json.loads(open(f"{two_rounds}/reflow.json").read())["student"]
    assert s["self_error"] < 0.5 * s["init_self_error"]
    data = gmm2().sample(1000, generator=torch.Generator().manual_seed(3))
    assert sliced_w2(student.sample(1000, 1, seed=1)[0], data) < 0.2
    # other NFE sample the final flow with its own Euler rule
    assert torch.equal(student.sample(100, 4, x=x_T[:100])[0], flow.sample(100, 4, x=x_T[:100])[0])


def test_a_round_is_a_flow_teacher(two_rounds, tmp_path):
    """A round loads as an ordinary flow model for every sampler and teaches a further round."""
    flow = load(f"{two_rounds}/round2")
    meta = json.loads(open(f"{two_rounds}/round2/model.json").read())
    assert (meta["process"]["kind"], meta["prediction"], "denoiser" in meta) == ("flow", "flow", False)
    z = _noise(300, seed=7)
    ode = flow.sample(300, 32, sampler="dpmpp_2m", grid="time-trailing", x=999 * z)[0]
    assert rms(flow.sample(300, 8, sampler="unipc", grid="time-trailing", x=999 * z)[0], ode) < 0.02
    out = distill("reflow", _cfg(teacher=f"{two_rounds}/round2", rounds=1, steps=150, distill_steps=0,
                                 pair_nfe=8), str(tmp_path / "more"), progress=False)
    r = json.loads(open(f"{out}/reflow.json").read())["rounds"][0]
    assert r["couplings"] == "teacher" and r["reference"] == "exact" and "student" not in json.loads(
        open(f"{out}/reflow.json").read())
    pairs = json.loads(open(f"{out}/round1/pairs/pairs.json").read())
    assert (pairs["sampler"], pairs["grid"]) == ("euler", "time-trailing")  # the round's own rule
    assert r["euler_self_error"]["1"] < 0.05 and r["straightness"] < 0.01
    top = json.loads(open(f"{out}/model.json").read())
    assert top["sampling"]["sampler"] == "euler"
    # the run names its own teacher (so `fewstep bench` finds it beside that teacher) and its final round
    assert (top["teacher"], top["flow"]) == (f"{two_rounds}/round2", "round1")
    assert json.loads(open(f"{two_rounds}/model.json").read())["teacher"] is None  # data couplings
    from fewstep.report.bench import discover_students

    moved = Path(two_rounds) / "students" / "more"
    shutil.copytree(out, moved)
    assert str(moved) in [str(Path(p).resolve()) for p in discover_students(f"{two_rounds}/round2")]


def test_interrupted_run_resumes_identically(spec, tmp_path, monkeypatch):
    cfg = _cfg(teacher=spec, steps=60, checkpoint_every=20, pairs=500, pair_batch=250, pair_nfe=8,
               distill_steps=30, eval_samples=200, reflow_nfe=8)
    full = distill("reflow", cfg, str(tmp_path / "full"), progress=False)
    interrupt(monkeypatch, lambda seed, step: seed == 1000 and step == 45,  # round 2 trains with seed + 1000
              lambda: distill("reflow", cfg, str(tmp_path / "cut"), progress=False))
    assert (tmp_path / "cut" / "round1" / "model.json").is_file()
    assert (tmp_path / "cut" / "round2" / "checkpoints").is_dir()
    assert not (tmp_path / "cut" / "round2" / "model.json").exists()
    cut = distill("reflow", {}, str(tmp_path / "cut"), resume=True, progress=False)
    for sub in ("round1", "round2", ""):
        a = load(f"{full}/{sub}").denoiser.net.state_dict()
        b = load(f"{cut}/{sub}").denoiser.net.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    a, b = (json.loads(open(f"{p}/reflow.json").read()) for p in (full, cut))
    assert [r["straightness"] for r in a["rounds"]] == [r["straightness"] for r in b["rounds"]]


@pytest.mark.parametrize("bad, match", [
    ({"couplings": "teacher"}, "needs --teacher"),
    ({"couplings": "ot"}, "use independent or teacher"),
    ({"rounds": 0}, "--rounds must be"),
    ({"reflow_sampler": "nope"}, "sampler"),
    ({"init": "teacher"}, "use auto or random"),
    ({"distill_steps": -1}, "--distill-steps"),
    ({"eval_samples": 1}, "--eval-samples"),
    ({"wobble": 1}, "unknown option"),
])
def test_bad_options_fail_before_any_work(spec, tmp_path, bad, match):
    with pytest.raises(UserError, match=match):
        distill("reflow", {**_cfg(data=spec), **bad}, str(tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()


def test_command_line(spec, two_rounds, tmp_path, capsys):
    from fewstep.cli import main

    for nfe in (1, 2):
        assert main(["sample", two_rounds, "--nfe", str(nfe), "--n", "16", "--out", str(tmp_path / f"s{nfe}.npz")]) == 0
    out = tmp_path / "cli"
    assert main(["distill", "reflow", "--data", spec, "--rounds", "1", "--steps", "3", "--distill-steps", "0",
                 "--net", json.dumps(NET), "--eval-samples", "20", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    assert main(["sample", str(out), "--nfe", "3", "--n", "8", "--out", str(tmp_path / "c.npz")]) == 0
    assert main(["distill", "reflow", "--out", str(tmp_path / "x"), "--quiet"]) == 2  # no data, no teacher
    assert main(["distill", "reflow", "--data", spec, "--pair-batch", "0", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("fewstep distill: error:") for line in err), err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
