"""Time grids against diffusers as the oracle: ``grids.time_uniform`` on a ``VPDiscrete``
process gives exactly DDIMScheduler's timesteps (every spacing, ``steps_offset``, several
training lengths), and ``fewstep.sample(grid="time-...", process=...)`` needs nothing else
and reproduces diffusers' DDIM run."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from _diffusers_oracle import rel_diff, run_diffusers
from _exact import gmm2
from fewstep import grids as G
from fewstep import samplers as S
from fewstep.denoiser import ModelDenoiser, NFECounter
from fewstep.errors import UserError
from fewstep.process import VPDiscrete

CASES = [(N, n) for N in (1000, 500, 100, 37) for n in (2, 3, 7, 10, 13, 25, 50, 99, N // 2, N) if n <= N]


@pytest.mark.parametrize("spacing,steps_offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0),
                                                  ("trailing", 1), ("linspace", 1)])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_time_grid_is_ddim_timesteps(spacing, steps_offset, beta_schedule):
    """Our levels sit exactly at DDIMScheduler's integer timesteps (steps_offset applies
    to "leading" only, as there), then 0. Our VPDiscrete.diffusers schedule is diffusers'
    alphas_cumprod up to its float32 rounding; on a VPDiscrete made of the scheduler's own
    alphas_cumprod the levels are its sqrt((1 - abar)/abar) to 1e-12."""
    for N, n in CASES:
        if spacing == "leading" and steps_offset and n == N:
            continue  # refused by us (test below); diffusers' step would index past its table
        sch = DDIMScheduler(num_train_timesteps=N, timestep_spacing=spacing, steps_offset=steps_offset,
                            beta_schedule=beta_schedule)
        sch.set_timesteps(n)
        proc = VPDiscrete.diffusers(N, beta_schedule=beta_schedule)
        abar = sch.alphas_cumprod.to(torch.float64)
        assert torch.allclose(proc.alphas_cumprod, abar, rtol=1e-5, atol=0)
        sig = G.time_uniform(proc, n, spacing, steps_offset=steps_offset)
        t = proc.t_of_sigma(sig[:-1])
        assert t.round().long().tolist() == sch.timesteps.tolist(), (N, n)
        assert float((t - t.round()).abs().max()) < 1e-9 and float(sig[-1]) == 0.0
        own = VPDiscrete(1 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))
        sig = G.time_uniform(own, n, spacing, steps_offset=steps_offset)
        a = abar[sch.timesteps]
        assert torch.allclose(sig[:-1], ((1 - a) / a).sqrt(), rtol=1e-12, atol=0), (N, n)


def test_deliberate_differences_from_ddim_timesteps():
    proc = VPDiscrete.diffusers(1000)
    # one linspace step starts at the top (diffusers: t = 0, the end of the trajectory)
    assert proc.t_of_sigma(G.time_uniform(proc, 1, "linspace")[:1]).round().tolist() == [999.0]
    with pytest.raises(UserError, match="beyond the process's last timestep 999"):
        G.time_uniform(proc, 1000, "leading", steps_offset=1)


@pytest.mark.parametrize("spacing,steps_offset", [("trailing", 0), ("leading", 0), ("leading", 1)])
@pytest.mark.parametrize("steps", [5, 10])
def test_sample_on_a_time_grid_needs_only_the_process(spacing, steps_offset, steps):
    """fewstep.sample(grid="time-<spacing>", process=VPDiscrete) with no sigma range runs
    DDIM on diffusers' timesteps: same result as DDIMScheduler(set_alpha_to_one=True,
    clip_sample=False) driven by the exact teacher, to 1e-5. (Not "linspace": DDIM's
    step() assumes the stride N // n there, which is not its linspace timesteps' stride.)"""
    gmm = gmm2()
    x = torch.randn(64, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sch = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
                        steps_offset=steps_offset)
    ref, sigmas, nfe = run_diffusers(sch, gmm, x, steps)
    proc = VPDiscrete.diffusers()
    grid = f"time-{spacing}"
    ours_sig = G.make_grid(grid, steps, process=proc, steps_offset=steps_offset)
    counter = NFECounter(gmm)
    out = S.sample(counter, x * math.sqrt(1 + float(ours_sig[0]) ** 2), "ddim", nfe=steps, grid=grid, process=proc,
                   grid_options={"steps_offset": steps_offset})
    assert rel_diff(out, ref) < 1e-5 and counter.nfe == nfe == steps
    assert torch.allclose(ours_sig, sigmas, rtol=1e-4, atol=0)  # float32 abar near t = 0


def test_sample_takes_the_sigma_range_from_the_process():
    """Named sigma-range grids take the process's range (explicit, or the denoiser's own
    process) when none is given; with neither, one clear line."""
    gmm = gmm2()
    proc = VPDiscrete.diffusers()
    den = ModelDenoiser(gmm.as_model(proc, "eps"), proc, "eps")
    x = torch.randn(8, gmm.dim, dtype=torch.float64) * proc.sigma_max
    for kw in ({"process": proc}, {}):  # the second: den.process
        seen = []
        S.sample(den, x, "euler", nfe=6, grid="karras", callback=seen.append, **kw)
        assert seen[0]["sigma"] == pytest.approx(proc.sigma_max, rel=1e-12)
        assert seen[-1]["sigma"] == pytest.approx(proc.sigma_min, rel=1e-12) and seen[-1]["sigma_next"] == 0
        out = S.sample(den, x, "euler", nfe=6, grid="time-trailing", **kw)
        assert torch.isfinite(out).all()
    with pytest.raises(UserError, match="needs sigma_min and sigma_max") as e:
        S.sample(gmm, x, "euler", nfe=6, grid="karras")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="needs a process"):
        S.sample(gmm, x, "euler", nfe=6, grid="time-trailing")
