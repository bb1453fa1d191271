"""The autoregressive family (survey sec. 1, eq. 1-5): masks by gradients, likelihoods
against closed forms, maximum likelihood on an exact mixture, sampling one coordinate per
network evaluation, and the option checks."""
from __future__ import annotations

import math

import pytest
import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.data.registry import Dataset, load_dataset
from fewstep.errors import UserError
from fewstep.families import FamilyModel
from fewstep.families import autoregressive as arm
from fewstep.nets.masked import MADE, PixelCNN, build_masked


def _cfg(**kw) -> dict:
    cfg = dict(arm.DEFAULTS, batch_size=256, seed=0, data="t", n_data=None)
    cfg.update(kw)
    return cfg


def _points(x) -> Dataset:
    return Dataset(x=torch.as_tensor(x, dtype=torch.float32), labels=None, num_classes=0, kind="points", name="t")


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _freeze_outputs(net: torch.nn.Module) -> None:
    """Zero every weight into the outputs (MADE: last layer and direct connection), so
    the outputs are the last layer's bias: fixed conditionals."""
    with torch.no_grad():
        net.out.weight.zero_()
        if getattr(net, "direct", None) is not None:
            net.direct.weight.zero_()


class _Count:
    """Counts forward calls of a module."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("dim,hidden,depth", [(5, 16, 2), (6, 3, 1), (1, 4, 2)])
def test_made_is_autoregressive_by_gradients(dim, hidden, depth):
    P = 3
    net = _randomise(MADE(dim, P, hidden=hidden, depth=depth).double())
    x = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = torch.autograd.functional.jacobian(lambda v: net(v), x)[0, :, :, 0, :]  # [d, P, d]
    for i in range(dim):
        assert bool((J[i, :, i:] == 0).all()), f"output {i} depends on inputs >= {i}"
        if i > 0:  # masks are not trivially zero: the direct connection reaches every j < i
            assert bool((J[i, :, :i] != 0).all())
    # output 0 is a learned constant: the same for any input
    y = net(torch.randn(4, dim, dtype=torch.float64))
    assert torch.equal(y[:, 0], y[:1, 0].expand(4, P))


def test_pixelcnn_is_autoregressive_by_gradients():
    C, H, W, P = 2, 4, 3, 2
    net = _randomise(PixelCNN(C, P, hidden=8, blocks=2).double(), seed=3)
    x = torch.randn(1, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    J = torch.autograd.functional.jacobian(lambda v: net(v), x)[0, ..., 0, :, :, :]  # [C,H,W,P, C,H,W]

    def order(c, h, w):  # raster order over pixels, the channels of a pixel in order
        return (h * W + w) * C + c

    rank = torch.tensor([[[order(c, h, w) for w in range(W)] for h in range(H)] for c in range(C)])
    for c in range(C):
        for h in range(H):
            for w in range(W):
                o = order(c, h, w)
                dep = J[c, h, w].abs().sum(0)  # [C, H, W]: over the P outputs
                assert bool((dep[rank >= o] == 0).all()), f"coordinate {(c, h, w)} sees itself or later ones"
                if o > 0:
                    assert bool((dep[rank < o] != 0).any())
    # not trivially zero: channel 1 sees channel 0 of its own pixel, a pixel its left neighbour
    assert float(J[1, 2, 1, :, 0, 2, 1].abs().sum()) > 0
    assert float(J[0, 2, 1, :, :, 2, 0].abs().sum()) > 0 and float(J[0, 2, 1, :, :, 1, 1].abs().sum()) > 0


def test_masked_config_rebuilds():
    for net in (MADE(4, 3, hidden=8, depth=3, direct=False), PixelCNN(3, 5, hidden=6, blocks=1, kernel=5)):
        again = build_masked(net.config)
        again.load_state_dict(net.state_dict())
        x = torch.randn(2, 4) if isinstance(net, MADE) else torch.randn(2, 3, 4, 4)
        assert torch.equal(again(x), net(x))
    with pytest.raises(UserError):
        PixelCNN(3, 2, hidden=2)  # fewer feature maps than channel groups
    with pytest.raises(UserError):
        build_masked({"kind": "mlp"})


# ----------------------------------------------------------------------------- likelihoods
def _fixed_module(output, dim=3, **kw):
    opts = dict(output=output, shape=[dim], kind="points", components=kw.pop("components", 2),
                bins=kw.pop("bins", 8), range=kw.pop("range", None))
    P = arm.num_params(output, opts["components"], opts["bins"])
    net = _randomise(MADE(dim, P, hidden=16, depth=2))
    _freeze_outputs(net)
    return arm.AutoregressiveModel(net, **opts)


def test_gaussian_and_mixture_nll_are_the_closed_form():
    D = torch.distributions
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 2
    shift, scale = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.5])

    m = _fixed_module("gaussian")
    mean, log_std = torch.tensor([0.3, -0.7, 1.1]), torch.tensor([-0.2, 0.4, 0.0])
    with torch.no_grad():
        m.net.output_bias().copy_(torch.stack([mean, log_std], 1))
        m.shift.copy_(shift), m.scale.copy_(scale)
    # in data units: x_i ~ N(shift_i + scale_i mu_i, (scale_i sigma_i)^2), independent
    exact = D.Normal(shift + scale * mean, scale * log_std.exp()).log_prob(x).sum(1)
    assert torch.allclose(m(x, mode="density"), exact, atol=1e-5)  # float32 rounding
    assert torch.allclose(m(x), -exact, atol=1e-5)

    m = _fixed_module("mixture", components=2)
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    means = torch.tensor([[-1.0, 1.0], [0.0, 2.0], [-2.0, 0.5]])
    lstd = torch.tensor([[0.1, -0.3], [0.0, 0.2], [-0.5, 0.3]])
    with torch.no_grad():
        m.net.output_bias().copy_(torch.cat([logits, means, lstd], 1))
    mix = D.MixtureSameFamily(D.Categorical(logits=logits), D.Normal(means, lstd.exp()))
    assert torch.allclose(m(x, mode="density"), mix.log_prob(x).sum(1), atol=1e-5)


def test_softmax_nll_is_log_bin_probability_minus_log_width():
    lo, hi, bins = -1.0, 2.0, 7
    w = (hi - lo) / (bins - 1)
    m = _fixed_module("softmax", dim=2, bins=bins, range=[lo, hi])
    logits = torch.randn(2, bins, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        m.net.output_bias().copy_(logits)
    k = torch.tensor([[0, 6], [3, 1], [6, 0], [2, 5]])
    off = torch.tensor([[-0.49, 0.49], [0.0, 0.3], [0.2, -0.45], [-0.1, 0.0]])  # inside bin k: |off| < 1/2
    x = lo + (k + off) * w
    logP = torch.log_softmax(logits, -1)
    exact = logP[0][k[:, 0]] + logP[1][k[:, 1]]
    assert torch.allclose(m(x, mode="discrete"), exact, atol=1e-5)
    assert torch.allclose(m(x, mode="density"), exact - 2 * math.log(w), atol=1e-5)
    assert torch.allclose(m(x), -exact, atol=1e-5)  # the loss: the discretised likelihood
    outside = torch.tensor([[lo - 0.51 * w, 0.0], [0.0, hi + 0.51 * w]])
    assert bool(torch.isinf(m(outside, mode="density")).all())


def test_discretised_gaussian_bins_are_cdf_differences_and_sum_to_one():
    lo, hi, bins = -1.0, 1.0, 9
    w = (hi - lo) / (bins - 1)
    k = torch.arange(bins, dtype=torch.float64)
    c = lo + k * w
    mean, std = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    lp = arm.log_normal_bin(c - w / 2, c + w / 2, mean, std, k == 0, k == bins - 1)

    def Phi(v):
        return 0.5 * (1 + math.erf((v - 0.3) / (0.4 * math.sqrt(2))))
    exact = [Phi(float(c[0]) + w / 2)] + [Phi(float(ci) + w / 2) - Phi(float(ci) - w / 2) for ci in c[1:-1]] \
        + [1 - Phi(float(c[-1]) - w / 2)]
    assert torch.allclose(lp.exp(), torch.tensor(exact, dtype=torch.float64), atol=1e-13)
    assert abs(float(lp.exp().sum()) - 1.0) < 1e-12
    # far in a tail the difference of CDFs neither cancels to 0 nor gives NaN
    far = arm.log_normal_bin(torch.tensor([30.0], dtype=torch.float64), torch.tensor([30.1], dtype=torch.float64),
                             torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                             torch.tensor([False]), torch.tensor([False]))
    # P = (erfc(30 / sqrt 2) - erfc(30.1 / sqrt 2)) / 2 ~ 1e-198, still a float64 without
    # cancellation (the ratio of the two terms is ~ e^-3); relative error ~1e-15
    exact_far = math.log(0.5 * (math.erfc(30 / math.sqrt(2)) - math.erfc(30.1 / math.sqrt(2))))
    assert abs(float(far) - exact_far) < 1e-9 * abs(exact_far)


@pytest.mark.parametrize("output", ["softmax", "gaussian", "mixture"])
def test_image_models_are_normalised_over_every_image(output):
    """Every output is a discrete model on images: with a random (input-dependent) PixelCNN,
    P summed over all 8^4 images of 2 channels x 1 x 2 pixels is 1 (the chain rule in the
    order of the masks); float32 log-probabilities: error ~1e-6."""
    C, H, W, bins = 2, 1, 2, 8
    P = arm.num_params(output, 2, bins)
    net = _randomise(PixelCNN(C, P, hidden=4, blocks=1, kernel=3), seed=5)
    m = arm.AutoregressiveModel(net, output, [C, H, W], kind="image", components=2, bins=bins, range=[-1.0, 1.0])
    grid = torch.linspace(-1, 1, bins)
    every = torch.cartesian_prod(*[grid] * (C * H * W)).view(-1, C, H, W)
    with torch.no_grad():
        total = float(m(every, mode="discrete").double().exp().sum())
    assert abs(total - 1.0) < 1e-4


# ----------------------------------------------------------------------------- training
MEANS = [[-2.5, -1.0], [-2.5, 2.0], [1.5, -2.5], [2.5, 2.0]]


@pytest.fixture(scope="module")
def mixture_spec(tmp_path_factory):
    """4 well separated isotropic modes (std 0.4, >= 7 std apart), as gmm:FILE.npz; the
    second coordinate's modes depend on the first."""
    gmm = GaussianMixture(torch.ones(4), torch.tensor(MEANS), 0.4 ** 2 * torch.eye(2).expand(4, 2, 2))
    path = tmp_path_factory.mktemp("arm") / "four.npz"
    gmm.save(path)
    return gmm, f"gmm:{path}"


def _fit(cfg, data, steps=400, lr=3e-3):
    torch.manual_seed(int(cfg["seed"]))
    obj = arm.objective(cfg, data)
    opt = torch.optim.Adam(obj.module.parameters(), lr=lr)
    for step in range(steps):
        loss = obj.loss(obj.module, obj.draw(torch.Generator().manual_seed(step), step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return obj.module


def test_mixture_arm_reaches_the_entropy_and_the_gaussian_one_does_not(mixture_spec):
    gmm, spec = mixture_spec
    data = load_dataset(spec, n=4000, seed=0)
    ref = gmm.sample(5000, torch.Generator().manual_seed(7919))
    ref_lp = gmm.log_prob(ref, 0.0)
    H = -float(ref_lp.mean())          # exact entropy (Monte Carlo over the mixture's own samples)
    se = float(ref_lp.std()) / math.sqrt(len(ref))  # ~0.01 nats
    out = {}
    for output in ("mixture", "gaussian"):
        cfg = _cfg(data=spec, n_data=4000, arm_output=output, arm_hidden=64, arm_components=5,
                   eval_samples=5000)
        module = _fit(cfg, data)
        model = arm.as_model(module, arm.meta(cfg, module, data), "arm", "cpu")
        out[output] = arm.evaluate(model, data, cfg)
        assert out[output]["nfe_per_sample"] == 2 and out[output]["nll_samples"] == 5000
    nll_mix = out["mixture"]["nll_nats_per_sample"]
    nll_gauss = out["gaussian"]["nll_nats_per_sample"]
    # budget: KL >= 0 less the Monte-Carlo error (4 se) below; the 400-step mixture ARM is
    # measured 0.02-0.06 nats above H (seeds 0-2), allowed 0.2
    assert H - 4 * se < nll_mix < H + 0.2, (nll_mix, H)
    # a Gaussian conditional cannot split x_1's modes, nor x_2's given x_1: even the best
    # Gaussian ARM in this order (each conditional moment-matched to the exact one, N(E, Var)
    # of p(x_1) and p(x_2 | x_1); 4e5-sample Monte Carlo) is 1.49 nats above H; measured
    # 1.50-1.53; required > 1.0 (0.49 of margin against the estimate's ~0.02 error)
    assert nll_gauss > H + 1.0, (nll_gauss, H)
    assert abs(out["mixture"]["nll_nats_per_dim"] - nll_mix / 2) < 1e-12


# ----------------------------------------------------------------------------- sampling
def test_sampling_a_gaussian_chain_has_its_moments_at_d_evaluations():
    """x_0 ~ N(m0, s0^2), x_1 | x_0 ~ N(a x_0 + m1, s1^2) set by hand (output biases, the
    direct connection 1 <- 0): a Gaussian with known mean and covariance."""
    m0, s0, a, m1, s1 = 1.0, 0.5, -2.0, 0.5, 0.3
    m = _fixed_module("gaussian", dim=2)
    with torch.no_grad():
        m.net.output_bias().copy_(torch.tensor([[m0, math.log(s0)], [m1, math.log(s1)]]))
        m.net.direct.weight[2 * 1 + 0, 0] = a  # output (coordinate 1, mean) <- input 0
    model = arm.as_model(m, {"family": "arm"}, "chain", "cpu")
    assert isinstance(model, FamilyModel) and model.cost == 2
    count = _Count(m.net)
    n = 40000
    x, _ = model.sample(n, seed=3)
    assert count.calls == 2  # one network evaluation per coordinate, batched over the n samples
    mean = torch.tensor([m0, a * m0 + m1])
    cov = torch.tensor([[s0 ** 2, a * s0 ** 2], [a * s0 ** 2, a ** 2 * s0 ** 2 + s1 ** 2]])
    # 5 standard errors: var/n for means, (S_ii S_jj + S_ij^2)/n for covariances (Gaussian)
    se_mean = (cov.diagonal() / n).sqrt()
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov ** 2) / n).sqrt()
    assert bool(((x.mean(0) - mean).abs() < 5 * se_mean).all())
    assert bool(((torch.cov(x.T) - cov).abs() < 5 * se_cov).all())
    with pytest.raises(UserError, match="--nfe 2"):
        model.sample(4, nfe=1)
    # log_prob is that Gaussian's density
    exact = torch.distributions.MultivariateNormal(mean, cov).log_prob(x[:100])
    assert torch.allclose(model.log_prob(x[:100]), exact, atol=1e-4)


def test_image_softmax_sampling_draws_the_bins_at_one_evaluation_per_coordinate():
    C, H, W, bins = 2, 2, 2, 4
    net = _randomise(PixelCNN(C, bins, hidden=4, blocks=1))
    _freeze_outputs(net)
    m = arm.AutoregressiveModel(net, "softmax", [C, H, W], kind="image", bins=bins, range=[-1.0, 1.0])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    with torch.no_grad():
        net.output_bias().copy_(probs.log())
    count = _Count(net)
    n = 20000
    x, _ = arm.as_model(m, {}, "img", "cpu").sample(n, seed=0)
    assert count.calls == C * H * W
    centres = torch.linspace(-1, 1, bins)
    k = (x[..., None] - centres).abs().argmin(-1)
    assert torch.allclose(centres[k], x)  # samples are bin centres exactly
    for c in range(C):
        freq = torch.stack([(k[:, c] == j).float().mean() for j in range(bins)])
        se = (probs[c] * (1 - probs[c]) / (n * H * W)).sqrt()
        assert bool(((freq - probs[c]).abs() < 5 * se).all()), (c, freq)


def test_point_softmax_samples_the_piecewise_constant_density():
    """d = 1, 4 bins of width 1 centred at 0..3 with probabilities p: a bin, then uniform in
    it, so E x = sum p_k c_k and Var x = sum p_k c_k^2 - (E x)^2 + 1/12."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    m = _fixed_module("softmax", dim=1, bins=4, range=[0.0, 3.0])
    with torch.no_grad():
        m.net.output_bias().copy_(p.log()[None])
    n = 40000
    x, _ = arm.as_model(m, {}, "s", "cpu").sample(n, seed=2)
    c = torch.arange(4.0)
    mean, var = float((p * c).sum()), float((p * c ** 2).sum() - (p * c).sum() ** 2 + 1 / 12)
    assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n)
    mu4 = float(((x - mean) ** 4).mean())  # Var of the sample variance ~ (mu4 - var^2) / n
    assert abs(float(x.var()) - var) < 5 * math.sqrt((mu4 - var ** 2) / n)
    assert float(x.min()) >= -0.5 and float(x.max()) <= 3.5
    off = x - x.round()  # the offset within the bin: uniform on [-1/2, 1/2]
    assert abs(float((off.abs() < 0.25).float().mean()) - 0.5) < 5 * math.sqrt(0.25 / n)


def test_uniform_softmax_image_is_eight_bits_per_dim():
    data = load_dataset("shapes16", n=8, seed=0)
    cfg = _cfg(data="shapes16", n_data=8, arm_hidden=4, arm_layers=1, eval_samples=8)
    arm.check(cfg, data)
    obj = arm.objective(cfg, data)
    _freeze_outputs(obj.module.net)  # output = the zero bias: uniform over the 256 pixel values
    model = arm.as_model(obj.module, arm.meta(cfg, obj.module, data), "u", "cpu")
    res = arm.evaluate(model, data, cfg)
    assert abs(res["bits_per_dim"] - 8.0) < 1e-6
    # the density: log 256 + log(2/255) nats per dim
    assert abs(res["nll_nats_per_dim"] - (math.log(256) + math.log(2 / 255))) < 1e-5
    assert res["nfe_per_sample"] == data.dim == 3 * 16 * 16 and res["nll_reference"] == "fresh"


# ----------------------------------------------------------------------------- contract
def test_meta_build_round_trip_gives_the_same_model():
    data = _points(torch.randn(200, 3) * torch.tensor([1.0, 3.0, 0.5]))
    cfg = _cfg(arm_output="mixture", arm_hidden=16, arm_components=3)
    torch.manual_seed(0)
    module = arm.objective(cfg, data).module
    meta = arm.meta(cfg, module, data)
    assert meta["family"] == "arm" and meta["default_nfe"] == 3 and meta["sampling"] == {"sampler": "autoregressive"}
    assert meta["arm"]["output"] == "mixture" and meta["net"]["kind"] == "made"
    again = arm.build(meta)
    again.load_state_dict(module.state_dict())
    a, b = arm.as_model(module, meta, "a", "cpu"), arm.as_model(again, meta, "b", "cpu")
    assert torch.equal(a.log_prob(data.x), b.log_prob(data.x))
    assert torch.equal(a.sample(16, seed=1)[0], b.sample(16, seed=1)[0])


def test_check_refuses_what_cannot_work():
    data = _points(torch.randn(100, 2))
    with pytest.raises(UserError, match="--arm-range"):
        arm.check(_cfg(arm_output="softmax"), data)
    with pytest.raises(UserError, match=r"-0\.5.*values in \[-"):  # names the observed min/max
        arm.check(_cfg(arm_output="softmax", arm_range=[-0.5, 0.5]), data)
    arm.check(_cfg(arm_output="softmax", arm_range=[-10, 10]), data)
    with pytest.raises(UserError, match="--arm-range"):
        arm.check(_cfg(arm_output="mixture", arm_range=[-10, 10]), data)
    for bad in (dict(arm_components=0), dict(arm_bins=1), dict(arm_hidden=-3), dict(arm_layers=1.5),
                dict(arm_output="logistic"), dict(arm_net="unet"), dict(arm_net="pixelcnn"),
                dict(arm_output="softmax", arm_range=[1.0, 1.0]), dict(arm_output="softmax", arm_range="x")):
        with pytest.raises(UserError):
            arm.check(_cfg(**bad), data)
    clouds = Dataset(x=torch.randn(4, 8, 3), labels=None, num_classes=0, kind="clouds", name="c")
    with pytest.raises(UserError, match="--family diffusion"):
        arm.check(_cfg(), clouds)
    with pytest.raises(UserError, match="NaN"):
        arm.check(_cfg(), _points([[0.0, float("nan")], [1.0, 2.0]]))
    image = Dataset(x=torch.rand(4, 1, 4, 4) * 2 - 1, labels=None, num_classes=0, kind="image", name="i")
    arm.check(_cfg(arm_output="gaussian"), image)  # images: default range [-1, 1], gaussian allowed
    with pytest.raises(UserError, match="values in"):
        arm.check(_cfg(), Dataset(x=image.x * 2, labels=None, num_classes=0, kind="image", name="i"))


def test_bench_nll_of_an_image_arm_uses_its_own_bins():
    """The bench's NLL of a uniform 256-bin ARM is 8 bits/dim on any image data, digits'
    17 levels (quantum 1/8) included: -log2 P of the ARM's bins, not the density shifted by
    the data's quantum (which would read 8 - log2(255 / 16) = 4.0 bits/dim too little)."""
    from fewstep.report.bench import family_nll

    data = load_dataset("digits", n=16, seed=0)
    cfg = _cfg(data="digits", n_data=16, arm_hidden=4, arm_layers=1, eval_samples=16)
    arm.check(cfg, data)
    obj = arm.objective(cfg, data)
    _freeze_outputs(obj.module.net)
    model = arm.as_model(obj.module, arm.meta(cfg, obj.module, data), "u", "cpu")
    res = family_nll(model, data.x, "digits")
    assert abs(res["teacher_nll_bits_per_dim"] - 8.0) < 1e-6
