"""fewstep bench on class-conditional teachers: one fixed label vector for every method and
the reference, class-conditioned data, per-class rows, --label, --guidance, and the bad
inputs (one line, exit 2, no output folder)."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from _exact import gmm_cond
from fewstep import GaussianMixture
from fewstep.cli import main as fewstep_main
from fewstep.errors import UserError
from fewstep.model import load
from fewstep.report import Results, run_bench
from fewstep.report.bench import bench_labels

N = 200


from _cli import bench_cli  # noqa: E402  (fewstep bench through its own parser)


@pytest.fixture(scope="module")
def cond_spec(cspec):
    return cspec


@pytest.fixture(scope="module")
def cond_bench(cond_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    assert bench_cli(["--teacher", cond_spec, "--samplers", "euler,dpmpp_2m", "--nfe", "1,8,256", "--n", str(N),
                      "--students", "none", "--out", str(out), "--quiet"]) == 0
    return Results.load(out), out


def _flow_errors(res, method="euler", nfe=256):
    return {c: res.row(method, nfe, c)["flow_error"] for c in res.classes()}


def test_per_class_rows_for_every_class_and_method(cond_bench):
    res, out = cond_bench
    C = gmm_cond().num_classes
    assert res.classes() == list(range(C))
    cl = res.meta["classes"]
    assert cl["num_classes"] == C and sum(cl["counts"]) == N and min(cl["counts"]) > 20
    # the labels follow the mixture's class prior (weights 6 : 4 : 3.5 of 13.5)
    assert cl["counts"] == torch.bincount(bench_labels(load(res.meta["teacher"]), res.meta["teacher"], N, 0)[0],
                                          minlength=C).tolist()
    methods = ["data (held-out)", "exact flow", "euler", "dpmpp_2m"]
    for m in methods:
        for k in ([None] if m in methods[:2] else [1, 8, 256]):
            overall = res.row(m, k)
            assert overall is not None and overall["class"] is None, (m, k)
            for c in range(C):
                r = res.row(m, k, c)
                assert r is not None and r["kind"] == overall["kind"] and r["sliced_w2"] >= 0, (m, k, c)
                if m not in methods[:2]:
                    assert "flow_error" in r
    # grouped: each overall row is followed by its class rows
    for i, r in enumerate(res.rows):
        if r["class"] is None:
            assert [q["class"] for q in res.rows[i + 1:i + 1 + C]] == list(range(C))
            assert all(q["method"] == r["method"] and q["nfe"] == r["nfe"] for q in res.rows[i + 1:i + 1 + C])
    # the overall views see the overall rows only
    assert all(r["class"] is None for r in res.pareto()) and all(r["class"] is None for r in res.overall().rows)
    html = (out / "report.html").read_text()
    assert '<table class="classes" id="classes-sliced_w2">' in html and "flow error per class" in html
    assert html.count('<tr class="sub') >= 2 * C * 3 * 2  # class rows in the per-class and full tables
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].split(",")[:5] == ["method", "kind", "nfe", "nfe_used", "class"] and len(csv) == 1 + len(res.rows)


def test_euler_matches_the_class_conditional_reference(cond_bench):
    res, _ = cond_bench
    errs = _flow_errors(res)
    assert max(errs.values()) < 0.03, errs  # euler at 256 steps against the exact conditional flow
    e8 = _flow_errors(res, "euler", 8)
    assert all(e8[c] > errs[c] for c in errs)  # and converging
    # the data sets are p(x | c) per label: a class's data matches the class's reference, not another class's
    for c in res.classes():
        assert res.row("data (held-out)", None, c)["sliced_w2"] < 1.0  # another class's data: about 3


def test_the_reference_really_uses_the_labels(cond_spec, tmp_path):
    model = load(cond_spec)
    n = 100
    labels, _ = bench_labels(model, cond_spec, n, 0)
    wrong = (labels + 1) % model.num_classes
    res, _ = run_bench(cond_spec, samplers="euler", students="none", nfe=[256], n=n, out=str(tmp_path / "o"),
                       progress=False, reference_labels=wrong)
    errs = _flow_errors(res)
    assert min(errs.values()) > 1.0, errs  # samples of class c against the flow of class c + 1


def test_label_restricts_to_one_class(cond_spec, tmp_path):
    out = tmp_path / "one"
    assert bench_cli(["--teacher", cond_spec, "--samplers", "euler", "--nfe", "256", "--n", "100", "--label", "1",
                      "--students", "none", "--out", str(out), "--quiet"]) == 0
    res = Results.load(out)
    assert res.classes() == [1] and res.meta["classes"]["counts"] == [0, 100, 0] and res.meta["label"] == 1
    assert res.row("euler", 256)["flow_error"] < 0.03
    assert res.row("euler", 256, 1)["flow_error"] == pytest.approx(res.row("euler", 256)["flow_error"])


def test_guidance_uses_the_exact_guided_flow(cond_spec, tmp_path):
    res, _ = run_bench(cond_spec, samplers="euler", students="none", nfe=[256], n=100, out=str(tmp_path / "g"),
                       progress=False, guidance=3.0)
    assert res.meta["guidance"] == 3.0
    assert any(r["method"] == "exact flow (guidance 3)" for r in res.rows)
    errs = _flow_errors(res)
    assert max(errs.values()) < 0.03, errs  # CFG euler against the exact guided flow, per class
    # each class row compares the class's samples with the class's (guided) data, as the reference's does
    for c in res.classes():
        assert res.row("euler", 256, c)["sliced_w2"] == pytest.approx(
            res.row("exact flow (guidance 3)", None, c)["sliced_w2"], abs=0.03)
    assert any("exact guided flow" in t for t in res.meta["notes"])
    # the guided reference is not the conditional flow of the same noise and labels
    labels, _ = bench_labels(load(cond_spec), cond_spec, 100, 0)
    eps = torch.randn((100, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = gmm_cond().flow(80.0 * eps, 80.0, 0.0, rtol=1e-6, labels=labels)
    guided = res.samples["reference"]["exact flow (guidance 3)"]
    assert float(((guided - plain) ** 2).mean().sqrt()) > 0.3


@pytest.mark.parametrize("extra, match", [
    (["--label", "3"], r"--label 3: teacher .* has classes 0\.\.2"),
    (["--label", "-1"], r"--label -1: teacher .* has classes 0\.\.2"),
    (["--guidance", "nan"], "finite"),
])
def test_bad_class_options_on_a_conditional_teacher(cond_spec, tmp_path, capsys, extra, match):
    out = tmp_path / "bad"
    rc = fewstep_main(["bench", "--teacher", cond_spec, "--samplers", "euler", "--nfe", "1", "--n", "50",
                       "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(match, err), err
    assert not out.exists()


@pytest.mark.parametrize("extra, match", [
    (["--label", "0"], "unconditional; it takes no --label"),
    (["--guidance", "2"], "unconditional; --guidance needs a class-conditional teacher"),
    (["--guidance", "nan"], "finite"),
])
def test_bad_class_options_on_an_unconditional_teacher(tmp_path, capsys, extra, match):
    GaussianMixture.ring(4).save(tmp_path / "ring.npz")
    out = tmp_path / "bad"
    rc = fewstep_main(["bench", "--teacher", f"gmm:{tmp_path / 'ring.npz'}", "--samplers", "euler", "--nfe", "1",
                       "--n", "50", "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def cond_teacher(tmp_path_factory):
    """A tiny class-conditional teacher on moons (2 classes) and a 'student' copy of it
    whose model.json says it was distilled at guidance 3."""
    from fewstep.train.teacher import train_teacher

    root = tmp_path_factory.mktemp("condruns")
    teacher = train_teacher({"data": "moons", "conditional": True, "steps": 30, "batch_size": 64, "seed": 0,
                             "eval_samples": 64}, str(root / "teacher"), progress=False, evaluate=False)
    student = root / "students" / "copy"
    shutil.copytree(teacher, student)
    meta = json.loads((student / "model.json").read_text())
    meta.update(role="student", method="copy", teacher=str(teacher), default_sampler="euler", guidance=3.0)
    (student / "model.json").write_text(json.dumps(meta))
    return Path(teacher), student


def test_trained_conditional_teacher_and_a_student_at_another_guidance(cond_teacher, tmp_path):
    teacher, student = cond_teacher
    res, _ = run_bench(str(teacher), samplers="euler", nfe=[4], n=200, out=str(tmp_path / "a"), progress=False)
    assert res.classes() == [0, 1] and res.meta["data"] == "moons"
    assert sum(res.meta["classes"]["counts"]) == 200
    assert res.meta["classes"]["labels"].endswith("uniformly over the classes")
    assert res.row("teacher ODE (rk45, tol 1e-05)", None, 0) is not None  # the reference, per class
    assert res.row("euler", 4, 1)["flow_error"] >= 0
    # distilled at guidance 3, benched without guidance (w = 1): skipped with a note, not scored
    assert res.row("copy", 4) is None
    assert any(s["method"] == "copy" and "guidance 3" in s["reason"] for s in res.skipped)
    # at its own guidance it is run, on the same labels, like the teacher's guided euler
    res3, _ = run_bench(str(teacher), samplers="euler", nfe=[4], n=200, out=str(tmp_path / "b"), progress=False,
                        guidance=3.0, reference=False)
    assert res3.row("copy", 4) is not None and res3.row("copy", 4, 0) is not None
    assert any("NOT the guided distribution" in t for t in res3.meta["notes"])
    with pytest.raises(UserError, match="has classes 0..1"):
        run_bench(str(teacher), samplers="euler", nfe=[4], n=50, out=str(tmp_path / "c"), progress=False, label=2)
    assert not (tmp_path / "c").exists()


def test_labelled_data_sets_follow_the_labels_and_shrink_to_fit():
    """A finite labelled set (digits: about 180 per class) with more labels of a class than
    it holds twice over: n shrinks, keeping the first labels; A[i] and B[i] have class labels[i]."""
    from types import SimpleNamespace

    from fewstep.data.registry import load_dataset
    from fewstep.report.bench import conditional_sets

    teacher = SimpleNamespace(num_classes=10, shape=(1, 8, 8), meta={}, kind="image")
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    notes = []
    a, b, dspec, lab = conditional_sets(teacher, "run", labels, 0, data="digits", notes=notes)
    assert dspec == "digits" and 10 <= len(lab) < 1000 and torch.equal(lab, labels[:len(lab)])
    assert a.shape == b.shape == (len(lab), 1, 8, 8) and any("n reduced" in t for t in notes)
    ds = load_dataset("digits")
    flat = ds.x.reshape(len(ds.x), -1)
    for x in (a, b):
        hit = (x.reshape(len(x), 1, -1) == flat[None]).all(-1)  # [m, N]: which digit each sample is
        assert bool(hit.any(1).all())
        assert all(int(lab[i]) in ds.labels[hit[i]].tolist() for i in range(len(x)))
    assert not (a.reshape(len(a), -1)[:, None] == b.reshape(len(b), -1)[None]).all(-1).any()  # disjoint
