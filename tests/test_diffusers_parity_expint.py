"""Parity with diffusers' exponential-integrator schedulers on the exact teacher.

Each diffusers scheduler (``beta_schedule="linear"``, 1000 training steps, epsilon
prediction) is driven by the exact Gaussian mixture through tests/_diffusers_oracle.py;
our sampler runs on the scheduler's own sigma grid (``s.sigmas``, with its trailing 0 or
sigma_min, converted exactly to float64) from the same start, y = x_T sqrt(1 + sigma_0^2).
The evaluation counts must match and the final samples must agree within the error budget
of ``_diffusers_oracle.parity`` (derivation in its docstring).

Error budget. Our sampler and the teacher are float64 and use the grid's float32 values
exactly, so the grid is no source of difference. As shipped, these schedulers compute
alpha, sigma, lambda and every step coefficient from their float32 ``sigmas`` in float32
arithmetic, and DPMSolverMultistep also rounds the sample and the SDE noise to float32 in
``step``; the formulas amplify that rounding by kappa = (as-shipped difference) / u32, from
kappa ~ 1 (data-prediction forms) to ~1e4 (noise-prediction forms cancel at NFE 5). Measured
as-shipped differences: 8e-9 .. 6e-4, among them DEIS order 3, d = 16, NFE 20 at 7.9e-6 on
one machine and 1.009e-5 on another (float32 ``log`` differs between CPUs: that is why a
fixed 1e-5 failed). The comparison is therefore made with the float32 part removed: the
reference is the same scheduler with its tables cast to float64 (same values) and its
float32 casts turned off, and the budget is the float64 one, 1000 u64 (nfe + kappa) with
kappa measured in the test from its own as-shipped run: 6e-13 .. 1e-9 here, against
observed differences of 2e-16 .. 1.6e-12 (largest rel / budget 0.013).

A coefficient of ours off by 1e-3 relative (the highest-order weight w_k, also only on the
last steps, or the multistep weight of the oldest model output) moves the result by
1.5e-5 .. 4e-4, at least 1e6 times the budget.
"""
from __future__ import annotations

import math

import pytest
import torch

from _diffusers_oracle import parity, run_diffusers
from _exact import gmm2, gmm16
from fewstep.denoiser import NFECounter
from fewstep.samplers import get

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import logging as _dlogging  # noqa: E402

_dlogging.set_verbosity_error()

MS, SS = "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"
UP, DE = "UniPCMultistepScheduler", "DEISMultistepScheduler"
SM = {"final_sigmas_type": "sigma_min"}

# (scheduler class, scheduler config, our sampler, our options)
CASES = [
    (MS, {}, "dpmpp_2m", {}),
    (MS, SM, "dpmpp_2m", {}),
    (MS, {"solver_type": "heun"}, "dpmpp_2m", {"solver_type": "heun"}),
    (MS, {"algorithm_type": "dpmsolver", **SM}, "dpmpp_2m", {"algorithm_type": "dpmsolver"}),
    (MS, {"algorithm_type": "dpmsolver", "solver_type": "heun", **SM}, "dpmpp_2m",
     {"algorithm_type": "dpmsolver", "solver_type": "heun"}),
    (MS, {"euler_at_final": True, "lower_order_final": False, **SM}, "dpmpp_2m",
     {"euler_at_final": True, "lower_order_final": False}),
    (MS, {"solver_order": 3}, "dpmpp_3m", {"third_order": "diffusers"}),
    (MS, {"solver_order": 3, **SM}, "dpmpp_3m", {"third_order": "diffusers"}),
    (MS, {"solver_order": 3, "algorithm_type": "dpmsolver", **SM}, "dpmpp_3m",
     {"third_order": "diffusers", "algorithm_type": "dpmsolver"}),
    (MS, {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde", {}),
    (MS, {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", **SM}, "dpmpp_2m_sde",
     {"solver_type": "heun"}),
    (SS, {}, "dpm_solver_2", {"intermediates": "grid", "algorithm_type": "dpmsolver++"}),
    (SS, {"solver_order": 3}, "dpm_solver_3", {"intermediates": "grid", "algorithm_type": "dpmsolver++"}),
    (SS, {"solver_order": 3, "solver_type": "heun", **SM}, "dpm_solver_3",
     {"intermediates": "grid", "algorithm_type": "dpmsolver++", "solver_type": "heun"}),
    (SS, {"algorithm_type": "dpmsolver", **SM}, "dpm_solver_2",
     {"intermediates": "grid", "algorithm_type": "dpmsolver"}),
    (SS, {"solver_order": 3, "algorithm_type": "dpmsolver", "lower_order_final": True, **SM}, "dpm_solver_3",
     {"intermediates": "grid", "algorithm_type": "dpmsolver", "lower_order_final": True}),
    (UP, {}, "unipc", {}),
    (UP, SM, "unipc", {}),
    (UP, {"solver_type": "bh1", **SM}, "unipc", {"solver_type": "bh1"}),
    (UP, {"solver_order": 1, "solver_type": "bh1", **SM}, "unipc", {"order": 1, "solver_type": "bh1"}),
    (UP, {"solver_order": 3}, "unipc", {"order": 3}),
    (UP, {"solver_order": 3, "predict_x0": False, **SM}, "unipc", {"order": 3, "predict_x0": False}),
    (UP, {"predict_x0": False, "solver_type": "bh1", **SM}, "unipc", {"predict_x0": False, "solver_type": "bh1"}),
    (UP, {"disable_corrector": list(range(20))}, "unipc", {"use_corrector": False}),
    (UP, {"disable_corrector": [1, 3]}, "unipc", {"disable_corrector": [1, 3]}),
    (UP, {"lower_order_final": False, **SM}, "unipc", {"lower_order_final": False}),
    (DE, {}, "deis", {}),
    (DE, {"solver_order": 3}, "deis", {"order": 3}),
    (DE, {"solver_order": 1}, "deis", {"order": 1}),
]


def _ids(case):
    cls, cfg, name, opts = case
    short = {MS: "MS", SS: "SS", UP: "UniPC", DE: "DEIS"}[cls]
    return f"{short}{cfg}-{name}{opts}".replace(" ", "")


def compare(cls, cfg, name, opts, gmm, nfe, seed=0):
    """(rel(ours, float64 reference), its budget, explanation, diffusers' NFE, our NFE)."""
    make = lambda: getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule="linear", **cfg)  # noqa: E731
    x_T = torch.randn(64, gmm.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noises, opts = None, dict(opts)
    if name == "dpmpp_2m_sde":  # the noise our sampler draws, step by step, handed to diffusers
        s = make()
        s.set_timesteps(nfe)
        gen = torch.Generator().manual_seed(seed + 1)
        noises = [torch.randn(x_T.shape, generator=gen, dtype=torch.float64) if s.sigmas[i + 1] > 0 else None
                  for i in range(len(s.sigmas) - 1)]
        opts["generator"] = torch.Generator().manual_seed(seed + 1)
    y_ref, sigmas, nfe_ref = run_diffusers(make(), gmm, x_T, nfe, noises=noises)
    counter = NFECounter(gmm)
    y = get(name)(counter, x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, **opts)
    rel, tol, why = parity(make, lambda s: run_diffusers(s, gmm, x_T, nfe, noises=noises)[0], y, nfe_ref,
                           ref32=y_ref)
    return rel, tol, why, nfe_ref, counter.nfe


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids spin-waiting on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_parity(case):
    for gmm in (gmm2(), gmm16()):
        for nfe in (5, 10, 20):
            rel, tol, why, nfe_ref, nfe_ours = compare(*case, gmm, nfe)
            assert nfe_ours == nfe_ref == nfe
            assert rel < tol, (case, gmm.dim, nfe, why)


def test_exact_third_order_differs_from_diffusers_3m():
    """Our default 3M integrates the quadratic exactly (2 w_3 D_2); diffusers uses w_3 D_2:
    a formula difference far outside the comparison's budget (and the as-shipped floor)."""
    rel, tol, why, _, _ = compare(MS, {"solver_order": 3, **SM}, "dpmpp_3m", {}, gmm16(), 20)
    assert rel > 1e-4 and rel > 100 * tol, why
