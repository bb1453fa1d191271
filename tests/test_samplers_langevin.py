"""Langevin samplers (fewstep.samplers.langevin) against closed forms.

Gaussian target: a one-component GaussianMixture N(mu, S) is its own exact denoiser, so
at level sigma the chains target N(mu, C), C = S + sigma^2 I, exactly. For ULA with step
eps the stationary law is known too: the chain x' = (I - eps C^-1)(x - mu) + mu + sqrt(2 eps) z
is linear-Gaussian, and its stationary covariance V solves V = A V A + 2 eps I with
A = I - eps C^-1; in C's eigenbasis v = 2 eps / (1 - (1 - eps / c)^2) = c / (1 - eps / (2 c)),
i.e. V = C (I - eps C^-1 / 2)^-1 (mean exactly mu). Chains start far from mu and run long
enough for the transient (|1 - eps / c|^k, printed below per test) to be far below the
Monte-Carlo error. Tolerances: 5 standard errors of the n = 4000 independent chains'
sample mean (sqrt(V_ii / n)) and sample covariance (sqrt((V_ii V_jj + V_ij^2) / n)), the
exact standard errors for Gaussian samples; seeds are fixed.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fewstep import grids
from fewstep import samplers as S
from fewstep.data.gmm import GaussianMixture
from fewstep.denoiser import NFECounter
from fewstep.errors import UserError
from fewstep.metrics import energy_distance

N_CHAINS = 4000
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = 0.002  # the level the one-level samplers run at (the grid's smallest positive sigma)
Z_TOL = 5.0  # standard errors


def _cov() -> torch.Tensor:
    """A full covariance with eigenvalues 1 and 0.25, axes rotated by 30 degrees."""
    a = math.pi / 6
    R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    return R @ torch.diag(torch.tensor([1.0, 0.25], dtype=torch.float64)) @ R.T


def gaussian() -> GaussianMixture:
    return GaussianMixture(torch.ones(1), MU[None], _cov()[None])


def target_cov() -> torch.Tensor:
    return _cov() + SIGMA**2 * torch.eye(2, dtype=torch.float64)


def ula_cov(eps: float) -> torch.Tensor:
    """ULA's stationary covariance C (I - eps C^-1 / 2)^-1 on N(mu, C) (module docstring)."""
    c, U = torch.linalg.eigh(target_cov())
    return U @ torch.diag(c / (1 - eps / (2 * c))) @ U.T


def ula_law(eps: float, k: int):
    """Exact (mean, covariance) of ULA after k steps from :func:`far_start` on N(mu, C): in
    C's eigenbasis, with a = 1 - eps / c, the offset shrinks by a^k and the variance is
    v (1 - a^(2k)), v = c / (1 - eps / (2 c)) (x_k - mu = a^k (x_0 - mu) + Gaussian noise)."""
    c, U = torch.linalg.eigh(target_cov())
    a = 1 - eps / c
    v = c / (1 - eps / (2 * c))
    mean = MU + U @ (a**k * (U.T @ (far_start(1)[0] - MU)))
    return mean, U @ torch.diag(v * (1 - a ** (2 * k))) @ U.T


def far_start(n: int = N_CHAINS) -> torch.Tensor:
    return (MU + torch.tensor([8.0, 8.0], dtype=torch.float64)).expand(n, 2).clone()


def one_level_grid(steps: int, final_zero: bool = True) -> torch.Tensor:
    """A grid of ``steps`` steps whose smallest positive level is SIGMA."""
    return grids.logsnr_uniform(steps, SIGMA, 1.0, final_zero=final_zero)


def check_gaussian(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean and covariance of the chains within Z_TOL exact standard errors."""
    n = x.shape[0]
    m = x.mean(0)
    se_m = (cov.diagonal() / n).sqrt()
    assert ((m - mean).abs() <= Z_TOL * se_m).all(), (m, mean, se_m)
    c = torch.cov(x.T)
    d = cov.diagonal()
    se_c = ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    assert ((c - cov).abs() <= Z_TOL * se_c).all(), (c, cov, se_c)


def run(name, eps, steps, callback=None, denoiser=None, seed=0):
    return S.get(name)(gaussian() if denoiser is None else denoiser, far_start(), one_level_grid(steps),
                       step_size=eps, generator=torch.Generator().manual_seed(seed), callback=callback)


def test_ula_follows_its_exact_law_and_the_target_as_eps_shrinks():
    eps = 0.05
    levels = []
    # after 60 steps the transient is still large (0.95^60 = 0.046 of the start offset, ~30 SE):
    # the chains must follow ULA's exact k-step law, not just its limit
    x = run("langevin", eps, 60, callback=lambda info: levels.append((info["sigma"], info["step_size"])))
    assert len(levels) == 60 and all(s == pytest.approx(SIGMA, rel=1e-12) and e == eps for s, e in levels)
    check_gaussian(x, *ula_law(eps, 60))
    # after 400 steps it is ULA's stationary law (0.95^400 * 11 ~ 1e-8 left of the start)
    x = run("langevin", eps, 400, seed=2)
    check_gaussian(x, MU, ula_cov(eps))
    # ULA's bias is O(eps): 1 / (1 - eps / (2 c)) - 1 = 11% on the c = 0.25 axis here, ~5 SE
    assert not torch.allclose(ula_cov(eps), target_cov(), rtol=0.05)
    # eps = 0.005: the bias (1% of a variance, 0.45 SE) is below the MC error and after 2500
    # steps the transient is 0.995^2500 * 11 ~ 4e-5 (0.003 SE): the chains sample the target
    x = run("langevin", 0.005, 2500, seed=1)
    check_gaussian(x, MU, target_cov())


def test_langevin_level_and_default_step():
    """The level is the grid's smallest positive sigma whether or not the grid ends at 0,
    len(sigmas) - 1 steps, and the default step is 0.1 sigma^2."""
    for final_zero in (True, False):
        seen = []
        sig = grids.karras(7, 0.05, 2.0, final_zero=final_zero)
        S.get("langevin")(gaussian(), far_start(8), sig, generator=torch.Generator().manual_seed(0),
                          callback=lambda info: seen.append((info["sigma"], info["step_size"])))
        assert len(seen) == len(sig) - 1
        assert all(s == pytest.approx(0.05, rel=1e-12) and e == pytest.approx(0.1 * 0.05**2, rel=1e-12)
                   for s, e in seen)
    with pytest.raises(UserError, match="step_size"):
        run("langevin", -1.0, 3)
    with pytest.raises(UserError, match="step_size"):
        run("langevin", float("nan"), 3)


def test_mala_is_exact_at_a_step_where_ula_is_biased():
    # eps = 0.2: ULA contracts by |1 - eps / c| = 0.8 and 0.2 per step on the two axes and its
    # stationary variance on the c = 0.25 axis is 0.25 / (1 - 0.4) = 0.417, 0.167 too large
    # (~30 SE at n = 4000); MALA must still give the target's covariance.
    eps = 0.2
    x_ula = run("langevin", eps, 300)
    check_gaussian(x_ula, MU, ula_cov(eps))
    c, U = torch.linalg.eigh(target_cov())
    var_ula = torch.var((x_ula - MU) @ U, dim=0)
    assert var_ula[0] > c[0] * (1 + 10 * math.sqrt(2 / N_CHAINS))  # visibly biased

    rates = []
    x_mala = run("mala", eps, 600, callback=lambda info: rates.append(info["accept_rate"]), seed=3)
    check_gaussian(x_mala, MU, target_cov())
    var_mala = torch.var((x_mala - MU) @ U, dim=0)
    assert abs(float(var_mala[0] - c[0])) < Z_TOL * float(c[0]) * math.sqrt(2 / N_CHAINS)
    assert var_ula[0] - var_mala[0] > 10 * float(c[0]) * math.sqrt(2 / N_CHAINS)
    # the adjustment did work: some proposals were rejected at stationarity, most accepted
    late = sum(rates[-100:]) / 100
    assert 0.3 < late < 0.99, late


def test_mala_small_step_and_info():
    """At its default step (1.65^2/2 d^(-1/3) sigma^2, tiny here) MALA accepts nearly
    everything; at a moderate step from a far start it converges to the target."""
    info = []
    x0 = far_start(16)
    S.get("mala")(gaussian(), x0, one_level_grid(3), generator=torch.Generator().manual_seed(0),
                  callback=info.append)
    assert len(info) == 3
    eps = 1.65**2 / 2 * 2 ** (-1 / 3) * SIGMA**2
    assert all(i["step_size"] == pytest.approx(eps, rel=1e-12) for i in info)
    assert all(i["accept"].dtype == torch.bool and i["accept"].shape == (16,) for i in info)
    assert torch.equal(info[0]["x"], x0)
    # the next state is the proposal where accepted, the old state elsewhere
    for a, b in zip(info, info[1:]):
        assert torch.equal(b["x"], torch.where(a["accept"][:, None], a["proposal"], a["x"]))


def test_mala_counts_evaluations_and_finds_log_prob_through_wrappers():
    """Through sample(): a NFECounter-wrapped mixture (log_prob on .inner), cost steps + 1."""
    gmm = gaussian()
    counter = NFECounter(gmm)
    x = far_start(32)
    out = S.sample(counter, x, "mala", nfe=20, sigma_min=SIGMA, sigma_max=1.0,
                   generator=torch.Generator().manual_seed(0), step_size=0.1)
    assert counter.nfe == 20 == S.info("mala").cost(19)
    # the same chain as on the bare mixture (same generator, same grid)
    ref = S.get("mala")(gmm, x, grids.karras(19, SIGMA, 1.0), generator=torch.Generator().manual_seed(0),
                        step_size=0.1)
    assert torch.equal(out, ref)


def test_mala_uses_a_score_models_log_prob():
    families = pytest.importorskip("fewstep.families")
    gmm = gaussian()
    with_energy = families.ScoreDenoiser(torch.nn.Module(), lambda x, s: gmm.score(x, s),
                                         lambda x, s: gmm.log_prob(x, s))
    x = far_start(64)
    a = S.get("mala")(with_energy, x, one_level_grid(30), step_size=0.1, generator=torch.Generator().manual_seed(4))
    b = S.get("mala")(gmm, x, one_level_grid(30), step_size=0.1, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, atol=1e-9)
    without = families.ScoreDenoiser(torch.nn.Module(), lambda x, s: gmm.score(x, s))
    with pytest.raises(UserError, match="mala.*energy"):
        S.get("mala")(without, x, one_level_grid(3), generator=torch.Generator().manual_seed(0))
    # labels the energy cannot take would make the chain target another law: refused
    with pytest.raises(UserError, match="takes no labels"):
        S.get("mala")(with_energy, x, one_level_grid(3), extra_args={"labels": torch.zeros(64, dtype=torch.long)})


def test_mala_passes_labels_to_denoiser_and_log_prob():
    gmm = GaussianMixture.labelled_ring()
    seen = []

    class Spy:
        def __call__(self, x, sigma, **cond):
            seen.append(("D", cond["labels"]))
            return gmm(x, sigma, **cond)

        def log_prob(self, x, sigma, labels=None):
            seen.append(("log_prob", labels))
            return gmm.log_prob(x, sigma, labels=labels)

    lab = torch.tensor([0, 1, 2, -1])
    S.get("mala")(Spy(), torch.zeros(4, 2, dtype=torch.float64), grids.karras(3, 0.05, 1.0),
                  generator=torch.Generator().manual_seed(0), extra_args={"labels": lab})
    assert [k for k, _ in seen] == ["D", "log_prob"] * 4 and all(torch.equal(v, lab) for _, v in seen)


def test_mala_without_log_prob_is_a_user_error():
    with pytest.raises(UserError, match="energy") as e:
        S.get("mala")(lambda x, s, **_: x, far_start(4), one_level_grid(3))
    assert "\n" not in str(e.value) and "gmm:FILE.npz" in str(e.value)
    with pytest.raises(UserError, match="energy"):
        S.sample(NFECounter(lambda x, s, **_: x), far_start(4), "mala", nfe=5, sigma_min=0.1, sigma_max=1.0)


# ------------------------------------------------------------------ annealed Langevin
class ConstantScore:
    """D(x, sigma) = x + sigma^2 b: the score is exactly b at every level. Records calls."""

    def __init__(self, b):
        self.b, self.calls = torch.as_tensor(b, dtype=torch.float64), []

    def __call__(self, x, sigma, **_):
        self.calls.append((float(sigma[0]), x))
        return x + sigma[:, None] ** 2 * self.b


def test_annealed_step_rule_is_song_ermon_algorithm_1():
    """alpha_i = eps sigma_i^2 / sigma_L^2, T calls per level in decreasing order, and the
    paper's update x + (alpha/2) s + sqrt(alpha) z: with a constant score b the increments
    of a level have mean (alpha_i / 2) b and variance alpha_i per coordinate.

    Tolerance: n T = 20000 increments per level and coordinate; 5 SE of their mean is
    5 sqrt(alpha_i / 20000), of their variance 5 alpha_i sqrt(2 / 40000) (two coordinates
    pooled) = 3.5%; the wrong conventions (alpha s + sqrt(2 alpha) z) are off by 2x."""
    sig = torch.tensor([2.0, 0.7, 0.2, 0.05, 0.0], dtype=torch.float64)
    eps, T, n = 1e-3, 5, 4000
    b = torch.tensor([50.0, 0.0], dtype=torch.float64)
    D = ConstantScore(b)
    info = []
    x = torch.zeros(n, 2, dtype=torch.float64)
    out = S.get("annealed_langevin")(D, x, sig, steps_per_level=T, eps=eps, denoise_last=False,
                                     generator=torch.Generator().manual_seed(0), callback=info.append)
    levels = [2.0, 0.7, 0.2, 0.05]
    assert [s for s, _ in D.calls] == [s for s in levels for _ in range(T)]
    assert len(info) == 4 * T == S.info("annealed_langevin").cost(4, steps_per_level=T, denoise_last=False)
    states = [i["x"] for i in info] + [out]
    for li, s in enumerate(levels):
        alpha = eps * s**2 / 0.05**2
        rows = [i for i in info if i["level"] == li]
        assert [r["t"] for r in rows] == list(range(T))
        assert all(r["alpha"] == pytest.approx(alpha, rel=1e-12) and r["sigma"] == s for r in rows)
        inc = torch.cat([states[k + 1] - states[k] for k in range(li * T, (li + 1) * T)])
        mean = inc.mean(0)
        assert abs(float(mean[0]) - alpha / 2 * 50) < Z_TOL * math.sqrt(alpha / (n * T))
        assert abs(float(mean[1])) < Z_TOL * math.sqrt(alpha / (n * T))
        var = float((inc - inc.mean(0)).square().mean())
        assert abs(var / alpha - 1) < Z_TOL * math.sqrt(2 / (2 * n * T)), (s, var, alpha)


def test_annealed_denoise_last_is_one_tweedie_step():
    sig = torch.tensor([1.0, 0.3, 0.1, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    D = ConstantScore(b)
    info = []
    out = S.get("annealed_langevin")(D, torch.zeros(5, 2, dtype=torch.float64), sig, steps_per_level=4,
                                     generator=torch.Generator().manual_seed(0), callback=info.append)
    assert len(D.calls) == 3 * 4 + 1 == S.info("annealed_langevin").cost(3, steps_per_level=4)
    s_last, x_last = D.calls[-1]
    assert s_last == 0.1 and info[-1]["final"] and info[-1]["sigma_next"] == 0.0
    # x + sigma_L^2 s(x, sigma_L) with s = b
    assert torch.allclose(out, x_last + 0.1**2 * b, atol=1e-15)


def test_annealed_langevin_converges_to_the_mixture():
    """Energy distance to exact samples falls as T grows and at T = 100 is below the 99.9%
    quantile of its null distribution (two independent exact sets of N = 500, estimated
    in test_samplers_stochastic.threshold); 10 levels geometric from 3 to 0.01, the paper's
    eps = 2e-5, chains started from N(0, 3^2 I) (not the marginal at sigma = 3)."""
    from test_samplers_stochastic import N, TEACHERS, data, threshold

    gmm = TEACHERS["gmm2"]()
    sig = grids.logsnr_uniform(10, 0.01, 3.0)
    ref, null = data("gmm2"), threshold("gmm2")
    dist = {}
    for T in (1, 3, 100):
        x = 3.0 * torch.randn(N, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out = S.get("annealed_langevin")(gmm, x, sig, steps_per_level=T, generator=torch.Generator().manual_seed(2))
        dist[T] = energy_distance(out, ref)
    assert dist[1] > dist[3] > 2 * null, dist
    assert dist[100] < null, (dist, null)


def test_annealed_cost_through_sample():
    gmm = gaussian()
    sampler = "annealed_langevin"
    cost = S.info(sampler).cost
    # nfe = 500 with T = 10 and the final denoising step: 49 levels, 491 evaluations (a warning)
    counter, seen = NFECounter(gmm), set()
    with pytest.warns(UserWarning, match="491"):
        S.sample(counter, far_start(8), sampler, nfe=500, sigma_min=0.01, sigma_max=3.0,
                 generator=torch.Generator().manual_seed(0), callback=lambda i: seen.add(i["sigma"]))
    assert counter.nfe == 491 == cost(49) and len(seen) == 49 and min(seen) == pytest.approx(0.01)
    # a budget that fits exactly: no warning
    counter = NFECounter(gmm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.sample(counter, far_start(8), sampler, nfe=501, sigma_min=0.01, sigma_max=3.0,
                 generator=torch.Generator().manual_seed(0))
    assert counter.nfe == 501 == cost(50)
    counter = NFECounter(gmm)
    with pytest.warns(UserWarning):
        S.sample(counter, far_start(8), sampler, nfe=100, sigma_min=0.01, sigma_max=3.0, steps_per_level=7,
                 denoise_last=False, generator=torch.Generator().manual_seed(0))
    assert counter.nfe == 98 == cost(14, steps_per_level=7, denoise_last=False)
    # a user grid ending at sigma_min: 4 steps but 5 positive levels -> 5 T + 1 = 51
    grid = grids.logsnr_uniform(4, 0.01, 3.0, final_zero=False)
    counter = NFECounter(gmm)
    S.sample(counter, far_start(8), sampler, nfe=51, grid=grid, generator=torch.Generator().manual_seed(0))
    assert counter.nfe == 51 == cost(4, final_zero=False)
    with pytest.raises(UserError, match="51 > 50"):
        S.sample(NFECounter(gmm), far_start(8), sampler, nfe=50, grid=grid)
    # langevin: one evaluation per step
    counter = NFECounter(gmm)
    S.sample(counter, far_start(8), "langevin", nfe=12, sigma_min=0.01, sigma_max=3.0)
    assert counter.nfe == 12


def test_annealed_bad_options():
    gmm = gaussian()
    sig = grids.logsnr_uniform(3, 0.01, 3.0)
    out = S.get("annealed_langevin")(gmm, far_start(4), sig, steps_per_level=np.int64(2), denoise_last=False,
                                     generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 2) and S.info("annealed_langevin").cost(3, steps_per_level=np.int64(2)) == 7
    for bad in (0, -1, 2.5, "ten", True):
        with pytest.raises(UserError, match="steps_per_level"):
            S.get("annealed_langevin")(gmm, far_start(4), sig, steps_per_level=bad)
    with pytest.raises(UserError, match="steps_per_level"):
        S.sample(gmm, far_start(4), "annealed_langevin", nfe=50, sigma_min=0.01, sigma_max=3.0, steps_per_level=0)
    for bad in (0.0, -1e-5, float("inf")):
        with pytest.raises(UserError, match="eps"):
            S.get("annealed_langevin")(gmm, far_start(4), sig, eps=bad)


def test_annealed_langevin_default_step_is_stable_on_a_teacher_grid(tmp_path):
    """On a diffusion teacher's own grid (Karras, 80 -> 0.002), the default eps keeps the
    paper's alpha_i / sigma_i^2 = 0.2 (eps = 2e-5 (sigma_L / 0.01)^2); the paper's eps taken
    literally there would give alpha_1 / (2 sigma_1^2) = 2.5 and diverge. ``fewstep.load``
    of gmm:FILE samples the exact mixture to within the null level (99.9% quantile)."""
    from test_samplers_stochastic import N, TEACHERS, data, threshold

    from fewstep.model import load

    TEACHERS["gmm2"]().save(tmp_path / "g.npz")
    m = load(f"gmm:{tmp_path / 'g.npz'}")
    x, _ = m.sample(N, nfe=301, sampler="annealed_langevin", seed=3)  # 30 levels x 10 steps + 1
    assert torch.isfinite(x).all()
    assert energy_distance(x, data("gmm2")) < threshold("gmm2")
