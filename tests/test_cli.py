"""The command line: help everywhere, sampling, and one clear line for every user mistake."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.cli import main


def run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from fewstep.train.teacher import train_teacher

    out = tmp_path_factory.mktemp("t") / "teacher"
    return train_teacher({"data": "moons", "steps": 30, "device": "cpu", "eval_samples": 100, "eval_nfe": 5},
                         str(out), progress=False)


def test_help_for_every_command():
    for cmd in ([], ["train"], ["sample"], ["demo"], ["samplers"]):
        r = subprocess.run([sys.executable, "-m", "fewstep", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: fewstep" in r.stdout


def test_every_command_lives_in_fewstep_commands():
    """cli.py is only the entry point: each command is a module of fewstep.commands, listed
    by `fewstep --help` in the old order (train, sample, demo, samplers first)."""
    from fewstep.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    names = list(sub.choices)
    assert names[:4] == ["train", "sample", "demo", "samplers"]
    assert {"distill", "bench", "schedule", "export"} <= set(names)
    for name, p in sub.choices.items():
        assert p.get_default("func").__module__ == f"fewstep.commands.{name.replace('-', '_')}", name


def test_sample_gmm_writes_npz_and_png(tmp_path, gmm_spec, capsys):
    out = tmp_path / "s.npz"
    code, _, err = run(["sample", gmm_spec, "--sampler", "euler", "--nfe", "8", "--n", "50", "--out", str(out)], capsys)
    assert code == 0, err
    with np.load(out) as f:
        assert f["samples"].shape == (50, 2)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_sample_run_folder_default_sampler(tmp_path, teacher, capsys):
    code, _, err = run(["sample", teacher, "--nfe", "5", "--n", "20", "--out", str(tmp_path / "a.npz")], capsys)
    assert code == 0, err


def test_python_load_matches_cli(tmp_path, teacher, capsys):
    import fewstep.model as fm

    m = fm.load(teacher)
    x, _ = m.sample(20, nfe=5, sampler="euler", seed=3)
    run(["sample", teacher, "--sampler", "euler", "--nfe", "5", "--n", "20", "--seed", "3", "--out", str(tmp_path / "b.npz")], capsys)
    with np.load(tmp_path / "b.npz") as f:
        assert np.allclose(f["samples"], x.numpy())


@pytest.mark.parametrize("args,needle", [
    (["train", "--data", "moonz", "--steps", "5", "--out", "{tmp}/r"], "unknown dataset 'moonz' (did you mean 'moons'?)"),
    (["train", "--data", "moons", "--process", "vq", "--steps", "5", "--out", "{tmp}/r"], "unknown process 'vq'"),
    (["train", "--data", "moons", "--prediction", "epsilon", "--steps", "5", "--out", "{tmp}/r"], "unknown prediction 'epsilon'"),
    (["train", "--data", "{tmp}/missing.npz", "--steps", "5", "--out", "{tmp}/r"], "missing.npz"),
    (["train", "--data", "moons", "--steps", "0", "--out", "{tmp}/r"], "--steps must be a whole number of at least 1, got 0"),
    (["train", "--data", "moons", "--steps", "5", "--config", "{tmp}/nope.json", "--out", "{tmp}/r"], "nope.json not found"),
    (["train", "--resume", "--out", "{tmp}/nothing"], "is not a fewstep run folder"),
    (["sample", "{tmp}/norun", "--nfe", "4", "--out", "{tmp}/x.npz"], "not found"),
    (["sample", "gmm:{tmp}/nogmm.npz", "--nfe", "4", "--out", "{tmp}/x.npz"], "nogmm.npz not found"),
    (["sample", "{gmm}", "--sampler", "eulr", "--nfe", "4", "--out", "{tmp}/x.npz"], "unknown sampler 'eulr'"),
    (["sample", "{gmm}", "--nfe", "4", "--out", "{tmp}/x.txt"], "must be a .npz"),
    (["sample", "{gmm}", "--nfe", "4", "--grid", "{tmp}/g.json", "--out", "{tmp}/x.npz"], "g.json not found"),
    (["sample", "{gmm}", "--nfe", "4", "--grid", "kraras", "--out", "{tmp}/x.npz"], "unknown grid 'kraras'"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, gmm_spec, capsys, args, needle):
    args = [a.format(tmp=tmp_path, gmm=gmm_spec) for a in args]
    code, out, err = run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.npz").exists()


def test_unknown_sampler_lists_valid_names(tmp_path, gmm_spec, capsys):
    code, _, err = run(["sample", gmm_spec, "--sampler", "nope", "--nfe", "4", "--out", str(tmp_path / "x.npz")], capsys)
    assert code == 2 and "euler" in err and "heun" in err


def test_corrupt_weights_and_existing_out(tmp_path, teacher, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(teacher, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = run(["sample", str(bad), "--nfe", "4", "--out", str(tmp_path / "x.npz")], capsys)
    assert code == 2 and "model.safetensors" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["train", "--data", "moons", "--steps", "5", "--out", teacher], capsys)
    assert code == 2 and "exists and is not empty" in err


def test_nan_loss_stops_with_a_clear_line_and_no_folder(tmp_path, capsys):
    code, _, err = run(["train", "--data", "moons", "--steps", "50", "--lr", "1e30", "--grad-clip", "0",
                        "--warmup", "1", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and "diverged" in err and "--lr" in err
    assert not (tmp_path / "r").exists()


def test_samplers_command_lists_registry(capsys):
    code, out, _ = run(["samplers"], capsys)
    assert code == 0 and "euler" in out and "rk45" in out
