"""fewstep.interop.diffusers_schedulers: the scheduler driver used by the parity tests and
bench/samplers.py (model-call counting, budgets, end levels, errors)."""
from __future__ import annotations

import math

import pytest
import torch

from _exact import gmm2
from fewstep import samplers as S
from fewstep.denoiser import NFECounter
from fewstep.errors import UserError
from fewstep.interop.diffusers_schedulers import make_scheduler, model_calls, run_diffusers, steps_for_nfe

pytest.importorskip("diffusers")


def test_make_scheduler_defaults_and_unknown_name():
    s = make_scheduler("DDIMScheduler", clip_sample=False)
    assert s.config.beta_schedule == "linear" and s.config.num_train_timesteps == 1000
    assert s.config.clip_sample is False
    with pytest.raises(UserError, match="no scheduler 'NoSuchScheduler'"):
        make_scheduler("NoSuchScheduler")


def test_model_calls_and_budget():
    heun = lambda: make_scheduler("HeunDiscreteScheduler")  # noqa: E731
    assert [model_calls(heun, n) for n in (1, 2, 5)] == [1, 3, 9]
    assert steps_for_nfe(heun, 6) == 3 and steps_for_nfe(heun, 7) == 4
    ddim = lambda: make_scheduler("DDIMScheduler")  # noqa: E731
    assert steps_for_nfe(ddim, 10) == 10
    plms = lambda: make_scheduler("PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=True)  # noqa: E731
    assert steps_for_nfe(plms, 10) == 9 and model_calls(plms, 9) == 10  # N + 1 calls for N >= 2 steps
    prk = lambda: make_scheduler("PNDMScheduler", set_alpha_to_one=True)  # noqa: E731
    assert steps_for_nfe(prk, 12) == 0 and steps_for_nfe(prk, 13) == 4  # refuses N < 4; 4 steps: 13 calls


def test_counts_calls_and_matches_ddim_with_a_counted_denoiser():
    gmm = gmm2()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counter = NFECounter(gmm)
    y, sigmas, nfe = run_diffusers(make_scheduler("DDIMScheduler", clip_sample=False, set_alpha_to_one=True,
                                                  timestep_spacing="trailing"), counter, x, 8)
    assert nfe == counter.nfe == 8 and float(sigmas[-1]) == 0.0 and len(sigmas) == 9
    ours = S.get("ddim")(gmm, x * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    assert float((ours - y).norm() / y.norm()) < 1e-5


def test_ddpm_ends_at_sigma_zero_with_the_same_noise():
    """DDPM's last step (from t = 0) lands on alpha_bar = 1; a shared generator gives our
    ddpm sampler the same draws."""
    gmm = gmm2()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, sigmas, nfe = run_diffusers(make_scheduler("DDPMScheduler", clip_sample=False), gmm, x, 10,
                                   generator=torch.Generator().manual_seed(7))
    assert float(sigmas[-1]) == 0.0 and nfe == 10
    ours = S.get("ddpm")(gmm, x * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas,
                         generator=torch.Generator().manual_seed(7))
    assert float((ours - y).norm() / y.norm()) < 1e-5
