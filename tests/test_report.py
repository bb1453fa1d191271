"""fewstep bench and the report: results files, Pareto front, report.html (also rendered in
headless Chromium when /usr/bin/chromium exists), the BENCHMARKS.md section generator."""
import csv
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fewstep import GaussianMixture
from fewstep.errors import UserError
from fewstep.report import Results, run_bench, write_report

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]


from _cli import bench_cli  # noqa: E402


@pytest.fixture(scope="module")
def gmm_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    GaussianMixture.ring(8, radius=2.0, std=0.2).save(root / "ring.npz")
    out = root / "out"
    assert bench_cli(["--teacher", f"gmm:{root / 'ring.npz'}", "--samplers", "euler,dpmpp_2m,heun",
                      "--nfe", "1,2,4,8,30,31", "--n", "300", "--nll", "40", "--out", str(out), "--quiet"]) == 0
    return out


def test_bench_writes_every_file_and_sensible_numbers(gmm_bench):
    for name in ("results.json", "results.csv", "pareto.png", "report.html", "samples_euler.png",
                 "samples_reference.png"):
        assert (gmm_bench / name).is_file(), name
    res = Results.load(gmm_bench)
    assert res.primary == "sliced_w2" and res.meta["n"] == 300
    kinds = {r["kind"] for r in res.rows}
    assert kinds == {"data", "reference", "sampler"}
    # the exact flow map is the reference: its own flow error is not reported, the samplers' is
    euler = {r["nfe"]: r for r in res.rows if r["method"] == "euler"}
    assert sorted(euler) == [1, 2, 4, 8, 30, 31]
    errs = [euler[k]["flow_error"] for k in (1, 2, 4, 8)]
    assert errs[-1] < errs[0]
    # heun spends an even number of evaluations on its default grid (or is refused at few): budgets that repeat a
    # cost are not rerun
    heun = [r for r in res.rows if r["method"] == "heun"]
    assert all(r["nfe_used"] <= r["nfe"] for r in heun)
    assert len({r["nfe_used"] for r in heun}) == len(heun)
    assert any(s["method"] == "heun" for s in res.skipped)
    s = res.meta["summary"]
    # NLL through the ODE against the exact log-density (40 held-out points, exact divergence)
    assert s["teacher_nll_bits_per_dim"] == pytest.approx(s["exact_nll_bits_per_dim"], abs=0.01)
    with open(gmm_bench / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res.rows) and "flow_error" in rows[0]


def test_report_html_has_the_table_and_embedded_images(gmm_bench):
    html = (gmm_bench / "report.html").read_text()
    assert '<table id="summary">' in html and '<table id="all">' in html
    for method in ("euler", "dpmpp_2m", "heun"):
        assert f'<td class="name">{method}</td>' in html
    imgs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', html)
    assert len(imgs) == 1 + 4  # Pareto plot, reference, three samplers
    assert "http://" not in html and "https://" not in html  # nothing to fetch


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="headless Chromium not installed (/usr/bin/chromium; Debian package 'chromium')")
def test_report_renders_in_headless_chromium(gmm_bench, tmp_path):
    page = (gmm_bench / "report.html").resolve().as_uri()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    n_img = len(re.findall(r"<img ", dom))
    assert n_img == 5
    assert f'data-images-loaded="{n_img}/{n_img}"' in dom  # every embedded image decoded
    summary = re.search(r'<table id="summary">(.*?)</table>', dom, re.S).group(1)
    assert summary.count("<tr") >= 1 + 3 + 2  # header, three samplers, data and reference rows
    cmd[-2:] = [f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,2000", page]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_results_round_trip_and_pareto_front(tmp_path):
    rows = [
        {"method": "a", "kind": "sampler", "nfe": 1, "nfe_used": 1, "fd": 5.0},
        {"method": "a", "kind": "sampler", "nfe": 2, "nfe_used": 2, "fd": 3.0},
        {"method": "c", "kind": "sampler", "nfe": 1, "nfe_used": 1, "fd": 5.0},  # ties a@1: both on the front
        {"method": "b", "kind": "sampler", "nfe": 2, "nfe_used": 2, "fd": 2.0},
        {"method": "b", "kind": "sampler", "nfe": 4, "nfe_used": 3, "fd": 2.5},  # dominated by b@2
        {"method": "s", "kind": "student", "nfe": 4, "nfe_used": 4, "fd": 1.0},
        {"method": "data", "kind": "data", "nfe": None, "nfe_used": None, "fd": 0.1},
        {"method": "bad", "kind": "sampler", "nfe": 1, "nfe_used": 1, "fd": float("nan")},
    ]
    res = Results({"primary": "fd", "kind": "image"}, rows, [])
    assert [(r["method"], r["nfe_used"]) for r in res.pareto()] == [("a", 1), ("c", 1), ("b", 2), ("s", 4)]
    res.save(tmp_path)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["rows"][-1]["fd"] is None  # strict JSON
    back = Results.load(tmp_path)
    assert back.rows[:-1] == rows[:-1] and back.primary == "fd"
    path = write_report(back, tmp_path, panels={"a": {"NFE 1": torch.zeros(4, 1, 8, 8)}})
    assert 'class="front"' in path.read_text()
    with pytest.raises(UserError, match="not found"):
        Results.load(tmp_path / "nothing")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UserError, match="not a fewstep bench result"):
        Results.load(tmp_path / "x.json")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from fewstep.train.teacher import train_teacher

    root = tmp_path_factory.mktemp("runs")
    teacher = train_teacher({"data": "moons", "steps": 30, "batch_size": 64, "seed": 0, "eval_samples": 64},
                            str(root / "teacher"), progress=False, evaluate=False)
    # a "student": the same network under a student's model.json (what fewstep distill writes)
    student = root / "students" / "copy"
    shutil.copytree(teacher, student)
    meta = json.loads((student / "model.json").read_text())
    meta.update(role="student", method="copy", teacher=str(teacher), default_sampler="euler")
    (student / "model.json").write_text(json.dumps(meta))
    return Path(teacher), student


def test_bench_on_a_trained_teacher_finds_its_students(tiny_teacher, tmp_path):
    teacher, student = tiny_teacher
    out = tmp_path / "b"
    res, path = run_bench(str(teacher), samplers="euler", nfe=[2, 4], out=str(out), n=200, nll_n=20,
                          progress=False)
    methods = {r["method"]: r["kind"] for r in res.rows}
    assert methods.get("euler") == "sampler" and methods.get("copy") == "student"
    assert res.meta["students"] == [str(student)]
    # same network, same noise, euler as its own rule: the student equals the euler rows
    for k in (2, 4):
        a, b = res.row("euler", k), res.row("copy", k)
        assert a["sliced_w2"] == pytest.approx(b["sliced_w2"], rel=1e-6)
    assert any(r["kind"] == "reference" and r["nfe_used"] for r in res.rows)  # rk45, evaluations counted
    assert "teacher_nll_bits_per_dim" in res.meta["summary"]
    assert path.is_file()


def test_bench_user_errors(tiny_teacher, tmp_path):
    teacher, _ = tiny_teacher
    with pytest.raises(UserError, match="unknown sampler"):
        bench_cli(["--teacher", str(teacher), "--samplers", "eulr", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--nfe"):
        bench_cli(["--teacher", str(teacher), "--nfe", "0,2", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--nfe"):
        bench_cli(["--teacher", str(teacher), "--nfe", "a", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="not found"):
        bench_cli(["--teacher", str(teacher), "--students", str(tmp_path / "none"), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="not found"):
        bench_cli(["--teacher", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()  # nothing half-written


def test_benchmarks_md_section_is_replaced_and_the_rest_kept(gmm_bench, tmp_path):
    spec = importlib.util.spec_from_file_location("make_benchmarks_md", ROOT / "bench" / "make_benchmarks_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Samplers\n\nkeep me\n\n" + mod.HEADING + "\n\nold numbers\n\n## Later\n\nme too\n")
    assert mod.main([str(gmm_bench / "results.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old numbers" not in text and "keep me" in text and "## Later\n\nme too" in text
    assert text.count(mod.HEADING) == 1 and "| euler | sampler |" in text and "bits/dim" in text
    assert mod.main([str(gmm_bench / "results.json"), "--doc", str(doc)]) == 0
    assert doc.read_text() == text  # idempotent
    fresh = tmp_path / "new.md"
    assert mod.main([str(gmm_bench), "--doc", str(fresh)]) == 0
    assert fresh.read_text().startswith("# Benchmarks\n\n" + mod.HEADING)


def test_point_cloud_sets_get_the_cloud_metrics():
    from fewstep.report.bench import Evaluator

    g = torch.Generator().manual_seed(0)
    real = torch.randn(20, 32, 3, generator=g)
    notes = []
    ev = Evaluator(real, "points", "clouds", notes)
    m = ev(torch.randn(20, 32, 3, generator=g), flow_ref=torch.zeros(20, 32, 3))
    assert ev.kind == "clouds" and set(m) == {"mmd_cd", "cov_cd", "nna_cd", "flow_error"}
