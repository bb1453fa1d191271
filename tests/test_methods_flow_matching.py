"""Flow matching on stochastic interpolants (Albergo & Vanden-Eijnden 2022; Lipman et al. 2023;
Tong et al. 2024): each path's closed forms against its process and their time derivative,
the OT / Sinkhorn couplings against their limits, OT straightens the flow of the exact ring
against independent pairs, the run is an ordinary flow model, bad options fail in one line."""
import json
import math

import pytest
import torch

from _exact import SMALL_MLP as NET
from _resume import same_weights
from fewstep.data.gmm import GaussianMixture
from fewstep.denoiser import ModelDenoiser
from fewstep.errors import UserError
from fewstep.methods import distill, get, resolve
from fewstep.methods.flow_matching import (PATHS, couple, coupling_straightness, flow_straightness, interpolate,
                                           mean_pair_distance, ot_assignment, path_coefficients, path_process,
                                           path_velocity, sinkhorn_plan)
from fewstep.model import load
from fewstep.nets import build_net
from fewstep.process import LinearFlow


def _batch(n=64, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = GaussianMixture.ring(8, radius=2.0, std=0.3).sample(n, generator=g)
    return x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.randn(x0.shape, generator=g,
                                                                                   dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_interpolant_ends_process_and_velocity(path, gamma):
    x0, x1, z = _batch()
    n = len(x0)
    # data at t = 0 exactly; noise at t = 1 (vp: up to its alpha(1) = exp(-5.025) share of data)
    x_at0, _ = interpolate(path, x0, x1, torch.zeros(n, dtype=torch.float64), z, gamma)
    x_at1, _ = interpolate(path, x0, x1, torch.ones(n, dtype=torch.float64), z, gamma)
    assert torch.allclose(x_at0, x0, atol=1e-12)
    tol = 1e-12 if path != "vp" else 0.0067 * float(x0.abs().max()) + 3e-5 * float(x1.abs().max())
    assert float((x_at1 - x1).abs().max()) <= tol
    # alpha, beta are the stored process's scale and std (so the model is that process's flow prediction)
    p = path_process(path)
    t = torch.linspace(max(p.t_min, 0.01), min(p.t_max, 0.99), 25, dtype=torch.float64)
    a, b, da, db = path_coefficients(path, t)
    assert torch.allclose(a, p.scale(t), rtol=1e-10) and torch.allclose(b, p.std(t), rtol=1e-10)
    assert torch.allclose(da, p.dscale_dt(t), rtol=1e-8) and torch.allclose(db, p.dstd_dt(t), rtol=1e-8)
    # the conditional velocity is d x_t / dt (central differences, float64)
    for tv in (0.05, 0.3, 0.5, 0.8, 0.95):
        t, h = torch.full((n,), tv, dtype=torch.float64), 1e-6
        _, u = interpolate(path, x0, x1, t, z, gamma)
        fd = (interpolate(path, x0, x1, t + h, z, gamma)[0] - interpolate(path, x0, x1, t - h, z, gamma)[0]) / (2 * h)
        assert torch.allclose(u, fd, atol=1e-6, rtol=1e-6), (path, gamma, tv)


@pytest.mark.parametrize("path", PATHS)
def test_the_model_reads_back_the_trained_velocity(path):
    """What the loss trains, net(x_t, c_noise(t)), is the velocity the loaded flow-prediction
    denoiser gives at x_t (samplers integrate that velocity)."""
    torch.manual_seed(0)
    net = build_net(NET).double()
    p = path_process(path)
    D = ModelDenoiser(net, p, "flow", 0.5)
    x0, x1, _ = _batch()
    t = torch.rand(len(x0), dtype=torch.float64) * 0.9 + 0.05
    x_t, _ = interpolate(path, x0, x1, t)
    with torch.no_grad():
        assert torch.allclose(path_velocity(D, p, x_t, t), net(x_t, p.c_noise(t)), atol=1e-7)


def test_straightness_is_reflows_on_the_linear_path():
    reflow = get("reflow")
    gmm = GaussianMixture.ring(8, radius=2.0, std=0.3)
    x0, x1, _ = _batch(500)
    assert coupling_straightness(gmm, LinearFlow(), "linear", x0, x1) == \
        pytest.approx(reflow.coupling_straightness(gmm, x0, x1), rel=1e-9)
    assert flow_straightness(gmm, LinearFlow(), x1) == pytest.approx(reflow.flow_straightness(gmm, LinearFlow(), x1),
                                                                     rel=1e-9)


def test_ot_coupling_is_a_permutation_and_shortens_the_pairs():
    x0, x1, _ = _batch(256)
    perm = ot_assignment(x0, x1)
    assert sorted(perm.tolist()) == list(range(256))
    a, b = couple("ot", x0, x1, torch.Generator().manual_seed(0))
    assert torch.equal(b, x1[perm]) and torch.equal(a, x0)
    # measured: 6.4 -> 0.9; any other permutation (e.g. a swap) is no shorter
    assert mean_pair_distance(a, b) < 0.3 * mean_pair_distance(x0, x1)
    swapped = perm.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert mean_pair_distance(x0, x1[perm]) <= mean_pair_distance(x0, x1[swapped]) + 1e-12
    # --ot-pairs sample (torchcfm's OT-CFM): B draws with replacement from the same plan: every pair is a
    # plan pair, reproducible from the generator; the distinct count of B draws from B equal atoms has mean
    # B (1 - (1 - 1/B)^B) = 162.0 and sd 5.0 at B = 256 (the occupancy variance): 4 sd either side
    a, b = couple("ot", x0, x1, torch.Generator().manual_seed(0), ot_pairs="sample")
    a2, b2 = couple("ot", x0, x1, torch.Generator().manual_seed(0), ot_pairs="sample")
    assert torch.equal(a, a2) and torch.equal(b, b2)
    rows = [int((x0 == r).all(1).nonzero()[0]) for r in a]
    assert torch.equal(b, x1[perm[rows]])
    assert 142 <= len(set(rows)) <= 182


def test_sinkhorn_plan_between_independent_and_ot():
    """P_eps minimises <P, M> - eps H(P), so OT <= <P_eps, M> <= OT + eps (H(P_eps) - H(P_ot)) <=
    OT + eps log n (a permutation plan has entropy log n, any plan at most 2 log n); as eps
    grows P_eps tends to the independent plan 1 / n^2. (The ring's near-tied assignments make
    the plan itself, not its cost, converge slowly: L1 distance 0.66 to the OT plan at eps 0.01.)"""
    x0, x1, _ = _batch(64)
    n = len(x0)
    M = torch.cdist(x0, x1) ** 2
    ot_cost = float(M[torch.arange(n), ot_assignment(x0, x1)].mean())
    costs = {}
    for eps in (1e4, 1.0, 0.1, 0.01):
        P = sinkhorn_plan(x0, x1, eps)
        assert torch.allclose(P.sum(1), torch.full((n,), 1 / n, dtype=torch.float64), atol=1e-6)
        assert float((P.sum(0) * n - 1).abs().max()) < 1e-3  # measured 4e-4 at eps 0.01 (5000 iterations)
        costs[eps] = float((P * M).sum())
        assert ot_cost - 1e-9 <= costs[eps] <= ot_cost + eps * math.log(n) + 1e-6, (eps, costs[eps], ot_cost)
    P = sinkhorn_plan(x0, x1, 1e4)  # pi ~ exp(-M / eps) ~ uniform: the independent coupling
    assert float((P * n * n - 1).abs().max()) < 0.01
    assert costs[1e4] == pytest.approx(float(M.mean()), rel=1e-3)
    assert costs[1e4] > costs[1.0] > costs[0.1] > costs[0.01]
    assert costs[0.01] - ot_cost < 0.01 * (float(M.mean()) - ot_cost)  # measured 0.002 of 5.0
    # sb pairs are drawn from the plan: reproducible from the generator
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert all(torch.equal(u, v) for u, v in zip(couple("sb", x0, x1, g1, 1.0), couple("sb", x0, x1, g2, 1.0)))


def _run(tmp_path, spec, coupling, **kw):
    cfg = {"data": spec, "coupling": coupling, "net": NET, "steps": 300, "device": "cpu", "eval_samples": 500,
           "lr": 3e-3, "warmup": 20, "ema_decay": 0.99, **kw}
    out = distill("flow_matching", cfg, str(tmp_path / coupling), progress=False)
    return out, json.loads(open(f"{out}/eval.json").read())


@pytest.fixture(scope="module")
def ring_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("fm") / "ring.npz"
    GaussianMixture.ring(8, radius=2.0, std=0.3).save(path)
    return f"gmm:{path}"


def test_ot_coupling_straightens_the_ring_flow(tmp_path, ring_spec):
    """300 steps each. Measured over seeds 0-2 (independent | ot): straightness 4.1-4.6 | 0.10,
    flow straightness 1.03-1.07 | 0.0012-0.0015, 1-step self error 1.12-1.18 | 0.046-0.056,
    2-step 0.38-0.41 | 0.021-0.030, energy distance at 1 step 0.85-0.92 | <= 0.005, 2 steps
    0.09-0.12 | <= 0.005 (500 samples: noise ~0.005)."""
    ind_out, ind = _run(tmp_path, ring_spec, "independent")
    ot_out, ot = _run(tmp_path, ring_spec, "ot")
    assert ot["pair_distance"] < 0.3 * ind["pair_distance"]
    assert ot["straightness"] < 0.1 * ind["straightness"]
    assert ot["flow_straightness"] < 0.05 * ind["flow_straightness"]
    for k in ("1", "2"):
        assert ot["euler_self_error"][k] < 0.25 * ind["euler_self_error"][k]
        assert ot["energy_distance"][k] < 0.3 * ind["energy_distance"][k]
    # an ordinary flow model: its own rule is Euler on the uniform-t grid, the measured samples
    model = load(ot_out)
    meta = model.meta
    assert (meta["process"]["kind"], meta["prediction"], meta["default_sampler"]) == ("flow", "flow", "euler")
    assert meta["interpolant"] == {"path": "linear", "gamma": 0.0, "coupling": "ot", "sb_epsilon": None,
                                   "ot_pairs": "permutation", "ode_only": False}
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
    x_rule = model.sample(200, 2, x=model.sigma_max * z)[0]
    x_dpm = model.sample(200, 8, sampler="dpmpp_2m", x=model.sigma_max * z)[0]
    assert float((x_rule - x_dpm).pow(2).mean().sqrt()) < 0.1  # straight: 2 Euler steps ~ an accurate ODE


def test_bad_options_are_one_line(ring_spec):
    base = {"data": ring_spec, "net": NET}
    for bad, word in (({"path": "spiral"}, "--path"), ({"sb_epsilon": -1.0}, "--sb-epsilon"),
                      ({"sb_epsilon": 0.0}, "--sb-epsilon"), ({"gamma": -0.1}, "--gamma"),
                      ({"coupling": "best"}, "--coupling"), ({"coupling": "teacher"}, "--teacher"),
                      ({"ot_pairs": "greedy", "coupling": "ot"}, "--ot-pairs"),
                      ({"ot_pairs": "sample", "coupling": "sb"}, "--ot-pairs"), ({"ot_pairs": "sample"}, "--ot-pairs")):
        with pytest.raises(UserError) as e:
            resolve("flow_matching", {**base, **bad})
        assert word in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_sb_run_resumes_bit_for_bit(monkeypatch, tmp_path, ring_spec):
    """The Sinkhorn pairs and the bridge noise come from the step's generator: a run stopped at
    step 30 and resumed equals the uninterrupted one (checkpoint every 20 steps)."""
    from _resume import full_and_resumed

    cfg = {"data": ring_spec, "coupling": "sb", "net": NET, "steps": 60, "device": "cpu", "eval_samples": 50,
           "checkpoint_every": 20, "warmup": 5, "batch_size": 64}
    full, resumed = full_and_resumed(monkeypatch, "flow_matching", cfg, tmp_path, at=30)
    same_weights(full, resumed)
