"""Score distillation sampling (DreamFusion) and SJC (fewstep.methods.sds) against closed forms
and the exact mixture: the estimators' formulas, mode seeking, labels, guidance, and the
generator run folder (fewstep.model.load_generator, fewstep sample)."""
import json
import math

import numpy as np
import pytest
import torch

from fewstep import GaussianMixture
from fewstep.cli import main
from fewstep.methods import distill
from fewstep.methods.sds import paas, row_loss, sds_gradient, sigma_of_t, sjc_gradient
from fewstep.model import load_generator

def run_cli(argv, capsys):
    """``fewstep ARGV`` in-process: (exit code, what it printed)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    got = capsys.readouterr()
    return rc, got.out + got.err


M = 3.0   # mode distance from the origin
S = 0.3   # mode std


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Four separated modes at radius 3 (std 0.3), classes {(3,0), (0,3)} = 0 and the other two = 1."""
    means = torch.tensor([[M, 0.0], [0.0, M], [-M, 0.0], [0.0, -M]], dtype=torch.float64)
    g = GaussianMixture(torch.ones(4), means, S**2 * torch.eye(2, dtype=torch.float64).expand(4, 2, 2),
                        labels=torch.tensor([0, 0, 1, 1]))
    p = tmp_path_factory.mktemp("sds") / "four.npz"
    g.save(p)
    return f"gmm:{p}", g


def gaussian(m=(0.5, -1.0), s=0.7):
    return GaussianMixture(torch.ones(1), torch.tensor([m], dtype=torch.float64),
                           s**2 * torch.eye(2, dtype=torch.float64)[None])


def test_sds_direction_is_eps_hat_minus_eps_closed_form():
    """For Gaussian data N(m, s^2 I), D(y) = m + a (y - m) with a = s^2 / (s^2 + sigma^2), so
    eps_hat - eps = (x - D)/sigma = ((1 - a)(x - m) - a sigma eps) / sigma exactly (float64)."""
    g, m, s = gaussian(), torch.tensor([0.5, -1.0], dtype=torch.float64), 0.7
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    sigma = sigma_of_t(torch.rand(64, generator=gen, dtype=torch.float64) * 0.96 + 0.02)
    a = (s**2 / (s**2 + sigma**2))[:, None]
    want = ((1 - a) * (x - m) - a * sigma[:, None] * eps) / sigma[:, None]
    got = sds_gradient(g, x, sigma, eps, weighting="uniform")
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)
    w = (sigma**2 / (1 + sigma**2))[:, None]  # DreamFusion's sigma_vp^2
    assert torch.allclose(sds_gradient(g, x, sigma, eps), w * want, atol=1e-12, rtol=1e-10)


def test_sjc_paas_is_the_papers_formula_and_matches_sds_uniform():
    """PAAS(x, sqrt2 sigma) = mean_k (D(x + sigma n_k) - x) / sigma^2; for linear D it is exactly
    (a - 1)(x - m)/sigma^2 + a mean_k(n_k)/sigma. With one draw, -sigma PAAS is SDS's
    eps_hat - eps with uniform weight on the same noise (the known equivalence)."""
    g, m, s = gaussian(), torch.tensor([0.5, -1.0], dtype=torch.float64), 0.7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 16, 2, generator=gen, dtype=torch.float64)
    sigma = torch.linspace(0.05, 20, 16, dtype=torch.float64)
    a = (s**2 / (s**2 + sigma**2))[:, None]
    want = (a - 1) * (x - m) / sigma[:, None] ** 2 + a * noise.mean(0) / sigma[:, None]
    assert torch.allclose(paas(g, x, sigma, noise), want, atol=1e-12, rtol=1e-10)
    one = noise[:1]
    assert torch.allclose(sjc_gradient(g, x, sigma, one), sds_gradient(g, x, sigma, one[0], weighting="uniform"),
                          atol=1e-12, rtol=1e-10)
    # the averaged estimate tends to the exact expectation -(x - m)/(s^2 + sigma^2) (paper's formula in mean)
    many = torch.randn(4000, 16, 2, generator=gen, dtype=torch.float64)
    exact = -(x - m) / (s**2 + sigma[:, None] ** 2)
    err = (paas(g, x, sigma, many) - exact).abs().max()
    # MC error of the mean of a N(0, a^2/sigma^2) term over 4000 draws: 5 std bounds it
    assert err < 5 * float((a.squeeze(1) / sigma).max()) / math.sqrt(4000)


def test_row_loss_gradient_is_the_direction_and_skips_the_teacher():
    """d/dx of the per-row loss is g itself; the teacher's parameters take no gradient."""
    from fewstep.nets import build_net
    from fewstep.denoiser import ModelDenoiser
    from fewstep.process import EDM

    torch.manual_seed(0)
    net = build_net({"kind": "mlp", "dim": 2, "hidden": 16, "depth": 2, "emb_dim": 16})
    D = ModelDenoiser(net, EDM(0.002, 80), "edm", 0.5)
    x = torch.randn(8, 2, requires_grad=True)
    sigma = torch.full((8,), 0.7)
    noise = torch.randn(8, 1, 2)
    row_loss(D, x, sigma, noise, weighting="uniform").sum().backward()
    assert torch.allclose(x.grad, sds_gradient(D, x.detach(), sigma, noise[:, 0], weighting="uniform"), atol=1e-6)
    assert all(p.grad is None for p in net.parameters())


def _points(spec, out, **kw):
    opts = {"teacher": spec, "count": 32, "batch_size": 32, "steps": 600, "lr": 0.02, "t_max": 0.5, "seed": 3}
    opts.update(kw)
    distill("sds", opts, out=str(out), progress=False)
    return load_generator(out).sample(opts["count"]).double(), json.loads((out / "eval.json").read_text())


def test_single_gaussian_fixed_point_is_its_mean_at_the_default_range(tmp_path):
    """E[x - D(x + sigma eps)] = (1 - a)(x - m) vanishes only at m at every level: SDS on one
    Gaussian is exactly mode seeking, even with DreamFusion's t in [0.02, 0.98]."""
    p = tmp_path / "g.npz"
    gaussian().save(p)
    x, ev = _points(f"gmm:{p}", tmp_path / "run", t_max=0.98, steps=800)
    # Adam (lr 0.02) leaves points jittering around the fixed point by about the step size
    assert (x.mean(0) - torch.tensor([0.5, -1.0], dtype=torch.float64)).norm() < 0.05
    assert ev["mode_gap_max"] < 0.05  # log-density gap for a 0.1 offset at s = 0.7: 0.01 nats


def test_points_seek_the_modes_and_the_label_picks_its_class(four, tmp_path):
    """Exact mixture, sigma up to tan(pi/4) = 1 (t_max 0.5): separated modes (distance 4.2 > 4
    sigma) barely interact, so the points end at the modes: mean log-density gap to the mode
    each climbs to below 0.2 nats (an offset of 0.19 std), none above 1.5 nats. With a label,
    every point is in that class's modes."""
    spec, g = four
    x, ev = _points(spec, tmp_path / "plain")
    assert ev["mode_gap_mean"] < 0.2 and ev["mode_gap_max"] < 1.5
    assert (x.norm(dim=1) - M).abs().max() < 0.5
    x1, ev1 = _points(spec, tmp_path / "label1", label=1)
    assert ev1["label_share"] == 1.0 and ev1["mode_gap_mean"] < 0.2
    # class 1's modes are (-3, 0) and (0, -3): x + y < 0 for each point
    assert (x1.sum(1) < 0).all()


def test_guidance_pushes_points_away_from_the_other_class(four, tmp_path):
    """Guided density p(x|c)^w p(x)^(1-w): for w > 1 the points of class 0 move further from class
    1's modes, along (1, 1), than plain conditional SDS (w = 1) leaves them. The classes differ in
    the levels where their modes blur together (sigma ~ 1-10), so the full default range is used."""
    spec, _ = four
    d = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    x1, _ = _points(spec, tmp_path / "w1", label=0, t_max=0.98)
    x4, _ = _points(spec, tmp_path / "w4", label=0, guidance=4.0, t_max=0.98)
    assert float((x4 @ d).mean()) > float((x1 @ d).mean()) + 0.1


def test_default_range_biases_mixtures_towards_the_centre(four, tmp_path):
    """With DreamFusion's range (sigma up to 31.8) the high levels see one blurred blob, so the
    fixed point is pulled towards the data mean: the documented cost of the default (the points
    end well inside radius 3, yet each nearer its own mode than the centre)."""
    spec, _ = four
    x, ev = _points(spec, tmp_path / "wide", t_max=0.98)
    r = x.norm(dim=1)
    assert r.mean() < M - 0.3 and r.min() > 0.5 * M - 0.5
    assert ev["mode_gap_mean"] > 0.5


def test_generator_run_folder_and_cli(four, tmp_path, capsys):
    spec, _ = four
    out = tmp_path / "run"
    rc, text = run_cli(["distill", "sds", "--teacher", spec, "--count", "8", "--batch-size", "8", "--steps", "20",
                        "--label", "0", "--out", str(out), "--quiet"], capsys)
    assert rc == 0, text
    meta = json.loads((out / "model.json").read_text())
    assert meta["role"] == "generator" and meta["net"]["kind"] == "points" and meta["label"] == 0
    rc, text = run_cli(["sample", str(out), "--out", str(tmp_path / "x.npz")], capsys)
    assert rc == 0, text
    with np.load(tmp_path / "x.npz") as f:
        got = f["samples"]
    assert got.shape == (8, 2) and np.allclose(got, load_generator(out).sample(8).numpy())
    for args, word in ((["--n", "9"], "at most 8"), (["--nfe", "4"], "--nfe"), (["--sampler", "heun"], "--sampler")):
        rc, text = run_cli(["sample", str(out), "--out", str(tmp_path / "y.npz"), *args], capsys)
        assert rc == 2 and word in text and "Traceback" not in text
    rc, text = run_cli(["sample", str(out), "--nfe", "4", "--out", str(tmp_path / "z.npz")], capsys)
    assert rc == 2


@pytest.mark.parametrize("args, word", [
    (["--label", "2"], "classes 0..1"), (["--guidance", "3"], "--label"), (["--generator", "image"], "square images"),
    (["--t-min", "0.5", "--t-max", "0.4"], "--t-min"), (["--estimator", "sjc", "--weighting", "dreamfusion"],
                                                        "unweighted"),
    (["--paas-samples", "3"], "sjc"), (["--fine-steps", "10"], "nerf"), (["--render-size", "8"], "nerf"),
    (["--t-max", "1.5"], "--t-max"), (["--count", "0"], "--count"),
    (["--net", '{"kind": "mlp", "dim": 2}'], "--net"),
])
def test_bad_options_one_line(four, tmp_path, capsys, args, word):
    spec, _ = four
    out = tmp_path / "bad"
    rc, text = run_cli(["distill", "sds", "--teacher", spec, "--steps", "2", "--out", str(out), "--quiet", *args], capsys)
    assert rc == 2 and word in text and "Traceback" not in text, text
    assert not out.exists()


def test_label_on_an_unconditional_teacher_is_refused(tmp_path, capsys):
    p = tmp_path / "g.npz"
    gaussian().save(p)
    rc, text = run_cli(["distill", "sds", "--teacher", f"gmm:{p}", "--label", "0", "--out", str(tmp_path / "o"),
                        "--quiet"], capsys)
    assert rc == 2 and "unconditional" in text


def test_image_generator_on_a_conditional_diffusers_teacher(null_class_unet_specs, tmp_path, capsys):
    """The image generator runs against any image teacher (a random diffusers UNet with a null
    class here): tanh keeps the pixels in [-1, 1], the run folder has its picture, and
    ``fewstep sample`` returns the images the generator holds."""
    spec, _ = null_class_unet_specs
    out = tmp_path / "img"
    rc, text = run_cli(["distill", "sds", "--teacher", spec, "--generator", "image", "--count", "2", "--label", "3",
                        "--guidance", "2", "--steps", "4", "--batch-size", "4", "--out", out, "--quiet"], capsys)
    assert rc == 0, text
    assert (out / "images.png").is_file()
    x = load_generator(out).sample(2)
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1
    ev = json.loads((out / "eval.json").read_text())
    assert ev["finite"] and 0 <= ev["saturated"] <= 1
    rc, text = run_cli(["distill", "sds", "--teacher", spec, "--generator", "image", "--image-param", "cnn",
                        "--count", "2", "--steps", "2", "--batch-size", "2", "--out", tmp_path / "cnn", "--quiet"],
                       capsys)
    assert rc == 0, text
    assert load_generator(tmp_path / "cnn").sample(2).shape == (2, 1, 8, 8)


def test_nerf_coarse_to_fine_run(null_class_unet_specs, tmp_path, capsys):
    """A voxel field by SDS in two stages (Magic3D): coarse renders 4x4 (resized to the teacher's
    8x8) on a 4^3 grid, fine renders 8x8 on the grid upsampled to 8^3 from the coarse one; the
    top folder publishes the fine stage, with a turntable strip; ``fewstep sample --n 3`` gives
    3 random views; the render's gradient reaches the field (it changed from its start)."""
    from fewstep.nets.generators import build_generator

    spec, _ = null_class_unet_specs
    out = tmp_path / "nerf"
    rc, text = run_cli(["distill", "sds", "--teacher", spec, "--generator", "nerf", "--label", "1", "--steps", "3",
                        "--fine-steps", "2", "--resolution", "4", "--render-size", "4", "--ray-samples", "8",
                        "--batch-size", "2", "--emptiness", "1", "--lr", "0.1", "--out", out, "--quiet"], capsys)
    assert rc == 0, text
    assert (out / "coarse" / "model.json").is_file() and (out / "fine" / "turntable.png").is_file()
    meta = json.loads((out / "model.json").read_text())
    assert meta["stage"] == "fine" and meta["stages"] == ["coarse", "fine"]
    assert meta["net"]["field"]["resolution"] == 8 and meta["net"]["render_size"] == 8
    coarse = load_generator(out / "coarse")
    start = build_generator(coarse.module.config)
    assert not torch.equal(start.field.density_grid, coarse.module.field.density_grid)
    rc, text = run_cli(["sample", out, "--n", "3", "--out", tmp_path / "v.npz"], capsys)
    assert rc == 0, text
    with np.load(tmp_path / "v.npz") as f:
        assert f["samples"].shape == (3, 1, 8, 8)
