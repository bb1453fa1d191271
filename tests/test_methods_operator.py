"""Diffusion operator distillation (Zheng et al. 2022, DFNO/DSNO) on the exact ring teacher: the
temporal Fourier layer is the DFT computation it claims to be; the teacher's trajectories are the
exact flow's; the operator fits them; its 1-NFE sample beats one Euler step; resume is bit for bit;
bad options are one line before any folder; the command line runs."""
import json
import math

import pytest
import torch

from _exact import gmm2
from _resume import full_and_resumed, same_weights
from fewstep.errors import UserError
from fewstep.io import load_weights
from fewstep.methods import distill
from fewstep.methods.operator import teacher_trajectory
from fewstep.metrics import energy_distance
from fewstep.model import load
from fewstep.nets.fno import OperatorNet, TemporalFourier

BACKBONE = {"kind": "mlp", "dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32}


def _cfg(spec, **kw):
    return {"teacher": spec, "net": BACKBONE, "steps": 400, "pairs": 2000, "pair_nfe": 16, "pair_batch": 500,
            "levels": 4, "lr": 3e-3, "batch_size": 256, "device": "cpu", "warmup": 20, "ema_decay": 0.99, **kw}


# ------------------------------------------------------------------ the temporal Fourier layer
@pytest.mark.parametrize("K", [7, 8])
def test_temporal_fourier_identity_with_all_modes(K):
    """All K//2 + 1 modes kept with R_k = I: irfft(rfft(u)) = u (the DFT is invertible). float32
    FFTs of O(1) values round at ~1e-7 per operation, K log K of them: 1e-5 is far above that."""
    C = 3
    layer = TemporalFourier(C, K // 2 + 1)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[..., 0] = torch.eye(C)
    u = torch.randn(5, K, C, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(layer(u), u, atol=1e-5)


def test_temporal_fourier_is_the_truncated_dft():
    """With random complex R_k on the lowest m < K/2 modes the layer is, in closed form,
    u'_j = (1/K) [Re(V_0) + 2 sum_{k=1}^{m-1} Re(V_k e^{2 pi i k j / K})], V_k = R_k^T U_k,
    U_k = sum_j u_j e^{-2 pi i k j / K} (the real signal's Hermitian spectrum, modes >= m zero);
    computed here in float64 by explicit sums; float32 rounding as above (1e-5)."""
    K, C, D, m = 9, 3, 2, 3
    layer = TemporalFourier(C, m, out_channels=D)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, C, D, 2, generator=g))
    u = torch.randn(4, K, C, generator=g)
    j = torch.arange(K, dtype=torch.float64)
    R = torch.view_as_complex(layer.weight.detach().double())
    U = [(u.double().to(torch.complex128) * torch.exp(-2j * math.pi * k * j / K)[None, :, None]).sum(1)
         for k in range(m)]  # [B, C] each
    V = [U[k] @ R[k] for k in range(m)]  # [B, D]
    want = V[0].real[:, None, :].expand(-1, K, -1).clone()
    for k in range(1, m):
        want += 2 * (V[k][:, None, :] * torch.exp(2j * math.pi * k * j / K)[None, :, None]).real
    want /= K
    assert torch.allclose(layer(u).double(), want, atol=1e-5)
    # a frequency above the kept modes is removed entirely
    hi = torch.cos(2 * math.pi * 4 * j / K).float()[None, :, None].expand(1, K, C)
    assert layer(hi).abs().max() < 1e-5


def test_operator_net_starts_on_the_noise_path():
    """Untrained (zero output layer) the operator returns c_m z_T, c_m = a(sigma_m) / a(sigma_T),
    a(s) = s / sqrt(1 + s^2): the pure-noise part, exactly 0 at the last level sigma = 0."""
    levels = [20.0, 1.0, 0.1, 0.0]
    net = OperatorNet(2, levels, 80.0, hidden=16, depth=1, modes=2, emb_dim=8)
    z = torch.randn(6, 2)
    out = net(z, None, trajectory=True)
    a = torch.tensor([s / math.sqrt(1 + s * s) for s in levels]) / (80.0 / math.sqrt(1 + 80.0**2))
    assert torch.allclose(out, a[None, :, None] * z[:, None, :], atol=1e-6)
    assert torch.equal(net(z, None), out[:, -1])


# ----------------------------------------------------------------------------- trajectories
def test_teacher_trajectory_is_the_exact_flow(spec):
    """The states read from the sampler's callback are the ODE's states at the chosen levels
    (grid points S/4, S/2, 3S/4, S): against the exact flow map of the mixture, Heun's error at
    each level falls ~4x from 32 to 64 Karras steps, its second order (a state off by one grid
    point would not converge: it sits at another level); measured ratio 0.22, error at 64 steps
    <= 0.005 for states of scale ~2."""
    from fewstep.grids import karras

    teacher = load(spec)
    x_T = teacher.noise(200, seed=4)
    errs = {}
    for S in (32, 64):
        sig = karras(S, teacher.sigma_min, teacher.sigma_max)
        idx = [S // 4, S // 2, 3 * S // 4, S]
        X = teacher_trajectory(teacher.denoiser, "heun", x_T, sig, idx)
        assert X.shape == (200, 4, 2)
        errs[S] = torch.stack([(X[:, m] - gmm2().flow(x_T, teacher.sigma_max, float(sig[i]), rtol=1e-8))
                               .pow(2).sum(1).mean().sqrt() for m, i in enumerate(idx)])
    assert bool((errs[64] < 0.3 * errs[32]).all()) and bool((errs[64] < 0.01).all()), errs


def test_operator_fits_its_training_trajectories(spec, tmp_path):
    """A tiny case (16 pairs, 4 levels, 2 kept modes): after 600 steps the operator's output at
    every level is the teacher's trajectory on the training pairs. The states have RMS ~1-2 per
    sample; a fit within 0.05 RMS at each level is 2-4% of that (measured 0.005 at the first level to
    0.025 at the last)."""
    cfg = _cfg(spec, steps=600, pairs=16, pair_batch=16, batch_size=16, modes=2, ema_decay=0.9, lr=3e-3)
    out = distill("operator", cfg, str(tmp_path / "fit"), progress=False)
    chunk = load_weights(tmp_path / "fit" / "trajectories" / "chunk_00000.safetensors")
    net = load(out).denoiser.net
    with torch.no_grad():
        pred = net(chunk["z_T"], None, trajectory=True)
    err = (pred - chunk["Z"]).pow(2).sum(2).mean(0).sqrt()  # per level
    scale = chunk["Z"].pow(2).sum(2).mean(0).sqrt()
    assert bool((err < 0.05).all()), (err, scale)


# ---------------------------------------------------------------------- the 1-NFE student
def test_one_step_student_beats_one_euler_step(spec, tmp_path):
    """On the ring, 2000 trajectory pairs and 400 steps: the 1-NFE sample's energy distance to
    exact samples is far below one Euler step's (measured 0.06 vs 1.4; the statistic's noise at
    2000 samples is ~0.01). The saved student samples with fewstep.load(run).sample(n, 1)."""
    out = distill("operator", _cfg(spec), str(tmp_path / "op"), progress=False)
    student, teacher = load(out), load(spec)
    data = gmm2().sample(2000, generator=torch.Generator().manual_seed(3)).double()
    x = student.sample(2000, 1, seed=1)[0].double()
    with pytest.warns(UserWarning):  # one Euler step on karras: the note that a better grid exists
        xe = teacher.sample(2000, 1, "euler", seed=1, grid="karras")[0].double()
    ed, ed_euler = energy_distance(x, data), energy_distance(xe, data)
    assert ed < 0.25 * ed_euler, (ed, ed_euler)
    meta = json.loads((tmp_path / "op" / "model.json").read_text())
    assert meta["sampling"]["grids"] == {"1": [80.0, 0.0]} and meta["method"] == "operator"
    assert meta["net"]["kind"] == "fno" and meta["net"]["levels"][-1] == 0.0 and len(meta["net"]["levels"]) == 4
    assert meta["cost"]["teacher_evals"] == 2000 * 15  # heun: 8 steps = 15 evaluations per trajectory


# --------------------------------------------------------------------------------- resume
def test_interrupted_distillation_resumes_identically(spec, tmp_path, monkeypatch):
    cfg = _cfg(spec, steps=30, checkpoint_every=10, pairs=400, pair_batch=100, batch_size=64)
    full, cut = full_and_resumed(monkeypatch, "operator", cfg, tmp_path, at=25)
    same_weights(full, cut)


# ---------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("bad, match", [
    ({"levels": 4, "modes": 4}, "--modes 4"),
    ({"levels": 9}, "--levels 9"),
    ({"levels": 6, "pad": 3}, "--levels 6 with --pad 3"),
    ({"levels": 3, "pad": 1, "modes": 4}, "--modes 4"),
    ({"pair_sampler": "edm_stochastic"}, "deterministic grid sampler"),
    ({"pair_sampler": "rk45"}, "deterministic grid sampler"),
    ({"net": {"kind": "unet", "in_channels": 1, "image_size": 8}}, "backbone is an MLP"),
    ({"teacher": None}, "--teacher"),
])
def test_bad_options_are_one_line_and_no_folder(spec, tmp_path, bad, match):
    with pytest.raises(UserError, match=match) as err:
        distill("operator", _cfg(spec, **bad), str(tmp_path / "bad"), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_command_line(spec, tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "cli"
    args = ["distill", "operator", "--teacher", spec, "--steps", "5", "--pairs", "64", "--pair-nfe", "8",
            "--levels", "2", "--pad", "1", "--net", json.dumps(BACKBONE), "--out", str(out), "--quiet", "--device",
            "cpu"]
    assert main(args) == 0
    meta = json.loads((out / "model.json").read_text())  # 2 supervised levels after 1 unsupervised one
    assert len(meta["net"]["levels"]) == 3 and len(meta["trajectories"]["levels"]) == 2
    assert meta["trajectories"]["levels"] == meta["net"]["levels"][1:] and meta["net"]["levels"][-1] == 0.0
    assert main(["sample", str(out), "--nfe", "1", "--n", "16", "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["distill", "operator", "--teacher", spec, "--levels", "2", "--modes", "3",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fewstep distill: error:"), err
    assert not (tmp_path / "b").exists()
