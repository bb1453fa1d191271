"""Latent models (issue 23): ``latents:AE,DATA`` encodes a set with a trained autoencoder, keeps
its labels or captions, and every model trained on it lives in the latent space; sampling
decodes. Checked on 8x8 digits with a tiny autoencoder: the latents have the autoencoder's
latent shape and unit variance (its scale factor), a class teacher and a text teacher train on
them, and ``fewstep sample`` writes decoded images of the data's shape beside the latents."""
import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.data.registry import load_dataset
from fewstep.model import load
from fewstep.train.autoencoder import train_autoencoder

AE = {"data": "digits", "steps": 150, "batch_size": 64, "lr": 2e-3, "channel_mult": [1, 2], "base_channels": 16,
      "latent_channels": 2, "device": "cpu", "checkpoint_every": 10000}


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
    return train_autoencoder(dict(AE), str(tmp_path_factory.mktemp("ae") / "ae"), progress=False)


def test_latent_data_keeps_labels_and_has_unit_variance(ae):
    d = load_dataset(f"latents:{ae},digits", seed=0)
    raw = load_dataset("digits", seed=0)
    assert d.x.shape == (len(raw), 2, 4, 4) and torch.equal(d.labels, raw.labels) and d.num_classes == 10
    assert abs(float(d.x.std()) - 1.0) < 0.25  # the scale factor is measured on posterior samples, these are means


def test_latent_teachers_train_and_sample_decoded(ae, tmp_path):
    t = tmp_path / "t"
    assert main(["train", "--data", f"latents:{ae},digits", "--conditional", "--steps", "20", "--batch-size", "32",
                 "--out", str(t), "--quiet"]) == 0
    model = load(str(t))
    assert tuple(model.shape) == (2, 4, 4) and model.autoencoder == ae
    out = tmp_path / "x.npz"
    assert main(["sample", str(t), "--nfe", "4", "--n", "6", "--label", "3", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["samples"].shape == (6, 1, 8, 8) and f["latents"].shape == (6, 2, 4, 4)
        assert float(np.abs(f["samples"]).max()) <= 1.0
    tt = tmp_path / "tt"
    assert main(["train", "--data", f"latents:{ae},captions:digits,encoder=hash", "--steps", "10", "--batch-size",
                 "16", "--out", str(tt), "--quiet"]) == 0
    m = load(str(tt))
    assert m.meta.get("text_encoder") and m.autoencoder == ae
    x, _ = m.sample(4, 4, labels=m.prompt(["a bright class 2"] * 4), guidance=2.0, seed=0)
    assert m.decode(x).shape == (4, 1, 8, 8)


def test_lcm_in_latent_space_keeps_the_boundary(ae, tmp_path):
    """An LCM student of a latent text teacher: f(y, sigma_min) = y exactly on latents, and its
    samples decode to images."""
    from fewstep.methods import distill

    t, s = tmp_path / "t", tmp_path / "s"
    assert main(["train", "--data", f"latents:{ae},captions:digits,encoder=hash", "--steps", "10", "--batch-size",
                 "16", "--out", str(t), "--quiet"]) == 0
    distill("lcm", {"teacher": str(t), "steps": 3, "batch_size": 8, "levels": 10, "device": "cpu",
                    "checkpoint_every": 1000}, str(s), progress=False)
    student = load(str(s))
    assert student.autoencoder == ae and student.meta["text_encoder"]["kind"] == "hash"
    f = student.denoiser
    y = torch.randn(4, 2, 4, 4)
    ctx = student.prompt(["a dark class 1"] * 4)
    with torch.no_grad():
        out = f(y, torch.full((4,), f.sigma_min), labels=ctx, cond=torch.full((4,), 2.0))
    assert torch.equal(out, y)
    x, _ = student.sample(4, 2, labels=ctx, guidance=2.0, seed=0)
    assert student.decode(x).shape == (4, 1, 8, 8)
