"""Score matching (``--family sm``: exact / sliced / denoising) and NCSN (``--family ncsn``)
against closed forms on Gaussians and the exact scores of a 2-D Gaussian mixture.

Monte-Carlo tolerances are 5 standard errors of the estimate (measured from the samples
themselves), so a correct implementation fails with probability < 1e-6 per check; every
random draw is seeded.
"""
import math

import pytest
import torch
from torch import nn

from fewstep.data.gmm import GaussianMixture
from fewstep.data.registry import Dataset
from fewstep.errors import UserError
from fewstep.families import ScoreDenoiser
from fewstep.families import ncsn as NC
from fewstep.families import score_matching as SM

SMALL_NET = {"kind": "mlp", "dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32}
F64 = torch.float64


def _gaussian(d, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=F64)
    M = torch.randn(d, d, generator=g, dtype=F64)
    return mu, M @ M.T / d + 0.5 * torch.eye(d, dtype=F64), g


def _samples(mu, S, n, g):
    return mu + torch.randn(n, len(mu), generator=g, dtype=F64) @ torch.linalg.cholesky(S).T


def _linear(A, b):
    return lambda x: x @ A.T + b


def _within(samples, target, k=5.0):
    """Mean of per-sample values within k standard errors of target (and the numbers)."""
    m, se = float(samples.mean()), float(samples.std() / math.sqrt(samples.numel()))
    assert abs(m - target) < k * se + 1e-12, (m, target, se)


# ------------------------------------------------------------------ objectives vs closed forms
def test_exact_sm_loss_is_hyvarinens_closed_form_on_a_gaussian():
    """x ~ N(mu, S), s(x) = A x + b: J(s) = 1/2 tr(A S A^T) + 1/2 |A mu + b|^2 + tr A, which is
    also 1/2 E|s - s_p|^2 - 1/2 E|s_p|^2 (Fisher identity) with s_p = -P (x - mu), P = S^-1."""
    d = 3
    mu, S, g = _gaussian(d, 0)
    P = torch.linalg.inv(S)
    A, b = torch.randn(d, d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    closed = 0.5 * torch.trace(A @ S @ A.T) + 0.5 * (A @ mu + b).pow(2).sum() + torch.trace(A)
    E = A + P  # s - s_p = E x + (b - P mu)
    fisher = 0.5 * (torch.trace(E @ S @ E.T) + (E @ mu + b - P @ mu).pow(2).sum()) - 0.5 * torch.trace(P)
    assert float(closed) == pytest.approx(float(fisher), rel=1e-12)  # the identity, algebraically

    x = _samples(mu, S, 100_000, g)
    loss = SM.exact_sm_loss(_linear(A, b), x, create_graph=False)
    assert loss.shape == (len(x),)
    _within(loss.detach(), float(closed))

    # the minimiser is the true score: J(s_p + delta) - J(s_p) = 1/2 E|delta|^2 > 0, on common samples
    true = _linear(-P, P @ mu)
    j_true = SM.exact_sm_loss(true, x, create_graph=False).detach()
    _within(j_true, float(-0.5 * torch.trace(P)))
    for k in range(3):
        dA, db = 0.3 * torch.randn(d, d, generator=g, dtype=F64), 0.3 * torch.randn(d, generator=g, dtype=F64)
        diff = SM.exact_sm_loss(_linear(dA - P, db + P @ mu), x, create_graph=False).detach() - j_true
        half_delta = 0.5 * (torch.trace(dA @ S @ dA.T) + (dA @ mu + db).pow(2).sum())
        assert float(diff.mean()) > 0
        _within(diff, float(half_delta))


def _mlp_score(d, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, d)).double()
    return lambda x: net(x) - 0.5 * x


def test_sliced_sm_is_an_unbiased_estimate_of_the_exact_trace_loss():
    """E_v of both SSM forms equals eq. 18 for a nonlinear score (per-sample differences to
    the exact-trace loss average to 0 within 5 SE), and for a linear score the VJP gives
    v^T A v exactly."""
    d, n = 4, 40_000
    fn = _mlp_score(d, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=g, dtype=F64)
    exact = SM.exact_sm_loss(fn, x, create_graph=False).detach()
    for vr in (True, False):
        for m in (1, 3):
            v = torch.randn(n, m, d, generator=g, dtype=F64)
            sliced = SM.sliced_sm_loss(fn, x, v, variance_reduced=vr, create_graph=False).detach()
            assert sliced.shape == (n,)
            _within(sliced - exact, 0.0)

    A, b = torch.randn(d, d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    xs, v = x[:50], torch.randn(50, 2, d, generator=g, dtype=F64)
    s = xs @ A.T + b
    vAv = torch.einsum("bmi,ij,bmj->bm", v, A, v)
    want_vr = (vAv + 0.5 * s.pow(2).sum(1, keepdim=True)).mean(1)
    want_plain = (vAv + 0.5 * torch.einsum("bmi,bi->bm", v, s).pow(2)).mean(1)
    got_vr = SM.sliced_sm_loss(_linear(A, b), xs, v, create_graph=False)
    got_plain = SM.sliced_sm_loss(_linear(A, b), xs, v, variance_reduced=False, create_graph=False)
    assert torch.allclose(got_vr, want_vr, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_plain, want_plain, rtol=1e-12, atol=1e-12)


def test_dsm_differences_follow_vincents_identity():
    """x ~ N(mu, S), level sigma: p_sigma = N(mu, C), C = S + sigma^2 I, s_sigma = -C^-1 (y - mu).
    sigma^2-weighted DSM: J(s) - J(s') = sigma^2 / 2 (E|s - s_sigma|^2 - E|s' - s_sigma|^2)."""
    d, sigma, n = 2, 0.5, 200_000
    mu, S, g = _gaussian(d, 3)
    C = S + sigma**2 * torch.eye(d, dtype=F64)
    Q = torch.linalg.inv(C)

    def fisher(A, b):  # E_{y ~ p_sigma} |A y + b - s_sigma(y)|^2
        E = A + Q
        return torch.trace(E @ C @ E.T) + (E @ mu + b - Q @ mu).pow(2).sum()

    x = _samples(mu, S, n, g)
    z = torch.randn(n, d, generator=g, dtype=F64)
    pairs = [((-Q, Q @ mu), (-Q + 0.4 * torch.randn(d, d, generator=g, dtype=F64), Q @ mu + 0.3)),
             ((0.2 * torch.eye(d, dtype=F64), torch.zeros(d, dtype=F64)), (-Q, Q @ mu + 0.5))]
    for (A, b), (A2, b2) in pairs:
        diff = SM.dsm_loss(_linear(A, b), x, z, sigma) - SM.dsm_loss(_linear(A2, b2), x, z, sigma)
        _within(diff, float(0.5 * sigma**2 * (fisher(A, b) - fisher(A2, b2))))
    # per-sample: the loss is sigma^2 / 2 |s(x + sigma z) + z / sigma|^2
    A, b = pairs[0][1]
    one = SM.dsm_loss(_linear(A, b), x[:5], z[:5], sigma)
    want = 0.5 * sigma**2 * ((x[:5] + sigma * z[:5]) @ A.T + b + z[:5] / sigma).pow(2).sum(1)
    assert torch.allclose(one, want, rtol=1e-12)


# ------------------------------------------------------------------ training on a 2-D mixture
def _mixture():
    covs = torch.stack([torch.diag(torch.tensor(v, dtype=F64)) for v in ([0.25, 0.16], [0.16, 0.36], [0.3, 0.2])])
    return GaussianMixture(torch.tensor([1.0, 2.0, 1.5]), torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]), covs)


@pytest.fixture(scope="module")
def gmm():
    return _mixture()


@pytest.fixture(scope="module")
def data(gmm):
    x = gmm.sample(4000, generator=torch.Generator().manual_seed(0)).float()
    return Dataset(x=x, labels=None, num_classes=0, kind="points", name="gmm")


@pytest.fixture(scope="module")
def spec(gmm, tmp_path_factory):
    path = tmp_path_factory.mktemp("score") / "mix.npz"
    gmm.save(path)
    return f"gmm:{path}"


def _sm_cfg(objective, **kw):
    return {**SM.DEFAULTS, "sm_objective": objective, "batch_size": 256, "net": SMALL_NET, "seed": 0, **kw}


def _ncsn_cfg(**kw):
    return {**NC.DEFAULTS, "ncsn_levels": 4, "ncsn_sigma_max": 3.0, "ncsn_sigma_min": 0.1, "batch_size": 256,
            "net": SMALL_NET, "seed": 0, **kw}


def _train(fam, cfg, data, steps):
    """A plain Adam loop over the family's Objective (draw from a per-step generator)."""
    torch.manual_seed(int(cfg["seed"]))
    obj = fam.objective(cfg, data)
    opt = torch.optim.Adam(obj.module.parameters(), lr=3e-3)
    for k in range(steps):
        loss = obj.loss(obj.module, obj.draw(torch.Generator().manual_seed(1000 + k), k)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return obj.module


def _with_data(meta, data):
    return {**meta, "data": {"name": data.name, "kind": data.kind, "shape": list(data.shape), "num_classes": 0}}


# relative score errors after 300 steps of the small MLP (measured over seeds 0-2: exact
# 0.05-0.07, sliced 0.07-0.08, dsm 0.14-0.16, whose target -z / sigma is the noisiest);
# bounds with a 2-3x margin
SM_BOUNDS = {"exact": 0.2, "sliced": 0.25, "dsm": 0.35}


@pytest.mark.parametrize("objective", ["exact", "sliced", "dsm"])
def test_score_matching_recovers_the_mixture_score(objective, data, gmm):
    cfg = _sm_cfg(objective)
    sigma = cfg["sm_sigma"] if objective == "dsm" else 0.0
    torch.manual_seed(0)
    init = SM.objective(cfg, data).module
    err0 = SM.score_error(lambda y, s: init(y), gmm, sigma, 4000, 5)
    assert err0 == pytest.approx(1.0, abs=1e-6)  # the MLP's zero-initialised output: s = 0
    module = _train(SM, cfg, data, 300)
    err = SM.score_error(lambda y, s: module(y), gmm, sigma, 4000, 5)
    assert err < SM_BOUNDS[objective], err
    assert err < 0.4 * err0


@pytest.fixture(scope="module")
def dsm_module(data):
    return _train(SM, _sm_cfg("dsm"), data, 300)


def test_sm_model_round_trip_rule_and_evaluate(dsm_module, data, gmm, spec, monkeypatch):
    from fewstep import samplers

    cfg = _sm_cfg("dsm", data=spec)
    meta = _with_data(SM.meta(cfg, dsm_module, data), data)
    rms = float(data.x.double().pow(2).mean().sqrt())
    assert meta["sigma_min"] == cfg["sm_sigma"] and meta["sigma_max"] == pytest.approx(2 * rms)
    assert meta["sampling"] == {"sampler": "langevin", "options": {"step_size": pytest.approx(1e-3 * rms**2)}}
    fresh = SM.build(meta)
    fresh.load_state_dict(dsm_module.state_dict())
    model = SM.as_model(fresh.eval(), meta, "run", "cpu")
    assert isinstance(model.denoiser, ScoreDenoiser)
    y = torch.randn(7, 2)
    # D = x + sigma^2 s at the model's level
    assert torch.allclose(model.denoiser(y, 0.1), y + 0.01 * dsm_module(y), atol=1e-6)
    assert (model.process.sigma_min, model.process.sigma_max) == (meta["sigma_min"], meta["sigma_max"])

    calls = []

    def fake(denoiser, x, sigmas, **opts):
        calls.append((sigmas, opts))
        return x

    monkeypatch.setitem(samplers._REGISTRY, "langevin",
                        samplers.SamplerInfo("langevin", fake, lambda steps, **_: steps, stochastic=True))
    model.sample(5, nfe=meta["default_nfe"], seed=0)
    sigmas, opts = calls[0]
    assert len(sigmas) - 1 == meta["default_nfe"] and float(sigmas[-2]) == pytest.approx(0.1)  # at the level
    assert opts["step_size"] == meta["sampling"]["options"]["step_size"]
    monkeypatch.undo()

    ev = SM.evaluate(model, data, {**cfg, "eval_samples": 3000})
    assert ev["score_rel_error"] == pytest.approx(SM.score_error(
        lambda y, s: dsm_module(y), gmm, 0.1, 3000, cfg["seed"] + 17), rel=1e-5)
    assert ev["score_sigma"] == 0.1 and ev["sampling_nfe"] == 1000 and ev["sampling_rule"] == "langevin"
    assert SM.evaluate(model, data, {**cfg, "data": "moons"}) == {"sampling_rule": "langevin", "sampling_nfe": 1000}


class _Exact(nn.Module):
    """The mixture's exact score s_sigma(x) as a module (sigma=None: the data score)."""

    def __init__(self, gmm, sigma=None):
        super().__init__()
        self.gmm, self.sigma = gmm, sigma

    def forward(self, x, sigma=None):
        s = self.sigma if self.sigma is not None else sigma
        return self.gmm.score(x, s if s is not None else 0.0).to(x.dtype)


def test_evaluate_gives_zero_error_for_the_exact_score(data, gmm, spec):
    """A model whose score is the exact one scores ~0 (float32 inputs: ~1e-12)."""
    meta = _with_data(SM.meta(_sm_cfg("sliced"), SM.objective(_sm_cfg("sliced"), data).module, data), data)
    model = SM.score_model(_Exact(gmm), meta, "exact", "cpu", "langevin")
    ev = SM.evaluate(model, data, {**_sm_cfg("sliced"), "data": spec})
    assert ev["score_sigma"] == 0.0 and ev["score_rel_error"] < 1e-8
    cfg = _ncsn_cfg(data=spec)
    meta = _with_data(NC.meta(cfg, NC.objective(cfg, data).module, data), data)
    ev = NC.evaluate(SM.score_model(_Exact(gmm), meta, "exact", "cpu", "annealed_langevin"), data, cfg)
    assert len(ev["score_rel_error_per_level"]) == 4 and max(ev["score_rel_error_per_level"]) < 1e-8


def test_langevin_on_the_model_spends_its_nfe(dsm_module, data):
    """The registered ULA sampler (samplers/langevin.py) runs the own rule: one evaluation per step."""
    from fewstep import samplers

    if "langevin" not in samplers.names():
        pytest.skip("sampler 'langevin' not registered yet")
    meta = _with_data(SM.meta(_sm_cfg("dsm"), dsm_module, data), data)
    model = SM.as_model(dsm_module, meta, "run", "cpu")
    count = []
    h = dsm_module.register_forward_hook(lambda *a: count.append(1))
    try:
        x, _ = model.sample(64, nfe=40, seed=0)
    finally:
        h.remove()
    assert len(count) == 40 and x.shape == (64, 2) and bool(torch.isfinite(x).all())


def test_sm_check_refuses_what_cannot_work(data):
    wide = Dataset(x=torch.randn(10, 65), labels=None, num_classes=0, kind="points", name="wide")
    with pytest.raises(UserError, match="--sm-objective sliced or dsm"):
        SM.check(_sm_cfg("exact"), wide)
    SM.check(_sm_cfg("sliced"), wide)
    SM.check(_sm_cfg("exact"), data)
    for bad in ({"sm_objective": "ssm"}, {"sm_sigma": -0.1}, {"sm_sigma": float("nan")}, {"sm_slices": 0},
                {"sm_slices": 1.5}, {"sm_step_size": 0.0}, {"sm_sliced_vr": "maybe"}):
        with pytest.raises(UserError):
            SM.check({**_sm_cfg("sliced"), **bad}, data)


# ------------------------------------------------------------------ NCSN
def test_ncsn_levels_are_geometric_with_the_given_ends(data):
    cfg = _ncsn_cfg(ncsn_levels=6, ncsn_sigma_max=5.0, ncsn_sigma_min=0.02)
    lv = NC.ladder(cfg, data)
    assert len(lv) == 6 and float(lv[0]) == pytest.approx(5.0, rel=1e-12) and float(lv[-1]) == pytest.approx(0.02)
    ratio = lv[1:] / lv[:-1]
    assert torch.allclose(ratio, torch.full_like(ratio, (0.02 / 5.0) ** (1 / 5)), rtol=1e-12)
    meta = NC.meta(cfg, NC.objective(cfg, data).module, data)
    assert meta["levels"] == lv.tolist() and (meta["sigma_max"], meta["sigma_min"]) == (lv[0], lv[-1])
    assert meta["default_nfe"] == 6 * cfg["ncsn_steps_per_level"] + 1


def test_ncsn_sigma_max_is_the_largest_pairwise_distance(data):
    """Song & Ermon 2020, technique 1; on 1500 <= 2000 points the estimate is the exact maximum."""
    few = Dataset(x=data.x[:1500], labels=None, num_classes=0, kind="points", name="few")
    brute = float(torch.nn.functional.pdist(few.x.double()).max())  # pair by pair, not NC's cdist
    lv = NC.ladder(_ncsn_cfg(ncsn_sigma_max=None), few)
    assert float(lv[0]) == pytest.approx(brute, rel=1e-9)  # cdist's matrix-product rounding
    # on more points than the subset it is a lower bound of the true maximum
    assert NC.max_pairwise_distance(data.x, 0) <= float(torch.nn.functional.pdist(data.x.double()).max()) + 1e-9


def test_ncsn_loss_is_sigma_squared_weighted_dsm_at_uniform_levels(data, gmm):
    cfg = _ncsn_cfg()
    obj = NC.objective(cfg, data)
    levels = NC.ladder(cfg, data).float()
    exact = _Exact(gmm)
    b = obj.draw(torch.Generator().manual_seed(0), 0)
    loss = obj.loss(exact, b)
    sig = b["sigma"][:, None].double()
    y = b["x"].double() + sig * b["z"].double()
    want = 0.5 * sig[:, 0] ** 2 * (gmm.score(y, sig[:, 0]) + b["z"].double() / sig).pow(2).sum(1)
    assert torch.allclose(loss.double(), want, rtol=1e-4)
    # each sample's level uniformly from the ladder: frequencies 1/L within 5 SE
    draws = torch.cat([obj.draw(torch.Generator().manual_seed(k), k)["sigma"] for k in range(40)])
    idx = (draws[:, None] == levels[None]).float()
    assert bool((idx.sum(1) == 1).all())
    p, se = idx.mean(0), math.sqrt(0.25 * 0.75 / len(draws))
    assert bool(((p - 0.25).abs() < 5 * se).all()), p
    # Vincent at each level: E[loss | sigma] at the exact score = 1/2 (d - sigma^2 E|s_sigma|^2)
    n = 40_000
    g = torch.Generator().manual_seed(9)
    for s in levels.tolist():
        x = gmm.sample(n, generator=g)
        z = torch.randn(n, 2, generator=g, dtype=F64)
        per = SM.dsm_loss(lambda yy: gmm.score(yy, s), x, z, s)
        ys = gmm.sample(n, generator=g)
        ys = ys + s * torch.randn(ys.shape, generator=g, dtype=F64)
        _within(per - 0.5 * (2 - s**2 * gmm.score(ys, s).pow(2).sum(1)), 0.0, k=6.0)


@pytest.fixture(scope="module")
def ncsn_module(data):
    return _train(NC, _ncsn_cfg(), data, 300)


def test_ncsn_training_lowers_the_score_error_at_every_level(ncsn_module, data, gmm):
    levels = NC.ladder(_ncsn_cfg(), data).tolist()
    torch.manual_seed(0)
    init = NC.objective(_ncsn_cfg(), data).module
    before = [SM.score_error(lambda y, s: init(y, s), gmm, s, 3000, 1) for s in levels]
    after = [SM.score_error(lambda y, s: ncsn_module(y, s), gmm, s, 3000, 1) for s in levels]
    assert all(b == pytest.approx(1.0, abs=1e-6) for b in before)  # zero-initialised output
    # measured (seeds 0-2) 0.01, 0.02-0.03, 0.09-0.12, 0.32-0.40 from the largest level down (the
    # DSM target's noise grows as 1 / sigma; each level gets a quarter of the batch), mean 0.12-0.14
    assert all(a < 0.7 for a in after) and sum(after) / len(after) < 0.3, after


def test_ncsn_own_rule_is_annealed_langevin_on_the_ladder(ncsn_module, data, monkeypatch):
    from fewstep import samplers

    cfg = _ncsn_cfg(ncsn_steps_per_level=3, ncsn_eps=3e-5)
    meta = _with_data(NC.meta(cfg, ncsn_module, data), data)
    model = NC.as_model(ncsn_module, meta, "run", "cpu")
    assert meta["default_nfe"] == 4 * 3 + 1
    assert meta["sampling"]["options"] == {"steps_per_level": 3, "eps": 3e-5, "denoise_last": True}
    y = torch.randn(5, 2)
    sig = torch.tensor(0.7)
    assert torch.allclose(model.denoiser(y, sig), y + 0.49 * ncsn_module(y, sig), atol=1e-6)  # D = x + s^2 score

    real = "annealed_langevin" in samplers.names()
    calls = []

    def fake(denoiser, x, sigmas, **opts):
        calls.append((sigmas, opts))
        return x

    def cost(steps, steps_per_level=10, denoise_last=True, final_zero=True, **_):
        return (steps + (not final_zero)) * steps_per_level + int(denoise_last)

    monkeypatch.setitem(samplers._REGISTRY, "annealed_langevin",
                        samplers.SamplerInfo("annealed_langevin", fake, cost, stochastic=True))
    model.sample(5, nfe=meta["default_nfe"], seed=0)
    sigmas, opts = calls[0]
    assert float(sigmas[-1]) == 0 and torch.allclose(sigmas[:-1].double(), torch.tensor(meta["levels"], dtype=F64),
                                                     rtol=1e-12)
    assert opts["steps_per_level"] == 3 and opts["eps"] == 3e-5 and opts["denoise_last"] is True
    monkeypatch.undo()

    if not real:
        pytest.skip("sampler 'annealed_langevin' not registered yet: the evaluation count is untested")
    count = []
    h = ncsn_module.register_forward_hook(lambda *a: count.append(1))
    try:
        x, _ = model.sample(64, nfe=meta["default_nfe"], seed=0)
    finally:
        h.remove()
    assert len(count) == meta["default_nfe"] and bool(torch.isfinite(x).all())
    # a diffusion sampler runs on NCSN too (a VE model on the ladder)
    x, _ = model.sample(64, nfe=8, sampler="euler", seed=0)
    assert x.shape == (64, 2) and bool(torch.isfinite(x).all())


def test_ncsn_check_refuses_what_cannot_work(data):
    NC.check(_ncsn_cfg(), data)
    for bad in ({"ncsn_levels": 1}, {"ncsn_sigma_max": 0.05}, {"ncsn_sigma_min": 0.0}, {"ncsn_eps": -1.0},
                {"ncsn_steps_per_level": 0}, {"ncsn_denoise_last": "sometimes"}):
        with pytest.raises(UserError):
            NC.check({**_ncsn_cfg(), **bad}, data)
    one = Dataset(x=torch.zeros(1, 2), labels=None, num_classes=0, kind="points", name="one")
    with pytest.raises(UserError, match="--ncsn-sigma-max"):
        NC.check(_ncsn_cfg(ncsn_sigma_max=None), one)
