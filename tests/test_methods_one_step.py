"""One training step changes the student and nothing else, for every method and mode.

The stage runner's loop is replaced (``fewstep.train.job.fit``) by a probe that, at the
stage under test (the first, unless a case names a later one: then the stages before it
run the real loop), takes the stage's :class:`~fewstep.train.loop.Task` and checks:

* ``draw`` is a function of its generator alone: two draws with generators of the same
  seed are equal whatever the global RNG; another step or seed gives another batch;
* ``loss(model, batch)`` is one finite value per sample of the batch, a deterministic
  function of (model, batch) that trains the ``model`` it is given (a copy of the
  student gets the gradient, the student none);
* backpropagating the mean gives every trainable student parameter a finite gradient, not
  zero in total, and nothing else (frozen, extra, teacher, data) a gradient;
* one AdamW step (no weight decay) moves the student: its parameters with a gradient (those
  with a gradient above 1e-6, at least), no other; every frozen and extra module, every teacher loaded
  by the job, every tensor reachable from ``draw`` and ``loss`` (data, pairs, levels,
  mixtures) and the batch itself are bit-identical to their snapshot; ``after_step`` (a
  consistency target's EMA) touches only the extra modules.
"""
import copy
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import fewstep.model
import fewstep.train.job as job_mod
from fewstep.methods import distill
from fewstep.train.loop import slice_batch, step_generator

NET = {"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16}
NET_C = {**NET, "num_classes": 3}
LOOP = {"steps": 2, "batch_size": 16, "device": "cpu"}
PAIRS = {"pairs": 32, "pair_batch": 32, "pair_nfe": 4}
REFLOW = {**PAIRS, "eval_samples": 16, "reflow_nfe": 4}
CLOUDS = "pointclouds:points=16,classes=sphere+cube,pose=none"
PSF = {"data": CLOUDS, "net": {"kind": "pointnet", "dim": 3, "hidden": 16, "depth": 2, "emb_dim": 16},
       "n_data": 32, "teacher_steps": 2, "reflow_steps": 2, "pairs": 32, "pair_batch": 32, "pair_nfe": 2,
       "eval_clouds": 4, "eval_nfe": 2, "renders": 1}
GUIDED, DROPOUT = {"guidance": 3.0}, {"label_dropout": 0.2}


def _case(id, method, stage=0, folder="", **cfg):
    """A case: ``method`` with ``cfg`` (values "SPEC", "CSPEC", "NETTEACHER" are filled in),
    probed at its ``stage``-th loop call, which must train the run folder ``folder``."""
    return pytest.param(method, cfg, stage, folder, id=id)


def _k(**kw):
    return {"teacher": "SPEC", "net": NET, **PAIRS, **kw}


def _kc(**kw):
    return {"teacher": "CSPEC", "net": NET_C, **PAIRS, **kw}


CASES = [
    # the first (training) stage of every method and mode
    _case("knowledge", "knowledge", **_k()),
    _case("knowledge-latent", "knowledge", **_k(latent_dim=1)),
    _case("progressive", "progressive", folder="rounds/steps_0004", teacher="SPEC", net=NET, start_steps=4),
    _case("consistency-cd", "consistency", teacher="SPEC", net=NET),
    _case("consistency-ict", "consistency", data="SPEC", net=NET, mode="training", schedule="ict"),
    _case("reflow-teacher", "reflow", folder="round1", teacher="SPEC", couplings="teacher", net=NET, **REFLOW),
    _case("reflow-independent", "reflow", folder="round1", data="SPEC", couplings="independent", net=NET, **REFLOW),
    _case("pointcloud", "pointcloud", folder="round1", **PSF),
    # class-conditional exact teacher: guided targets, or a share of null labels
    _case("knowledge-guided", "knowledge", **_kc(**GUIDED)),
    _case("knowledge-dropout", "knowledge", **_kc(**DROPOUT)),
    _case("progressive-guided", "progressive", folder="rounds/steps_0004", teacher="CSPEC", net=NET_C,
          start_steps=4, **GUIDED),
    _case("progressive-dropout", "progressive", folder="rounds/steps_0004", teacher="CSPEC", net=NET_C,
          start_steps=4, **DROPOUT),
    _case("consistency-cd-guided", "consistency", teacher="CSPEC", net=NET_C, **GUIDED),
    _case("consistency-cd-dropout", "consistency", teacher="CSPEC", net=NET_C, **DROPOUT),
    _case("consistency-ict-dropout", "consistency", data="CSPEC", net=NET_C, mode="training", schedule="ict",
          **DROPOUT),
    _case("reflow-teacher-guided", "reflow", folder="round1", teacher="CSPEC", couplings="teacher", net=NET_C,
          **REFLOW, **GUIDED),
    _case("reflow-teacher-dropout", "reflow", folder="round1", teacher="CSPEC", couplings="teacher", net=NET_C,
          **REFLOW, **DROPOUT),
    _case("reflow-independent-dropout", "reflow", folder="round1", data="CSPEC", couplings="independent",
          net=NET_C, **REFLOW, **DROPOUT),
    # later stages, whose teacher is a network (a previous stage's student, frozen)
    _case("progressive-round2", "progressive", stage=1, folder="rounds/steps_0002", teacher="SPEC", net=NET,
          start_steps=4),
    _case("progressive-guided-round2", "progressive", stage=1, folder="rounds/steps_0002", teacher="CSPEC",
          net=NET_C, start_steps=4, **GUIDED),
    _case("reflow-round2", "reflow", stage=1, folder="round2", teacher="SPEC", couplings="teacher", net=NET,
          **REFLOW),
    _case("reflow-student", "reflow", stage=2, folder="student", teacher="SPEC", couplings="teacher", net=NET,
          **REFLOW),
    _case("reflow-guided-student", "reflow", stage=2, folder="student", teacher="CSPEC", couplings="teacher",
          net=NET_C, **REFLOW, **GUIDED),
    _case("pointcloud-reflow", "pointcloud", stage=1, folder="round2", **PSF),
    _case("pointcloud-student", "pointcloud", stage=2, folder="student", **PSF),
    # a trained network teacher (its weights are the student's start where the architecture fits)
    _case("knowledge-net-teacher", "knowledge", teacher="NETTEACHER", net=NET, **PAIRS),
    _case("progressive-net-teacher", "progressive", folder="rounds/steps_0002", teacher="NETTEACHER", net=NET,
          start_steps=4),
    _case("consistency-cd-net-teacher", "consistency", teacher="NETTEACHER", net=NET),
]


class _Stop(Exception):
    """Raised by the probe once the stage under test is checked."""


@pytest.fixture(scope="module")
def net_teacher(tmp_path_factory):
    """A tiny EDM teacher network (two steps of ``fewstep train`` on moons)."""
    from fewstep.train.teacher import train_teacher

    return train_teacher({"data": "moons", "steps": 2, "batch_size": 16, "n_data": 64, "device": "cpu", "net": NET},
                         str(tmp_path_factory.mktemp("teacher") / "run"), progress=False, evaluate=False)


# ------------------------------------------------------------------------------ helpers
def _reachable(roots: dict) -> dict:
    """{path: tensor} of every tensor reachable from ``roots``: closure cells and defaults of
    functions, items of dicts / lists / tuples, attributes of modules and fewstep objects
    (data sources, mixtures, models, denoisers, conditionings)."""
    found, seen = {}, set()

    def walk(obj, path, depth):
        if id(obj) in seen or depth > 12:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[path] = obj
        elif isinstance(obj, types.FunctionType):
            for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
                try:
                    walk(cell.cell_contents, f"{path}.<{name}>", depth + 1)
                except ValueError:  # an empty cell
                    pass
            for i, d in enumerate(obj.__defaults__ or ()):
                walk(d, f"{path}.<default {i}>", depth + 1)
        elif isinstance(obj, types.MethodType):
            walk(obj.__func__, path, depth + 1)
            walk(obj.__self__, f"{path}.__self__", depth + 1)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}[{k!r}]", depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]", depth + 1)
        elif isinstance(obj, nn.Module) or type(obj).__module__.startswith("fewstep"):
            for k, v in getattr(obj, "__dict__", {}).items():
                walk(v, f"{path}.{k}", depth + 1)

    for name, obj in roots.items():
        walk(obj, name, 0)
    return found


def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _clone(tensors: dict) -> dict:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _same(a: dict, b: dict) -> list:
    """Keys of ``a`` whose tensors differ (bit for bit) from ``b``'s."""
    return [k for k in a if not (a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]


def _batches_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor) != isinstance(b[k], torch.Tensor):
            return False
        if isinstance(a[k], torch.Tensor):
            if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


def _probe(task, cfg: dict, loaded: list) -> None:
    """The one-step checks (module docstring) on ``task`` under the stage's loop ``cfg``."""
    student, seed, B = task.student, int(cfg["seed"]), int(cfg["batch_size"])
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert trainable, "the student has no trainable parameter"
    student_state = _clone(student.state_dict(keep_vars=True))
    own = _storages(student.state_dict(keep_vars=True).values())

    # the modules that must not move: frozen, extra, every network teacher the job loaded
    others = {f"frozen[{k}]": m for k, m in task.frozen.items()}
    others.update({f"extra[{k}]": m for k, m in task.extra.items()})
    for i, model in enumerate(loaded):
        if isinstance(model.denoiser, nn.Module):
            others[f"teacher{i}({model.name})"] = model.denoiser
    fixed = {f"{name}.{k}": v for name, m in others.items() for k, v in m.state_dict(keep_vars=True).items()}
    for name, m in others.items():
        assert isinstance(m, nn.Module), f"{name} is not a module"
        shared = _storages(m.state_dict(keep_vars=True).values()) & own
        assert not shared, f"{name} shares tensors with the student"
    # everything the task's functions reach (data, pairs, levels, mixtures, teachers), not the student's own
    reached = _reachable({"draw": task.draw, "loss": task.loss, "after_step": task.after_step,
                          **{f"loaded{i}": m for i, m in enumerate(loaded)}})
    reached = {k: v for k, v in reached.items() if v.untyped_storage().data_ptr() not in own}
    fixed.update({f"reached:{k}": v for k, v in reached.items()})
    snapshot = _clone(fixed)

    # draw: the generator alone decides the batch
    torch.manual_seed(123)
    raw = task.draw(step_generator(seed, 0), 0)
    torch.manual_seed(456)
    again = task.draw(step_generator(seed, 0), 0)
    assert isinstance(raw, dict) and _batches_equal(raw, again), "two draws with the same generator differ"
    assert not _batches_equal(raw, task.draw(step_generator(seed, 1), 1)), "step 1 draws step 0's batch"
    assert not _batches_equal(raw, task.draw(step_generator(seed + 1, 0), 0)), "another seed draws the same batch"
    batch = slice_batch(raw, B, 0, 1, "cpu")
    batch_before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    assert _batches_equal(batch, batch_before)

    # loss(model, batch) trains the model it is given: a copy of the student takes the gradient
    twin = copy.deepcopy(student)
    twin_loss = task.loss(twin, batch)
    twin_loss.mean().backward()
    assert all(p.grad is None for p in student.parameters()), "loss(model, b) puts gradient into task.student"
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in twin.parameters()), \
        "loss(model, b) gives the model it is given no gradient"
    del twin

    # one step
    loss = task.loss(student, batch)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 1 and loss.shape == (B,), \
        f"loss is {type(loss).__name__} {list(getattr(loss, 'shape', []))}, not one value per sample of {B}"
    assert loss.dtype.is_floating_point and loss.requires_grad and bool(torch.isfinite(loss).all()), loss
    assert torch.equal(loss.detach(), twin_loss.detach()), "loss is not a function of (model, batch)"
    loss.mean().backward()
    for n, p in trainable.items():  # (zero where a zero-initialised output layer blocks it, at a fresh start)
        assert p.grad is not None, f"student parameter {n} got no gradient"
        assert bool(torch.isfinite(p.grad).all()), f"student parameter {n} got a non-finite gradient"
    pushed = [n for n, p in trainable.items() if bool(p.grad.abs().sum() > 0)]
    assert pushed, "the student got a zero gradient"
    for k, t in fixed.items():
        assert not t.requires_grad, f"{k} requires grad"
        assert t.grad is None, f"{k} got a gradient"
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    opt.step()
    after = student.state_dict(keep_vars=True)
    moved = [n for n in trainable if not torch.equal(trainable[n].detach(), student_state[n])]
    strong = [n for n in pushed if float(trainable[n].grad.abs().max()) > 1e-6]  # Adam moves these by ~lr
    assert moved and set(strong) <= set(moved) <= set(pushed), (moved, pushed)
    assert not _same({k: v for k, v in after.items() if k not in trainable}, student_state), "a student buffer moved"
    changed = _same(snapshot, fixed)
    assert not changed, f"one step changed what is not the student: {changed}"
    assert _batches_equal(batch, batch_before), "the step changed its batch"
    assert _batches_equal(raw, task.draw(step_generator(seed, 0), 0)), "the step changed what draw draws from"

    # after_step (a consistency target's EMA) moves the extra modules at most
    if task.after_step is not None:
        stepped = _clone(student.state_dict(keep_vars=True))
        task.after_step(student, 0)
        assert not _same(stepped, student.state_dict(keep_vars=True)), "after_step changed the student"
        extra = _storages(t for m in task.extra.values() for t in m.state_dict(keep_vars=True).values())
        changed = [k for k in _same(snapshot, fixed) if fixed[k].untyped_storage().data_ptr() not in extra]
        assert not changed, f"after_step changed what is not an extra module: {changed}"


# -------------------------------------------------------------------------------- test
@pytest.mark.parametrize("method, cfg, stage, folder", CASES)
def test_one_training_step_changes_the_student_and_nothing_else(method, cfg, stage, folder, spec, cspec, request,
                                                                tmp_path, monkeypatch):
    fill = {"SPEC": spec, "CSPEC": cspec}
    if "NETTEACHER" in cfg.values():
        fill["NETTEACHER"] = request.getfixturevalue("net_teacher")
    cfg = {**LOOP, **{k: fill.get(v, v) if isinstance(v, str) else v for k, v in cfg.items()}}
    loaded, runs = [], []
    real_load, real_fit = fewstep.model.load, job_mod.fit

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(model)
        return model

    def fit(task, run, loop_cfg, accelerator=None, progress=True):
        runs.append(Path(run.root))
        if len(runs) <= stage:
            return real_fit(task, run, loop_cfg, accelerator=accelerator, progress=progress)
        _probe(task, loop_cfg, loaded)
        raise _Stop

    monkeypatch.setattr(fewstep.model, "load", load)
    monkeypatch.setattr(job_mod, "fit", fit)
    out = tmp_path / "run"
    with pytest.raises(_Stop):
        distill(method, cfg, str(out), progress=False)
    assert len(runs) == stage + 1 and runs[-1] == (out / folder if folder else out), runs
