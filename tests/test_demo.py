"""``fewstep demo``: teacher, students and samplers in one report (tiny budgets here; the
real ones are measured in docs/BENCHMARKS.md)."""
import json

import pytest

import fewstep.demo as demo
from fewstep.cli import main

TINY = {"knowledge": {"steps": 300, "pairs": 1000},
        "progressive": {"steps": 60, "start_steps": 8, "end_steps": 1},
        "consistency": {"steps": 100, "n": 20, "tune_levels": 0},
        "reflow": {"rounds": 1, "pairs": 1000, "steps": 100, "distill_steps": 100, "reflow_nfe": 8}}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(demo, "DEMO_STUDENTS", TINY)
    mp.setattr(demo, "DEMO_SAMPLERS", ("euler", "dpmpp_2m"))
    mp.setattr(demo, "DEMO_NFE", (1, 2, 4))
    root = tmp_path_factory.mktemp("demo") / "run"
    result = demo.run_demo(str(root), steps=400, progress=False)
    yield root, result
    mp.undo()


def test_demo_distils_four_students_into_one_report(tiny_demo):
    root, result = tiny_demo
    saved = json.loads((root / "metrics.json").read_text())
    one = {r["student"]: r["ode_error"] for r in saved["students"] if r["nfe"] == 1}
    assert set(one) == {"knowledge", "progressive", "consistency", "reflow"}
    for name in TINY:
        assert json.loads((root / "students" / name / "model.json").read_text())["role"] == "student"
    euler1 = next(r["ode_error"] for r in saved["rows"] if r["sampler"] == "euler" and r["nfe"] == 1)
    # Euler at one step returns D(x_T, sigma_max), close to the data mean: its error is about the
    # data's spread; knowledge distillation regresses the teacher's ODE map itself and, even after
    # 300 steps, removes a good part of that (0.5-0.65 of it measured)
    assert one["knowledge"] < 0.85 * euler1
    html = (root / "report" / "report.html").read_text()
    assert result["headline"] and "1-step student" in result["headline"]
    assert result["headline"] in html.replace("&#x27;", "'")
    assert (root / "error_vs_nfe.png").stat().st_size > 0 and (root / "samples.png").stat().st_size > 0


def test_demo_again_reuses_teacher_and_students(tiny_demo, capsys, monkeypatch):
    root, _ = tiny_demo
    monkeypatch.setattr(demo, "DEMO_STUDENTS", TINY)
    monkeypatch.setattr(demo, "DEMO_SAMPLERS", ("euler",))
    monkeypatch.setattr(demo, "DEMO_NFE", (1,))
    demo.run_demo(str(root), steps=400, progress=False, students="knowledge,reflow")
    out = capsys.readouterr().out
    assert "reusing the teacher" in out
    assert "knowledge: reusing" in out and "reflow: reusing" in out
    saved = json.loads((root / "metrics.json").read_text())
    assert {r["student"] for r in saved["students"]} == {"knowledge", "reflow"}


def test_demo_unknown_student_is_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--students", "knowledge,magic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "magic" in err[0] and "knowledge" in err[0]
    assert not (tmp_path / "d").exists()
