"""The energy-based family (survey sec. 1.2, eq. 6-13; Du & Mordatch 2019): the maximum-
likelihood gradient, persistent chains and their resume, the temperature of the sampling
rule, and a short training run against an exact Gaussian mixture."""
import copy

import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.data.registry import Dataset, load_dataset
from fewstep.errors import UserError
from fewstep.families import energy as ebm
from fewstep.families import load_family

MEANS = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]], dtype=torch.float64)
STD = 0.3


def mixture() -> GaussianMixture:
    return GaussianMixture(torch.ones(4), MEANS, STD**2 * torch.eye(2, dtype=torch.float64).expand(4, 2, 2))


def points(n=4000, seed=0) -> Dataset:
    x = mixture().sample(n, generator=torch.Generator().manual_seed(seed)).float()
    return Dataset(x=x, labels=None, num_classes=0, kind="points", name="gmm4")


def small_cfg(**kw) -> dict:
    cfg = dict(data="gmm4", batch_size=64, seed=0, ebm_steps=10, ebm_buffer=500, ebm_keep=100,
               net=dict(kind="mlp", dim=2, hidden=32, depth=2, emb_dim=16))
    cfg.update(kw)
    return cfg


def energies(module, *xs):
    with torch.no_grad():
        return [module(x) for x in xs]


def test_one_step_lowers_data_energy_relative_to_chains():
    """One SGD step on the loss of a fixed batch lowers E(data) - E(chains) on that batch by
    lr |grad L|^2 (first order; eq. 13's direction). E alone is defined up to a constant, so
    only this gap is invariant: the untrained net's features share a common direction and one
    step may shift both energies alike."""
    torch.manual_seed(0)
    data, cfg = points(), small_cfg(ebm_alpha=0.0)
    obj = ebm.objective(cfg, data)
    b = obj.draw(torch.Generator().manual_seed(1), 0)
    loss = obj.loss(obj.module, b).mean()
    pos, neg = b["x0"] + 0.01 * b["data_noise"], obj.extra["buffer"].x[b["slot"]].clone()
    ep0, en0 = energies(obj.module, pos, neg)
    lr = 1e-2
    opt = torch.optim.SGD(obj.module.parameters(), lr=lr)
    opt.zero_grad()
    loss.backward()
    g2 = float(sum(p.grad.square().sum() for p in obj.module.parameters()))
    opt.step()
    ep1, en1 = energies(obj.module, pos, neg)
    change = float((ep1.mean() - en1.mean()) - (ep0.mean() - en0.mean()))
    assert change < 0
    # second-order remainder ~ lr^2 |H| |g|^2: at lr = 1e-2 it is well under 5% of lr |g|^2
    assert change == pytest.approx(-lr * g2, rel=0.05)
    # the chains ran from their rows (or restarts) and their ends were written back
    rows = ebm.ReplayBuffer(500, (2,), obj.module.start_std, 0).x[b["slot"]]
    start = torch.where(b["reinit"][:, None], b["init"], rows)
    assert float((neg - start).abs().max()) > 0.1


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_loss_gradient_is_the_eq13_estimator(alpha):
    """grad_theta mean(loss) = grad mean E(x+) - grad mean E(x-) (+ alpha grad mean(E+^2 + E-^2)),
    each term by autograd on its own; the chains leave no parameter gradient behind."""
    torch.manual_seed(1)
    data, cfg = points(), small_cfg(ebm_alpha=alpha)
    obj = ebm.objective(cfg, data)
    for p in obj.module.parameters():  # a non-degenerate net (the output layer starts at 0)
        p.data.add_(0.1 * torch.randn_like(p))
    b = obj.draw(torch.Generator().manual_seed(2), 0)
    loss = obj.loss(obj.module, b).mean()
    assert all(p.grad is None for p in obj.module.parameters())  # the chain accumulated nothing
    params = list(obj.module.parameters())
    got = torch.autograd.grad(loss, params)
    pos, neg = b["x0"] + 0.01 * b["data_noise"], obj.extra["buffer"].x[b["slot"]].clone()
    e_pos, e_neg = obj.module(pos), obj.module(neg)
    g_pos = torch.autograd.grad(e_pos.mean(), params, retain_graph=True)
    g_neg = torch.autograd.grad(e_neg.mean(), params, retain_graph=True)
    g_reg = torch.autograd.grad((e_pos.square() + e_neg.square()).mean(), params)
    for a, gp, gn, gr in zip(got, g_pos, g_neg, g_reg):
        # float32 sums over 128 samples: agreement to ~1e-6 relative
        torch.testing.assert_close(a, gp - gn + alpha * gr, rtol=1e-4, atol=1e-6)


def _run(obj, opt, steps, start=0):
    losses = []
    for k in range(start, start + steps):
        b = obj.draw(torch.Generator().manual_seed(1000 + k), k)
        loss = obj.loss(obj.module, b).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_determinism_and_resume_are_bit_identical():
    data, cfg = points(), small_cfg()
    # the buffer's start comes from cfg["seed"], not the global RNG
    torch.manual_seed(123)
    a = ebm.objective(cfg, data)
    torch.manual_seed(456)
    assert torch.equal(a.extra["buffer"].x, ebm.objective(cfg, data).extra["buffer"].x)
    assert not torch.equal(a.extra["buffer"].x, ebm.objective({**cfg, "seed": 1}, data).extra["buffer"].x)

    def fresh(seed):
        torch.manual_seed(seed)
        obj = ebm.objective(cfg, data)
        return obj, torch.optim.Adam(obj.module.parameters(), lr=1e-3)

    one, opt1 = fresh(0)
    two, opt2 = fresh(0)
    l1, l2 = _run(one, opt1, 4), _run(two, opt2, 4)
    assert torch.equal(l1, l2) and torch.equal(one.extra["buffer"].x, two.extra["buffer"].x)

    # resume: 2 steps, state_dicts (what the loop checkpoints), a fresh object (other init), 2 more
    part, opt = fresh(0)
    _run(part, opt, 2)
    saved = copy.deepcopy({"net": part.module.state_dict(), "buffer": part.extra["buffer"].state_dict(),
                           "opt": opt.state_dict()})
    assert set(saved["buffer"]) == {"x"}
    resumed, opt_r = fresh(99)
    resumed.module.load_state_dict(saved["net"])
    resumed.extra["buffer"].load_state_dict(saved["buffer"])
    opt_r.load_state_dict(saved["opt"])
    l_r = _run(resumed, opt_r, 2, start=2)
    assert torch.equal(l_r, l1[2:])
    assert torch.equal(resumed.extra["buffer"].x, one.extra["buffer"].x)
    assert torch.equal(resumed.module.bank, one.module.bank)
    for p, q in zip(resumed.module.parameters(), one.module.parameters()):
        assert torch.equal(p, q)


def test_each_slice_writes_only_its_rows():
    """Two processes' slices of one global batch (the loop's split) give the buffer and the
    losses of the whole batch: each slice reads and writes only its own rows."""
    torch.manual_seed(0)
    data, cfg = points(), small_cfg()
    whole, halves = ebm.objective(cfg, data), ebm.objective(cfg, data)
    halves.module.load_state_dict(whole.module.state_dict())
    b = whole.draw(torch.Generator().manual_seed(5), 0)
    full = whole.loss(whole.module, b)
    parts = [halves.loss(halves.module, {k: v[sl] for k, v in b.items()}) for sl in (slice(0, 32), slice(32, 64))]
    # per-sample work; only batched-matmul rounding can differ (float32, 10 chain steps)
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(halves.extra["buffer"].x, whole.extra["buffer"].x, rtol=0, atol=1e-5)
    untouched = torch.ones(500, dtype=torch.bool)
    untouched[b["slot"]] = False
    start = ebm.ReplayBuffer(500, (2,), whole.module.start_std, 0).x
    assert torch.equal(whole.extra["buffer"].x[untouched], start[untouched])


def _gaussian_model(step_size=0.01, noise=0.1):
    """An untrained EBM (zero output layer) with tail 1 and start std 1: E(x) = |x|^2 / 2, so
    the model's density exp(-E / T) is exactly N(0, T I), T = noise^2 / (2 step_size)."""
    torch.manual_seed(0)
    module = ebm.EnergyNet(dict(kind="mlp", dim=2, hidden=16, depth=1, emb_dim=16), (2,), 1.0, tail=1.0, keep=8)
    cfg = dict(batch_size=8, ebm_step_size=step_size, ebm_noise=noise, ebm_buffer=8, ebm_keep=8)
    meta = ebm.meta(cfg, module, None)
    meta["data"] = {"name": "toy", "kind": "points", "shape": [2], "num_classes": 0}
    return module, meta, ebm.as_model(module, meta, "ebm-test")


def test_own_rule_and_mala_sample_the_tempered_density():
    """With decoupled step 0.01 and noise 0.1 (T = 0.5) the model is N(0, 0.5 I): MALA (exact
    at any step) and the own ULA rule (stationary variance T / (1 - eps / (2 T)) = 0.5025 at
    eps = 0.005) reach it from N(0, I)."""
    module, meta, model = _gaussian_model()
    T = meta["ebm"]["temperature"]
    assert T == pytest.approx(0.5)
    x = torch.randn(16, 2)
    # score -grad E / T = -x / T, log p = -E / T, Tweedie's D at the model's level
    torch.testing.assert_close(model.denoiser.score(x, 0.3), -x / T)
    torch.testing.assert_close(model.denoiser.log_prob(x), -0.5 * x.square().sum(1) / T)
    s = model.sigma_min
    torch.testing.assert_close(model.denoiser(x, s), x - s**2 * x / T)
    n = 2000
    # MALA at eps = 0.05 contracts the variance gap by (1 - eps / T)^2 per step: 300 steps
    # leave e^-60; the sample variance of 2 x 2000 values has std 0.5 sqrt(2 / 4000) = 0.011,
    # so 0.05 is > 4 std
    rates = []
    xm, _ = model.sample(n, 301, sampler="mala", seed=3, step_size=0.05,
                         callback=lambda info: rates.append(info["accept_rate"]))
    assert xm.shape == (n, 2) and torch.isfinite(xm).all()
    assert 0.5 < sum(rates) / len(rates) <= 1.0
    assert float(xm.var()) == pytest.approx(0.5, abs=0.05)
    # own rule: 400 steps at eps = 0.005 leave the start's excess variance times (0.99)^800 = 3e-4
    assert model.sampling["sampler"] == "langevin"
    assert model.sampling["options"]["step_size"] == pytest.approx(0.1**2 / 2)
    xl, _ = model.sample(n, 400, seed=4)
    assert xl.shape == (n, 2) and torch.isfinite(xl).all()
    assert float(xl.var()) == pytest.approx(0.5 / (1 - 0.005 / (2 * 0.5)), abs=0.05)


def test_own_rule_is_the_training_chain():
    """The registered ``langevin`` sampler at the own rule's step eps = noise^2 / 2, on the
    score -grad E / T, makes exactly the training chain's steps x - a grad E + b z."""
    module, meta, model = _gaussian_model(step_size=0.02, noise=0.1)  # T = 0.25
    for p in module.parameters():  # a rugged energy: gradients of order 1-10
        p.data.add_(0.3 * torch.randn_like(p))
    x0, K = torch.randn(64, 2), 20
    g = torch.Generator().manual_seed(7)
    z = torch.stack([torch.randn((64, 2), generator=g) for _ in range(K)], 1)
    want = ebm.langevin_chain(module, x0, z, 0.02, 0.1)
    got, _ = model.sample(64, K, x=x0, generator=torch.Generator().manual_seed(7))
    # the sampler recovers s = (D - x) / sigma^2 at sigma = 0.01: rounding of D costs
    # ~6e-8 |x| / 1e-4 in s, times eps = 0.005, over 20 steps: < 1e-4 for |x| < 4
    assert float((want - x0).abs().max()) > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=5e-4)


def test_meta_build_round_trip_and_buffer_samples():
    torch.manual_seed(0)
    data, cfg = points(), small_cfg()
    obj = ebm.objective(cfg, data)
    _run(obj, torch.optim.Adam(obj.module.parameters(), lr=1e-3), 2)
    meta = ebm.meta(cfg, obj.module, data)
    assert meta["family"] == "ebm" and meta["default_nfe"] == 200 and meta["default_sampler"] == "langevin"
    assert meta["sigma_min"] == 0.01 and meta["sigma_max"] == pytest.approx(obj.module.start_std)
    import json

    meta = json.loads(json.dumps(meta))  # model.json is JSON
    meta["data"] = {"name": "gmm4", "kind": "points", "shape": [2], "num_classes": 0}
    model = load_family(meta, obj.module.state_dict(), "run", "cpu")  # build + weights + as_model
    again = model.denoiser.module
    x = torch.randn(10, 2)
    assert torch.equal(energies(again, x)[0], energies(obj.module, x)[0])
    bank = ebm.buffer_samples(model, 50)
    assert torch.equal(bank, obj.extra["buffer"].x[:50])
    out, _ = model.sample(50, 5, x=bank)  # continue the persistent chains
    assert out.shape == (50, 2) and torch.isfinite(out).all()
    with pytest.raises(UserError, match="keeps 100"):
        ebm.buffer_samples(model, 101)


@pytest.mark.parametrize("bad, match", [
    ({"ebm_steps": -1}, "--ebm-steps"),
    ({"ebm_steps": 2.5}, "--ebm-steps"),
    ({"ebm_reinit": 1.5}, "--ebm-reinit"),
    ({"ebm_reinit": -0.1}, "--ebm-reinit"),
    ({"ebm_buffer": 32}, "--ebm-buffer 32 is smaller than --batch-size 64"),
    ({"ebm_step_size": 0.0}, "--ebm-step-size"),
    ({"ebm_step_size": float("nan")}, "--ebm-step-size"),
    ({"ebm_noise": 0}, "--ebm-noise"),
    ({"ebm_alpha": -1.0}, "--ebm-alpha"),
    ({"ebm_alpha": True}, "--ebm-alpha"),
    ({"ebm_data_noise": "x"}, "--ebm-data-noise"),
    ({"ebm_keep": 600}, "--ebm-keep 600 is larger"),
    ({"ebm_clip": -1}, "--ebm-clip"),
    ({"ebm_tail": float("inf")}, "--ebm-tail"),
    ({"ebm_sample_steps": 0}, "--ebm-sample-steps"),
    ({"conditional": True}, "--conditional"),
    ({"net": {"kind": "unet", "dropout": 0.1}}, "dropout"),
])
def test_check_refuses_bad_values(bad, match):
    with pytest.raises(UserError, match=match):
        ebm.check(small_cfg(**bad), points(100))


def test_options_have_help_and_images_train():
    assert set(ebm.HELP) == set(ebm.DEFAULTS) and all(k.startswith("ebm_") for k in ebm.DEFAULTS)
    d = load_dataset("digits", n=64, seed=0)
    cfg = dict(data="digits", batch_size=4, seed=0, ebm_steps=2, ebm_buffer=8, ebm_keep=4,
               net=dict(kind="unet", in_channels=1, image_size=8, base_channels=8, channel_mult=[1],
                        num_res_blocks=1, attn_resolutions=[], dropout=0.0))
    torch.manual_seed(0)
    obj = ebm.objective(cfg, d)
    loss = obj.loss(obj.module, obj.draw(torch.Generator().manual_seed(0), 0))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    meta = ebm.meta(cfg, obj.module, d)
    meta["data"] = {"name": "digits", "kind": "image", "shape": list(d.shape), "num_classes": 0}
    x, _ = ebm.as_model(obj.module, meta, "img").sample(3, 2)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    # the default UNet of a 32 px set has dropout 0.1: the family turns it off (a deterministic energy)
    shapes = Dataset(x=torch.zeros(4, 3, 32, 32), labels=None, num_classes=0, kind="image", name="s")
    assert ebm._net_config({}, shapes)["dropout"] == 0.0


def test_check_refuses_clouds():
    clouds = load_dataset("pointclouds:points=16", n=4, seed=0)
    with pytest.raises(UserError, match="point clouds"):
        ebm.check(small_cfg(), clouds)


def test_short_training_learns_the_mixture(tmp_path):
    """A plain Adam loop of 200 steps on 4000 points of a 4-mode mixture: the own rule's
    samples (200 Langevin steps from noise) come closer to exact samples (energy distance,
    ``evaluate``) than the untrained model's, and the energy ranks data below points in the
    gaps between the modes (which the untrained model's tail ranks the other way), and
    -E follows the exact log-density. Measured over seeds 0-2: energy distance 0.13 -> 0.016
    to 0.043 (null ~0.003), ranking AUC 0.61 -> >= 0.99, correlation 0.21 -> >= 0.76."""
    path = tmp_path / "gmm4.npz"
    mixture().save(path)
    spec = f"gmm:{path}"
    data = load_dataset(spec, n=4000, seed=0)
    torch.manual_seed(0)
    cfg = small_cfg(data=spec, n_data=4000, ebm_buffer=1000, ebm_keep=1000, eval_samples=1000,
                    net=dict(kind="mlp", dim=2, hidden=64, depth=2, emb_dim=16))
    ebm.check(cfg, data)
    obj = ebm.objective(cfg, data)
    untrained = copy.deepcopy(obj.module)
    _run(obj, torch.optim.Adam(obj.module.parameters(), lr=2e-3), 200)

    meta = ebm.meta(cfg, obj.module, data)
    meta["data"] = {"name": data.name, "kind": "points", "shape": [2], "num_classes": 0}
    before = ebm.evaluate(ebm.as_model(untrained, meta, "untrained"), data, cfg)
    after = ebm.evaluate(ebm.as_model(obj.module, meta, "trained"), data, cfg)
    assert after["reference_n"] == 1000 and after["reference"] == "fresh" and after["langevin"]["nfe"] == 200
    # null: two exact sets of 1000; over seeds 0-3 it was -0.001..0.005
    assert abs(after["null_energy_distance"]) < 0.02
    assert after["langevin"]["energy_distance"] < 0.5 * before["langevin"]["energy_distance"]
    assert after["buffer"]["energy_distance"] < 0.5 * before["langevin"]["energy_distance"]
    assert after["mala"]["energy_distance"] < 0.5 * before["mala"]["energy_distance"]
    assert 0.3 < after["mala"]["acceptance"] <= 1.0

    holes = torch.rand(20000, 2, generator=torch.Generator().manual_seed(3)) * 6 - 3
    holes = holes[torch.cdist(holes.double(), MEANS).min(1).values > 1.0][:1000]  # > 3.3 std from every mode
    ref = mixture().sample(1000, generator=torch.Generator().manual_seed(5)).float()

    def auc(module):
        e_data, e_holes = energies(module, ref, holes)
        return float((e_data[:, None] < e_holes[None, :]).float().mean())

    assert auc(untrained) < 0.8 and auc(obj.module) > 0.95
    logp = mixture().log_prob(ref.double(), 0.01)
    corr = torch.corrcoef(torch.stack([-energies(obj.module, ref)[0].double(), logp]))[0, 1]
    assert float(corr) > 0.6
