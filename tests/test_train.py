"""Teacher training: quality improves, every (process, prediction) trains, resume is exact."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.data.gmm import GaussianMixture
from fewstep.denoiser import ModelDenoiser
from fewstep.metrics import sliced_w2
from fewstep.model import load
from fewstep.process import EDM, VE, VP, LinearFlow
from fewstep.train.losses import WEIGHTINGS, DenoisingLoss
from fewstep.train.teacher import train_teacher


def test_moons_teacher_beats_untrained(tmp_path):
    """About a minute on 2 cores: sliced-W2 (100-step ODE) well below an untrained net's.

    Measured: 1500 steps give 0.05-0.08 (data-to-data floor at n=2000 is about 0.03);
    an untrained net gives about 0.9. The threshold 0.2 leaves room for thread noise."""
    out = train_teacher({"data": "moons", "steps": 1500, "seed": 0, "device": "cpu", "eval_samples": 2000},
                        str(tmp_path / "run"), progress=False)
    trained = json.loads((Path(out) / "eval.json").read_text())["sliced_w2"]
    untrained_dir = train_teacher({"data": "moons", "steps": 1, "lr": 1e-12, "warmup": 1, "seed": 0,
                                   "device": "cpu"}, str(tmp_path / "untrained"), progress=False)
    untrained = json.loads((Path(untrained_dir) / "eval.json").read_text())["sliced_w2"]
    assert trained < 0.2 and untrained > 0.5, (trained, untrained)


@pytest.mark.parametrize("process,prediction", [("vp", "eps"), ("vp_cosine", "v"), ("ve", "edm"), ("flow", "flow"),
                                                ("edm", "x0"), ("vp_discrete", "eps"), ("vp", "score")])
def test_every_process_and_prediction_trains(tmp_path, process, prediction):
    """Trained on samples of a Gaussian mixture, the denoiser moves toward the exact one:
    its distance to the exact denoiser over sigma in [0.05, 5] falls well below the
    initial net's."""
    import numpy as np

    from fewstep.data.registry import load_dataset
    from fewstep.train.config import resolve
    from fewstep.train.teacher import build_teacher

    gmm = GaussianMixture.ring(8, radius=1.5, std=0.2)
    np.save(tmp_path / "gmm.npy", gmm.sample(20000, generator=torch.Generator().manual_seed(0)).float().numpy())
    over = {"data": str(tmp_path / "gmm.npy"), "process": process, "prediction": prediction, "steps": 200,
            "batch_size": 256, "device": "cpu", "eval_samples": 200, "eval_nfe": 10, "ema_decay": 0.9, "lr": 3e-3}
    out = train_teacher(over, str(tmp_path / "r"), progress=False)
    init = build_teacher(resolve(over), load_dataset(over["data"]))
    m = load(out, device="cpu")
    g = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.empty(2048).uniform_(np.log(0.05), np.log(5.0), generator=g))
    y = gmm.sample(2048, generator=g).float() + sigma[:, None] * torch.randn(2048, 2, generator=g)
    exact = gmm.denoise(y.double(), sigma.double()).float()
    with torch.no_grad():
        before = ((init(y, sigma) - exact) ** 2).mean()
        after = ((m.denoiser(y, sigma) - exact) ** 2).mean()
    assert after < 0.3 * before, (float(before), float(after))
    x, _ = m.sample(64, nfe=4, sampler="euler", seed=0)
    assert x.shape == (64, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_weightings_are_x0_weights(weighting):
    """lambda * ||out - target||^2 == w(sigma) * ||D - x0||^2 for every weighting (perturbed net)."""
    gmm = GaussianMixture.ring(4)
    proc = VP.linear()
    pred = "v"
    D = ModelDenoiser(gmm.as_model(proc, pred), proc, pred)
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(32, generator=g)
    t = proc.sample_t(32, generator=g).double()
    eps = torch.randn(32, 2, generator=g, dtype=torch.float64)
    bump = lambda x, c, **k: D.net(x, c) + 0.1  # a net with a known error
    loss = DenoisingLoss(weighting)(D, x0, t, eps, net=bump)
    sigma = proc.sigma(t)
    y = x0 + sigma[:, None] * eps
    D2 = ModelDenoiser(bump, proc, pred)
    err_x0 = ((D2(y, sigma) - x0) ** 2).mean(1)
    from fewstep.train.losses import x0_weight

    # 'simple' on a VP v-net is the v-MSE, i.e. x0 weight snr + 1 (Salimans & Ho 2022)
    w = x0_weight("v" if weighting == "simple" else weighting, sigma, proc)
    assert torch.allclose(loss, w * err_x0, rtol=1e-6)


def _train_cmd(out, steps):
    return [sys.executable, "-m", "fewstep", "train", "--data", "moons", "--steps", str(steps), "--batch-size", "64",
            "--checkpoint-every", "10", "--out", str(out), "--device", "cpu", "--seed", "3", "--quiet"]


def test_killed_run_resumes_to_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 400
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full, steps), check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    # a child inherits an ignored SIGINT (a pytest-xdist worker may ignore it), and Python then keeps
    # ignoring it: restore the default so Ctrl-C reaches the run as it does in a terminal
    proc = subprocess.Popen(_train_cmd(cut, steps), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert not (cut / "model.json").exists()  # it really was interrupted
    done = subprocess.run([sys.executable, "-m", "fewstep", "train", "--resume", "--out", str(cut), "--quiet"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("conditional,net_classes,needle", [(True, 0, "num_classes 0"), (True, 5, "10 classes"),
                                                            (False, 10, "unconditional")])
def test_net_classes_must_match_conditioning(tmp_path, conditional, net_classes, needle):
    """A net config whose classes disagree with --conditional would train a net that ignores
    the labels (or expects labels it never gets): refused before anything is written."""
    from fewstep.errors import UserError

    net = {"kind": "unet", "in_channels": 1, "image_size": 8, "base_channels": 16, "channel_mult": [1, 2],
           "num_res_blocks": 1, "attn_resolutions": [], "num_classes": net_classes}
    with pytest.raises(UserError, match=needle):
        train_teacher({"data": "digits", "conditional": conditional, "net": net, "steps": 1, "device": "cpu"},
                      str(tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()
