"""Classic deterministic samplers on the exact teacher: convergence orders, NFE counts,
identities between samplers.

Orders are measured in float64 on grids ending at sigma_min = 0.02 (no final denoising)
against the exact flow map of the Gaussian mixture (``tests/_exact.py``), as
log2(e_n / e_2n); the last (finest) pair must be within 0.5 of the theoretical order and
the errors must decrease. The reference flow is solved here at rtol 1e-9 (global error
~1e-9, far below the smallest error measured, ~1e-6): the shared ``_exact.reference``
uses rtol 1e-11, which for gmm2 takes tens of seconds.

Theory: heun 2 (EDM Alg. 1); ddim(eta=0) = euler 1; pndm / plms / ipndm are 4th-order
Adams-Bashforth after their warm start, with *equal-step* coefficients, so their order
is 4 on a grid uniform in sigma (and 2 on other grids); ipndm with ``variable_step`` is
4 on Karras grids; era is 2 (ERA-Solver's statement: third-order local error with the
paper's equal-step Adams-Moulton coefficients), 4 with ``variable_step``.
"""
from __future__ import annotations

import functools

import pytest
import torch

from _exact import gmm2, gmm16, orders, rms, start
from fewstep import grids
from fewstep import samplers as S
from fewstep.denoiser import NFECounter
from fewstep.samplers.era import select_bases

TEACHERS = {"gmm2": gmm2, "gmm16": gmm16}
SIGMA_MIN, SIGMA_MAX = 0.02, 20.0


@functools.lru_cache(maxsize=None)
def reference(which: str):
    gmm = TEACHERS[which]()
    x = start(gmm, 128, SIGMA_MAX)
    return x, gmm.flow(x, SIGMA_MAX, SIGMA_MIN, rtol=1e-9)


def uniform(n, sigma_min, sigma_max, final_zero=False):
    """n levels uniform in sigma (the grid on which equal-step Adams coefficients are exact)."""
    return torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)


def errors(name, which, steps, grid, **options):
    x, ref = reference(which)
    gmm = TEACHERS[which]()
    return [rms(S.get(name)(gmm, x.clone(), grid(n, SIGMA_MIN, SIGMA_MAX, final_zero=False), **options), ref)
            for n in steps]


ORDER_CASES = [
    # name, options, grid, levels (doubling), theoretical order
    ("heun", {}, grids.karras, [16, 32, 64, 128], 2),
    ("ddim", {}, grids.karras, [16, 32, 64], 1),
    ("pndm", {}, uniform, [128, 256, 512, 1024], 4),
    ("plms", {}, uniform, [128, 256, 512, 1024], 4),
    ("ipndm", {}, uniform, [128, 256, 512, 1024], 4),
    ("ipndm", {"variable_step": True}, grids.karras, [32, 64, 128, 256], 4),
    ("era", {}, grids.karras, [64, 128, 256, 512], 2),
    ("era", {"variable_step": True}, grids.karras, [32, 64, 128, 256], 4),
]


@pytest.mark.parametrize("which", TEACHERS)
@pytest.mark.parametrize("name,options,grid,levels,theory", ORDER_CASES,
                         ids=[f"{c[0]}{'-var' if c[1] else ''}" for c in ORDER_CASES])
def test_convergence_order(which, name, options, grid, levels, theory):
    e = errors(name, which, levels, grid, **options)
    assert all(a > b for a, b in zip(e[:-1], e[1:])), e
    measured = orders(e)[-1]
    assert abs(measured - theory) < 0.5, (name, which, e, orders(e))


def test_equal_step_samplers_are_not_4th_order_on_karras_grids():
    """The equal-step Adams coefficients lose the order on a non-uniform grid (documented)."""
    e = errors("ipndm", "gmm2", [64, 128, 256], grids.karras)
    assert abs(orders(e)[-1] - 2) < 0.5


# --------------------------------------------------------------------------- NFE counts
COST_CASES = [
    ("heun", {}), ("edm_stochastic", {}), ("ddim", {}), ("ddim", {"eta": 1.0}), ("ddpm", {}),
    ("pndm", {}), ("pndm", {"skip_prk_steps": True}), ("plms", {}), ("ipndm", {}),
    ("ipndm", {"variable_step": True, "max_order": 3}), ("era", {}), ("era", {"variable_step": True}),
    ("pc", {}), ("pc", {"n_corrector": 3}), ("analytic_dpm", {}),
]


@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("name,options", COST_CASES, ids=[f"{n}{o}" for n, o in COST_CASES])
def test_nfe_equals_registered_cost(name, options, final_zero):
    gmm = gmm2()
    for steps in (1, 2, 3, 4, 5, 9):
        sig = grids.karras(steps, SIGMA_MIN, SIGMA_MAX, final_zero=final_zero)
        assert len(sig) - 1 == steps
        counter = NFECounter(gmm)
        extra = {"stats": [0.5] * steps} if name == "analytic_dpm" else {}
        out = S.get(name)(counter, start(gmm, 8, SIGMA_MAX), sig, **options, **extra)
        assert torch.isfinite(out).all()
        assert counter.nfe == S.info(name).cost(steps, final_zero=final_zero, **options), (steps, counter.nfe)


def test_registered_defaults_spend_the_budget():
    """fewstep.samplers.sample chooses the step count from the registered cost."""
    gmm = gmm2()
    for name, nfe, steps in [("heun", 9, 5), ("pndm", 19, 10), ("plms", 11, 10), ("pc", 10, 5)]:
        assert S.steps_for_nfe(name, nfe) == steps
        counter = NFECounter(gmm)
        S.sample(counter, start(gmm, 4, SIGMA_MAX), name, nfe=nfe, grid="karras", sigma_min=SIGMA_MIN,
                 sigma_max=SIGMA_MAX)
        assert counter.nfe == nfe


# --------------------------------------------------------------------------- identities
def _run(name, sig, **options):
    gmm = gmm16()
    return S.get(name)(gmm, start(gmm, 16, SIGMA_MAX, seed=1), sig, **options)


def test_identities_between_samplers():
    sig = grids.karras(12, SIGMA_MIN, SIGMA_MAX)
    assert torch.equal(_run("ddim", sig), _run("euler", sig))
    assert torch.equal(_run("edm_stochastic", sig, s_churn=0.0), _run("heun", sig))
    assert torch.equal(_run("pndm", sig, skip_prk_steps=True), _run("plms", sig))
    assert torch.allclose(_run("ipndm", sig, max_order=1), _run("euler", sig), rtol=1e-13, atol=1e-13)
    assert torch.allclose(_run("ipndm", sig, variable_step=True), _run("era", sig, variable_step=True, lam=0.0),
                          rtol=1e-10, atol=1e-10)
    # on equal steps, an Adams-Moulton corrector fed with the extrapolated eps is Adams-Bashforth
    uni = uniform(12, SIGMA_MIN, SIGMA_MAX)
    assert torch.allclose(_run("era", uni, lam=0.0), _run("ipndm", uni), rtol=1e-10, atol=1e-10)
    # ddpm's posterior step is ddim with eta = 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(_run("ddpm", sig, generator=g1), _run("ddim", sig, eta=1.0, generator=g2))


@pytest.mark.parametrize("prk_form", ["eps", "data"])
def test_prk_with_sigma_midpoints_is_rk4(prk_form):
    """PNDM's first steps are classical RK4 (in sigma on eps, or in 1/sigma on D): one PRK
    step matches the exact flow to 5th-order local error (halving h divides it by ~32)."""
    gmm = gmm2()
    x = start(gmm, 64, 2.0, seed=2)
    errs = []
    for h in (0.4, 0.2):
        sig = torch.tensor([2.0, 2.0 - h], dtype=torch.float64)
        out = S.get("pndm")(gmm, x.clone(), sig, prk_form=prk_form)
        errs.append(rms(out, gmm.flow(x, 2.0, 2.0 - h, rtol=1e-12)))
    assert 4.3 < orders(errs)[0] < 5.7


@pytest.mark.parametrize("teacher", [gmm2, gmm16], ids=["gmm2", "gmm16"])
@pytest.mark.parametrize("sigma_max", [80.0, 157.0])
def test_pndm_error_falls_with_nfe_on_karras_grids(teacher, sigma_max):
    """PNDM on Karras grids from sigma_max to 0.002, 2-32 steps (5-41 evaluations, 3 PRK
    steps at most): no error above the one-evaluation error (D(x, sigma_max)) at any
    budget, falling by decades from 2 to 8 to 32 steps, and at order >= 1.5 from 16 to 32
    steps (theory: 2, the equal-step PLMS coefficients on a non-uniform grid; in between,
    the few starts near a basin boundary make it wobble as for ``plms``). The eps-form PRK
    steps (``prk_form="eps"``) blow up here (RMS 13-26, 9-31x the one-evaluation error,
    at 5 NFE; with diffusers' time midpoints 55-1700)."""
    gmm = teacher()
    x = start(gmm, 128, sigma_max, seed=0)
    ref = gmm.flow(x, sigma_max, 0.0, rtol=1e-10)
    one = rms(gmm.denoise(x, torch.full((len(x),), sigma_max, dtype=torch.float64)), ref)
    steps = (2, 3, 4, 5, 6, 8, 10, 12, 16, 32)
    err = dict(zip(steps, [rms(S.get("pndm")(gmm, x.clone(), grids.karras(n, 0.002, sigma_max)), ref) for n in steps]))
    assert max(err.values()) <= one, (err, one)
    assert err[2] > err[8] > err[32] and err[32] < 0.01 * one, err
    assert orders([err[16], err[32]])[0] > 1.5, err
    eps_form = rms(S.get("pndm")(gmm, x.clone(), grids.karras(2, 0.002, sigma_max), prk_form="eps"), ref)
    assert eps_form > 5 * one  # the failure the data form removes


def test_era_base_selection():
    """Newest k bases when the error measure is small; reaching back (power-law spaced,
    distinct, inside the buffer) as it grows."""
    assert select_bases(10, 4, 0.0, 1.0, 2.0) == [10, 9, 8, 7]
    assert select_bases(1, 4, 0.0, 1.0, 2.0) == [1, 0]
    far = select_bases(20, 4, 5.0, 1.0, 2.0)
    assert far[0] == 20 and far[-1] == 2 and len(set(far)) == 4 and far == sorted(far, reverse=True)
    assert select_bases(5, 4, 100.0, 1.0, 2.0)[-1] == 0
