"""bench/guided.py --part digits without training: the held-out reference and floor sets
(balanced, never in the teacher's training digits), the target's verdict (2 points below the
guided teacher's 64-NFE accuracy is still met; non-finite samples miss), and the section
(its own heading, rebuilt from a result, beside part student's section in the same file)."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_guided", ROOT / "bench" / "guided.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_and_floor_are_held_out_and_balanced():
    from fewstep.data.registry import load_dataset

    g = _bench()
    ref, lab, floor, floor_lab, where = g._digits_sets(100)
    assert ref.shape == (100, 1, 8, 8) and torch.equal(lab, torch.arange(100) % 10)
    assert torch.bincount(floor_lab, minlength=10).tolist() == [10] * 10 and "held-out" in where
    full = load_dataset("digits")
    order = torch.randperm(len(full.x), generator=torch.Generator().manual_seed(0))  # the teacher's seeded order
    held = order[g.DIGITS_TRAIN_N:]
    flat = full.x[held].reshape(len(held), -1)
    for x, y in ((ref, lab), (floor, floor_lab)):
        match = (x.reshape(len(x), 1, -1) == flat[None]).all(-1)  # [len(x), held]
        assert bool(match.any(1).all())  # every image is one of the held-out digits ...
        first = match.float().argmax(1)
        assert torch.equal(full.labels[held][first], y)  # ... with its own label
    assert not bool((ref.reshape(100, 1, -1) == floor.reshape(1, 100, -1)).all(-1).any())  # disjoint


def _row(model, nfe, fd, acc, calls=None, passes=None, **extra):
    return {"model": model, "nfe": nfe, "calls": calls or nfe, "passes": passes or nfe, "fd": fd, "accuracy": acc,
            "finite": fd is not None, **extra}


def _case(w, student_acc):
    g = _bench()
    rows = [_row("student", k, 5.0 + k, a) for k, a in zip(g.STUDENT_NFES, student_acc)]
    rows += [_row("student, guided_stochastic", k, 4.0, 0.9) for k in g.STOCH_NFES]
    rows += [_row(f"teacher {s}", k, 9.0, 0.8, k, 2 * k) for s in ("euler (DDIM)", "dpmpp_2m") for k in g.STUDENT_NFES]
    more = [_row(f"teacher {s}", k, 3.0, 0.97, k, 2 * k, sampler=s) for s in ("euler", "dpmpp_2m")
            for k in g.DIGITS_TEACHER_MORE]
    case = {"w": w, "rows": rows, "teacher_more": more}
    case["target"] = g.digits_target(case)
    return case


def test_target_verdict_and_section(tmp_path):
    g = _bench()
    case = _case(4.0, [0.95, 0.949, None, 0.99])  # -2.0 points, -2.1, non-finite, +2.0
    for r in case["rows"]:
        if r["accuracy"] is None:
            r["fd"] = None
    case["target"] = g.digits_target(case)
    assert [t["met"] for t in case["target"]] == [True, False, False, True]
    assert abs(case["target"][0]["points"] + 2.0) < 1e-9 and case["target"][2]["points"] is None
    machine = {"nproc": 2, "cpu": "cpu", "load_average": [1.0, 1.0, 1.0], "torch": "2", "torch_threads": 1,
               "date": "2026-01-01 00:00", "commit": "abc"}
    res = {"part": "digits", "n": 100, "guidance": [1.0, 4.0], "nfes": g.STUDENT_NFES, "points": g.DIGITS_POINTS,
           "reference_sampler": list(g.DIGITS_REF), "train_n": g.DIGITS_TRAIN_N,
           "teacher_budget": g.DIGITS_TEACHER_BUDGET, "student_budget": g.DIGITS_STUDENT_BUDGET,
           "teacher_config": {"process": {"kind": "edm"}, "prediction": "edm", "weighting": "simple", "lr": 2e-3,
                              "warmup": 100, "ema_decay": 0.995},
           "teacher_train_seconds": 1.0, "teacher_how": "kept", "student_train_seconds": 2.0, "student_how": "trained",
           "student_stage1": {"init": "teacher"}, "evaluation_seconds": 3.0, "seconds": 6.0,
           "command": "python bench/guided.py --part digits", "machine": machine,
           "reference": {"source": "held-out: 1000 digits", "n": 100, "floor_n": 100, "floor_per_class": [10] * 10,
                         "classifier": {"val_accuracy": 0.96}},
           "floor": {"fd": 1.5, "accuracy_reference": 1.0, "accuracy_floor_set": 0.99},
           "cases": [_case(1.0, [0.97] * 4), case]}
    text = g.digits_section(res)
    assert text.startswith(g.DIGITS_HEADING + "\n") and text.count("\n## ") == 0
    assert "| 4 | 1 | 95.0% | 6 | 97.0% | 3 | -2.0 | met |" in text
    assert "| 4 | 2 | 94.9% | 7 | 97.0% | 3 | -2.1 | missed |" in text
    assert "| 4 | 4 | non-finite | - | 97.0% | 3 | - | missed |" in text
    assert "| teacher dpmpp_2m | 1 (2), 2 (4), 4 (8), 8 (16) |" in text and "bench/out/guided_digits.json" in text
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\n" + g.STUDENT_HEADING + "\n\nstudent numbers\n\n" + g.DIGITS_HEADING
                   + "\n\nold numbers\n\n## Later\n\nkeep\n")
    g.replace_section(doc, g.DIGITS_HEADING, text)
    out = doc.read_text()
    assert "student numbers" in out and "old numbers" not in out and out.endswith("## Later\n\nkeep\n")
    assert out.count(g.DIGITS_HEADING) == 1
