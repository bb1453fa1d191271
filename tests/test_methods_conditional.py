"""Conditional teachers through every method: an exact class-conditional mixture (3 classes
of 2-3 components, tests/_exact.py ``gmm_cond``), a class-conditional run folder and a
diffusers UNet with class embeddings are distilled into conditional students; the teacher's
targets use the labels (and the guidance scale asked for); bad labels get one line, exit 2.

Truth: per label, the student's samples are compared with exact samples of p(x | c) by the
energy distance, against the teacher's own Euler at 1 NFE (the cost the student replaces);
the student must land in its class (nearest component of the label's class)."""
import json

import pytest
import torch

from _exact import gmm_cond
from fewstep.cli import main
from fewstep.errors import UserError
from fewstep.methods import distill
from fewstep.metrics import energy_distance
from fewstep.model import load

MLP3 = {"kind": "mlp", "dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32, "num_classes": 3}
LOOP = {"batch_size": 128, "lr": 2e-3, "warmup": 20, "ema_decay": 0.95, "device": "cpu", "checkpoint_every": 1000,
        "net": MLP3}
N = 1500


RUNS = {
    "knowledge": ("knowledge", {"steps": 600, "pairs": 3000, "pair_batch": 1500, "pair_nfe": 16}),
    "progressive": ("progressive", {"steps": 250, "start_steps": 8}),
    "consistency": ("consistency", {"steps": 800, "n": 30}),
    "consistency_training": ("consistency", {"steps": 800, "mode": "training", "schedule": "ict", "teacher": None}),
    "reflow": ("reflow", {"steps": 500, "rounds": 1, "pairs": 3000, "pair_batch": 1500, "pair_nfe": 16,
                          "reflow_nfe": 16, "eval_samples": 200, "distill_steps": 400}),
}


def _class_of_nearest(x: torch.Tensor) -> torch.Tensor:
    g = gmm_cond()
    return g.labels[torch.cdist(x.double(), g.means).argmin(1)]


@pytest.mark.parametrize("name", list(RUNS))
def test_conditional_student_beats_the_teachers_one_step_per_label(name, cspec, tmp_path):
    method, opts = RUNS[name]
    cfg = {**LOOP, "teacher": cspec, **opts}
    if cfg["teacher"] is None:
        cfg["data"] = cspec
    out = distill(method, cfg, str(tmp_path / "s"), progress=False)
    student, teacher, g = load(out), load(cspec), gmm_cond()
    assert student.num_classes == 3 and json.loads((tmp_path / "s" / "model.json").read_text())["data"]["num_classes"] == 3
    for c in range(3):
        lab = torch.full((N,), c)
        x = student.sample(N, 1, labels=lab, seed=11)[0].double()
        ref = g.conditional(c).sample(N, generator=torch.Generator().manual_seed(12))
        e1 = teacher.sample(N, 1, sampler="euler", labels=lab, seed=13, grid="karras")[0]
        assert float((_class_of_nearest(x) == c).double().mean()) > 0.9
        assert energy_distance(x, ref) < 0.5 * energy_distance(e1, ref)


def test_guided_targets_are_the_guided_teachers(cspec, tmp_path):
    """--guidance 3: the student learns D(null) + 3 (D(c) - D(null)): its samples per label are
    distributed as the exact guided flow's (from fresh noise), far from the plain conditional
    p(x | c) (energy distance between the two: 0.23-0.53 here; estimator noise ~1e-3)."""
    cfg = {**LOOP, "teacher": cspec, **RUNS["knowledge"][1], "pair_nfe": 40, "guidance": 3.0}  # guided ODEs are stiffer
    out = distill("knowledge", cfg, str(tmp_path / "g"), progress=False)
    student, g = load(out), gmm_cond()
    assert student.meta["guidance"] == 3.0
    for c in range(3):
        lab = torch.full((N,), c)
        x = student.sample(N, 1, labels=lab, seed=5)[0].double()
        guided = g.flow(student.noise(N, seed=6).double(), student.sigma_max, 0.0, rtol=1e-6, labels=lab,
                        guidance=3.0)
        plain = g.conditional(c).sample(N, generator=torch.Generator().manual_seed(7))
        assert energy_distance(x, guided) < 0.25 * energy_distance(x, plain)
    lab = torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match="distilled at guidance 3"):
        student.sample(4, 1, labels=lab, guidance=2.0)


def test_label_dropout_gives_a_null_branch_for_guidance(cspec, tmp_path):
    cfg = {**LOOP, "teacher": cspec, **RUNS["knowledge"][1], "steps": 50, "label_dropout": 0.2}
    out = distill("knowledge", cfg, str(tmp_path / "d"), progress=False)
    x, lab = load(out).sample(8, 1, labels=torch.zeros(8, dtype=torch.long), guidance=2.0)
    assert x.shape == (8, 2) and torch.isfinite(x).all()
    plain = distill("knowledge", {**cfg, "label_dropout": 0.0, "steps": 2}, str(tmp_path / "p"), progress=False)
    with pytest.raises(UserError, match="no null label|unconditional branch"):
        load(plain).sample(4, 1, labels=torch.zeros(4, dtype=torch.long), guidance=2.0)


def test_conditional_run_folder_teacher(tmp_path):
    """A class-conditional teacher trained by fewstep train (digits, 10 classes) distils into a
    conditional student that samples per label."""
    net = {"kind": "mlp", "dim": 64, "hidden": 64, "depth": 2, "emb_dim": 32, "num_classes": 10}
    conf = tmp_path / "t.json"
    conf.write_text(json.dumps({"net": net}))
    assert main(["train", "--data", "digits", "--conditional", "--steps", "3", "--batch-size", "16", "--quiet",
                 "--device", "cpu", "--config", str(conf), "--out", str(tmp_path / "t")]) == 0
    out = distill("progressive", {"teacher": str(tmp_path / "t"), "steps": 2, "start_steps": 2, "batch_size": 16,
                                  "device": "cpu", "guidance": 2.0}, str(tmp_path / "s"), progress=False)
    st = load(out)
    assert st.num_classes == 10
    assert main(["sample", out, "--nfe", "1", "--n", "4", "--label", "7", "--out", str(tmp_path / "x.npz")]) == 0


def test_diffusers_unet_with_class_labels(class_unet_spec, tmp_path):
    spec = class_unet_spec
    teacher = load(spec, device="cpu")
    assert teacher.num_classes == 3
    out = distill("knowledge", {"teacher": spec, "steps": 2, "pairs": 8, "pair_batch": 8, "pair_nfe": 2,
                                "pair_sampler": "euler", "batch_size": 4, "device": "cpu",
                                "net": {"kind": "mlp", "dim": 64, "hidden": 32, "depth": 1, "emb_dim": 16,
                                        "num_classes": 3}}, str(tmp_path / "s"), progress=False)
    from safetensors.torch import load_file

    labels = load_file(str(tmp_path / "s" / "pairs" / "chunk_00000.safetensors"))["labels"]
    assert labels.shape == (8,) and set(labels.tolist()) <= {0, 1, 2}
    assert load(out).sample(3, 1, labels=torch.tensor([0, 1, 2]))[0].shape == (3, 1, 8, 8)


# ------------------------------------------------------------------------------ bad input
def _fails(args, capsys, needle):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_bad_labels_get_one_line_and_write_nothing(cspec, spec, tmp_path, capsys):
    out = distill("knowledge", {**LOOP, "teacher": cspec, "steps": 2, "pairs": 16, "pair_batch": 16, "pair_nfe": 2},
                  str(tmp_path / "s"), progress=False)
    _fails(["sample", out, "--nfe", "1", "--label", "3", "--out", str(tmp_path / "a.npz")], capsys, "classes 0..2")
    assert not (tmp_path / "a.npz").exists()
    uncond = distill("knowledge", {**LOOP, "net": None, "teacher": spec, "steps": 2, "pairs": 16, "pair_batch": 16,
                                   "pair_nfe": 2}, str(tmp_path / "u"), progress=False)
    _fails(["sample", uncond, "--nfe", "1", "--label", "0", "--out", str(tmp_path / "b.npz")], capsys, "unconditional")
    _fails(["sample", spec, "--nfe", "4", "--guidance", "2", "--out", str(tmp_path / "c.npz")], capsys, "unconditional")
    for extra, needle in ((["--guidance", "3"], "unconditional"), (["--label-dropout", "0.1"], "unconditional")):
        _fails(["distill", "knowledge", "--teacher", spec, "--steps", "2", *extra, "--out", str(tmp_path / "x")],
               capsys, needle)
        assert not (tmp_path / "x").exists()
    _fails(["distill", "knowledge", "--teacher", cspec, "--label-dropout", "1.5", "--out", str(tmp_path / "y")],
           capsys, "label-dropout")
    _fails(["distill", "knowledge", "--teacher", cspec, "--net", json.dumps({**MLP3, "num_classes": 0}),
            "--out", str(tmp_path / "y")], capsys, "num_classes")
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("labels", [[0, 1], [0.0, 1.0, 1.0, 2.0, 2.0, 0.0, 1.0, 2.0], [[0, 1, 2, 0, 1, 2, 0, 1]],
                                    [0, 0, 0, 0, 0, 0, 0, 2]])
def test_gmm_labels_not_one_integer_per_component(labels, tmp_path, capsys):
    import numpy as np

    g = gmm_cond()
    path = tmp_path / "bad.npz"
    np.savez(path, weights=g.weights.numpy(), means=g.means.numpy(), covs=g.covs.numpy(), labels=np.array(labels))
    _fails(["distill", "knowledge", "--teacher", f"gmm:{path}", "--out", str(tmp_path / "z")], capsys, "labels")
    assert not (tmp_path / "z").exists()


def test_data_with_other_classes_than_the_teacher_is_refused(class_unet_spec, tmp_path, capsys):
    # a 3-class teacher and the 10-class digits: labels 3-9 would index past its class rows
    _fails(["distill", "progressive", "--teacher", class_unet_spec, "--data", "digits", "--steps", "1",
            "--start-steps", "2", "--out", str(tmp_path / "k")], capsys, "10 classes")
    assert not (tmp_path / "k").exists()


def test_diffusers_unet_without_a_null_class_refuses_guidance(class_unet_spec, tmp_path, capsys):
    spec = class_unet_spec
    _fails(["sample", spec, "--nfe", "2", "--n", "2", "--label", "1", "--guidance", "2", "--out",
            str(tmp_path / "a.npz")], capsys, "no null class")
    assert not (tmp_path / "a.npz").exists()
    _fails(["distill", "knowledge", "--teacher", spec, "--guidance", "2", "--steps", "1", "--pairs", "4",
            "--pair-batch", "4", "--pair-nfe", "2", "--out", str(tmp_path / "k")], capsys, "no null class")
    assert not (tmp_path / "k").exists()
