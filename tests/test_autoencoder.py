"""The KL-regularised autoencoder of latent diffusion (fewstep.nets.autoencoder,
fewstep.train.autoencoder, `fewstep train-autoencoder`): the posterior's KL against its closed
form, LDM's scale factor giving unit-variance latents (within the sampling error of the data),
training lowering the reconstruction error, the run folder round trip, a diffusers AutoencoderKL
behind the same interface, and bad options refused in one line before any folder is written."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fewstep.errors import UserError
from fewstep.nets.autoencoder import DiagonalGaussian, KLAutoencoder, build_autoencoder, measure_scale_factor
from fewstep.train.autoencoder import (build_autoencoder_net, evaluate_reconstruction, image_data,
                                       load_autoencoder, resolve, train_autoencoder)

# digits (8x8), f = 2 -> 4 x 4 x 4 latents; small enough for ~10 s of CPU training
RUN = {"data": "digits", "n_data": 1000, "steps": 250, "batch_size": 16, "base_channels": 8, "channel_mult": [1, 2],
       "device": "cpu", "log_every": 50, "checkpoint_every": 250, "eval_images": 500, "seed": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_autoencoder(dict(RUN), str(tmp_path_factory.mktemp("ae") / "run"), progress=False)


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form():
    shape = (3, 4, 5, 5)
    prior = DiagonalGaussian(torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))
    assert torch.equal(prior.kl(), torch.zeros(3, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    mu, logvar = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    q = DiagonalGaussian(mu, logvar)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)),
                                              torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(q.kl(), exact, rtol=1e-12, atol=1e-12)
    assert torch.equal(q.mode(), mu)
    # the reparametrised sample is mean + std * eps, eps from the generator
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(q.sample(torch.Generator().manual_seed(3)), mu + torch.exp(0.5 * logvar) * eps)
    clamped = DiagonalGaussian(torch.zeros(1, 1, 1, 1), torch.tensor([[[[-50.0]]]]))
    assert float(clamped.logvar) == -30.0  # LDM's clamp to [-30, 20]


def test_shapes_config_and_refusals():
    net = KLAutoencoder(in_channels=1, latent_channels=4, base_channels=8, channel_mult=(1, 2, 2))
    post = net.encode(torch.zeros(2, 1, 28, 28))
    assert post.mean.shape == (2, 4, 7, 7) and net.latent_shape((1, 28, 28)) == (4, 7, 7)  # Fashion-MNIST: 7x7
    assert net.decode(post.mode()).shape == (2, 1, 28, 28)
    again = build_autoencoder(net.config)
    assert again.config == net.config and sum(p.numel() for p in again.parameters()) == sum(
        p.numel() for p in net.parameters())
    with pytest.raises(UserError, match="multiple of the autoencoder's downsampling factor 4"):
        net.encode(torch.zeros(1, 1, 10, 10))
    with pytest.raises(UserError, match="unknown option"):
        build_autoencoder({"kind": "kl", "depth": 3})


def test_training_lowers_the_reconstruction_error(run):
    meta = json.loads(open(f"{run}/model.json").read())
    assert meta["role"] == "autoencoder" and meta["latent_shape"] == [4, 4, 4] and meta["image_shape"] == [1, 8, 8]
    rec = meta["reconstruction"]
    assert rec["reference"] == "held-out" and rec["images"] == 500
    cfg = resolve(dict(RUN))
    data = image_data(cfg)
    untrained = build_autoencoder_net(cfg, data)  # the same seed: the weights training started from
    from fewstep.data.registry import held_out
    from fewstep.nets.autoencoder import LatentCodec

    ref, _ = held_out("digits", 500, 1, 1000, 0)
    before, _ = evaluate_reconstruction(LatentCodec(untrained, 1.0, (1, 8, 8), (4, 4, 4), "untrained"), ref.x)
    assert rec["l1"] < 0.25 * before["l1"], (rec, before)
    assert rec["l1"] < 0.5 * rec["l1_mean_image"], rec  # far better than "every image the mean image"


def test_run_folder_round_trip(run):
    """The loaded autoencoder reproduces the numbers the finished run computed in memory, and its
    encode / decode are D(E(x)) with LDM's scaling: encode = s * mean, decode(l) = D(l / s)."""
    meta = json.loads(open(f"{run}/model.json").read())
    codec = load_autoencoder(run, "cpu")
    assert codec.scale_factor == meta["scale_factor"] and codec.latent_shape == (4, 4, 4)
    from fewstep.data.registry import held_out

    ref, _ = held_out("digits", 500, 1, 1000, 0)
    again, _ = evaluate_reconstruction(codec, ref.x)
    assert again["l1"] == pytest.approx(meta["reconstruction"]["l1"], rel=1e-5, abs=1e-7)
    x = ref.x[:8]
    with torch.no_grad():
        lat = codec.encode(x)
        assert torch.allclose(lat, codec.module.encode(x).mean * codec.scale_factor)
        assert torch.allclose(codec.decode(lat), codec.module.decode(lat / codec.scale_factor))
    # resuming the finished run with the same options trains nothing and writes the same model
    train_autoencoder(dict(RUN), run, resume=True, progress=False)
    assert json.loads(open(f"{run}/model.json").read())["reconstruction"] == meta["reconstruction"]


def _std_tolerance(z: torch.Tensor, n_scale: int) -> float:
    """Four standard errors of std(s z) / 1 where s came from ``n_scale`` other images of the same
    data: each image's mean square (z - mean)^2 is one independent unit (values within an image are
    correlated), so var-hat has relative standard error sd(m_i) / (sqrt(N) var) per set, the ratio of
    two sets' variances adds both, and a standard deviation has half the relative error."""
    m = (z - z.mean()).pow(2).flatten(1).mean(1)
    rel = float(m.std() / m.mean()) * (1 / len(m) + 1 / n_scale) ** 0.5
    return 4 * rel / 2


def test_scale_factor_gives_unit_variance_latents(run):
    """s = 1 / std(z) on the training images' posterior samples; on held-out images of the same
    data s * z (fresh posterior samples) has standard deviation 1 within the sampling error."""
    from fewstep.data.registry import held_out

    meta = json.loads(open(f"{run}/model.json").read())
    codec = load_autoencoder(run, "cpu")
    ref, source = held_out("digits", 1024, 1, 1000, 0)
    assert source == "held-out" and len(ref) == 797
    with torch.no_grad():
        z = codec.encode(ref.x, sample=True, generator=torch.Generator().manual_seed(5))
    tol = _std_tolerance(z, meta["scale_images"])
    assert abs(float(z.std()) - 1.0) < tol, (float(z.std()), tol)
    assert abs(1.0 / codec.scale_factor - 1.0) > 4 * tol  # the unscaled latents are not unit-variance already


def _tiny_vae(shift=None):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8,
                                   scaling_factor=0.3, shift_factor=shift)


@pytest.mark.parametrize("shift", [None, 0.25])
def test_diffusers_autoencoder_behind_the_same_interface(tmp_path, shift):
    vae = _tiny_vae(shift).eval()
    vae.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline folder's vae/
    codec = load_autoencoder(f"diffusers:{tmp_path / 'pipe'}", "cpu")
    assert codec.scale_factor == 0.3 and codec.image_shape == (1, 8, 8) and codec.latent_shape == (4, 4, 4)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    s, b = 0.3, shift or 0.0
    with torch.no_grad():
        want = (vae.encode(x).latent_dist.mode() - b) * s  # diffusers' own call, as its pipelines scale
        lat = codec.encode(x)
        assert lat.shape == (3, 4, 4, 4) and torch.allclose(lat, want, atol=1e-6)
        drawn = (vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(1)) - b) * s
        assert torch.allclose(codec.encode(x, sample=True, generator=torch.Generator().manual_seed(1)), drawn,
                              atol=1e-6)
        out = codec.decode(lat)
        assert out.shape == x.shape and torch.allclose(out, vae.decode(lat / s + b).sample, atol=1e-6)
        # LDM's recipe for another model's latents: s measured on the data gives them unit variance
        data = image_data(resolve({"data": "digits", "n_data": 400}))
        s_data = measure_scale_factor(codec, data.x, torch.Generator().manual_seed(2))
        rescaled = load_autoencoder(f"diffusers:{tmp_path / 'pipe'}", "cpu", scale_factor=s_data)
        z = rescaled.encode(data.x, sample=True, generator=torch.Generator().manual_seed(2))
        assert float(z.std()) == pytest.approx(1.0, abs=1e-5)  # the very samples s was measured on


def test_diffusers_refusals(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(UserError, match="not an AutoencoderKL"):
        load_autoencoder(f"diffusers:{tmp_path / 'unet'}")
    with pytest.raises(UserError, match="no config.json"):
        load_autoencoder(f"diffusers:{tmp_path / 'nothing'}")
    with pytest.raises(UserError, match="not an autoencoder run|no finished autoencoder"):
        load_autoencoder(str(tmp_path))


@pytest.mark.parametrize("args, config, says", [
    (["--kl-weight", "-1"], None, "--kl-weight must be a finite number of at least 0"),
    (["--latent-channels", "0"], None, "--latent-channels must be a whole number"),
    (["--reconstruction", "l3"], None, "--reconstruction must be one of l1, mse"),
    ([], {"depth": 3}, "unknown autoencoder option(s) depth"),
    ([], {"channel_mult": [1, 2, 2, 2, 2]}, "not a multiple of the autoencoder's downsampling factor 16"),
])
def test_bad_options_exit_2_with_one_line_and_no_folder(tmp_path, args, config, says):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fewstep", "train-autoencoder", "--data", "digits", "--out", str(out), "--quiet",
           "--steps", "5", *args]
    if config is not None:
        (tmp_path / "c.json").write_text(json.dumps(config))
        cmd += ["--config", str(tmp_path / "c.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewstep train-autoencoder: error: ") and says in lines[0], lines
    assert not out.exists()


def test_non_image_data_is_refused_before_any_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="encodes images, 'moons' is points data"):
        train_autoencoder({"data": "moons", "steps": 5}, str(out), progress=False)
    assert not out.exists()
