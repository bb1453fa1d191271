"""Faults and resume: kill -9 at any moment, then the same command plus --resume finishes
bit-identical to an uninterrupted run (weights and metrics rows); one writer per run folder
(a lock with pid and host, stale locks taken over); a checkpoint pointer may not lead out of
its run folder; a diverging loss keeps the last good checkpoint and ``--resume --lr lower``
goes on from it; options given on resume are checked against the stored run; interrupting
a command without --resume says what was written; a diffusers config names only a
supported model class."""
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _exact import SMALL_MLP
from fewstep.cli import main
from test_cli import run as _run  # main(args) -> (code, out, err)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NET = json.dumps(SMALL_MLP)
LOOP = ["--steps", "60", "--batch-size", "64", "--checkpoint-every", "10", "--log-every", "5", "--device", "cpu",
        "--quiet"]


# ----------------------------------------------------------------------------- helpers
def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tree(root: Path) -> dict:
    """{relative path: sha1} of every file under ``root`` (what a refused command must not change)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _all_rows(run: Path) -> list:
    """Every metrics.jsonl row of the run and of its stages (rounds of a staged method), by path."""
    return [(str(f.relative_to(run)), json.loads(line)) for f in sorted(run.rglob("metrics.jsonl"))
            for line in f.read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _latest_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.fixture(scope="module")
def evcfg(tmp_path_factory):
    """A --config file that keeps the teacher's final evaluation small."""
    p = tmp_path_factory.mktemp("cfg") / "eval.json"
    p.write_text(json.dumps({"eval_samples": 64, "eval_nfe": 4}))
    return str(p)


def _train_args(out, evcfg, *extra):
    return ["train", "--data", "moons", *LOOP, "--seed", "3", "--config", evcfg, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, evcfg):
    """A finished tiny teacher run folder (copy it before changing it) and its command."""
    out = tmp_path_factory.mktemp("fin") / "run"
    args = ["train", "--data", "moons", "--steps", "20", "--batch-size", "64", "--checkpoint-every", "10",
            "--device", "cpu", "--seed", "3", "--config", evcfg, "--quiet", "--out", str(out)]
    assert main(args) == 0
    return out, args


def _copy(finished, tmp_path, name="run"):
    src, args = finished
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst, [a if a != str(src) else str(dst) for a in args]


# ------------------------------------------------- (a) kill -9, then the same command + --resume
def _commands(spec, evcfg, cspec):
    return {
        "train": ["train", "--data", "moons", *LOOP, "--seed", "3", "--config", evcfg],
        "knowledge": ["distill", "knowledge", "--teacher", spec, "--net", NET, *LOOP, "--pairs", "256",
                      "--pair-nfe", "4", "--pair-batch", "64"],
        "consistency": ["distill", "consistency", "--teacher", spec, "--net", NET, *LOOP],
        # staged methods: rounds are run folders of their own inside the top folder
        "progressive": ["distill", "progressive", "--teacher", spec, "--net", NET, *LOOP, "--start-steps", "4"],
        "reflow": ["distill", "reflow", "--teacher", spec, "--net", NET, *LOOP, "--pairs", "256", "--pair-nfe", "4",
                   "--pair-batch", "64", "--reflow-nfe", "4", "--distill-steps", "20", "--eval-samples", "64"],
        # guided: a w-conditioned stage one, then progressive rounds, on the exact conditional mixture
        "guided": ["distill", "guided", "--teacher", cspec, "--net", json.dumps({**SMALL_MLP, "num_classes": 3}), *LOOP,
                   "--start-steps", "4"],
        # PSF: its own teacher, a reflow round and the one-step student, on procedural point clouds
        "pointcloud": ["distill", "pointcloud", "--data", "pointclouds:points=16", "--n-data", "32", *LOOP,
                       "--batch-size", "8", "--teacher-steps", "20", "--reflow-steps", "20", "--pairs", "32",
                       "--pair-nfe", "2", "--pair-batch", "16", "--eval-clouds", "4", "--eval-nfe", "2", "--renders", "1"],
    }


def _pairs_done(run: Path) -> int:
    return len(list((run / "pairs").glob("chunk_*.json"))) if (run / "pairs").is_dir() else 0


def _run_and_kill(cmd, out: Path, until, timeout=120.0):
    """Start ``fewstep CMD --out OUT``; SIGKILL it once ``until(out)`` holds (never, if None).
    Returns (exit code, seconds until the folder appeared, seconds in all)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fewstep", *cmd, "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    appeared = None
    while proc.poll() is None and time.time() - t0 < timeout:
        if appeared is None and (out / "config.json").is_file():
            appeared = time.time() - t0
        if until is not None and until(out, appeared, t0):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, appeared, time.time() - t0, err.decode()


# kill points: after a checkpoint of step >= N, after N pair chunks, or a random delay (fixed seed)
# after the run folder appeared, within the uninterrupted run's duration
KILLS = [("train", "checkpoint", 20), ("train", "random", 1),
         ("knowledge", "pairs", 2), ("knowledge", "random", 2),
         ("consistency", "checkpoint", 30), ("consistency", "random", 3),
         ("progressive", "random", 4), ("progressive", "random", 5), ("reflow", "random", 6), ("reflow", "random", 7),
         ("guided", "random", 8), ("pointcloud", "random", 9)]


@pytest.fixture(scope="module")
def references(tmp_path_factory, spec, evcfg, cspec):
    """Uninterrupted runs of each command: (folder, seconds from folder to exit)."""
    root = tmp_path_factory.mktemp("ref")
    refs = {}
    for name, cmd in _commands(spec, evcfg, cspec).items():
        code, appeared, total, err = _run_and_kill(cmd, root / name, None)
        assert code == 0, err
        refs[name] = (root / name, total - (appeared or 0.0))
    return refs


@pytest.mark.parametrize("name, how, arg", KILLS, ids=[f"{n}-{h}-{a}" for n, h, a in KILLS])
def test_killed_run_resumes_bit_identical(name, how, arg, references, spec, evcfg, cspec, tmp_path):
    cmd = _commands(spec, evcfg, cspec)[name]
    ref, span = references[name]
    out = tmp_path / "cut"
    if how == "checkpoint":
        until = lambda o, appeared, t0: _latest_step(o) >= arg  # noqa: E731
    elif how == "pairs":
        until = lambda o, appeared, t0: _pairs_done(o) >= arg  # noqa: E731
    else:
        delay = random.Random(1000 + arg).uniform(0.0, 0.9 * span)
        until = lambda o, appeared, t0: appeared is not None and time.time() - t0 > appeared + delay  # noqa: E731
    code, _, _, err = _run_and_kill(cmd, out, until)
    assert code in (-signal.SIGKILL, 0), err  # 0: the random delay outlasted the run
    if how != "random":
        assert code == -signal.SIGKILL and not (out / "model.json").exists()  # it really was cut
    done = subprocess.run([sys.executable, "-m", "fewstep", *cmd, "--out", str(out), "--resume"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _same_weights(ref, out)
    assert _all_rows(out) == _all_rows(ref)  # the running loss goes on as if never stopped, no row twice
    assert not (out / ".lock").exists()


# --------------------------------------------------------------------- (b) the run-folder lock
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(run: Path, pid: int, host=None, since=None):
    since = time.time() if since is None else since
    (run / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": since,
                                           "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))}))


@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def test_second_process_on_a_locked_folder_is_refused(finished, tmp_path):
    """A real holder (this process, flock held) and a second process: exit 2, one line, nothing changed."""
    from fewstep.train.lock import RunLock

    run, args = _copy(finished, tmp_path)
    with RunLock.acquire(run):
        before = _tree(run)
        r = subprocess.run([sys.executable, "-m", "fewstep", *args, "--resume"], env=ENV, capture_output=True,
                           text=True, timeout=120)
        line = _one_line(r.stderr)
        assert r.returncode == 2 and f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in line
        assert "wait for it or choose another --out" in line
        assert _tree(run) == before
    assert not (run / ".lock").exists()  # released


@pytest.mark.parametrize("kind", ["live pid", "other host", "same process"])
@pytest.mark.parametrize("resume", [True, False])
def test_locked_folder_gives_one_line_and_exit_2(kind, resume, finished, tmp_path, sleeper, capsys):
    from fewstep.train.lock import RunLock

    run, args = _copy(finished, tmp_path)
    held = None
    if kind == "live pid":
        _write_lock(run, sleeper.pid)
    elif kind == "other host":
        _write_lock(run, 12345, host="elsewhere.example")
    else:
        held = RunLock.acquire(run)
    before = _tree(run)
    try:
        code, _, err = _run(args + (["--resume"] if resume else []), capsys)
    finally:
        if held is not None:
            held.release()
    line = _one_line(err)
    assert code == 2 and "is in use by pid" in line and "choose another --out" in line, line
    if kind == "other host":
        assert "elsewhere.example" in line and ".lock" in line
    if held is None:
        assert _tree(run) == before


@pytest.mark.parametrize("kind", ["dead pid", "reused pid", "garbage"])
def test_stale_lock_is_taken_over_with_a_note(kind, finished, tmp_path, sleeper, capsys):
    run, args = _copy(finished, tmp_path)
    if kind == "dead pid":
        _write_lock(run, _dead_pid())
    elif kind == "reused pid":  # a live process that started long after the lock was taken
        _write_lock(run, sleeper.pid, since=time.time() - 3600)
    else:
        (run / ".lock").write_text("{not json")
    with warnings.catch_warnings(record=True) as seen:  # the note is a UserWarning (stderr on the CLI)
        warnings.simplefilter("always")
        code, _, err = _run(args + ["--resume", "--steps", "30"], capsys)
    assert code == 0, err
    if kind != "garbage":
        assert any("took over the stale lock" in str(w.message) for w in seen), [str(w.message) for w in seen]
    assert not (run / ".lock").exists() and _rows(run)[-1]["step"] == 30


def test_lock_is_released_on_error_and_interrupt(finished, tmp_path, monkeypatch, capsys):
    import fewstep.train.loop as loop

    run, args = _copy(finished, tmp_path)

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "step_generator", stop)
    code, _, err = _run(args + ["--resume", "--steps", "40"], capsys)
    assert code == 130 and not (run / ".lock").exists()
    assert "--resume" in _one_line(err) and "step 20" in err
    monkeypatch.undo()
    before = _tree(run)
    code, _, err = _run(args + ["--resume", "--steps", "10"], capsys)  # below the checkpoint: an error
    assert code == 2 and "below step 20" in _one_line(err) and _tree(run) == before


# ----------------------------------------------------------- (c) latest must stay in its folder
@pytest.mark.parametrize("how", ["pointer", "absolute pointer", "symlinked step"])
def test_latest_outside_the_run_folder_is_refused(how, finished, tmp_path, capsys):
    run, args = _copy(finished, tmp_path, "a")
    other, _ = _copy(finished, tmp_path, "b")
    ck = run / "checkpoints"
    if how == "pointer":
        (ck / "latest").write_text("../../b/checkpoints/step_00000020\n")
    elif how == "absolute pointer":
        (ck / "latest").write_text(str(other / "checkpoints" / "step_00000020") + "\n")
    else:
        (ck / "latest").unlink()
        os.symlink(other / "checkpoints" / "step_00000020", ck / "step_00000099")
    before = _tree(run)
    code, _, err = _run(args + ["--resume", "--steps", "30"], capsys)
    line = _one_line(err)
    assert code == 2 and "outside" in line, line
    assert _tree(run) == before and not (run / ".lock").exists()


# ------------------------------------------------------------------------------ (d) NaN guard
@pytest.mark.parametrize("fault", ["weights", "loss"])
def test_diverged_run_keeps_the_last_good_checkpoint(fault, tmp_path, evcfg, monkeypatch, capsys):
    """The run "diverges" at --lr 1e-2: its weights turn NaN on the 20th update (checkpoint 20 is not
    written), or the loss of step 21 is NaN (checkpoint 20, whose weights gave it, is dropped); then
    the same command plus --resume and a lower --lr goes on from checkpoint 10."""
    import fewstep.train.loop as loop

    real_step, real_slice = torch.optim.AdamW.step, loop.slice_batch
    count = {"updates": 0, "batches": 0}

    def nan_step(self, *a, **k):  # the 20th update leaves NaN weights (what a too high lr does)
        out = real_step(self, *a, **k)
        count["updates"] += 1
        if count["updates"] == 20:
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.fill_(float("nan"))
        return out

    def nan_batch(*a, **k):  # the loss of step 21, from the weights of checkpoint 20, is NaN
        out = real_slice(*a, **k)
        count["batches"] += 1
        if count["batches"] == 21:
            out["x0"] = out["x0"] * float("nan")
        return out

    out = tmp_path / "r"
    args = _train_args(out, evcfg, "--warmup", "30")
    if fault == "weights":
        monkeypatch.setattr(torch.optim.AdamW, "step", nan_step)
    else:
        monkeypatch.setattr(loop, "slice_batch", nan_batch)
    code, _, err = _run(args + ["--lr", "1e-2"], capsys)
    line = _one_line(err)
    assert code == 2 and f"diverged at step {20 if fault == 'weights' else 21} of 60" in line, line
    assert "the last good checkpoint, step 10" in line and "--resume" in line and "--lr" in line, line
    assert _latest_step(out) == 10 and sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000010"]
    monkeypatch.undo()
    code, _, err = _run(args + ["--lr", "1e-3", "--resume"], capsys)  # the advice, followed
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    w = load_file(out / "model.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in w.values())
    assert [r["step"] for r in _rows(out)] == list(range(5, 65, 5))


def test_diverging_before_any_checkpoint_leaves_nothing(tmp_path, capsys):
    code, _, err = _run(["train", "--data", "moons", "--steps", "50", "--lr", "1e30", "--grad-clip", "0",
                         "--warmup", "1", "--out", str(tmp_path / "r"), "--quiet", "--device", "cpu"], capsys)
    line = _one_line(err)
    assert code == 2 and "diverged" in line and "nothing was kept" in line and not (tmp_path / "r").exists()


# --------------------------------------------------- (e) the same command plus --resume, conflicts
def test_same_command_plus_resume_is_accepted(finished, tmp_path, capsys):
    run, args = _copy(finished, tmp_path)
    before = load_file(run / "model.safetensors")
    code, _, err = _run(args + ["--resume"], capsys)
    assert code == 0, err
    after = load_file(run / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("extra, changed", [
    (["--lr", "5e-4"], {"lr": 5e-4}),
    (["--steps", "30", "--log-every", "5", "--checkpoint-every", "5", "--keep-checkpoints", "3"],
     {"steps": 30, "log_every": 5, "checkpoint_every": 5, "keep_checkpoints": 3}),
    (["--warmup", "10", "--grad-clip", "0.5"], {"warmup": 10, "grad_clip": 0.5}),
])
def test_options_safe_on_resume_are_taken_and_recorded(extra, changed, finished, tmp_path, capsys):
    run, args = _copy(finished, tmp_path)
    code, _, err = _run(args + extra + ["--resume"], capsys)
    assert code == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert all(cfg[k] == v for k, v in changed.items()), cfg


@pytest.mark.parametrize("extra, needles", [
    (["--batch-size", "128"], ["--batch-size 128 (stored 64)"]),
    (["--seed", "4", "--process", "vp"], ["--seed 4 (stored 3)", "--process vp (stored edm)"]),
    (["--data", "swiss_roll"], ["--data swiss_roll (stored moons)"]),
    (["--weight-decay", "0.1"], ["--weight-decay 0.1 (stored 0.0)"]),
    (["--ema-decay", "0.9"], ["--ema-decay 0.9 (stored 0.995)"]),
    (["--conditional"], ["--conditional true (stored false)"]),
    (["--config", "{bad}"], ['"weight_decay" in', "0.1 (stored 0.0)"]),  # a config file's key, named so
])
def test_conflicting_options_on_resume_are_named(extra, needles, finished, tmp_path, capsys):
    run, args = _copy(finished, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"weight_decay": 0.1, "eval_samples": 64, "eval_nfe": 4}))
    if "--config" in extra:
        i = args.index("--config")
        args = args[:i] + args[i + 2:]
    extra = [e.format(bad=bad) for e in extra]
    before = _tree(run)
    code, _, err = _run(args + extra + ["--resume"], capsys)
    line = _one_line(err)
    assert code == 2 and line.startswith("fewstep train: error: cannot --resume") and "--lr" in line, line
    assert all(n in line for n in needles), line
    assert _tree(run) == before


def test_distill_resume_takes_the_same_command(spec, tmp_path, capsys):
    out = tmp_path / "kd"
    args = ["distill", "knowledge", "--teacher", spec, "--net", NET, "--steps", "10", "--batch-size", "32",
            "--pairs", "64", "--pair-nfe", "4", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--resume", "--steps", "20", "--lr", "5e-4"]) == 0  # same options + safe changes
    assert json.loads((out / "config.json").read_text())["steps"] == 20
    capsys.readouterr()
    before = _tree(out)
    code, _, err = _run(args + ["--resume", "--pairs", "9", "--batch-size", "16"], capsys)
    line = _one_line(err)
    assert code == 2 and "--pairs 9 (stored 64)" in line and "--batch-size 16 (stored 32)" in line, line
    code, _, err = _run(["distill", "consistency", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "'knowledge' run" in _one_line(err)
    assert _tree(out) == before


# -------------------------------------------- interrupting a command that has no --resume
@pytest.mark.parametrize("command", ["sample", "sample-png", "bench", "schedule"])
def test_interrupting_a_command_without_resume_says_what_was_written(command, gmm_spec, tmp_path, monkeypatch,
                                                                     capsys):
    def stop(*a, **k):
        raise KeyboardInterrupt

    if command == "sample":
        monkeypatch.setattr("fewstep.model.Model.sample", stop)
        args = ["sample", gmm_spec, "--sampler", "euler", "--nfe", "4", "--n", "10", "--out", str(tmp_path / "s.npz")]
    elif command == "sample-png":
        monkeypatch.setattr("fewstep.plots.save_samples_png", stop)
        args = ["sample", gmm_spec, "--sampler", "euler", "--nfe", "4", "--n", "10", "--out", str(tmp_path / "s.npz")]
    elif command == "bench":
        monkeypatch.setattr("fewstep.report.bench.run_bench", stop)
        args = ["bench", "--teacher", gmm_spec, "--out", str(tmp_path / "b")]
    else:
        monkeypatch.setattr("fewstep.schedules.learn", stop)
        args = ["schedule", "--teacher", gmm_spec, "--sampler", "euler", "--nfe", "4", "--out",
                str(tmp_path / "g.json")]
    code, _, err = _run(args, capsys)
    line = _one_line(err)
    assert code == 130 and "interrupted" in line and "--resume" not in line, line
    if command == "sample-png":
        assert "s.npz" in line and (tmp_path / "s.npz").is_file()
    else:
        assert "nothing was written" in line and not any(tmp_path.iterdir()), line


def test_interrupting_train_before_a_checkpoint_keeps_nothing(tmp_path, evcfg, monkeypatch, capsys):
    import fewstep.train.loop as loop

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "step_generator", stop)
    code, _, err = _run(_train_args(tmp_path / "r", evcfg), capsys)
    assert code == 130 and "nothing was kept" in _one_line(err) and not (tmp_path / "r").exists()


# ----------------------------------------------------------- a diffusers config's _class_name
@pytest.mark.parametrize("name", ["DDPMPipeline", "ModelMixin", "os", 7, None])
def test_diffusers_class_name_must_be_a_supported_model(name, tmp_path, capsys):
    pytest.importorskip("diffusers")
    import fewstep
    from fewstep.errors import UserError

    root = tmp_path / "pipe"
    (root / "unet").mkdir(parents=True)
    (root / "scheduler").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": name, "sample_size": 8}))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(UserError, match="not a model class this loader supports; supported: UNet2DModel"):
        fewstep.load(f"diffusers:{root}", device="cpu")
    code, _, err = _run(["sample", f"diffusers:{root}", "--nfe", "2", "--n", "2", "--out",
                         str(tmp_path / "s.npz")], capsys)
    assert code == 2 and "UNet2DModel" in _one_line(err) and not (tmp_path / "s.npz").exists()
