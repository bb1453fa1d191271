"""Latent consistency distillation (LCM, Luo et al. 2023) on the exact class-conditional
mixture (tests/_exact.py ``gmm_cond``), whose guided flow ``GaussianMixture.flow(..., labels,
guidance=w)`` is exact.

Truths: the consistency function is the identity at the boundary (c_skip = 1, c_out = 0) and
the net's x0 estimate one level up; the training target is one DDIM step of the guided
teacher D_w = D(null) + w (D(c) - D(null)) at each sample's own w; a student started from a
network teacher is exactly that teacher's x0 estimate at every w; after training, the 1- and
4-step students land near the exact guided flow map from the same noise (far nearer than the
untrained start), and changing the w input moves the samples the way the exact guided flow
moves; bad input is one line, exit 2, nothing written.
"""
import json
import warnings

import pytest
import torch

from _exact import gmm_cond
from fewstep.cli import main
from fewstep.methods import distill
from fewstep.model import load

MLP3 = {"kind": "mlp", "dim": 2, "hidden": 64, "depth": 3, "emb_dim": 32, "num_classes": 3}
LOOP = {"net": MLP3, "batch_size": 256, "lr": 2e-3, "warmup": 20, "ema_decay": 0.99, "device": "cpu",
        "checkpoint_every": 100000, "w_min": 1.0, "w_max": 4.0, "levels": 16, "mu": 0.9, "loss": "l2"}


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _rms(a, b) -> float:
    return float(((a.double() - b.double()) ** 2).sum(1).mean().sqrt())


@pytest.fixture(scope="module")
def run(cspec, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm") / "s"
    distill("lcm", {**LOOP, "teacher": cspec, "steps": 1200}, str(out), progress=False)
    return out


def test_boundary_and_scalings():
    from fewstep.denoiser import ModelDenoiser
    from fewstep.nets import build_net
    from fewstep.process import make_process
    from fewstep.students import LCMDenoiser

    torch.manual_seed(0)
    net = build_net({**MLP3, "use_cond": True})
    for p in net.out.parameters():
        torch.nn.init.normal_(p, std=0.3)
    inner = ModelDenoiser(net, make_process("edm"), "edm")
    f = LCMDenoiser(inner, 0.002, 0.5, 10.0, make_process("vp_cosine"))
    y = torch.randn(64, 2)
    lab = torch.randint(0, 3, (64,))
    w = torch.rand(64) * 3 + 1
    with torch.no_grad():
        assert torch.equal(f(y, torch.full((64,), 0.002), labels=lab, cond=w), y)
        s = torch.full((64,), 0.5)
        c_skip, c_out = f.scalings(s)
        assert float(c_skip[0]) < 1e-4 and abs(float(c_out[0]) - 1) < 1e-4
        assert torch.allclose(f(y, s, labels=lab, cond=w), inner(y, s, labels=lab, cond=w), atol=1e-3)


def test_target_is_one_guided_ddim_step(cspec):
    from fewstep.methods.common import solve_rows
    from fewstep.methods.lcm import InputGuided

    g = gmm_cond()
    gen = torch.Generator().manual_seed(1)
    y = 3.0 * torch.randn(32, 2, generator=gen, dtype=torch.float64)
    lab = g.labels[torch.randint(0, len(g.labels), (32,), generator=gen)]
    w = 1 + 3 * torch.rand(32, generator=gen, dtype=torch.float64)
    s0, s1 = torch.full((32,), 3.0, dtype=torch.float64), torch.full((32,), 2.0, dtype=torch.float64)
    got = solve_rows("euler", InputGuided(g), y, torch.stack([s0, s1], 1), lab, w)
    d_c, d_u = g(y, s0, labels=lab), g(y, s0, labels=torch.full_like(lab, -1))
    d_w = d_u + w[:, None] * (d_c - d_u)
    want = y + (s1 - s0)[:, None] * (y - d_w) / s0[:, None]
    assert torch.allclose(got, want, atol=1e-12)


def test_student_lands_on_the_exact_guided_flow(run, cspec):
    """At w = 1 and w = 3: one step from the same noise lands near the exact guided flow map
    (RMS well inside the data's spread); 1, 2, 4 steps (multistep sampling re-noises, so it
    matches the distribution, not the map) within a fixed bias budget of the exact samples by
    sliced-W2 (the budget above the sampling floor of two exact sets of this size, ~0.13),
    and the one-step student far better than the teacher's own one Euler step."""
    from fewstep.denoiser import CFGDenoiser
    from fewstep.metrics import sliced_w2

    meta = json.loads((run / "model.json").read_text())
    assert meta["method"] == "lcm" and meta["w_input"] == [1.0, 4.0] and meta["denoiser"]["kind"] == "lcm"
    assert "guidance" not in meta and meta["net"]["use_cond"]
    student, g = load(str(run)), gmm_cond()
    n, smax = 2000, float(student.sigma_max)
    gen = torch.Generator().manual_seed(7)
    labels = g.labels[torch.randint(0, len(g.labels), (n,), generator=gen)]
    x_T = smax * torch.randn(n, 2, generator=gen)
    spread = float(g.sample(n, generator=gen).double().std(0).norm())
    for w in (1.0, 3.0):
        exact = g.flow(x_T.double(), smax, 0.0, labels=labels, guidance=w, rtol=1e-6).float()
        one, _ = _quiet(student.sample, n, 1, labels=labels, x=x_T, guidance=w, seed=3)
        assert _rms(one, exact) < 0.25 * spread, (w, _rms(one, exact), spread)
        euler = CFGDenoiser(g, w)(x_T.double(), torch.full((n,), smax, dtype=torch.float64), labels=labels).float()
        assert sliced_w2(one, exact) < 0.5 * sliced_w2(euler, exact)
        for k in (1, 2, 4):
            x, _ = _quiet(student.sample, n, k, labels=labels, x=x_T, guidance=w, seed=3)
            assert sliced_w2(x, exact) < 0.13 + 0.3, (w, k, sliced_w2(x, exact))
    # the w input steers: the student's move from w = 1 to 3 follows the exact flow's move
    e1 = g.flow(x_T.double(), smax, 0.0, labels=labels, guidance=1.0, rtol=1e-6).float()
    e3 = g.flow(x_T.double(), smax, 0.0, labels=labels, guidance=3.0, rtol=1e-6).float()
    a1, _ = _quiet(student.sample, n, 2, labels=labels, x=x_T, guidance=1.0, seed=3)
    a3, _ = _quiet(student.sample, n, 2, labels=labels, x=x_T, guidance=3.0, seed=3)
    move, true_move = (a3 - a1).double(), (e3 - e1).double()
    cos = float((move * true_move).sum() / (move.norm() * true_move.norm()))
    assert cos > 0.7, cos


def test_student_starts_as_its_network_teacher(tmp_path, cspec):
    """From a run-folder teacher (a tiny conditional MLP trained a few steps): the student's
    x0 estimate at the start equals the teacher's at every w (the w embedding starts at 0)."""
    from fewstep.methods.common import data_source
    from fewstep.methods.lcm import build_student
    from fewstep.process import make_process
    from fewstep.train.teacher import train_teacher

    t = train_teacher({"data": cspec, "conditional": True, "steps": 5, "batch_size": 64, "device": "cpu",
                       "net": MLP3, "eval_samples": 16, "eval_nfe": 2}, str(tmp_path / "t"), progress=False,
                      evaluate=False)
    teacher = load(t)
    cfg = {**distill.__globals__["resolve"]("lcm", {**LOOP, "teacher": t})}
    lora, D, net_cfg = build_student(teacher, cfg, data_source(None, teacher), make_process("vp_cosine"))
    assert lora is None
    assert net_cfg["use_cond"] and not teacher.meta["net"].get("use_cond")
    y, lab = torch.randn(16, 2), torch.randint(0, 3, (16,))
    s = torch.full((16,), 1.3)
    with torch.no_grad():
        for w in (1.0, 5.0):
            got = D.inner(y, s, labels=lab, cond=torch.full((16,), w))
            assert torch.allclose(got, teacher.denoiser(y, s, labels=lab), atol=1e-6)


def test_lora_student_trains_adapters_only(tmp_path, cspec):
    """--lora-rank 4: the teacher's weights stay as they were (in its run folder and under the
    adapters), only the adapters and the w embedding move, it starts as the teacher, and it
    loads back and samples."""
    from safetensors.torch import load_file

    from fewstep.train.teacher import train_teacher

    t = train_teacher({"data": cspec, "conditional": True, "steps": 30, "batch_size": 64, "device": "cpu",
                       "net": MLP3, "eval_samples": 16, "eval_nfe": 2}, str(tmp_path / "t"), progress=False,
                      evaluate=False)
    before = load_file(f"{t}/model.safetensors")
    out = tmp_path / "s"
    distill("lcm", {**LOOP, "net": None, "teacher": t, "steps": 40, "lora_rank": 4, "ema_decay": 0.0}, str(out),
            progress=False)
    after = load_file(f"{t}/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((out / "model.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["train"] == ["embed.cond"]
    assert 0 < meta["parameters"]["lora"] < meta["parameters"]["base"]
    student = load_file(str(out / "model.safetensors"))
    for k, v in before.items():  # every base weight is the teacher's, under its adapter or as it was
        name = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        got = student.get(name, student.get(k))
        assert got is not None and torch.equal(got, v), k
    assert any(".lora_B." in k and bool(v.abs().sum() > 0) for k, v in student.items())  # the adapters moved
    model = load(str(out))
    lab = torch.randint(0, 3, (64,))
    x, _ = _quiet(model.sample, 64, 2, labels=lab, guidance=2.0, seed=0)
    assert x.shape == (64, 2) and bool(x.isfinite().all())


@pytest.mark.parametrize("args, words", [
    (["--w-min", "5", "--w-max", "2"], "--w-min"),
    (["--skip", "16", "--levels", "16"], "--skip"),
    (["--guidance", "3"], "w-min"),
])
def test_bad_input_is_one_line(tmp_path, capsys, cspec, args, words):
    out = tmp_path / "s"
    assert main(["distill", "lcm", "--teacher", cspec, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not out.exists()


def test_unconditional_teacher_is_refused(tmp_path, capsys):
    from _exact import gmm2

    spec = tmp_path / "g.npz"
    gmm2().save(spec)
    assert main(["distill", "lcm", "--teacher", f"gmm:{spec}", "--out", str(tmp_path / "s")]) == 2
    assert "unconditional" in capsys.readouterr().err and not (tmp_path / "s").exists()
