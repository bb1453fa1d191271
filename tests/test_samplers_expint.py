"""Exponential-integrator samplers (DPM-Solver, DPM-Solver++, DEIS, UniPC) on the exact teacher.

Convergence: RMS error against the exact flow (tests/_exact.py, Karras grids 20 -> 0.02,
no final step to 0, float64) for a step count N and 2N in each method's asymptotic
range, above the reference's 1e-11 floor (errors there are 1e-4 .. 1e-9):
first order N = 40, second order N = 80, third order N = 160, fourth order N = 320.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from _exact import errors, gmm2, gmm16, orders, reference, rms
from fewstep import grids
from fewstep.denoiser import NFECounter
from fewstep.errors import UserError
from fewstep.samplers import get, info, sample
from fewstep.samplers.dpm_solver import singlestep_orders
from fewstep.samplers._expint import phi

MINE = ["dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpm_solver_adaptive", "dpmpp_2s", "dpmpp_2m",
        "dpmpp_3m", "dpmpp_2m_sde", "deis", "unipc"]



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids spin-waiting on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (sampler, options, theoretical order, N): the order is measured between N and 2N steps.
ORDER_CASES = [
    ("dpm_solver_1", {}, 1, 40),
    ("dpm_solver_2", {}, 2, 80),
    ("dpm_solver_2", {"algorithm_type": "dpmsolver++", "solver_type": "heun"}, 2, 80),
    ("dpm_solver_3", {}, 3, 160),
    ("dpm_solver_3", {"algorithm_type": "dpmsolver++", "solver_type": "heun"}, 3, 160),
    ("dpmpp_2s", {}, 2, 80),
    ("dpmpp_2m", {}, 2, 80),
    ("dpmpp_2m", {"algorithm_type": "dpmsolver", "solver_type": "heun"}, 2, 80),
    ("dpmpp_3m", {}, 3, 160),
    ("dpmpp_3m", {"algorithm_type": "dpmsolver"}, 3, 160),
    ("dpmpp_3m", {"third_order": "diffusers"}, 2, 160),  # the official coefficient: second order
    ("deis", {"order": 1}, 1, 40),
    ("deis", {}, 2, 80),
    ("deis", {"order": 3}, 3, 160),
    ("unipc", {"order": 1, "lower_order_final": False}, 2, 80),  # UniPC-p is of order p + 1
    ("unipc", {"lower_order_final": False}, 3, 160),
    ("unipc", {"lower_order_final": False, "solver_type": "bh1", "predict_x0": False}, 3, 160),
    ("unipc", {"lower_order_final": False, "use_corrector": False}, 2, 80),
    ("unipc", {"order": 3, "lower_order_final": False}, 4, 320),
]


@pytest.mark.parametrize("which", ["gmm2", "gmm16"])
@pytest.mark.parametrize("name,opts,theory,n", ORDER_CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in ORDER_CASES])
def test_convergence_order(name, opts, theory, n, which):
    errs = errors(get(name), which, [n, 2 * n], **opts)
    (measured,) = orders(errs)
    assert abs(measured - theory) < 0.5, (name, opts, which, errs, measured)


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10])
def test_nfe_equals_registered_cost(name, steps):
    g = gmm2()
    x = reference("gmm2", 8, 20.0, 0.0)[0]
    opt_sets = [{}]
    if name in ("dpm_solver_2", "dpm_solver_3"):
        opt_sets.append({"intermediates": "grid", "algorithm_type": "dpmsolver++"})
    if name in ("dpmpp_3m", "deis", "unipc"):
        opt_sets.append({"order": 3} if name != "dpmpp_3m" else {"lower_order_final": False})
    for opts in opt_sets:
        counter = NFECounter(g)
        sig = grids.karras(steps, 0.02, 20.0)
        if name == "dpm_solver_adaptive":
            opts = {"max_nfe": 3 * steps + 1, "rtol": 1e-3}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                get(name)(counter, x.clone(), sig, **opts)
            assert counter.nfe <= opts["max_nfe"]
            continue
        out = get(name)(counter, x.clone(), sig, **opts)
        assert torch.isfinite(out).all()
        assert counter.nfe == info(name).cost(steps, **opts), (name, steps, opts)


def test_singlestep_lambda_cost_on_positive_end():
    """k evaluations per step when no step goes to sigma = 0."""
    for k in (2, 3):
        counter = NFECounter(gmm2())
        x = reference("gmm2", 8, 20.0, 0.02)[0]
        get(f"dpm_solver_{k}")(counter, x, grids.karras(4, 0.02, 20.0, final_zero=False))
        assert counter.nfe == 4 * k  # 5 levels, 4 steps


def test_adaptive_tracks_tolerance_and_budget():
    g = gmm16()
    x, ref = reference("gmm16", 128, 20.0, 0.02)
    ends = torch.tensor([20.0, 0.02], dtype=torch.float64)
    errs, nfes = [], []
    for rtol in (1e-2, 1e-3, 1e-4):
        counter = NFECounter(g)
        errs.append(rms(get("dpm_solver_adaptive")(counter, x.clone(), ends, rtol=rtol, atol=rtol / 10), ref))
        nfes.append(counter.nfe)
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs
    assert nfes[0] < nfes[1] < nfes[2], nfes
    x0, ref0 = reference("gmm16", 128, 20.0, 0.0)
    for max_nfe in (1, 2, 5, 12):
        counter = NFECounter(g)
        with pytest.warns(UserWarning, match="max_nfe"):
            out = get("dpm_solver_adaptive")(counter, x0.clone(), torch.tensor([20.0, 0.02, 0.0], dtype=torch.float64),
                                             rtol=1e-4, max_nfe=max_nfe)
        assert counter.nfe <= max_nfe and torch.isfinite(out).all()
    counter = NFECounter(g)
    sample(counter, x0.clone(), "dpm_solver_adaptive", nfe=400, sigma_min=0.02, sigma_max=20.0, rtol=1e-3, atol=1e-4)
    assert counter.nfe <= 400


def test_adaptive_below_its_need_finishes_within_the_budget():
    """Any budget: every sample reaches the last positive level (the callback's steps chain
    sigma_max -> sigma_min), at most max_nfe evaluations, and an error against the exact
    flow no larger than the one-evaluation sampler's (D(x, sigma_max)), where the old
    last step of order 3 blew up to 100-200. A budget of the evaluations the tolerance
    needs plus order + 1 (the finish's reserve) changes nothing."""
    for which, g in (("gmm2", gmm2), ("gmm16", gmm16)):
        x, ref = reference(which, 128, 80.0, 0.0)
        sig = grids.karras(2, 0.002, 80.0)
        counter = NFECounter(g())
        free = get("dpm_solver_adaptive")(counter, x.clone(), sig)
        need = counter.nfe
        assert 30 < need < 80 and rms(free, ref) < 0.01
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback when the budget suffices
            assert torch.equal(get("dpm_solver_adaptive")(g(), x.clone(), sig, max_nfe=need + 4), free)
        one_step = rms(g().denoise(x, torch.full((len(x),), 80.0, dtype=torch.float64)), ref)
        for max_nfe in (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, need - 1, need):
            counter, seen = NFECounter(g()), []
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                out = get("dpm_solver_adaptive")(counter, x.clone(), sig, max_nfe=max_nfe, callback=seen.append)
            assert any("finish with fixed steps" in str(m.message) for m in w) or max_nfe == need
            assert counter.nfe == max_nfe
            assert seen[0]["sigma"] == 80.0 and seen[-1]["sigma_next"] == pytest.approx(0.002, rel=1e-12)
            assert all(a["sigma_next"] == b["sigma"] for a, b in zip(seen, seen[1:]))
            assert rms(out, ref) < one_step, (which, max_nfe, rms(out, ref), one_step)
    with pytest.raises(UserError, match="at least 1 evaluations"):
        get("dpm_solver_adaptive")(gmm2(), x.clone(), torch.tensor([80.0, 0.002], dtype=torch.float64), max_nfe=0)


@pytest.mark.parametrize("name", [n for n in MINE if n != "dpm_solver_adaptive"])
def test_budget_sampling_and_callback_and_float32(name):
    """fewstep.sample spends at most the budget; callbacks see each step; float32 runs."""
    g = gmm2()
    x = reference("gmm2", 16, 20.0, 0.0)[0].float()
    seen = []
    counter = NFECounter(g)
    kw = {"generator": torch.Generator().manual_seed(0)} if name == "dpmpp_2m_sde" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sample(counter, x, name, nfe=10, grid="karras", sigma_min=0.02, sigma_max=20.0, callback=seen.append, **kw)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert counter.nfe <= 10 and len(seen) >= 1 and {"i", "x", "sigma", "sigma_next", "denoised"} <= set(seen[0])


def test_sde_distribution():
    """SDE-DPM-Solver++(2M) samples the mixture: mean and covariance of 4000 samples."""
    g = gmm2()
    gen = torch.Generator().manual_seed(0)
    x = 20.0 * torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    out = get("dpmpp_2m_sde")(g, x, grids.karras(40, 0.002, 20.0), generator=gen)
    data = g.sample(20000, generator=gen)
    assert (out.mean(0) - data.mean(0)).abs().max() < 0.1
    assert (torch.cov(out.T) - torch.cov(data.T)).abs().max() < 0.15


def test_singlestep_orders_match_diffusers():
    from diffusers import DPMSolverSinglestepScheduler
    from diffusers.utils import logging

    logging.set_verbosity_error()
    for order in (1, 2, 3):
        for steps in range(1, 13):
            for lof in (False, True):
                for final in ("zero", "sigma_min"):
                    s = DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lof, final_sigmas_type=final)
                    s.set_timesteps(steps)
                    ours = singlestep_orders(steps, order, lof, final == "zero")
                    assert ours == s.order_list, (order, steps, lof, final)


def test_phi_functions():
    for k in range(1, 5):
        for z in (-3.0, -0.3, -1e-3, 0.0, 1e-3, 0.2, 2.0):
            # phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1} / (k-1)! du by the midpoint rule
            u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
            ref = float((torch.exp((1 - u) * z) * u ** (k - 1)).mean() / math.factorial(k - 1))
            assert abs(phi(k, z) - ref) < 1e-8 * max(1.0, abs(ref))


def test_bad_options_are_user_errors():
    g, x, sig = gmm2(), reference("gmm2", 8, 20.0, 0.0)[0], grids.karras(4, 0.02, 20.0)
    with pytest.raises(UserError, match="algorithm_type"):
        get("dpmpp_2m")(g, x, sig, algorithm_type="dpm")
    with pytest.raises(UserError, match="solver_type"):
        get("unipc")(g, x, sig, solver_type="bh3")
    with pytest.raises(UserError, match="r1"):
        get("dpm_solver_2")(g, x, sig, r1=1.5)
