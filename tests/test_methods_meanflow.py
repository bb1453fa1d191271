"""MeanFlow (Geng et al. 2025) against truth: the JVP's total derivative against central
finite differences (float64), r = t gives the flow-matching velocity bit for bit, the exact
average velocity of Gaussian data satisfies the MeanFlow identity (residual ~ 1e-12) and is
the path integral of v, training on the exact ring mixture (from data, and distilled from the
mixture's exact marginal velocity) improves the 1-step sample's energy distance to exact
samples several-fold, the own k-step rule is what the paper's sampler does, a flow teacher's
weights start the student at the teacher's velocity, an interrupted run resumes bit for bit,
bad input is one line."""
import json
import math

import pytest
import torch
from torch import nn

from _resume import full_and_resumed, same_weights
from _exact import SMALL_MLP as NET
from _exact import gmm2
from fewstep.cli import main
from fewstep.errors import UserError
from fewstep.methods import distill, resolve
from fewstep.methods.meanflow import (adaptive_loss, init_from_teacher, meanflow_target, sample_times,
                                      total_derivative)
from fewstep.metrics import energy_distance
from fewstep.model import MeanFlowDenoiser, Model, load, mean_velocity, meanflow_sample
from fewstep.nets import build_net
from fewstep.process import LinearFlow

FLOW = LinearFlow()
LOOP = {"net": NET, "batch_size": 256, "lr": 3e-3, "warmup": 20, "ema_decay": 0.99, "device": "cpu",
        "eval_samples": 200}


class Tiny(nn.Module):
    """A smooth float64 net of the nets' contract (level c = t, cond = t - r): W2 tanh(W1 [x, c, cond] + b1)."""

    def __init__(self, d: int = 3, h: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(d + 2, h).double(), nn.Linear(h, d).double()

    def forward(self, x, c_noise, labels=None, cond=None):
        return self.l2(torch.tanh(self.l1(torch.cat([x, c_noise[:, None], cond[:, None]], 1))))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_jvp_total_derivative_matches_central_finite_differences():
    """d/dt u(z + tau v, r, t + tau) at tau = 0 (r fixed): the JVP with tangent (v, 0, 1) against
    (f(h) - f(-h)) / 2h, h = 1e-4 (float64): truncation h^2 |f'''| / 6 ~ 1e-9, rounding
    1e-16 / h ~ 1e-12, so agreement to 1e-6 relative."""
    net, g = Tiny(), _gen(1)
    z, v = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(64, generator=g, dtype=torch.float64)
    r = t * torch.rand(64, generator=g, dtype=torch.float64)
    u, dudt = total_derivative(net, z, r, t, v)
    h = 1e-4
    fd = (mean_velocity(net, z + h * v, r, t + h) - mean_velocity(net, z - h * v, r, t - h)) / (2 * h)
    assert torch.equal(u, mean_velocity(net, z, r, t))  # the primal is the plain evaluation
    rel = float((dudt - fd).norm() / fd.norm())
    assert rel < 1e-6, rel
    # the tangent of r is 0 and of t is 1: moving r as well gives another derivative
    fd_r = (mean_velocity(net, z + h * v, r + h, t + h) - mean_velocity(net, z - h * v, r - h, t - h)) / (2 * h)
    assert float((dudt - fd_r).norm() / fd_r.norm()) > 1e-3


def test_r_equal_t_target_is_the_flow_matching_velocity_exactly():
    """The batch's first int(n (1 - ratio)) samples have r = t, the rest r < t; at r = t the
    identity's second term vanishes: u_tgt == v bit for bit (here with the project's MLP)."""
    n, ratio = 1000, 0.25
    t, r = sample_times(n, _gen(2), ratio=ratio)
    same = int(n * (1 - ratio))
    assert torch.equal(r[:same], t[:same]) and bool((r[same:] < t[same:]).all()) and bool((t <= 1).all())
    assert bool((r >= 0).all())
    # logit-normal(-0.4, 1): the median of one draw is sigmoid(-0.4); t is the larger of two
    a = sample_times(20000, _gen(3), ratio=1.0)
    p_below = float((a[0] < 1 / (1 + math.exp(0.4))).double().mean())
    assert p_below == pytest.approx(0.25, abs=0.015)  # P(max of two < median) = 1/4
    net = build_net({**NET, "use_cond": True})
    for p in net.parameters():
        nn.init.normal_(p, std=0.3)
    g = _gen(4)
    x0, eps = gmm2().sample(n, generator=g).float(), torch.randn(n, 2, generator=g)
    z = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = eps - x0
    _, target = meanflow_target(net, z, r, t, v)
    assert torch.equal(target[:same], v[:same])
    assert float((target[same:] - v[same:]).abs().max()) > 1e-2  # the term is there where r < t


class GaussianExactU(nn.Module):
    """The exact average velocity of data N(m, s^2 I) on z_t = (1 - t) x + t eps: with
    c_t = z_t - (1 - t) m ~ N(0, sigma_t^2 I), sigma_t^2 = (1 - t)^2 s^2 + t^2, the flow moves
    c_t = (sigma_t / sigma_r) c_r, so u(z, r, t) = -m + (1 - sigma_r / sigma_t) / (t - r) c_t
    (r < t); v(z, t) = -m + (t - (1 - t) s^2) / sigma_t^2 c_t. As a net: t = c (the level),
    t - r = cond. ``instantaneous`` gives v(z, t) instead (a wrong u, for contrast)."""

    def __init__(self, m, s, instantaneous=False):
        super().__init__()
        self.m, self.s, self.inst = m, s, instantaneous

    def sigma(self, t):
        return ((1 - t) ** 2 * self.s**2 + t**2).sqrt()

    def v(self, z, t):
        c = z - (1 - t[:, None]) * self.m
        return -self.m + ((t - (1 - t) * self.s**2) / self.sigma(t) ** 2)[:, None] * c

    def forward(self, x, c_noise, labels=None, cond=None):
        t, h = c_noise, cond
        if self.inst:
            return self.v(x, t)
        c = x - (1 - t[:, None]) * self.m
        return -self.m + ((1 - self.sigma(t - h) / self.sigma(t)) / h)[:, None] * c


def test_exact_average_velocity_of_gaussian_data_satisfies_the_identity():
    """For Gaussian data the true u is closed-form: it is the path integral of v (RK4, 2000
    steps, error ~1e-13), and the MeanFlow target v - (t - r) (v du/dz + du/dt) of that u, with
    the marginal velocity v as the tangent, gives back u to rounding (residual ~1e-14 against a
    budget of 1e-10); a wrong u (the instantaneous v) leaves a residual of order one."""
    m, s = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64), 0.6
    exact, g = GaussianExactU(m, s), _gen(5)
    n = 256
    x = m + s * torch.randn(n, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = 0.05 + 0.95 * torch.rand(n, generator=g, dtype=torch.float64)
    r = (t - 0.05) * torch.rand(n, generator=g, dtype=torch.float64)  # t - r >= 0.05
    z = (1 - t[:, None]) * x + t[:, None] * eps
    u = mean_velocity(exact, z, r, t)
    # u is the average of v over [r, t] along the flow: z_r = z_t - (t - r) u
    zr, steps = z.clone(), 2000
    dt = (r - t) / steps
    tau = t.clone()
    for _ in range(steps):  # RK4 from t down to r
        k1 = exact.v(zr, tau)
        k2 = exact.v(zr + dt[:, None] / 2 * k1, tau + dt / 2)
        k3 = exact.v(zr + dt[:, None] / 2 * k2, tau + dt / 2)
        k4 = exact.v(zr + dt[:, None] * k3, tau + dt)
        zr, tau = zr + dt[:, None] / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tau + dt
    assert float((zr - (z - (t - r)[:, None] * u)).abs().max()) < 1e-10
    u_p, target = meanflow_target(exact, z, r, t, exact.v(z, t))
    assert torch.equal(u_p, u)
    assert float((target - u).abs().max()) < 1e-10
    wrong = GaussianExactU(m, s, instantaneous=True)
    u_w, target_w = meanflow_target(wrong, z, r, t, exact.v(z, t))
    assert float((target_w - u_w).abs().max()) > 0.1


def test_adaptive_weighting_is_the_papers():
    """Per sample sg(w) ||delta||^2, w = 1 / (||delta||^2 + c)^p; p = 0 is the squared error;
    the gradient is w times that of the squared error (w held fixed)."""
    d = torch.tensor([[3.0, 4.0], [0.1, 0.0]], requires_grad=True)
    loss = adaptive_loss(d, p=1.0, c=0.01)
    assert torch.allclose(loss.detach(), torch.tensor([25 / 25.01, 0.01 / 0.02]))
    loss.sum().backward()
    assert torch.allclose(d.grad, 2 * d.detach() / torch.tensor([[25.01], [0.02]]))
    assert torch.equal(adaptive_loss(d.detach(), p=0.0), (d.detach() ** 2).sum(1))


def _energy_1_2(model_or_D, n=2000):
    """Energy distance of 1- and 2-step samples (seed 3) to exact ring samples."""
    ref = gmm2().sample(n, generator=_gen(1)).float()
    if isinstance(model_or_D, Model):
        return [energy_distance(model_or_D.sample(n, k, seed=3)[0], ref) for k in (1, 2)]
    z = torch.randn(n, 2, generator=_gen(3))
    return [energy_distance(meanflow_sample(model_or_D, z, torch.linspace(1, 0, k + 1)), ref) for k in (1, 2)]


@pytest.fixture(scope="module")
def run(spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("meanflow") / "mf"
    distill("meanflow", {**LOOP, "data": spec, "steps": 400}, str(out), progress=False)
    return out


def _untrained():
    """The student before training: the MLP's zero output layer gives u = 0, so its samples are z_1 = eps."""
    return MeanFlowDenoiser(build_net({**NET, "use_cond": True}))


def test_training_on_the_exact_mixture_improves_the_one_step_sample(run):
    """400 steps from data (conditional velocity eps - x): the 1- and 2-step samples' energy
    distance to exact samples falls at least 5x below the untrained student's (its samples are
    the noise; measured 0.216 -> 0.011 and 0.014; two exact sample sets of 2000 read ~0.002)."""
    e0, e0_2 = _energy_1_2(_untrained())
    e1, e2 = _energy_1_2(load(str(run)))
    assert e1 < 0.2 * e0 and e2 < 0.2 * e0_2, (e0, e1, e0_2, e2)
    ev = json.loads((run / "meanflow.json").read_text())  # 200 evaluation samples: a looser bound
    assert set(ev["energy_distance"]) == {"1", "2"} and ev["energy_distance"]["1"] < 0.3 * e0
    meta = json.loads((run / "model.json").read_text())
    assert meta["sampling"] == {"sampler": "meanflow", "times": "uniform"} and meta["net"]["use_cond"]
    assert (meta["method"], meta["velocity"], meta["init"], meta["prediction"]) == \
        ("meanflow", "conditional", "random", "meanflow")
    assert meta["denoiser"]["kind"] == "meanflow" and meta["denoiser"]["time_scale"] == 1.0
    assert meta["meanflow"]["ratio"] == 0.25 and meta["meanflow"]["weight_p"] == 1.0


def test_distilled_from_the_exact_marginal_velocity(spec, tmp_path):
    """--teacher gmm:FILE: v_t is the mixture's exact marginal velocity (the paper's p = 1): 300
    steps bring the 1-step energy distance at least 5x below the untrained student's (measured
    0.216 -> 0.016; 1200 steps: 0.0026)."""
    out = distill("meanflow", {**LOOP, "teacher": spec, "steps": 300}, str(tmp_path / "t"), progress=False)
    m = load(out)
    assert m.meta["velocity"] == "teacher" and m.meta["cost"]["teacher_evals"] == 300 * 256
    e0, e1 = _energy_1_2(_untrained())[0], _energy_1_2(m)[0]
    assert e1 < 0.2 * e0, (e0, e1)


def test_own_rule_is_the_papers_sampler_and_the_flow_samples_too(run, tmp_path, capsys):
    """sample(n, 2) is z_{1/2} = z_1 - u(z_1, 1/2, 1) / 2, z_0 = z_{1/2} - u(z_{1/2}, 0, 1/2) / 2 from
    z_1 = noise / sigma_max; a named sampler runs the flow u(z, t, t) = v (heun at 16 evaluations:
    energy distance to exact samples well below the noise's); a grid is refused."""
    m = load(str(run))
    x = m.sample(300, 2, seed=7)[0]
    z = m.noise(300, seed=7) / m.sigma_max
    net, one = m.denoiser.net, torch.ones(300)
    with torch.no_grad():
        z = z - 0.5 * mean_velocity(net, z, 0.5 * one, one)
        z = z - 0.5 * mean_velocity(net, z, 0 * one, 0.5 * one)
    assert torch.allclose(x, z, atol=1e-6)
    ref = gmm2().sample(300, generator=_gen(1)).float()
    y = m.sample(300, 16, sampler="heun", seed=7)[0]  # measured 0.042; the noise itself 0.245
    assert energy_distance(y, ref) < 0.4 * energy_distance(m.noise(300, seed=7) / m.sigma_max, ref)
    with pytest.raises(UserError, match="own MeanFlow rule"):
        m.sample(10, 2, grid="karras")
    assert main(["sample", str(run), "--nfe", "1", "--n", "50", "--out", str(tmp_path / "s.npz")]) == 0
    assert (tmp_path / "s.npz").is_file()


def test_flow_teacher_weights_start_the_student_at_its_velocity():
    """init auto: a flow teacher whose net is the student's without use_cond gives all its
    weights; the zeroed cond output layer makes u_0(z, r, t) = v_teacher(z, t) exactly for any r.
    Another architecture gives none."""
    from fewstep.denoiser import ModelDenoiser

    torch.manual_seed(3)
    tnet = build_net(NET)
    for p in tnet.parameters():
        nn.init.normal_(p, std=0.3)
    teacher = Model(ModelDenoiser(tnet, FLOW, "flow"), FLOW, (2,), FLOW.sigma_min, FLOW.sigma_max, name="flow")
    student = build_net({**NET, "use_cond": True})
    assert init_from_teacher(student, teacher)
    g = _gen(6)
    z, t = torch.randn(100, 2, generator=g), torch.rand(100, generator=g)
    with torch.no_grad():
        for r in (t, 0 * t, 0.5 * t):
            assert torch.equal(mean_velocity(student, z, r, t, time_scale=1000.0), tnet(z, FLOW.c_noise(t)))
    assert not init_from_teacher(build_net({**NET, "hidden": 32, "use_cond": True}), teacher)


def test_the_student_at_r_equal_t_is_a_flow_denoiser():
    """MeanFlowDenoiser(y, sigma) is the flow prediction of its net at cond 0: the same as
    fewstep's flow ModelDenoiser of the net v(x, c) = net(x, c / 1000, cond=0) (level 1000 t)."""
    from fewstep.denoiser import ModelDenoiser

    net = build_net({**NET, "use_cond": True})
    for p in net.parameters():
        nn.init.normal_(p, std=0.3)
    D = MeanFlowDenoiser(net)
    flow = ModelDenoiser(lambda x, c: net(x, c / 1000, cond=torch.zeros_like(c)), FLOW, "flow")
    g = _gen(8)
    y, sigma = 3 * torch.randn(200, 2, generator=g), torch.exp(4 * torch.randn(200, generator=g))
    with torch.no_grad():
        assert torch.allclose(D(y, sigma), flow(y, sigma), rtol=1e-4, atol=1e-4)


def test_a_flow_teacher_run_starts_the_student_at_its_velocity(spec, tmp_path):
    """End to end: a reflow round (a flow teacher) gives its weights (init teacher, time_scale
    1000); with a learning rate of 1e-12 the saved student is the teacher's flow denoiser."""
    teacher = distill("reflow", {**LOOP, "data": spec, "rounds": 1, "distill_steps": 0, "steps": 30,
                                 "eval_samples": 50, "reflow_nfe": 4}, str(tmp_path / "flow"), progress=False)
    out = distill("meanflow", {**LOOP, "net": None, "teacher": teacher, "steps": 2, "lr": 1e-12, "ema_decay": 0.0,
                               "eval_samples": 50}, str(tmp_path / "mf"), progress=False)
    m, T = load(out), load(teacher)
    assert (m.meta["init"], m.meta["velocity"], m.meta["denoiser"]["time_scale"]) == ("teacher", "teacher", 1000.0)
    g = _gen(9)
    y, sigma = 3 * torch.randn(200, 2, generator=g), torch.exp(2 * torch.randn(200, generator=g))
    with torch.no_grad():
        assert torch.allclose(m.denoiser(y, sigma), T.denoiser(y, sigma), atol=1e-4)


def test_interrupted_run_resumes_identically(spec, tmp_path, monkeypatch):
    cfg = {**LOOP, "data": spec, "steps": 60, "checkpoint_every": 20}
    full, cut = full_and_resumed(monkeypatch, "meanflow", cfg, tmp_path, at=45)
    same_weights(full, cut)


def _fails(args, capsys, needle):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("extra, needle", [
    (["--ratio", "1.5"], "--ratio must be a number from 0 to 1"),
    (["--ratio", "-0.1"], "--ratio must be a number from 0 to 1"),
    (["--weight-p", "-1"], "--weight-p must be a finite number of at least 0"),
    (["--weight-c", "0"], "--weight-c must be a finite number above 0"),
    (["--time-dist", "gauss"], "--time-dist must be one of logit_normal, uniform"),
    (["--time-sigma", "0"], "--time-sigma"),
    (["--net", '{"kind": "mlp", "dim": 2, "use_cond": false}'], "use_cond"),
    (["--guidance", "2"], "guidance"),
])
def test_bad_input_is_one_line(extra, needle, spec, tmp_path, capsys):
    _fails(["distill", "meanflow", "--data", spec, *extra, "--out", str(tmp_path / "x")], capsys, needle)
    assert not (tmp_path / "x" / "model.json").exists()


def test_class_conditional_teacher_and_bad_api_values(cspec, tmp_path, capsys):
    _fails(["distill", "meanflow", "--teacher", cspec, "--net", json.dumps(NET), "--out", str(tmp_path / "x")], capsys,
           "num_classes")
    with pytest.raises(UserError, match="ratio"):
        resolve("meanflow", {"data": "gmm:x.npz", "ratio": 2})
    with pytest.raises(UserError, match="weight_p|weight-p"):
        resolve("meanflow", {"data": "gmm:x.npz", "weight_p": -0.5})
