"""Stochastic samplers on the exact teacher: do their samples follow the data distribution?

Statistic: the energy distance (fewstep.metrics.energy_distance) between N = 500 sampler
outputs and N = 500 fresh data samples. Threshold: the 99.9% quantile of the same
statistic between two independent data samples of size N (the null distribution),
estimated from 2000 random splits of 4 pools of 2N data samples. So an exact sampler
fails the test with probability 0.1% (false-alarm rate, up to the quantile's estimation
error); seeds are fixed, so a run is reproducible. Each sampler is also run deliberately
wrong (two or three steps for the whole trajectory, or tolerances of 10 for the
adaptive one) and must then exceed the threshold: the test can fail.
"""
from __future__ import annotations

import functools

import pytest
import torch

from _exact import gmm2, gmm16, start
from fewstep import grids
from fewstep import samplers as S
from fewstep.denoiser import NFECounter
from fewstep.errors import UserError
from fewstep.metrics import energy_distance
from fewstep.samplers.analytic_dpm import (analytic_dpm_stats, load_analytic_dpm_stats,
                                           save_analytic_dpm_stats)

TEACHERS = {"gmm2": gmm2, "gmm16": gmm16}
N = 500
SIGMA_MIN, SIGMA_MAX = 0.01, 40.0
FALSE_ALARM = 1e-3


def _split_energy(W: torch.Tensor, U: torch.Tensor, n: int) -> torch.Tensor:
    """Energy distance of each split (columns of U: indicator of set A) of a pool with
    pairwise distances W (zero diagonal), unbiased within-set terms as in the metric."""
    V = 1 - U
    WU, WV = W @ U, W @ V
    s_aa, s_bb, s_ab = (U * WU).sum(0), (V * WV).sum(0), (U * WV).sum(0)
    return 2 * s_ab / n**2 - (s_aa + s_bb) / (n * (n - 1))


@functools.lru_cache(maxsize=None)
def threshold(which: str, n: int = N, splits: int = 2000, pools: int = 4) -> float:
    gmm = TEACHERS[which]()
    g = torch.Generator().manual_seed(1234)
    stats = []
    for _ in range(pools):
        pool = gmm.sample(2 * n, generator=g)
        W = torch.cdist(pool, pool)
        W.fill_diagonal_(0)
        U = torch.zeros(2 * n, splits // pools, dtype=torch.float64)
        for r in range(U.shape[1]):
            U[torch.randperm(2 * n, generator=g)[:n], r] = 1
        stats.append(_split_energy(W, U, n))
        a = U[:, 0].bool()  # the fast formula is the metric's
        assert abs(float(stats[-1][0]) - energy_distance(pool[a], pool[~a])) < 1e-9
    return float(torch.cat(stats).quantile(1 - FALSE_ALARM))


@functools.lru_cache(maxsize=None)
def data(which: str) -> torch.Tensor:
    return TEACHERS[which]().sample(N, generator=torch.Generator().manual_seed(99))


def gamma_stats(which, sig):
    gmm = TEACHERS[which]()
    return analytic_dpm_stats(gmm, gmm.sample(20000, generator=torch.Generator().manual_seed(5)), sig[:-1], 4096)


def run(which, name, steps, seed=7, **options):
    gmm = TEACHERS[which]()
    sig = grids.karras(steps, SIGMA_MIN, SIGMA_MAX)
    if name == "analytic_dpm" and "stats" not in options:
        options["stats"] = gamma_stats(which, sig)
    x = start(gmm, N, SIGMA_MAX, seed=seed)  # exact samples of the marginal at sigma_max
    return S.get(name)(gmm, x, sig, generator=torch.Generator().manual_seed(seed + 1), **options)


# name, options, steps (a large NFE), steps when deliberately wrong
CASES = [
    ("ddpm", {}, 200, 3),
    ("ddim", {"eta": 1.0}, 200, 3),
    ("euler_maruyama", {}, 200, 3),
    ("edm_stochastic", {}, 100, 2),
    ("pc", {}, 100, 3),
    ("analytic_dpm", {}, 200, 2),
    ("gotta_go_fast", {}, 2, None),
]


@pytest.mark.parametrize("which", TEACHERS)
@pytest.mark.parametrize("name,options,steps,wrong_steps", CASES, ids=[c[0] for c in CASES])
def test_samples_match_the_data(which, name, options, steps, wrong_steps):
    thr = threshold(which)
    ed = energy_distance(run(which, name, steps, **options), data(which))
    assert ed < thr, (name, which, ed, thr)
    wrong = {"eps_rel": 10.0, "eps_abs": 10.0} if name == "gotta_go_fast" else {}
    ed_wrong = energy_distance(run(which, name, wrong_steps or 2, **options, **wrong), data(which))
    assert ed_wrong > thr, (name, which, ed_wrong, thr)


# ------------------------------------------------------------------ Analytic-DPM
@pytest.mark.parametrize("which", TEACHERS)
def test_analytic_dpm_gamma_matches_a_high_sample_estimate(which):
    """Gamma(sigma) = E|eps(x0 + sigma z, sigma)|^2 / d by the function (n_mc = 2000) vs an
    independent 100k-sample estimate here: within 4 standard errors."""
    gmm = TEACHERS[which]()
    levels = grids.karras(6, SIGMA_MIN, SIGMA_MAX, final_zero=False)
    est = analytic_dpm_stats(gmm, gmm.sample(5000, generator=torch.Generator().manual_seed(1)), levels, 2000,
                             cache=False)
    g = torch.Generator().manual_seed(2)
    x0 = gmm.sample(100_000, generator=g)
    for s, gam in zip(levels.tolist(), est.tolist()):
        y = x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        per_sample = ((y - gmm(y, s)) / s).square().mean(1)
        se = float(per_sample.std()) / 2000**0.5
        assert abs(gam - float(per_sample.mean())) < 4 * se + 1e-12, (s, gam, float(per_sample.mean()), se)
        assert 0 <= float(per_sample.mean()) <= 1 + 4 * float(per_sample.std()) / x0.shape[0] ** 0.5  # Gamma <= 1


@pytest.mark.parametrize("which", TEACHERS)
def test_analytic_dpm_beats_ddpm_at_small_nfe(which):
    """Bao et al. 2022's claim on the exact teacher: at 5 steps the optimal variance gives
    samples closer to the data than DDPM's posterior variance (two seeds each)."""
    ref = data(which)
    for seed in (7, 17):
        ed_a = energy_distance(run(which, "analytic_dpm", 5, seed=seed), ref)
        ed_d = energy_distance(run(which, "ddpm", 5, seed=seed), ref)
        assert ed_a < 0.6 * ed_d, (seed, ed_a, ed_d)


def test_analytic_dpm_stats_cache_json_and_table(tmp_path):
    gmm = gmm2()
    counter = NFECounter(gmm)
    sig = grids.karras(5, SIGMA_MIN, SIGMA_MAX)
    data_fn = lambda n: gmm.sample(n, generator=torch.Generator().manual_seed(0))  # noqa: E731
    g1 = analytic_dpm_stats(counter, data_fn, sig[:-1], 64, batch_size=32)
    assert counter.nfe == 5 * 2
    g2 = analytic_dpm_stats(counter, data_fn, sig[:-1], 64)
    assert counter.nfe == 10 and torch.equal(g1, g2)  # cached per denoiser and levels
    path = tmp_path / "gamma.json"
    save_analytic_dpm_stats(path, sig[:-1], g1)
    table = load_analytic_dpm_stats(path)
    x = start(gmm, 16, SIGMA_MAX)
    a = S.get("analytic_dpm")(gmm, x, sig, stats=table, generator=torch.Generator().manual_seed(0))
    b = S.get("analytic_dpm")(gmm, x, sig, stats=g1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    c = S.get("analytic_dpm")(counter, x, sig, data=data_fn, n_mc=64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, c, rtol=1e-12, atol=1e-12) and counter.nfe == 10 + 5  # stats from the cache
    with pytest.raises(UserError):
        S.get("analytic_dpm")(gmm, x, sig)
    with pytest.raises(UserError):
        load_analytic_dpm_stats(tmp_path / "missing.json")


def test_analytic_dpm_variance_bounds():
    """Gamma = 1 gives the DDIM-family lambda (DDPM posterior for eta = 1); Gamma = 0 the
    largest variance; data_range caps it (Thm. 2)."""
    from fewstep.samplers.analytic_dpm import _variances
    from fewstep.samplers._common import ancestral_levels

    sig = [4.0, 2.0, 0.0]
    (down, std), last = _variances(sig, [1.0, 0.3], 1.0, None, False)
    assert (down, std) == pytest.approx(ancestral_levels(4.0, 2.0, 1.0)) and last == (0.0, 0.0)
    (_, std0), _ = _variances(sig, [-0.2, 0.3], 1.0, None, False)  # clipped to Gamma = 0
    assert std0**2 == pytest.approx(std**2 + (4.0 - down) ** 2)
    (_, std_r), _ = _variances(sig, [0.0, 0.3], 1.0, (-1.0, 1.0), False)
    assert std_r**2 == pytest.approx(std**2 + (1 - down / 4.0) ** 2)


# ------------------------------------------------------------------ Gotta Go Fast
def test_gotta_go_fast_budget_refuses_never_truncates():
    """The tolerance alone decides the steps: a budget at least the evaluations the run
    needs gives the same samples; any smaller budget (down to a few evaluations, where
    forced steps used to diverge) is refused in one line after at most max_nfe calls."""
    gmm = gmm16()
    sig = grids.karras(2, SIGMA_MIN, SIGMA_MAX)
    x = start(gmm, 64, SIGMA_MAX)
    counter = NFECounter(gmm)
    free = S.get("gotta_go_fast")(counter, x, sig, generator=torch.Generator().manual_seed(0))
    need = counter.nfe
    assert need > 100 and energy_distance(free, data("gmm16")[:64]) < 4 * threshold("gmm16")
    for budget in (need, need + 7):
        out = S.get("gotta_go_fast")(gmm, x, sig, max_nfe=budget, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, free)
    for budget in (3, 4, 7, 20, 60, need - 1):
        counter = NFECounter(gmm)
        with pytest.raises(UserError, match=f"needs more than max_nfe={budget} ") as e:
            S.get("gotta_go_fast")(counter, x, sig, max_nfe=budget, generator=torch.Generator().manual_seed(0))
        assert "\n" not in str(e.value) and counter.nfe <= budget


def test_gotta_go_fast_adapts_to_tolerance_and_budget():
    gmm = gmm2()
    sig = grids.karras(2, SIGMA_MIN, SIGMA_MAX, final_zero=False)  # ends at sigma_min: no denoising
    nfe = {}
    for rel in (0.2, 0.05, 0.01):
        counter = NFECounter(gmm)
        S.get("gotta_go_fast")(counter, start(gmm, 32, SIGMA_MAX), sig, eps_rel=rel,
                               generator=torch.Generator().manual_seed(0))
        nfe[rel] = counter.nfe
    assert nfe[0.2] < nfe[0.05] < nfe[0.01] and all(v % 2 == 0 for v in nfe.values())
    with pytest.raises(UserError):
        S.get("gotta_go_fast")(gmm, start(gmm, 4, SIGMA_MAX), grids.karras(2, SIGMA_MIN, SIGMA_MAX), max_nfe=2)
    x = start(gmm, 4, SIGMA_MAX)
    S.get("gotta_go_fast")(gmm, x, sig, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, start(gmm, 4, SIGMA_MAX))  # the input is not modified


def test_sample_gives_adaptive_samplers_the_budget():
    gmm = gmm2()
    counter = NFECounter(gmm)
    S.sample(counter, start(gmm, 16, SIGMA_MAX), "gotta_go_fast", nfe=400, sigma_min=SIGMA_MIN,
             sigma_max=SIGMA_MAX, generator=torch.Generator().manual_seed(0))
    assert 12 < counter.nfe <= 400
    with pytest.raises(UserError, match="max_nfe=12"):
        S.sample(gmm, start(gmm, 16, SIGMA_MAX), "gotta_go_fast", nfe=12, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                 generator=torch.Generator().manual_seed(0))


def test_pc_corrector_only_changes_with_snr_and_costs_its_evaluations():
    gmm = gmm2()
    sig = grids.karras(4, SIGMA_MIN, SIGMA_MAX)
    x = start(gmm, 8, SIGMA_MAX)
    a = S.get("pc")(gmm, x, sig, n_corrector=0, generator=torch.Generator().manual_seed(0))
    b = S.get("euler_maruyama")(gmm, x, sig, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)  # reverse-diffusion predictor = EM in sigma-space
