"""Guided distillation (Meng et al. 2022) on the exact class-conditional mixture (3 classes,
tests/_exact.py ``gmm_cond``), whose guided flow ``GaussianMixture.flow(..., labels, guidance=w)``
is exact: stage one learns the guided teacher D_w = D(null) + w (D(c) - D(null)) with w as an
input; stage two halves as progressive distillation does; the w input steers the samples the
way the exact guided flow moves; the paper's stochastic sampler is the algorithm it says; bad
input is one line, exit 2, nothing written; an interrupted run resumes."""
import json
import warnings

import pytest
import torch

from _resume import interrupt, same_weights
from _exact import gmm_cond
from fewstep.cli import main
from fewstep.methods import distill
from fewstep.methods.guided import guided_target
from fewstep.model import guided_stochastic, load

MLP3 = {"kind": "mlp", "dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32, "num_classes": 3}
LOOP = {"net": MLP3, "batch_size": 128, "lr": 2e-3, "warmup": 20, "ema_decay": 0.95, "device": "cpu",
        "checkpoint_every": 10000, "w_min": 1.0, "w_max": 4.0, "start_steps": 4}
N = 1000


def _rms(a, b) -> float:
    return float(((a.double() - b.double()) ** 2).sum(1).mean().sqrt())


@pytest.fixture(scope="module")
def run(cspec, tmp_path_factory):
    """One full run: stage one, then rounds 4 -> 2 -> 1 (a teacher of 4 DDIM steps)."""
    out = tmp_path_factory.mktemp("guided") / "g"
    distill("guided", {**LOOP, "teacher": cspec, "stage1_steps": 700, "steps": 250}, str(out), progress=False)
    return out


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def test_stage_one_learns_the_guided_teacher(run, cspec):
    """Its error to D_w at random levels and w falls over training (the loss log, and against
    its untrained start), and it learned w: it beats the exact conditional D(c), which is D_w
    at w = 1 and ignores w."""
    from fewstep.methods.common import data_source
    from fewstep.methods.guided import build_student
    from fewstep.process import process_from_config

    meta = json.loads((run / "stage1" / "model.json").read_text())
    assert meta["w_input"] == [1.0, 4.0] and meta["net"]["use_cond"] and meta["data"]["num_classes"] == 3
    assert "guidance" not in meta and meta["stage"] == "stage1"
    logged = [json.loads(line)["loss"] for line in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] < 0.2 * logged[0], logged
    s1, teacher, g = load(str(run / "stage1")), load(cspec), gmm_cond()
    gen = torch.Generator().manual_seed(0)
    x0, k = g.sample(2000, generator=gen, return_labels=True)
    lab = g.labels[k]
    sigma = torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(-1.5, 1.5, generator=gen))  # 0.22 .. 4.5
    w = 2.0 + 2.0 * torch.rand(2000, generator=gen)
    y = (x0 + sigma[:, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64)).float()
    s = sigma.float()
    start, _, init = build_student(teacher, {**LOOP, "teacher": cspec, "seed": 0, "prediction": None},
                                   process_from_config("vp_cosine"), data_source(None, teacher), 3)
    assert init == "random"
    with torch.no_grad():
        ref = guided_target(teacher.denoiser, y, s, lab, w)
        err = _rms(s1.denoiser(y, s, labels=lab, cond=w), ref)
        plain = _rms(teacher.denoiser(y, s, labels=lab), ref)
        err0 = _rms(start(y, s, labels=lab, cond=w), ref)
    # measured: 0.18 (student), 2.5 (D(c)), 3.8 (its start)
    assert err < 0.4 * plain and err < 0.15 * err0, (err, plain, err0)


@pytest.mark.parametrize("n_steps", [2, 1])
def test_stage_two_halves_like_progressive_distillation(run, n_steps):
    """The N-step student lands where its teacher's 2N DDIM steps do (same noise, label, w),
    far closer than the teacher at N steps on the student's grid."""
    student = load(str(run / "rounds" / f"steps_{n_steps:04d}"))
    teacher = load(str(run / ("stage1" if n_steps == 2 else "rounds/steps_0002")))
    rule = student.sampling
    assert rule["stochastic"]["nfe"] == 2 * n_steps and len(rule["stochastic"]["grid"]) == 2 * n_steps + 1
    lab = torch.arange(N) % 3
    x_T = student.noise(N, seed=4)
    for w in (1.5, 3.5):
        ref = teacher.sample(N, 2 * n_steps, "euler", x=x_T, labels=lab, guidance=w, grid=rule["stochastic"]["grid"])[0]
        naive = teacher.sample(N, n_steps, "euler", x=x_T, labels=lab, guidance=w, grid=rule["grids"][str(n_steps)])[0]
        got = student.sample(N, n_steps, x=x_T, labels=lab, guidance=w)[0]
        # measured (N = 2, 1; w = 1.5, 3.5): student 0.05-0.09 from its teacher, the teacher at N steps 0.4-2.3
        assert _rms(got, ref) < 0.5 * _rms(naive, ref), (w, _rms(got, ref), _rms(naive, ref))


@pytest.mark.parametrize("nfe", [1, 2])
def test_w_input_moves_samples_as_the_exact_guided_flow(run, nfe):
    """Different w, different samples from the same noise; the sample at w = 4 is closer to
    the exact w = 4 flow of that noise than to the w = 1 flow, and the other way round."""
    top, g = load(str(run)), gmm_cond()
    lab = torch.arange(N) % 3
    x_T = top.noise(N, seed=3)
    flow = {w: g.flow(x_T.double(), top.sigma_max, 0.0, rtol=1e-6, labels=lab, guidance=w) for w in (1.0, 4.0)}
    x = {w: top.sample(N, nfe, x=x_T, labels=lab, guidance=w)[0] for w in (1.0, 4.0)}
    assert _rms(x[1.0], x[4.0]) > 0.5 * _rms(flow[1.0], flow[4.0])
    # measured (w = 4, 1): 0.6, 0.5 to its own w's flow, 1.55, 1.1 to the other's; x1 - x4 1.33, flows 1.34
    assert _rms(x[4.0], flow[4.0]) < 0.7 * _rms(x[4.0], flow[1.0])
    assert _rms(x[1.0], flow[1.0]) < 0.7 * _rms(x[1.0], flow[4.0])


def test_sampling_from_the_command_line(run, tmp_path, capsys):
    import numpy as np

    out = tmp_path / "x.npz"
    assert main(["sample", str(run), "--nfe", "1", "--n", "8", "--label", "1", "--guidance", "3",
                 "--out", str(out)]) == 0
    z = np.load(out)
    assert z["samples"].shape == (8, 2) and set(z["labels"].tolist()) == {1}
    with pytest.warns(UserWarning, match="no --guidance given: sampling at its default w = 2.5"):
        assert main(["sample", str(run), "--nfe", "2", "--n", "8", "--out", str(out)]) == 0
    with pytest.warns(UserWarning, match=r"--guidance 9 lies outside \[1, 4\]"):
        assert main(["sample", str(run), "--nfe", "2", "--n", "8", "--guidance", "9", "--out", str(out)]) == 0
    assert main(["sample", str(run), "--nfe", "4", "--n", "8", "--guidance", "2", "--sampler", "guided_stochastic",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--nfe", "3", "--guidance", "2", "--sampler", "guided_stochastic",
                 "--out", str(tmp_path / "y.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nfe 2 or 4" in err[0] and not (tmp_path / "y.npz").exists()


def test_stochastic_sampler_is_the_papers_algorithm():
    """By hand on the exact conditional mixture, levels 4, 2, 1, 0: from each level a DDIM jump
    of two levels, then fresh noise back up one level (the forward process, std
    sqrt(s_up^2 - s_down^2) in sigma-space); from the last level a plain step to 0; one
    evaluation per level but the last."""
    g = gmm_cond()
    lab = torch.tensor([0, 1, 2, 0])
    y = 4.0 * torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []

    def D(y, sigma, labels=None):
        calls.append(float(sigma[0]))
        return g.denoise(y, sigma, labels)

    got = guided_stochastic(D, y, torch.tensor([4.0, 2.0, 1.0, 0.0]), {"labels": lab}, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    eps = [torch.randn(4, 2, generator=gen, dtype=torch.float64) for _ in range(2)]
    x = g.denoise(y, 4.0, lab)
    y = x + (1.0 / 4.0) * (y - x) + 3.0 ** 0.5 * eps[0]  # 4 -> 1 (DDIM), noise up to 2: sqrt(2^2 - 1^2)
    y = g.denoise(y, 2.0, lab) + 1.0 * eps[1]            # 2 -> 0, noise up to 1
    assert calls == [4.0, 2.0, 1.0] and torch.allclose(got, g.denoise(y, 1.0, lab), atol=1e-12)


def test_stochastic_sampler_with_the_exact_denoiser_samples_the_data():
    """On a fine grid, with the exact D (w = 1), it samples p(x | c) (energy distance to exact
    samples near the estimator's own noise), from any seed."""
    from fewstep.metrics import energy_distance
    from fewstep.methods.progressive import level_grid
    from fewstep.process import process_from_config

    g = gmm_cond()
    grid = level_grid(process_from_config("vp_cosine"), 64, 80.0)
    lab = torch.full((600,), 2)
    x = 80.0 * torch.randn(600, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = guided_stochastic(lambda y, s, labels: g.denoise(y, s, labels), x, grid, {"labels": lab},
                            torch.Generator().manual_seed(1))
    ref = g.conditional(2).sample(600, generator=torch.Generator().manual_seed(2))
    floor = energy_distance(g.conditional(2).sample(600, generator=torch.Generator().manual_seed(3)), ref)
    assert energy_distance(out, ref) < max(3 * floor, 0.02), (energy_distance(out, ref), floor)


def test_students_stochastic_rule_uses_seed_and_w(run):
    top = load(str(run))
    lab = torch.zeros(64, dtype=torch.long)
    a = top.sample(64, 2, "guided_stochastic", seed=0, labels=lab, guidance=2.0)[0]
    b = top.sample(64, 2, "guided_stochastic", seed=0, labels=lab, guidance=2.0)[0]
    c = top.sample(64, 2, "guided_stochastic", seed=1, labels=lab, guidance=2.0)[0]
    d = top.sample(64, 2, "guided_stochastic", seed=0, labels=lab, guidance=4.0)[0]
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)
    assert bool(torch.isfinite(a).all())


# ------------------------------------------------------------------------------ bad input
def _fails(args, capsys, needle):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("extra, needle", [
    (["--w-min", "3", "--w-max", "2"], "above --w-max"),
    (["--w-min", "nan"], "finite"),
    (["--w-max", "inf"], "finite"),
    (["--w-min", "-1"], "0 (unconditional) or more"),
    (["--w-default", "7"], "outside"),
    (["--guidance", "3"], "choose w when sampling"),
    (["--end-steps", "4"], "below --start-steps"),
    (["--stage1-steps", "0"], "stage1-steps"),
])
def test_bad_options_get_one_line_and_write_nothing(extra, needle, cspec, tmp_path, capsys):
    _fails(["distill", "guided", "--teacher", cspec, "--start-steps", "4", *extra, "--out", str(tmp_path / "x")],
           capsys, needle)
    assert not (tmp_path / "x").exists()


def test_an_unconditional_teacher_is_refused(spec, tmp_path, capsys):
    _fails(["distill", "guided", "--teacher", spec, "--out", str(tmp_path / "x")], capsys, "unconditional")
    assert not (tmp_path / "x").exists()


def test_a_guided_student_is_no_teacher(run, tmp_path, capsys):
    _fails(["distill", "guided", "--teacher", str(run / "stage1"), "--out", str(tmp_path / "x")], capsys,
           "guided student already")
    assert not (tmp_path / "x").exists()


def test_a_class_conditional_run_folder_teacher_starts_the_student(tmp_path):
    """A teacher trained by fewstep train (moons, 2 classes, with a null label): the stage-one
    student is its net plus the w input, started from its weights, so that before training it
    is the teacher's D(c) at every w."""
    from fewstep.methods.common import data_source
    from fewstep.methods.guided import build_student
    from fewstep.process import process_from_config
    from fewstep.train.teacher import train_teacher

    net = {"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "num_classes": 2}
    t = train_teacher({"data": "moons", "conditional": True, "steps": 3, "batch_size": 16, "n_data": 64,
                       "device": "cpu", "net": net}, str(tmp_path / "t"), progress=False, evaluate=False)
    teacher = load(t)
    assert teacher.num_classes == 2
    cfg = {"net": None, "seed": 0, "prediction": None}
    D, net_cfg, init = build_student(teacher, cfg, process_from_config("vp_cosine"), data_source(None, teacher), 2)
    assert init == "teacher" and net_cfg == {**teacher.meta["net"], "use_cond": True}
    y, s, lab = torch.randn(8, 2), torch.full((8,), 0.7), torch.tensor([0, 1] * 4)
    with torch.no_grad():
        assert torch.allclose(D(y, s, labels=lab, cond=torch.full((8,), 3.0)), teacher.denoiser(y, s, labels=lab),
                              atol=1e-6)
    out = distill("guided", {"teacher": t, "stage1_steps": 2, "steps": 2, "start_steps": 2, "batch_size": 16,
                             "device": "cpu"}, str(tmp_path / "s"), progress=False)
    top = json.loads((tmp_path / "s" / "model.json").read_text())
    assert top["stage1"]["init"] == "teacher" and top["w_input"] == [1.0, 5.0] and top["method"] == "guided"
    assert _quiet(load(out).sample, 4, 1, labels=torch.tensor([0, 1, 0, 1]))[0].shape == (4, 2)


def test_diffusers_unet_without_a_null_class_is_refused(class_unet_spec, tmp_path, capsys):
    _fails(["distill", "guided", "--teacher", class_unet_spec, "--device", "cpu",
            "--out", str(tmp_path / "x")], capsys, "no null class")
    assert not (tmp_path / "x").exists()


def test_diffusers_unet_with_a_declared_null_class(null_class_unet_specs, tmp_path):
    """fewstep.json {"null_class": 4} on 11 rows: the 10 digit classes around row 4 (each label's
    output equals that row of the same weights loaded without the declaration); guidance
    combines those rows, and guided distillation on digits runs on the teacher."""
    from fewstep.denoiser import CFGDenoiser

    spec, plain_spec = null_class_unet_specs
    teacher, plain = load(spec, device="cpu"), load(plain_spec, device="cpu")
    assert teacher.num_classes == 10 and teacher.meta["null_class"] == 4 and plain.num_classes == 11
    y = 3.0 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = torch.full((4,), 3.0)
    with torch.no_grad():
        got = {c: teacher.denoiser(y, s, labels=torch.full((4,), c)) for c in (-1, 0, 3, 4, 9)}
        for c, row in ((-1, 4), (0, 0), (3, 3), (4, 5), (9, 10)):
            assert torch.equal(got[c], plain.denoiser(y, s, labels=torch.full((4,), row))), c
        assert not torch.allclose(got[0], got[9]) and not torch.allclose(got[0], got[-1])  # the rows are used
        cfg = CFGDenoiser(teacher.denoiser, 3.0)(y, s, labels=torch.full((4,), 9))
        assert torch.allclose(cfg, got[-1] + 3.0 * (got[9] - got[-1]), atol=1e-5)
    out = distill("guided", {"teacher": spec, "stage1_steps": 2, "steps": 2, "start_steps": 2, "batch_size": 4,
                             "device": "cpu", "data": "digits"}, str(tmp_path / "g"), progress=False)
    assert json.loads((tmp_path / "g" / "model.json").read_text())["method"] == "guided"
    assert _quiet(load(out).sample, 2, 1, labels=torch.tensor([0, 9]), guidance=2.0)[0].shape == (2, 1, 8, 8)


@pytest.mark.parametrize("decl", ['{"null_class": 3}', '{"null_class": -1}', '{"null_class": true}', '[1]', "{"])
def test_diffusers_null_class_declaration_checked(class_unet_spec, tmp_path, capsys, decl):
    import shutil

    root = tmp_path / "pipe"
    shutil.copytree(class_unet_spec[len("diffusers:"):], root)
    (root / "fewstep.json").write_text(decl)
    _fails(["sample", f"diffusers:{root}", "--nfe", "2", "--n", "2", "--out", str(tmp_path / "a.npz")], capsys,
           "fewstep.json")
    assert not (tmp_path / "a.npz").exists()


def test_interrupted_run_resumes_identically(cspec, tmp_path, monkeypatch):
    cfg = {**LOOP, "teacher": cspec, "stage1_steps": 20, "steps": 20, "start_steps": 2, "checkpoint_every": 10,
           "batch_size": 32}
    full = distill("guided", cfg, str(tmp_path / "full"), progress=False)
    interrupt(monkeypatch, lambda seed, step: seed == 1000 and step == 15,  # stage two, round 1
              lambda: distill("guided", cfg, str(tmp_path / "cut"), progress=False))
    assert (tmp_path / "cut" / "stage1" / "model.json").is_file()
    assert not (tmp_path / "cut" / "rounds" / "steps_0001" / "model.json").exists()
    cut = distill("guided", {}, str(tmp_path / "cut"), resume=True, progress=False)
    same_weights(full, cut)
