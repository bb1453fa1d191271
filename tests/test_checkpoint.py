"""Tests for fewstep.io (model files), fewstep.train.checkpoint, .ema and .runfolder."""
import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from fewstep import io as fio
from fewstep.errors import UserError
from fewstep.io import load_weights, save_checkpoint
from fewstep.train.checkpoint import latest_checkpoint, load_state, save_state
from fewstep.train.ema import EMA
from fewstep.train.runfolder import RunFolder


def make_model(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.GELU(), nn.BatchNorm1d(16),
                        nn.Linear(16, 4))
    return net


def make_parts(seed):
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ema = EMA(model, decay=lambda k: min(0.9, (1 + k) / (10 + k)))
    return model, opt, ema


def train(model, opt, ema, steps):
    """Uses all RNGs: torch (data, dropout), numpy and python random."""
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 4) + torch.from_numpy(np.random.randn(8, 4)).float()
        loss = (model(x) - x.flip(1)).square().mean() * (1 + random.random())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()


def all_tensors(model, opt, ema):
    out = {f"m.{k}": v for k, v in model.state_dict().items()}
    out.update({f"e.{k}": v for k, v in ema.module.state_dict().items()})
    for pid, st in opt.state_dict()["state"].items():
        out.update({f"o.{pid}.{k}": v for k, v in st.items()})
    return out


def seed_all(s):
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


# ------------------------------------------------------------------ resume is exact
def test_resume_is_bit_identical(tmp_path):
    seed_all(0)
    model, opt, ema = make_parts(0)
    train(model, opt, ema, 5)
    extra = {"epoch": 3, "pos": torch.arange(3), "nested": {1: (0.5, "a")}}
    save_state(tmp_path, 5, {"model": model, "ema": ema}, {"opt": opt}, extra=extra)
    train(model, opt, ema, 5)
    reference = all_tensors(model, opt, ema)

    seed_all(123)  # different init and RNG states: load must restore all of them
    model2, opt2, ema2 = make_parts(1)
    got = load_state(tmp_path, {"model": model2, "ema": ema2}, {"opt": opt2})
    assert got["step"] == 5 and got["epoch"] == 3 and got["nested"] == {1: (0.5, "a")}
    assert torch.equal(got["pos"], torch.arange(3))
    assert ema2.num_updates == 5
    train(model2, opt2, ema2, 5)
    resumed = all_tensors(model2, opt2, ema2)
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_checkpoint_layout_latest_and_keep(tmp_path):
    model, opt, ema = make_parts(0)
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3, 4):
        path = save_state(tmp_path, step, {"model": model}, {"opt": opt}, keep=2)
    assert path == tmp_path / "checkpoints" / "step_00000004"
    assert latest_checkpoint(tmp_path) == path
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000004"]
    assert sorted(os.listdir(path)) == sorted([
        "model.safetensors", "model.json", "opt.optimizer.safetensors",
        "opt.optimizer.json", "state.safetensors", "state.json"])
    # the saved weights load into a fresh model directly
    fresh = make_model(5)
    fresh.load_state_dict(load_weights(path / "model.safetensors"))
    assert torch.equal(fresh[0].weight, model[0].weight)
    # saving the same step again replaces it
    save_state(tmp_path, 4, {"model": model})
    assert latest_checkpoint(tmp_path) == path
    # a stale pointer falls back to the highest complete step
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
    assert latest_checkpoint(tmp_path) == path


def test_no_pickle_files_and_no_temp_files(tmp_path):
    model, opt, ema = make_parts(0)
    train(model, opt, ema, 1)
    save_checkpoint(tmp_path / "w", {"a": torch.ones(2), "b": torch.zeros(3)}, {"x": 1})
    save_state(tmp_path / "run", 1, {"model": model, "ema": ema}, {"opt": opt})
    files = [p for p in tmp_path.rglob("*")]
    assert not [p for p in files if "tmp" in p.name or p.name.startswith(".")]
    assert {p.suffix for p in files if p.is_file()} <= {".safetensors", ".json", ""}
    assert json.loads((tmp_path / "w" / "weights.json").read_text()) == {"x": 1}


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"a": torch.ones(2)}, {"v": 1}, name="w")

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fio.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"a": torch.zeros(2)}, {"v": 2}, name="w")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["w.json", "w.safetensors"]
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["a"], torch.ones(2))


def test_failed_state_save_leaves_previous_checkpoint(tmp_path):
    model, opt, _ = make_parts(0)
    save_state(tmp_path, 1, {"model": model})
    with pytest.raises(TypeError, match="never pickles"):
        save_state(tmp_path, 2, {"model": model}, extra={"bad": object()})
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000001"]


def test_shared_and_view_tensors_are_saved(tmp_path):
    w = torch.randn(4, 4)
    save_checkpoint(tmp_path, {"a": w, "b": w, "row": w[1]}, {})
    got = load_weights(tmp_path / "weights.safetensors")
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w)
    assert torch.equal(got["row"], w[1])


# ------------------------------------------------------------------- user errors
def test_missing_and_corrupt_weights_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="not found.*nope.safetensors"):
        load_weights(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(UserError, match="bad.safetensors"):
        load_weights(bad)
    good = save_checkpoint(tmp_path, {"a": torch.randn(100)}, {}, name="cut")
    good.write_bytes(good.read_bytes()[:-50])  # truncated
    with pytest.raises(UserError, match="cut.safetensors"):
        load_weights(good)


def test_load_state_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_state(tmp_path, {})
    model, opt, _ = make_parts(0)
    ck = save_state(tmp_path, 1, {"model": model}, {"opt": opt})
    with pytest.raises(UserError, match="no weights 'student'"):
        load_state(tmp_path, {"student": model})
    with pytest.raises(UserError, match="do not fit module 'model'"):
        load_state(tmp_path, {"model": nn.Linear(3, 3)})
    (ck / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="model.safetensors"):
        load_state(ck, {"model": model})
    (ck / "state.json").write_text("{ truncated")
    with pytest.raises(UserError, match="state.json"):
        load_state(ck, {})


@pytest.mark.parametrize("part, drop", [("state.json", "rng"), ("state.json", "extra"), ("state.json", "step"),
                                        ("opt.optimizer.json", "state_dict")])
def test_checkpoint_json_without_a_field_is_one_line(tmp_path, part, drop):
    model, opt, _ = make_parts(0)
    ck = save_state(tmp_path, 1, {"model": model}, {"opt": opt})
    meta = json.loads((ck / part).read_text())
    meta.pop(drop)
    (ck / part).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="damaged or incomplete") as e:
        load_state(tmp_path, {"model": model}, {"opt": opt})
    assert "\n" not in str(e.value) and str(ck) in str(e.value)


# --------------------------------------------------------------------------- EMA
def test_ema_update_is_lerp_and_state_round_trips():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.module.weight, 0.9 * start + 0.1 * model.weight)
    assert not ema.module.weight.requires_grad and ema.num_updates == 1
    other = EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.weight, ema.module.weight) and other.num_updates == 1


def test_ema_schedule_and_bad_decay():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=lambda k: 0.0 if k == 0 else 1.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update()  # decay 0: copy
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update()  # decay 1: frozen
    assert torch.all(ema.module.weight == 3.0)
    with pytest.raises(UserError, match="decay"):
        EMA(model, decay=1.5)


# --------------------------------------------------------------------- RunFolder
def test_runfolder_refuses_existing_non_empty(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(UserError, match="not empty; choose another --out"):  # not a run: nothing to resume
        RunFolder.create(tmp_path / "run", {"a": 1})
    RunFolder.create(tmp_path / "old", {"a": 1})
    with pytest.raises(UserError, match="pass --resume to continue it"):  # a run: say how to continue it
        RunFolder.create(tmp_path / "old", {"a": 1})
    with pytest.raises(UserError, match="not a fewstep run folder"):
        RunFolder.create(tmp_path / "run", {"a": 1}, resume=True)
    with pytest.raises(UserError, match="cannot resume"):
        RunFolder.create(tmp_path / "absent", {"a": 1}, resume=True)
    with pytest.raises(UserError, match="not a fewstep run folder"):
        RunFolder.open(tmp_path / "run")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_runfolder_removed_on_error_before_first_checkpoint(tmp_path, exc):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(exc):
        with RunFolder.create(out, {"lr": 0.1}) as run:
            run.log(0, loss=torch.tensor(1.5))
            assert (out / "config.json").is_file()
            raise exc()
    assert not (tmp_path / "a").exists()  # parents it created are gone too
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(exc):
        with RunFolder.create(empty, {"lr": 0.1}):
            raise exc()
    assert empty.is_dir() and not list(empty.iterdir())  # left as it was: empty


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_runfolder_kept_after_checkpoint_and_resumable(tmp_path, exc):
    out = tmp_path / "run"
    model, opt, ema = make_parts(0)
    with pytest.raises(exc):
        with RunFolder.create(out, {"lr": 0.1, "path": tmp_path}) as run:
            assert not run.committed
            for step in (1, 2, 3):
                run.log(step, loss=float(step), lr=np.float32(0.1))
                if step == 2:
                    run.save(step, {"model": model, "ema": ema}, {"opt": opt})
            raise exc()
    assert (out / "config.json").is_file() and latest_checkpoint(out) is not None
    run = RunFolder.create(out, {"lr": 0.5}, resume=True)
    assert run.config == {"lr": 0.1, "path": str(tmp_path)}  # the stored config wins
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]
    extra = run.load({"model": model, "ema": ema}, {"opt": opt})
    assert extra["step"] == 2
    assert [r["step"] for r in run.metrics()] == [1, 2]  # rows after step 2 dropped
    assert run.path("samples/x.png") == out / "samples" / "x.png"
    assert (out / "samples").is_dir()
    assert RunFolder.open(out).config["lr"] == 0.1
