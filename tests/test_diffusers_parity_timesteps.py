"""Time grids against diffusers as the oracle: ``grids.time_uniform`` on a ``VPDiscrete``
process gives exactly DDIMScheduler's timesteps (every spacing, ``steps_offset``, several
training lengths), and ``fewstep.sample(grid="time-...", process=...)`` needs nothing else
and reproduces diffusers' DDIM run.

Error budgets (u32 = 2^-24, u64 = 2^-53; FLOAT64_SAFETY = 1000 as in _diffusers_oracle):

* diffusers' ``betas`` are float32 (``linspace``; for ``scaled_linear`` also a float32
  square): at most BETA_ROUNDINGS = 12 roundings, |beta32 / beta64 - 1| <= 12 u32 = 7e-7
  (observed <= 5 u32).
* its ``alphas_cumprod`` = cumprod(fl32(1 - beta)): t + 1 roundings of 1 - beta, at most t + 1
  of the products (float32 accumulation; torch's CPU cumprod accumulates in double and rounds
  once), plus each beta's error times beta / (1 - beta):
  |abar32 / abar64 - 1| <= gamma_t = (2t + 2) u32 + 12 u32 sum_{j<=t} beta_j / (1 - beta_j)
  (a priori: 1.3e-4 at t = 999 for N = 1000; observed <= 0.2 gamma_t).
* a level sigma = sqrt((1 - abar) / abar) moves by d sigma / sigma = (d abar / abar) / (2 (1 - abar)),
  so diffusers' levels differ from ours by at most gamma_t / (1 - abar_t) (a factor 2 over the
  first-order term for the higher orders): 1.2e-3 at t = 0, where 1 - abar = 1e-4 and float32
  abar has 7 digits (observed 8e-5 there).
* our own float64 round trip t -> sigma -> t through the log-sigma table: |dt| <=
  u64 (1 + max |log sigma|) / min |d log sigma / dt| (1e-13 for N = 1000), times
  FLOAT64_SAFETY; on a VPDiscrete rebuilt from the scheduler's alphas_cumprod, our levels
  carry (t + 1) u64 / (1 - abar_t) + (1 + |log sigma|) u64 of float64 cumprod / log / exp
  rounding, times FLOAT64_SAFETY.
* the DDIM run is compared with DDIMScheduler holding our process's float64 table (so the
  float32 table, bounded above, is not part of it; diffusers then computes in float64) at
  the float64 budget of ``_diffusers_oracle.parity``.
A timestep off by one moves a level by at least 22 times its level bound (scaled_linear,
N = 1000; 80 times for linear) and is caught by the exact timestep comparison anyway.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from _diffusers_oracle import FLOAT64_SAFETY, U32, U64, parity, run_diffusers
from _exact import gmm2
from fewstep import grids as G
from fewstep import samplers as S
from fewstep.denoiser import ModelDenoiser, NFECounter
from fewstep.errors import UserError
from fewstep.process import VPDiscrete

CASES = [(N, n) for N in (1000, 500, 100, 37) for n in (2, 3, 7, 10, 13, 25, 50, 99, N // 2, N) if n <= N]
BETA_ROUNDINGS = 12


def abar_budget(proc: VPDiscrete) -> torch.Tensor:
    """gamma_t: the a-priori bound on |abar32 / abar64 - 1| for diffusers' float32 table."""
    t = torch.arange(len(proc.betas), dtype=torch.float64)
    b = proc.betas
    return (2 * t + 2) * U32 + BETA_ROUNDINGS * U32 * torch.cumsum(b / (1 - b), 0)


def level_budget(proc: VPDiscrete, t: torch.Tensor) -> torch.Tensor:
    """Bound on |sigma32 / sigma64 - 1| at integer timesteps t (see the module docstring)."""
    return abar_budget(proc)[t] / (1 - proc.alphas_cumprod[t])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a / b - 1).abs()


@pytest.mark.parametrize("spacing,steps_offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0),
                                                  ("trailing", 1), ("linspace", 1)])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_time_grid_is_ddim_timesteps(spacing, steps_offset, beta_schedule):
    """Our levels sit exactly at DDIMScheduler's integer timesteps (steps_offset applies
    to "leading" only, as there), then 0. Our VPDiscrete.diffusers schedule is diffusers'
    betas and alphas_cumprod up to their float32 rounding; on a VPDiscrete made of the
    scheduler's own alphas_cumprod the levels are its sqrt((1 - abar)/abar) up to float64
    rounding (budgets in the module docstring)."""
    for N, n in CASES:
        if spacing == "leading" and steps_offset and n == N:
            continue  # refused by us (test below); diffusers' step would index past its table
        sch = DDIMScheduler(num_train_timesteps=N, timestep_spacing=spacing, steps_offset=steps_offset,
                            beta_schedule=beta_schedule)
        sch.set_timesteps(n)
        proc = VPDiscrete.diffusers(N, beta_schedule=beta_schedule)
        abar = sch.alphas_cumprod.to(torch.float64)
        assert bool((rel_err(sch.betas.to(torch.float64), proc.betas) <= BETA_ROUNDINGS * U32).all())
        assert bool((rel_err(abar, proc.alphas_cumprod) <= abar_budget(proc)).all())
        sig = G.time_uniform(proc, n, spacing, steps_offset=steps_offset)
        t = proc.t_of_sigma(sig[:-1])
        assert t.round().long().tolist() == sch.timesteps.tolist(), (N, n)
        ls = proc.log_sigmas
        t_tol = FLOAT64_SAFETY * U64 * (1 + float(ls.abs().max())) / float(ls.diff().abs().min())
        assert float((t - t.round()).abs().max()) < t_tol and float(sig[-1]) == 0.0
        own = VPDiscrete(1 - abar / torch.cat([abar.new_ones(1), abar[:-1]]))
        sig = G.time_uniform(own, n, spacing, steps_offset=steps_offset)
        a = abar[sch.timesteps]
        ref = ((1 - a) / a).sqrt()
        own_tol = FLOAT64_SAFETY * U64 * ((sch.timesteps + 1) / (1 - a) + 1 + ref.log().abs())
        assert bool((rel_err(sig[:-1], ref) < own_tol).all()), (N, n)


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
    clip_sample=False) on the same table driven by the exact teacher, within the float64
    budget; diffusers' own float32 levels are ours within their rounding (module docstring).
    (Not "linspace": DDIM's step() assumes the stride N // n there, which is not its linspace
    timesteps' stride.)"""
    gmm = gmm2()
    x = torch.randn(64, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    proc = VPDiscrete.diffusers()

    def make(table=True):
        sch = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
                            steps_offset=steps_offset)
        if table:
            sch.alphas_cumprod = proc.alphas_cumprod.clone()
        return sch

    _, sigmas, nfe = run_diffusers(make(table=False), gmm, x, steps)
    grid = f"time-{spacing}"
    ours_sig = G.make_grid(grid, steps, process=proc, steps_offset=steps_offset)
    counter = NFECounter(gmm)
    out = S.sample(counter, x * math.sqrt(1 + float(ours_sig[0]) ** 2), "ddim", nfe=steps, grid=grid, process=proc,
                   grid_options={"steps_offset": steps_offset})
    rel, tol, why = parity(make, lambda s: run_diffusers(s, gmm, x, steps)[0], out, steps)
    assert rel < tol, why
    assert counter.nfe == nfe == steps and float(ours_sig[-1]) == float(sigmas[-1]) == 0.0
    t = proc.t_of_sigma(ours_sig[:-1]).round().long()
    assert bool((rel_err(sigmas[:-1], ours_sig[:-1]) <= level_budget(proc, t)).all())


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
