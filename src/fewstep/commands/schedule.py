"""``fewstep schedule``: learn the sigma grid of one teacher, sampler and NFE budget
(:mod:`fewstep.schedules`) and write it as a grid JSON file that ``fewstep sample --grid``,
``fewstep bench --grids`` and ``fewstep.grids.load`` read."""
from __future__ import annotations

import time
from pathlib import Path

from fewstep.errors import UserError


def _checks() -> tuple:
    """The rules of this command's values (:class:`fewstep.train.options.Option`)."""
    from fewstep.train.options import Option, option

    return (Option("nfe", int, None, "", low=1, example=8), Option("n", int, 256, "", low=2),
            Option("candidates", int, 100, "", low=2), Option("iters", int, 150, "", low=1),
            option("seed"), option("device"))


def add_parser(sub) -> None:
    from fewstep.schedules import COSTS, METHODS
    from fewstep.train.options import cli_number

    p = sub.add_parser(
        "schedule", help="learn the sigma grid for a teacher, a sampler and an NFE budget",
        description="Choose the sampler's noise levels for this teacher: by dynamic programming over candidate "
                    "levels (Watson et al. 2022; cost 'local': the sampler's one-step error against the teacher's "
                    "accurate ODE solution, 'elbo': the variational bound of ancestral sampling) and/or by "
                    "optimising the levels directly against the final error. Learned on --n training starts, "
                    "measured on as many fresh ones; written with its metadata to --out (a grid JSON file).")
    p.add_argument("--teacher", required=True, metavar="RUN_OR_SPEC", help="teacher run folder or gmm:FILE.npz")
    p.add_argument("--sampler", required=True, help="sampler name (see 'fewstep samplers'; not adaptive ones)")
    p.add_argument("--nfe", type=cli_number, required=True, help="evaluation budget; the grid never spends more")
    p.add_argument("--out", required=True, metavar="FILE.json", help="output grid file")
    p.add_argument("--method", default="dp+optimize", choices=METHODS, help="default dp+optimize")
    p.add_argument("--cost", default="local", choices=COSTS, help="DP cost (default local)")
    p.add_argument("--n", type=cli_number, default=256, help="training starts (default 256); as many fresh ones measure it")
    p.add_argument("--candidates", type=cli_number, default=100, help="DP candidate levels before refining (default 100)")
    p.add_argument("--iters", type=cli_number, default=150, help="Adam steps of the direct optimisation (default 150)")
    p.add_argument("--eval-levels", action="store_true",
                   help="also learn decoupled evaluation levels (the teacher at step i asked at a learned sigma'_i, "
                        "LD3-style), jointly with the grid; stored in the file as eval_sigmas, same NFE")
    p.add_argument("--data", help="the teacher's dataset (for --cost elbo), if its run folder does not say")
    p.add_argument("--seed", type=cli_number, default=0, help="training-noise seed (default 0); fresh noise uses seed + 1")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_schedule)


def _starts(model, spec: str, n: int, seed: int, with_data: bool, data=None):
    """(x_T at sigma_max, data samples or None, exact flow or None) for seed."""
    import torch

    from fewstep.data.gmm import GaussianMixture

    gmm = model.denoiser if isinstance(model.denoiser, GaussianMixture) else None
    if gmm is not None:  # the exact marginal at sigma_max: x0 + sigma_max eps
        g = torch.Generator().manual_seed(seed)
        x0 = gmm.sample(n, generator=g)
        return x0 + model.sigma_max * torch.randn(x0.shape, generator=g, dtype=torch.float64), x0, gmm.flow
    x0 = None
    if with_data:
        from fewstep.report.bench import real_sets

        x0 = real_sets(model, spec, n, seed, data)[0].to(model.device, model.dtype)
    return model.noise(n, seed), x0, None


def cmd_schedule(a) -> int:
    from fewstep.model import load
    from fewstep.samplers import info
    from fewstep.schedules import Problem, best_fixed, learn, save_schedule

    out = Path(a.out)
    if out.suffix != ".json":
        raise UserError(f"--out {out}: the grid file must end in .json")
    from fewstep.train.options import check_args, check_batch_memory, check_memory
    from fewstep.train.runfolder import check_output

    check_args(a, _checks())
    check_output(out, file=True)
    m = a.candidates
    check_memory(f"--candidates {m:,}", 3 * 8 * float(m + 1) ** 2, f"3 float64 matrices of {m + 1:,} x {m + 1:,} "
                 f"level-pair costs", "give fewer --candidates (default 100)")
    info(a.sampler)  # unknown names fail before any work
    say = (lambda m: None) if a.quiet else (lambda m: print(m, flush=True))
    t0 = time.time()
    model = load(a.teacher, device=a.device)
    check_batch_memory("--n", a.n, model.shape, copies=8, fix="give fewer --n training starts")  # train + fresh
    x_T, x0, flow = _starts(model, a.teacher, a.n, a.seed, a.cost == "elbo", a.data)
    prob = Problem(model.denoiser, a.sampler, a.nfe, model.sigma_min, model.sigma_max, x_T, exact_flow=flow,
                   x0=x0, seed=a.seed)
    say(f"[schedule] {a.teacher}: {a.sampler}, {a.nfe} NFE = {prob.steps} steps, {a.method} ({a.cost}), n = {a.n}")
    sigmas, meta = learn(prob, method=a.method, cost=a.cost, m=a.candidates, iters=a.iters, process=model.process,
                         log=say, levels=a.eval_levels)
    ev = meta.pop("eval_sigmas", None)
    # fresh noise: the learned grid and the best fixed grid (chosen on the training starts)
    xf, _, _ = _starts(model, a.teacher, a.n, a.seed + 1, False)
    fresh = Problem(model.denoiser, a.sampler, a.nfe, model.sigma_min, model.sigma_max, xf, exact_flow=flow)
    fixed_name, fixed, _ = best_fixed(prob, model.process)
    meta.update(rms_fresh=fresh.error(sigmas, levels=ev), rms_fresh_best_fixed=fresh.error(fixed))
    say(f"[schedule] RMS to the teacher's ODE solution on fresh noise: learned {meta['rms_fresh']:.4g}, "
        f"best fixed grid ({fixed_name}) {meta['rms_fresh_best_fixed']:.4g}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_schedule(out, sigmas, ev, teacher=a.teacher, sampler=a.sampler, nfe=a.nfe, seed=a.seed, n=a.n,
           sigma_min=model.sigma_min, sigma_max=model.sigma_max, seconds=time.time() - t0,
           reference="exact flow" if flow is not None else "Heun on a fine grid", **meta)
    print(f"wrote {out}: {len(sigmas) - 1} steps, {meta['nfe_spent']} evaluations, "
          f"sigmas {', '.join(f'{float(s):.4g}' for s in sigmas)}"
          + (f"; evaluation levels {', '.join(f'{float(s):.4g}' for s in ev)}" if ev is not None else ""))
    return 0
