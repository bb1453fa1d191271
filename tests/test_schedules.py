"""Learned step schedules: the DP against brute force, the budget, the JSON file, the
learned grid against Karras on fresh noise (exact GMM), autograd against differences,
decoupled evaluation levels (identity = the plain sampler bit for bit, the level map at
grid levels and midpoints, same budget, JSON, better than the grid alone on fresh noise),
and one clear line for bad input."""
import itertools
import json
import math

import pytest
import torch

from fewstep import grids as G
from fewstep import samplers as S
from fewstep.cli import main
from fewstep.data.gmm import GaussianMixture
from fewstep.denoiser import NFECounter
from fewstep.errors import UserError
from fewstep.schedules import (EvalLevels, Problem, candidates, differentiable, elbo_costs, from_sigmas, learn,
                               load_schedule, local_costs, optimize_levels, save_schedule, shortest_path, to_sigmas)

SMAX, SMIN = 80.0, 0.002


def gmm2():
    """4 anisotropic 2-D modes (the regime where the grid matters)."""
    ang = torch.arange(4, dtype=torch.float64) * math.pi / 2
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    covs = torch.stack([torch.diag(torch.tensor([0.3, 0.05], dtype=torch.float64)) ** 2 * 4] * 4)
    return GaussianMixture(torch.tensor([1.0, 2.0, 1.0, 1.5]), means, covs)


def starts(gmm, n, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, generator=g)
    return x0 + SMAX * torch.randn(x0.shape, generator=g, dtype=torch.float64), x0


def problem(gmm, sampler, nfe, n=32, seed=0, rtol=1e-6, **kw):
    x_T, x0 = starts(gmm, n, seed)
    return Problem(gmm, sampler, nfe, SMIN, SMAX, x_T, exact_flow=gmm.flow, x0=x0, rtol=rtol, **kw)


def brute_force(C, steps):
    """min over every choice of steps - 1 interior nodes of the path cost."""
    M = C.shape[0]
    best = (math.inf, None)
    for mid in itertools.combinations(range(1, M - 1), steps - 1):
        p = (0, *mid, M - 1)
        c = sum(float(C[a, b]) for a, b in zip(p[:-1], p[1:]))
        best = min(best, (c, p), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_is_the_brute_force_optimum_random_costs(seed):
    g = torch.Generator().manual_seed(seed)
    M = 9
    C = torch.rand(M, M, generator=g, dtype=torch.float64)
    C[torch.rand(M, M, generator=g) < 0.15] = math.inf  # some edges missing
    for steps in range(1, M):
        want, want_path = brute_force(C, steps)
        if not math.isfinite(want):
            with pytest.raises(UserError):
                shortest_path(C, steps)
            continue
        path, got = shortest_path(C, steps)
        assert got == pytest.approx(want, rel=1e-12) and len(path) == steps + 1
        assert sum(float(C[a, b]) for a, b in zip(path[:-1], path[1:])) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("cost", ["local", "elbo"])
def test_dp_is_the_brute_force_optimum_on_real_costs(cost):
    gmm = gmm2()
    prob = problem(gmm, "euler", 3, n=16)
    lv = candidates(8, SMIN, SMAX)  # 8 levels + 0
    C = local_costs(prob, lv, prob.path(lv)) if cost == "local" else elbo_costs(prob, lv)
    want, want_path = brute_force(C, 3)
    path, got = shortest_path(C, 3)
    assert got == pytest.approx(want, rel=1e-10)
    assert tuple(path) == want_path


def test_local_cost_is_the_one_step_error():
    gmm = gmm2()
    prob = problem(gmm, "heun", 4, n=8)
    lv = candidates(5, SMIN, SMAX)
    ref = prob.path(lv)
    C = local_costs(prob, lv, ref)
    i, j = 1, 3
    step = S.get("heun")(gmm, ref[i], lv[[i, j]])
    assert C[i, j] == pytest.approx(float((step - ref[j]).pow(2).mean()), rel=1e-12)
    assert torch.allclose(ref[-1], gmm.flow(prob.x_T, SMAX, 0.0, rtol=1e-6), atol=1e-4)


def test_reference_without_exact_flow_is_accurate():
    """A network teacher's reference (Heun on a fine grid, down to sigma_min, then to 0)
    matches the exact flow when the 'network' is the exact GMM denoiser."""
    gmm = gmm2()
    x_T, _ = starts(gmm, 16, 3)
    prob = Problem(gmm, "dpmpp_2m", 6, SMIN, SMAX, x_T)
    lv = torch.tensor([SMAX, 3.0, 0.5, 0.0], dtype=torch.float64)
    path = prob.path(lv)
    exact = gmm.flow(x_T, SMAX, 3.0, rtol=1e-8)
    assert torch.allclose(path[1], exact, atol=2e-3)
    assert float((path[-1] - gmm.flow(x_T, SMAX, 0.0, rtol=1e-8)).pow(2).mean().sqrt()) < 5e-3
    assert torch.allclose(prob.target, path[-1])


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2s", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m",
                                     "unipc", "ipndm"])
@pytest.mark.parametrize("method", ["dp", "optimize"])
def test_learned_grid_never_spends_more_than_asked(sampler, method):
    gmm = gmm2()
    for nfe in (3, 4):  # the reference's accuracy does not matter here: a loose tolerance
        prob = problem(gmm, sampler, nfe, n=8, rtol=1e-3)
        sig, info = learn(prob, method=method, m=6, refine=1, iters=2)
        counter = NFECounter(gmm)
        S.sample(counter, prob.x_T.clone(), sampler, nfe, grid=sig)  # raises if over budget
        assert counter.nfe <= nfe and counter.nfe == info["nfe_spent"]
        assert len(sig) - 1 == S.steps_for_nfe(sampler, nfe) and float(sig[0]) == SMAX and float(sig[-1]) == 0


def test_parametrisation_round_trip_and_monotone():
    for fz in (True, False):  # ending at 0, the last positive level may lie above sigma_min
        g = G.karras(6, 0.01 if fz else SMIN, SMAX, final_zero=fz)
        back = to_sigmas(from_sigmas(g, SMIN, SMAX, fz), SMIN, SMAX, fz)
        assert torch.allclose(back, g, rtol=1e-10, atol=0)
        th = torch.randn(len(from_sigmas(g, SMIN, SMAX, fz)), dtype=torch.float64) * 3
        s = to_sigmas(th, SMIN, SMAX, fz)
        pos = s[s > 0]
        assert bool((s[1:] < s[:-1]).all()) and float(s[0]) == SMAX and float(pos.min()) >= SMIN * (1 - 1e-12)


def test_gradient_of_the_final_error():
    """The central-difference gradient predicts the loss change along a random direction;
    autograd is used only where it agrees with it (samplers whose coefficients are Python
    floats give none)."""
    from fewstep.schedules.optimize import _grad_fd, _loss

    gmm = gmm2()
    prob = problem(gmm, "dpmpp_2m", 5, n=8)
    th = from_sigmas(G.karras(5, 0.01, SMAX), SMIN, SMAX, True)
    _, g = _grad_fd(prob, th, 1e-5)
    v = torch.randn(len(th), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = lambda t: float(_loss(prob, to_sigmas(t, SMIN, SMAX, True)))  # noqa: E731
    h = 1e-4
    assert float(g @ v) == pytest.approx((f(th + h * v) - f(th - h * v)) / (2 * h), rel=1e-4)
    assert not differentiable(prob, th)


def test_grid_json_round_trip(tmp_path):
    g = G.karras(5, SMIN, SMAX)
    G.save(tmp_path / "g.json", g, sampler="euler", nfe=5)
    assert torch.equal(G.load(tmp_path / "g.json"), g)
    assert json.loads((tmp_path / "g.json").read_text())["sampler"] == "euler"


@pytest.mark.parametrize("sampler,nfe", [("euler", 4), ("dpmpp_2m", 5), ("dpmpp_2m", 6)])
def test_learned_grid_beats_karras_on_fresh_noise(sampler, nfe):
    gmm = gmm2()
    prob = problem(gmm, sampler, nfe, n=128, seed=0)
    sig, info = learn(prob, method="dp+optimize", m=30, refine=1, iters=25, lr=0.1)
    assert info["rms_train"] <= info["rms_init"] + 1e-12
    fresh = problem(gmm, sampler, nfe, n=256, seed=1)
    learned, karras = fresh.error(sig), fresh.error(G.karras(prob.steps, SMIN, SMAX))
    assert learned < 0.7 * karras, (learned, karras)


def test_cli_schedule_then_sample(tmp_path, capsys):
    spec = tmp_path / "g.npz"
    gmm2().save(spec)
    out = tmp_path / "grid.json"
    code = main(["schedule", "--teacher", f"gmm:{spec}", "--sampler", "dpmpp_2m", "--nfe", "4", "--out", str(out),
                 "--n", "16", "--candidates", "8", "--iters", "3", "--quiet"])
    assert code == 0
    meta = json.loads(out.read_text())
    for k in ("teacher", "sampler", "nfe", "method", "cost", "seed", "rms_train", "rms_heldout", "rms_val", "afs", "nfe_spent"):
        assert k in meta
    assert meta["nfe_spent"] <= 4 and G.load(out)[0] == 80.0
    assert main(["sample", f"gmm:{spec}", "--sampler", "dpmpp_2m", "--nfe", "4", "--grid", str(out), "--n", "8",
                 "--out", str(tmp_path / "s.npz")]) == 0
    # a grid asks for more evaluations than given: one line, exit 2
    assert main(["sample", f"gmm:{spec}", "--sampler", "heun", "--nfe", "4", "--grid", str(out), "--n", "8",
                 "--out", str(tmp_path / "t.npz")]) == 2
    assert not (tmp_path / "t.npz").exists()
    # fewstep bench --grids: the learned grid is a method beside the fixed-grid samplers
    from fewstep.report.bench import run_bench

    res, _ = run_bench(f"gmm:{spec}", samplers="dpmpp_2m", students="none", nfe=[4], out=str(tmp_path / "b"), n=20,
                       nll_n=0, progress=False, grids=[str(out)])
    row = next(r for r in res.rows if r["method"] == "dpmpp_2m @ grid.json")
    assert row["nfe_used"] <= 4 and math.isfinite(row["flow_error"])


def test_cli_schedule_from_another_start_level(tmp_path):
    """--sigma-max 157.4 (diffusers' linear-beta start): the grid starts there, its metadata says
    so, and its held-out estimate is on starts drawn at that level (the exact marginal there)."""
    spec = tmp_path / "g.npz"
    gmm2().save(spec)
    out = tmp_path / "grid.json"
    assert main(["schedule", "--teacher", f"gmm:{spec}", "--sampler", "euler", "--nfe", "4", "--out", str(out),
                 "--sigma-max", "157.4", "--n", "64", "--candidates", "8", "--iters", "2", "--no-eval-levels",
                 "--quiet"]) == 0
    meta = json.loads(out.read_text())
    assert G.load(out)[0] == pytest.approx(157.4) and meta["sigma_max"] == pytest.approx(157.4)
    gmm = gmm2()
    g = torch.Generator().manual_seed(2)  # the command's report seed (seed + 2), at the asked level
    x0 = gmm.sample(64, generator=g)
    y = x0 + 157.4 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    got = S.sample(gmm, y, "euler", 4, str(out), sigma_min=SMIN, sigma_max=157.4)
    want = gmm.flow(y, 157.4, 0.0, rtol=1e-10)
    # the command's reference is its own level-to-level Dormand-Prince solve at rtol 1e-7 on values of
    # size ~3: its RMS differs from this rtol-1e-10 one by a few 1e-6 at most
    assert float(((got - want) ** 2).mean().sqrt()) == pytest.approx(meta["rms_heldout"], abs=2e-5)


def test_bad_input_is_a_user_error(tmp_path, capsys):
    gmm = gmm2()
    x_T, x0 = starts(gmm, 4, 0)
    with pytest.raises(UserError):
        Problem(gmm, "rk45", 10, SMIN, SMAX, x_T)  # adaptive: chooses its own steps
    with pytest.raises(UserError):
        Problem(gmm, "euler", 0, SMIN, SMAX, x_T)
    with pytest.raises(UserError):
        Problem(gmm, "euler", 4, SMAX, SMIN, x_T)  # range upside down
    with pytest.raises(UserError):
        Problem(gmm, "no_such_sampler", 4, SMIN, SMAX, x_T)
    prob = Problem(gmm, "euler", 4, SMIN, SMAX, x_T, exact_flow=gmm.flow)
    with pytest.raises(UserError):
        learn(prob, method="annealing")
    with pytest.raises(UserError):
        learn(prob, cost="fid")
    with pytest.raises(UserError):
        learn(prob, method="optimize", cost="elbo")
    with pytest.raises(UserError):
        elbo_costs(prob, candidates(4, SMIN, SMAX))  # no data samples
    with pytest.raises(UserError):
        shortest_path(torch.rand(4, 4), 4)  # 4 steps through 4 levels
    spec = tmp_path / "g.npz"
    gmm.save(spec)
    for bad in (["--out", str(tmp_path / "g.txt")], ["--nfe", "0"], ["--sampler", "rk45"], ["--n", "1"],
                ["--method", "nope"]):
        args = {"--teacher": f"gmm:{spec}", "--sampler": "euler", "--nfe": "4", "--out": str(tmp_path / "o.json")}
        args.update(dict(zip(bad[::2], bad[1::2])))
        try:
            code = main(["schedule", *[v for kv in args.items() for v in kv], "--quiet"])
        except SystemExit as e:  # argparse choices
            code = e.code
        assert code == 2, bad
        assert not (tmp_path / "o.json").exists()


# ----------------------------------------------------------------------------- evaluation levels
class Recorder:
    """The exact teacher, recording the levels it is asked at (one entry per call)."""

    def __init__(self, gmm):
        self.gmm, self.levels = gmm, []

    def __call__(self, x, sigma, **kw):
        s = torch.as_tensor(sigma)
        assert bool((s == s.flatten()[0]).all())
        self.levels.append(float(s.flatten()[0]))
        return self.gmm(x, sigma, **kw)


LEVEL_SAMPLERS = ["euler", "heun", "dpm_solver_2", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis"]


@pytest.mark.parametrize("sampler", LEVEL_SAMPLERS)
def test_identity_evaluation_levels_are_the_plain_sampler_bit_for_bit(sampler):
    gmm = gmm2()
    x_T, _ = starts(gmm, 16, 0)
    sig = G.karras(S.steps_for_nfe(sampler, 6), 0.01, SMAX)
    plain = S.sample(gmm, x_T.clone(), sampler, 6, grid=sig)
    wrapped = S.sample(EvalLevels(gmm, sig, sig[sig > 0].clone()), x_T.clone(), sampler, 6, grid=sig)
    assert torch.equal(plain, wrapped)


def _expected_level(sig, ev, s):
    """s exp(delta(log s)), delta linear in log sigma between the positive grid levels."""
    if s == 0:
        return 0.0
    pos = [float(v) for v in sig if v > 0]
    d = [math.log(float(e)) - math.log(p) for e, p in zip(ev, pos)]
    if s >= pos[0]:
        return s * math.exp(d[0])
    if s <= pos[-1]:
        return s * math.exp(d[-1])
    k = next(i for i in range(len(pos) - 1) if pos[i] >= s >= pos[i + 1])
    w = (math.log(s) - math.log(pos[k])) / (math.log(pos[k + 1]) - math.log(pos[k]))
    return s * math.exp(d[k] + w * (d[k + 1] - d[k]))


@pytest.mark.parametrize("sampler", LEVEL_SAMPLERS)
def test_evaluation_levels_map_every_call_and_keep_the_budget(sampler):
    """Each call of the plain sampler at s becomes one call at s exp(delta(log s)): the
    learned level at a grid level, the log-interpolated shift at midpoints (heun's corrector,
    dpm_solver_2's and dpmpp_2s's intermediate levels); the NFE is unchanged."""
    gmm = gmm2()
    x_T, _ = starts(gmm, 8, 0)
    sig = G.karras(S.steps_for_nfe(sampler, 6), 0.01, SMAX)
    ev = sig[sig > 0] * torch.exp(torch.linspace(-0.6, 0.4, int((sig > 0).sum()), dtype=torch.float64))
    a, b = Recorder(gmm), Recorder(gmm)
    S.sample(a, x_T.clone(), sampler, 6, grid=sig)
    S.sample(EvalLevels(b, sig, ev), x_T.clone(), sampler, 6, grid=sig)
    assert len(a.levels) == len(b.levels) <= 6
    for s, s_new in zip(a.levels, b.levels):
        assert s_new == pytest.approx(_expected_level(sig, ev, s), rel=1e-12)
    pos = [float(v) for v in sig if v > 0]
    for s, s_new in zip(a.levels, b.levels):  # at a grid level: exactly the table's level
        if s in pos:
            assert s_new == pytest.approx(float(ev[pos.index(s)]), rel=1e-12)
    # per-sample levels (not one per batch): each mapped on its own; 0 stays 0
    q = torch.tensor([0.0, 200.0, *pos, 0.5 * (pos[0] + pos[1]), pos[-1] / 3], dtype=torch.float64)
    got = EvalLevels(gmm, sig, ev).level(q)
    assert torch.allclose(got, torch.tensor([_expected_level(sig, ev, float(v)) for v in q], dtype=torch.float64),
                          rtol=1e-12, atol=0)


def test_schedule_json_round_trip_with_evaluation_levels(tmp_path):
    gmm = gmm2()
    x_T, _ = starts(gmm, 8, 0)
    sig = G.karras(4, 0.01, SMAX)
    ev = sig[sig > 0] * torch.tensor([0.3, 0.8, 1.1, 1.5], dtype=torch.float64)
    save_schedule(tmp_path / "s.json", sig, ev, sampler="dpmpp_2m", nfe=4)
    s2, wrap = load_schedule(tmp_path / "s.json")
    assert torch.equal(s2, sig) and torch.equal(G.load(tmp_path / "s.json"), sig)
    assert torch.equal(wrap(gmm).eval_sigmas, ev)
    # fewstep.sample with the file applies the levels (as sample --grid and bench --grids do)
    want = S.sample(EvalLevels(gmm, sig, ev), x_T.clone(), "dpmpp_2m", 4, grid=sig)
    assert torch.equal(S.sample(gmm, x_T.clone(), "dpmpp_2m", 4, grid=str(tmp_path / "s.json")), want)
    assert not torch.equal(S.sample(gmm, x_T.clone(), "dpmpp_2m", 4, grid=sig), want)
    # a file without them behaves as before
    G.save(tmp_path / "g.json", sig)
    s3, wrap = load_schedule(tmp_path / "g.json")
    assert torch.equal(s3, sig) and wrap(gmm) is gmm
    # a wrong table: one clear line
    bad = json.loads((tmp_path / "s.json").read_text())
    bad["eval_sigmas"] = bad["eval_sigmas"][:-1]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="eval_sigmas"):
        load_schedule(tmp_path / "b.json")


def test_learned_evaluation_levels_beat_the_learned_grid_on_fresh_noise():
    """Learning the levels jointly with the grid (from the learned grid) lowers the exact-flow
    error on fresh noise well below the grid-only optimum, at the same NFE."""
    gmm = gmm2()
    prob = problem(gmm, "dpmpp_2m", 4, n=128, seed=0)
    sig, info = learn(prob, method="optimize", iters=25, lr=0.1)
    sig2, ev, li = optimize_levels(prob, sig, iters=25, lr=0.1)
    assert li["rms_init"] == pytest.approx(info["rms_train"], rel=1e-4)  # starts at the grid-only optimum
    fresh = problem(gmm, "dpmpp_2m", 4, n=256, seed=1)
    grid_only, both = fresh.error(sig), fresh.error(sig2, levels=ev)
    assert both < 0.75 * grid_only, (both, grid_only)
    counter = NFECounter(gmm)
    S.sample(EvalLevels(counter, sig2, ev), fresh.x_T.clone(), "dpmpp_2m", 4, grid=sig2)
    assert counter.nfe == 4


def test_cli_schedule_with_evaluation_levels(tmp_path):
    spec = tmp_path / "g.npz"
    gmm2().save(spec)
    out = tmp_path / "lv.json"
    assert main(["schedule", "--teacher", f"gmm:{spec}", "--sampler", "dpmpp_2m", "--nfe", "4", "--out", str(out),
                 "--n", "16", "--method", "optimize", "--iters", "3", "--eval-levels", "--quiet"]) == 0
    meta = json.loads(out.read_text())
    assert len(meta["eval_sigmas"]) == sum(v > 0 for v in meta["sigmas"]) and meta["nfe_spent"] == 4
    assert main(["sample", f"gmm:{spec}", "--sampler", "dpmpp_2m", "--nfe", "4", "--grid", str(out), "--n", "8",
                 "--out", str(tmp_path / "s.npz")]) == 0


# ----------------------------------------------------------------------------- issue 21
def test_warm_start_splits_the_widest_positive_steps():
    from fewstep.schedules import warm_start

    w = warm_start([80.0, 1.0, 0.002, 0.0], 5)
    assert len(w) == 6 and float(w[-1]) == 0 and bool((w[1:] < w[:-1]).all())
    assert {80.0, 1.0, 0.002} <= {round(float(v), 12) for v in w}  # the old levels stay
    with pytest.raises(UserError, match="adds levels"):
        warm_start([80.0, 1.0, 0.0], 1)


def test_problem_with_afs_buys_one_more_step_and_matches_the_sampler():
    gmm = gmm2()
    x = 80.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p0 = Problem(gmm, "dpmpp_2m", 5, 0.002, 80.0, x, exact_flow=gmm.flow, final_zero=False)
    p1 = Problem(gmm, "dpmpp_2m", 5, 0.002, 80.0, x, exact_flow=gmm.flow, final_zero=False, afs=True)
    assert (p0.steps, p1.steps) == (5, 6)
    sig = G.vp_time(6, 0.002, 80.0, final_zero=False)
    direct = S.sample(gmm, x.clone(), "dpmpp_2m", 5, sig, afs=True)
    torch.testing.assert_close(p1.run(sig), direct)
    assert p1.cost(sig) == 5


def test_learn_stops_on_held_out_starts_and_is_never_worse_there_than_its_start():
    gmm = gmm2()
    g = torch.Generator().manual_seed(3)
    x, xv = (80.0 * torch.randn(64, 2, generator=g, dtype=torch.float64) for _ in range(2))
    prob = Problem(gmm, "dpmpp_2m", 4, 0.002, 80.0, x, exact_flow=gmm.flow)
    val = prob.on(xv)
    lines = []
    sig, info = learn(prob, method="optimize", iters=60, lr=0.1, val=val, patience=5, log=lines.append)
    assert info["rms_val"] <= info["rms_val_start"] + 1e-12
    assert abs(val.error(sig) - info["rms_val"]) < 1e-12
    assert val.x_T is xv and prob.x_T is x and val._target is not prob._target


def test_cli_several_budgets_are_monotone_and_keep_the_smaller_schedule(tmp_path, monkeypatch):
    """--nfe 3,4,5: learned in order; each budget's validation RMS is at most the one below it.
    Where learning (and the warm start) at 5 NFE come out worse than the 4-NFE schedule (forced
    here with a poor grid), the 5-NFE file is the 4-NFE schedule whole, spending 4."""
    import fewstep.schedules as SCH

    real_learn, real_warm = SCH.learn, SCH.warm_start

    def poor(prob):
        return G.karras(prob.steps, SMIN, SMAX, rho=0.5, final_zero=True)

    def learn(prob, **kw):
        sig, meta = real_learn(prob, **kw)
        if prob.nfe == 5:
            meta.pop("eval_sigmas", None)
            return poor(prob), {**meta, "nfe_spent": prob.cost(poor(prob))}
        return sig, meta

    def warm(prev, steps):
        return G.karras(steps, SMIN, SMAX, rho=0.5, final_zero=True) if steps >= 5 else real_warm(prev, steps)

    monkeypatch.setattr(SCH, "learn", learn)
    monkeypatch.setattr(SCH, "warm_start", warm)
    spec = tmp_path / "g.npz"
    gmm2().save(spec)
    out = tmp_path / "g{nfe}.json"
    assert main(["schedule", "--teacher", f"gmm:{spec}", "--sampler", "euler", "--nfe", "5,3,4", "--out", str(out),
                 "--n", "64", "--candidates", "12", "--iters", "10", "--end", "zero", "--afs", "off",
                 "--quiet"]) == 0
    metas = {k: json.loads((tmp_path / f"g{k}.json").read_text()) for k in (3, 4, 5)}
    assert metas[4]["rms_val"] <= metas[3]["rms_val"] + 1e-12 and metas[5]["rms_val"] <= metas[4]["rms_val"] + 1e-12
    assert metas[5]["kept_smaller_budget"] == 4 and metas[5]["sigmas"] == metas[4]["sigmas"]
    assert metas[5]["nfe_spent"] == 4 and metas[5]["rms_heldout"] == metas[4]["rms_heldout"]
    counter = NFECounter(gmm2())
    S.sample(counter, 80.0 * torch.randn(8, 2, dtype=torch.float64), "euler", 5, str(tmp_path / "g5.json"))
    assert counter.nfe == 4
