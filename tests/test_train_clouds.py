"""``fewstep train`` on point clouds: eval.json holds MMD-CD, COV-CD and 1-NNA-CD of the
teacher's samples against reference clouds it did not train on, equal to
cloud_set_metrics on the same clouds; MMD-CD near the data's own floor after training and
far from it before; samples.png renders the clouds."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.data.registry import held_out, load_dataset
from fewstep.metrics.pointcloud import cloud_set_metrics
from fewstep.model import load
from fewstep.train.teacher import train_teacher

DATA = "pointclouds:points=16,classes=sphere+cube,pose=none"
NET = {"kind": "pointnet", "dim": 3, "hidden": 32, "depth": 2, "emb_dim": 32}


def _over(**kw):
    return {"data": DATA, "net": NET, "process": "flow", "prediction": "flow", "n_data": 128, "steps": 300,
            "batch_size": 16, "lr": 3e-3, "warmup": 10, "ema_decay": 0.9, "device": "cpu", "eval_samples": 24,
            "eval_nfe": 8, "checkpoint_every": 300, "seed": 2, **kw}


def test_cloud_teacher_eval_has_set_metrics_that_improve_with_training(tmp_path):
    out = train_teacher(_over(), str(tmp_path / "run"), progress=False)
    ev = json.loads((Path(out) / "eval.json").read_text())
    assert ev["n"] == 24 and ev["reference"] == "fresh" and ev["reference_clouds"] == 24
    # the numbers are cloud_set_metrics of the run's samples against a fresh draw of the data
    x = load(out).sample(24, nfe=8, sampler="euler", seed=3)[0]
    real = load_dataset(DATA, n=24, seed=ev["reference_seed"]).x
    assert not any(torch.equal(real[0], c) for c in load_dataset(DATA, n=128, seed=2).x)  # not training clouds
    want = cloud_set_metrics(x, real)
    for key in ("mmd_cd", "cov_cd", "nna_cd"):
        assert ev[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
    assert (Path(out) / "samples.png").stat().st_size > 5000
    # fidelity near the data's own floor (another fresh draw: 0.18), far from an untrained net's
    # Gaussian-noise clouds. Measured: 0.28 after 300 steps, 1.28 untrained.
    floor = cloud_set_metrics(load_dataset(DATA, n=24, seed=5).x, real)["mmd_cd"]
    base = train_teacher(_over(steps=1, lr=1e-12, warmup=1, checkpoint_every=1), str(tmp_path / "untrained"),
                         progress=False)
    ev0 = json.loads((Path(base) / "eval.json").read_text())
    assert ev["mmd_cd"] < 2.5 * floor and ev0["mmd_cd"] > 5 * floor, (ev["mmd_cd"], ev0["mmd_cd"], floor)


def test_clouds_from_a_file_are_scored_on_clouds_left_out_of_training(tmp_path):
    clouds = load_dataset(DATA, n=40, seed=9)
    np.save(tmp_path / "c.npy", clouds.x.numpy())
    spec = f"clouds:{tmp_path / 'c.npy'}"
    out = train_teacher(_over(data=spec, n_data=30, steps=2, eval_samples=8, checkpoint_every=2),
                        str(tmp_path / "run"), progress=False)
    ev = json.loads((Path(out) / "eval.json").read_text())
    assert ev["reference"] == "held-out" and ev["reference_clouds"] == 8 and {"mmd_cd", "cov_cd", "nna_cd"} <= set(ev)
    train = load_dataset(spec, n=30, seed=2).x
    ref, source = held_out(spec, 8, ev["reference_seed"], 30, 2)
    assert source == "held-out" and len(ref) == 8
    both = torch.cat([train, ref.x])  # together: 38 distinct clouds of the file
    assert len({tuple(c.flatten().tolist()) for c in both}) == 38
    # a file used whole for training is scored on (a part of) its training clouds, and says so
    whole, why = held_out(spec, 8, 0, None, 2)
    assert why == "training" and len(whole) == 8
