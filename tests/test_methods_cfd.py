"""Classifier-based feature distillation (Sun et al. 2022): the KL term, the entropy and
diversity terms against their formulas on tiny cases; progressive's rounds unchanged with the
hook off (and the hook adding exactly its terms); a tiny 8x8-digits run whose one-step student
fewstep.load samples and whose classifier-feature KL to the teacher's two-step targets fell
below its initialisation's; bad input refused in one line."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from _exact import SMALL_MLP
from fewstep.errors import UserError
from fewstep.methods import distill, resolve
from fewstep.methods.cfd import cfd_kl, cfd_loss, classifier_outputs, diversity, entropy
from fewstep.model import load

DIGIT_NET = {"kind": "mlp", "dim": 64, "hidden": 64, "depth": 2, "emb_dim": 32}


def _softmax(v):
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


# --------------------------------------------------------------------------- the terms
def test_kl_is_zero_when_the_distributions_agree_and_the_hand_computed_kl_otherwise():
    t = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.3, -1.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 1.0, 0.5], [2.0, -1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(cfd_kl(t, t, 1.0), torch.zeros(2, dtype=torch.float64))  # logits agree, tau = 1
    assert cfd_kl(t / 0.9, t, 0.9).abs().max() < 1e-15  # the student reached the sharpened target
    for tau in (1.0, 0.9, 2.0):
        got = cfd_kl(s, t, tau)
        for b in range(2):
            p, q = _softmax([v / tau for v in t[b].tolist()]), _softmax(s[b].tolist())
            want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            assert want > 0 and abs(float(got[b]) - want) < 1e-12, (tau, b, float(got[b]), want)
    # tau < 1 sharpens only the teacher: equal logits leave KL(softmax(t/tau) || softmax(t)) > 0
    p, q = _softmax([v / 0.9 for v in t[0].tolist()]), _softmax(t[0].tolist())
    assert abs(float(cfd_kl(t, t, 0.9)[0]) - sum(a * math.log(a / b) for a, b in zip(p, q))) < 1e-12


def test_entropy_and_diversity_are_their_formulas():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 0.5]], dtype=torch.float64)
    P = [_softmax(r) for r in logits.tolist()]
    H = [-sum(p * math.log(p) for p in r) for r in P]
    assert torch.allclose(entropy(logits), torch.tensor(H, dtype=torch.float64), rtol=0, atol=1e-14)
    assert abs(float(entropy(logits)[1]) - math.log(3)) < 1e-14  # uniform: log K
    pbar = [sum(r[k] for r in P) / 3 for k in range(3)]
    assert abs(float(diversity(logits)) - sum(p * math.log(p) for p in pbar)) < 1e-14
    one_hot = torch.tensor([[50.0, 0, 0], [0, 50.0, 0], [0, 0, 50.0]], dtype=torch.float64)
    assert abs(float(diversity(one_hot)) + math.log(3)) < 1e-12  # every class used evenly: its minimum -log K
    assert abs(float(diversity(one_hot[[0, 0, 0]]))) < 1e-12  # one class only: 0, its maximum


def test_cfd_loss_sums_its_terms_and_its_gradient_reaches_only_the_student():
    from fewstep.metrics.features import SmallClassifier

    torch.manual_seed(0)
    clf = SmallClassifier(1, 8, 10).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x_t = torch.rand((6, 1, 8, 8), generator=g) * 2 - 1
    x_s = (x_t + 0.3 * torch.randn(x_t.shape, generator=g)).clamp(-0.99, 0.99).requires_grad_(True)
    loss = cfd_loss(clf, x_s, x_t, 0.9, 0.2, 0.3)
    f_s, l_s = classifier_outputs(clf, x_s)
    f_t, _ = classifier_outputs(clf, x_t)
    want = cfd_kl(f_s, f_t, 0.9) + 0.2 * entropy(l_s) + 0.3 * diversity(l_s)
    assert torch.allclose(loss, want, rtol=1e-6, atol=1e-7)
    assert torch.allclose(f_s, clf.features(x_s), atol=1e-6) and torch.allclose(l_s, clf(x_s), atol=1e-6)
    loss.mean().backward()
    assert x_s.grad is not None and float(x_s.grad.abs().sum()) > 0
    assert all(p.grad is None for p in clf.parameters())
    assert float(cfd_loss(clf, x_t, x_t, 1.0).abs().max()) < 1e-6  # the student on its target: zero
    l_logits = cfd_loss(clf, x_s.detach(), x_t, 1.0, space="logits")
    assert torch.allclose(l_logits, cfd_kl(l_s.detach(), clf(x_t), 1.0), atol=1e-6)


# ------------------------------------------------------------------ progressive's rounds
def _one_round(spec, round_loss=None):
    """progressive's run_rounds on the exact ring teacher, one round (2 student steps, two
    teacher steps each), driven by a stand-in job: (the round's task, its describe)."""
    from fewstep.methods import get
    from fewstep.methods.common import Conditioning, data_source
    from fewstep.process import process_from_config

    P = get("progressive")
    cfg = {**resolve("progressive", {"teacher": spec, "net": SMALL_MLP, "batch_size": 32, "steps": 5}), "seed": 3}
    teacher = load(spec)
    process = process_from_config(cfg["process"])
    base = P.level_grid(process, 4, teacher.sigma_max)
    seen = {}

    def stage(name, plan, **kw):
        seen["plan"] = plan(SimpleNamespace(seconds=1.5))
        return SimpleNamespace(meta={})

    job = SimpleNamespace(cfg=cfg, stage=stage)
    P.run_rounds(job, teacher, [(2, 2)], base, data_source(None, teacher), Conditioning(), process, "v",
                 dict(SMALL_MLP), True, round_loss=round_loss)
    return seen["plan"], teacher, cfg


def test_progressive_rounds_are_unchanged_with_the_hook_off(spec):
    """The loss of run_rounds without the hook is the PD loss w(s) ||x_student - x~||^2 (its
    formula, recomputed here), bit for bit; a hook of pixel weight 1 and no extra term gives the
    same numbers; a hook's extra term and pixel weight enter as said, its meta into model.json."""
    from fewstep.denoiser import ModelDenoiser
    from fewstep.methods.common import bcast, call_denoiser, data_source
    from fewstep.methods.progressive import target
    from fewstep.process import process_from_config
    from fewstep.train.losses import x0_weight

    plan, teacher, cfg = _one_round(spec)
    task = plan.task
    batch = task.draw(torch.Generator().manual_seed(11), 0)
    x0 = batch["x0"]
    y = x0 + bcast(batch["sigma"], x0) * batch["eps"]
    s = batch["sigma"].to(x0.dtype)
    off = task.loss(task.student, batch)
    # the formula, by hand, with the round's student (a fresh v-predicting net: the copy round's)
    Dm = ModelDenoiser(task.student, process_from_config(cfg["process"]), "v", data_source(None, teacher).sigma_data)
    pred = call_denoiser(Dm, task.student, y, s)
    x_tilde = target(teacher.denoiser, y, batch["rows"])
    want = x0_weight("truncated_snr", s.double()).to(x0.dtype) * ((pred - x_tilde) ** 2).flatten(1).mean(1)
    assert torch.equal(off, want)

    plan1, _, _ = _one_round(spec, lambda N, k: (1.0, None, {"note": 1}))
    same = plan1.task.loss(plan1.task.student, batch)
    assert torch.equal(same, off)
    extra = lambda pred, x_tilde, b, sigma: (pred - x_tilde).abs().flatten(1).sum(1)  # noqa: E731
    plan2, _, _ = _one_round(spec, lambda N, k: (0.25, extra, {"cfd": {"x": 1}, "cost": {"classifier_evals": 7}}))
    mixed = plan2.task.loss(plan2.task.student, batch)
    assert torch.allclose(mixed, 0.25 * off + (pred - x_tilde).abs().flatten(1).sum(1), rtol=1e-6, atol=1e-6)
    meta = plan2.describe(plan2.task.student)
    assert meta["cfd"] == {"x": 1} and meta["cost"]["classifier_evals"] == 7 and "teacher_evals" in meta["cost"]
    assert "cfd" not in plan.describe(task.student) and "note" in plan1.describe(plan1.task.student)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A tiny 8x8-digits teacher (an MLP, 300 steps): a few seconds on one CPU thread."""
    from fewstep.train.teacher import train_teacher

    return train_teacher({"data": "digits", "steps": 300, "batch_size": 64, "device": "cpu", "net": DIGIT_NET,
                          "seed": 0}, str(tmp_path_factory.mktemp("cfd") / "teacher"), progress=False, evaluate=False)


def _feature_kl(student_dir, rounds, clf, n=256):
    """Mean CFD KL (tau 1) of a model's x0 prediction at the one-step round's level against the
    two-step DDIM target of that round's teacher (the 2-step round), on fixed digits and noise."""
    from fewstep.methods.common import bcast, data_source
    from fewstep.methods.progressive import target

    m, t = load(student_dir), load(rounds / "steps_0002")
    level = float(load(rounds / "steps_0001").sampling["grids"]["1"][0])
    g = torch.Generator().manual_seed(123)
    x0 = data_source("digits", t).draw(n, g)
    sig = torch.full((n,), level, dtype=torch.float64)
    y = x0 + bcast(sig, x0) * torch.randn(x0.shape, generator=g)
    rows = torch.tensor(t.sampling["grids"]["2"], dtype=torch.float64).expand(n, 3)
    assert abs(float(rows[0, 0]) - level) < 1e-12
    with torch.no_grad():
        x_tilde = target(t.denoiser, y, rows)
        pred = m.denoiser(y, sig.float())
        return float(cfd_loss(clf, pred, x_tilde, 1.0).mean())


def test_cfd_on_digits_trains_a_one_step_student(digits_teacher, tmp_path):
    from fewstep.metrics.features import classifier_for

    out = distill("cfd", {"teacher": digits_teacher, "steps": 150, "start_steps": 4, "batch_size": 64, "lr": 1e-3,
                          "warmup": 10, "ema_decay": 0.9, "device": "cpu", "entropy_weight": 0.01,
                          "diversity_weight": 0.01, "cfd_from": 1}, str(tmp_path / "cfd"), progress=False)
    top = load(out)
    x, _ = top.sample(16, 1, seed=0)
    assert x.shape == (16, 1, 8, 8) and bool(torch.isfinite(x).all())
    meta = json.loads((tmp_path / "cfd" / "model.json").read_text())
    assert [r["student_steps"] for r in meta["rounds"]] == [2, 1]
    assert meta["method"] == "cfd" and meta["cfd"]["cfd_rounds"] == [1]
    assert meta["cfd"]["temperature"] == 0.9 and meta["cfd"]["classifier"]["data"] == "digits"
    r2 = json.loads((tmp_path / "cfd" / "rounds" / "steps_0002" / "model.json").read_text())
    r1 = json.loads((tmp_path / "cfd" / "rounds" / "steps_0001" / "model.json").read_text())
    assert r2["cfd"]["loss"] == "pd" and r2["cost"]["classifier_evals"] == 0  # 2 steps > --cfd-from 1: plain PD
    assert r1["cfd"]["loss"] == "cfd" and r1["cfd"]["entropy_weight"] == 0.01
    assert r1["cost"]["classifier_evals"] == 2 * 150 * 64 == meta["cost"]["classifier_evals"]
    # the one-step round's classifier-feature KL to its teacher's two-step targets fell below
    # that of its start (the 2-step round itself, taken at one step)
    rounds, clf = tmp_path / "cfd" / "rounds", classifier_for("digits")
    trained, start = _feature_kl(rounds / "steps_0001", rounds, clf), _feature_kl(rounds / "steps_0002", rounds, clf)
    assert trained < 0.25 * start, (trained, start)  # measured: 0.040 against 1.15


# ------------------------------------------------------------------------------ bad input
def _one_line(e):
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_a_points_teacher_is_refused(spec, tmp_path):
    with pytest.raises(UserError) as e:
        distill("cfd", {"teacher": spec, "steps": 1, "device": "cpu"}, str(tmp_path / "c"), progress=False)
    assert "image" in _one_line(e) and "cfd" in str(e.value)


@pytest.mark.parametrize("key, value, needle", [
    ("temperature", -0.5, "--temperature"), ("temperature", 0.0, "--temperature"),
    ("entropy_weight", -1.0, "--entropy-weight"), ("diversity_weight", float("nan"), "--diversity-weight"),
    ("pixel_weight", -0.1, "--pixel-weight"), ("cfd_from", 3, "--cfd-from"), ("cfd_space", "pixels", "--cfd-space"),
])
def test_bad_options_are_one_line(key, value, needle):
    with pytest.raises(UserError) as e:
        resolve("cfd", {"teacher": "gmm:x.npz", key: value})
    assert needle in _one_line(e)


def test_no_cfd_round_is_refused():
    with pytest.raises(UserError) as e:
        resolve("cfd", {"teacher": "gmm:x.npz", "end_steps": 2, "cfd_from": 1})
    assert "--cfd-from 1" in _one_line(e)


def test_bad_classifiers_are_one_line(digits_teacher, tmp_path):
    from fewstep.metrics.features import SmallClassifier, save_classifier

    with pytest.raises(UserError) as e:
        distill("cfd", {"teacher": digits_teacher, "steps": 1, "start_steps": 2, "device": "cpu",
                        "classifier": str(tmp_path / "none.safetensors")}, str(tmp_path / "a"), progress=False)
    assert "no such file" in _one_line(e)
    wrong = save_classifier(SmallClassifier(1, 16, 10), tmp_path / "c16.safetensors")
    with pytest.raises(UserError) as e:
        distill("cfd", {"teacher": digits_teacher, "steps": 1, "start_steps": 2, "device": "cpu",
                        "classifier": str(wrong)}, str(tmp_path / "b"), progress=False)
    assert "[1, 16, 16]" in _one_line(e) and "[1, 8, 8]" in str(e.value)
    (tmp_path / "junk.safetensors").write_text("not a classifier")
    with pytest.raises(UserError) as e:
        distill("cfd", {"teacher": digits_teacher, "steps": 1, "start_steps": 2, "device": "cpu",
                        "classifier": str(tmp_path / "junk.safetensors")}, str(tmp_path / "d"), progress=False)
    assert "not a fewstep classifier" in _one_line(e)
