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

    return (Option("n", int, 512, "", low=2), Option("candidates", int, 100, "", low=2),
            Option("iters", int, 150, "", low=1), Option("patience", int, 25, "", low=1),
            Option("seconds", float, 120.0, "", low=0.0, above=True, example=60),
            Option("sigma_max", float, None, "", low=0.0, above=True, none="the teacher's sigma_max", example=157.4),
            option("seed"), option("device"))


def _nfes(text) -> list:
    """--nfe as a sorted list of budgets: 8, or 3,4,6,8."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = sorted({int(p) for p in parts})
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals) or any(str(int(p)) != p for p in parts):
        raise UserError(f"--nfe {text}: give one or more whole numbers >= 1, e.g. 8 or 3,4,6,8")
    return vals


def add_parser(sub) -> None:
    from fewstep.schedules import COSTS, METHODS
    from fewstep.train.options import cli_number

    p = sub.add_parser(
        "schedule", help="learn the sigma grid for a teacher, a sampler and an NFE budget",
        description="Choose the sampler's noise levels for this teacher: by dynamic programming over candidate "
                    "levels (Watson et al. 2022; cost 'local': the sampler's one-step error against the teacher's "
                    "accurate ODE solution, 'elbo': the variational bound of ancestral sampling) and/or by "
                    "optimising the levels directly against the final error, then (by default) the evaluation "
                    "levels with them. Learned on --n training starts, stopped early on --n/2 held-out starts, "
                    "reported on --n more that neither saw; written with its metadata to --out (a grid JSON file). "
                    "Several budgets (--nfe 3,4,6,8) are learned in order, each warm-started from the one below.")
    p.add_argument("--teacher", required=True, metavar="RUN_OR_SPEC", help="teacher run folder or gmm:FILE.npz")
    p.add_argument("--sampler", help="sampler name (default: the measured default's sampler at each budget; "
                                     "see 'fewstep samplers --nfe K')")
    p.add_argument("--nfe", required=True, help="evaluation budget(s), e.g. 8 or 3,4,6,8; a grid never spends more")
    p.add_argument("--out", required=True, metavar="FILE.json",
                   help="output grid file; with several budgets it must contain {nfe}, e.g. grids/g{nfe}.json")
    p.add_argument("--method", default="dp+optimize", choices=METHODS, help="default dp+optimize")
    p.add_argument("--cost", default="local", choices=COSTS, help="DP cost (default local)")
    p.add_argument("--n", type=cli_number, default=512,
                   help="training starts (default 512); n/2 more stop the optimisation, n more measure the result")
    p.add_argument("--candidates", type=cli_number, default=100, help="DP candidate levels before refining (default 100)")
    p.add_argument("--iters", type=cli_number, default=150, help="most Adam steps per phase (default 150)")
    p.add_argument("--patience", type=cli_number, default=25,
                   help="stop a phase after this many steps without held-out improvement (default 25)")
    p.add_argument("--seconds", type=cli_number, default=120.0,
                   help="time budget of the optimisation per NFE (default 120 s)")
    lv = p.add_mutually_exclusive_group()
    lv.add_argument("--eval-levels", dest="eval_levels", action="store_true", default=True,
                    help="also learn decoupled evaluation levels (the teacher at step i asked at a learned sigma'_i, "
                         "LD3-style), jointly with the grid; stored as eval_sigmas, same NFE (the default)")
    lv.add_argument("--no-eval-levels", dest="eval_levels", action="store_false", help="learn the grid only")
    p.add_argument("--afs", choices=("auto", "on", "off"), default="auto",
                   help="analytical first step: auto (as the sampler's measured default at that budget), on, off")
    p.add_argument("--end", choices=("auto", "zero", "sigma-min"), default="auto",
                   help="grid ends at 0 or at sigma_min (auto: as the sampler's measured default)")
    p.add_argument("--sigma-max", type=cli_number, default=None, metavar="S",
                   help="start level of the grid (default: the teacher's sigma_max); e.g. 157.4 to match diffusers' "
                        "linear-beta VP start")
    p.add_argument("--data", help="the teacher's dataset (for --cost elbo), if its run folder does not say")
    p.add_argument("--seed", type=cli_number, default=0,
                   help="training-noise seed (default 0); held-out starts use seed + 1 and seed + 2")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_schedule)


def _starts(model, spec: str, n: int, seed: int, with_data: bool, data=None, sigma_max=None):
    """(x_T at sigma_max, data samples or None, exact flow or None) for seed."""
    import torch

    from fewstep.data.gmm import GaussianMixture

    gmm = model.denoiser if isinstance(model.denoiser, GaussianMixture) else None
    if gmm is not None:  # the exact marginal at sigma_max: x0 + sigma_max eps
        g = torch.Generator().manual_seed(seed)
        x0 = gmm.sample(n, generator=g)
        top = model.sigma_max if sigma_max is None else sigma_max
        return x0 + top * torch.randn(x0.shape, generator=g, dtype=torch.float64), x0, gmm.flow
    x0 = None
    if with_data:
        from fewstep.report.bench import real_sets

        x0 = real_sets(model, spec, n, seed, data)[0].to(model.device, model.dtype)
    x_T = model.noise(n, seed)  # x at the teacher's sigma_max: N(0, sigma_max^2) to its resolution
    if sigma_max is not None:
        x_T = x_T * (sigma_max / model.sigma_max)
    return x_T, x0, None


def _setting(a, sampler: str, nfe: int) -> tuple:
    """(sampler, afs, final_zero) at ``nfe``: as asked, else the measured default's."""
    from fewstep.samplers import recommend

    try:
        rec = recommend(nfe, sampler)
    except UserError:  # a budget the sampler is refused at by default: still learnable
        rec = None
    name = sampler or rec.sampler
    afs = {"on": True, "off": False}.get(a.afs, bool(rec.afs) if rec else False)
    fz = {"zero": True, "sigma-min": False}.get(a.end, bool((rec.grid_options if rec else {}).get("final_zero",
                                                                                                   True)))
    return name, afs, fz


def cmd_schedule(a) -> int:
    import torch

    from fewstep.model import load
    from fewstep.samplers import info
    from fewstep.schedules import Problem, best_fixed, learn, save_schedule, warm_start

    nfes = _nfes(a.nfe)
    if not str(a.out).endswith(".json"):
        raise UserError(f"--out {a.out}: the grid file must end in .json")
    if len(nfes) > 1 and "{nfe}" not in str(a.out):
        raise UserError(f"--out {a.out}: with several budgets the file name must contain {{nfe}}, "
                        f"e.g. {Path(a.out).with_name(Path(a.out).stem + '_{nfe}.json')}")
    outs = {k: Path(str(a.out).replace("{nfe}", str(k))) for k in nfes}
    from fewstep.train.options import check_args, check_batch_memory, check_memory
    from fewstep.train.runfolder import check_output

    check_args(a, _checks())
    for out in outs.values():
        check_output(out, file=True)
    m = a.candidates
    check_memory(f"--candidates {m:,}", 3 * 8 * float(m + 1) ** 2, f"3 float64 matrices of {m + 1:,} x {m + 1:,} "
                 f"level-pair costs", "give fewer --candidates (default 100)")
    if a.sampler is not None:
        info(a.sampler)  # unknown names fail before any work
        if info(a.sampler).adaptive:
            raise UserError(f"sampler '{a.sampler}' chooses its own steps (adaptive): a schedule cannot be learned "
                            f"for it")
    say = (lambda m: None) if a.quiet else (lambda m: print(m, flush=True))
    model = load(a.teacher, device=a.device)
    top = model.sigma_max if a.sigma_max is None else float(a.sigma_max)
    if not (top > model.sigma_min) or top != top or top == float("inf"):
        raise UserError(f"--sigma-max {a.sigma_max}: give a finite level above the teacher's sigma_min "
                        f"{model.sigma_min:g} (its sigma_max is {model.sigma_max:g})")
    check_batch_memory("--n", a.n, model.shape, copies=10, fix="give fewer --n training starts")
    x_T, x0, flow = _starts(model, a.teacher, a.n, a.seed, a.cost == "elbo", a.data, a.sigma_max)
    x_val = _starts(model, a.teacher, max(2, a.n // 2), a.seed + 1, False, sigma_max=a.sigma_max)[0]
    x_test = _starts(model, a.teacher, a.n, a.seed + 2, False, sigma_max=a.sigma_max)[0]
    prev = None  # the budget below: its grid, levels, sampler, AFS, validation RMS and metadata
    for nfe in nfes:
        t0 = time.time()
        sampler, afs, fz = _setting(a, a.sampler, nfe)
        prob = Problem(model.denoiser, sampler, nfe, model.sigma_min, top, x_T, exact_flow=flow,
                       x0=x0, seed=a.seed, afs=afs, final_zero=fz)
        val, test = prob.on(x_val), prob.on(x_test)
        inits = {}
        if prev is not None and (float(prev["sigmas"][-1]) == 0) == fz and len(prev["sigmas"]) - 1 <= prob.steps:
            inits["warm start"] = warm_start(prev["sigmas"], prob.steps)
        say(f"[schedule] {a.teacher}: {sampler}, {nfe} NFE = {prob.steps} steps"
            f"{' with AFS' if afs else ''}, ending at {'0' if fz else 'sigma_min'}, {a.method} ({a.cost}), "
            f"{a.n} training / {len(x_val)} stopping / {len(x_test)} held-out starts")
        sigmas, meta = learn(prob, method=a.method, cost=a.cost, m=a.candidates, iters=a.iters, process=model.process,
                             log=say, levels=a.eval_levels, val=val, patience=a.patience, seconds=a.seconds,
                             inits=inits)
        ev = meta.pop("eval_sigmas", None)
        ev = None if ev is None else torch.tensor(ev, dtype=torch.float64)
        fixed_name, fixed, _ = best_fixed(prob, model.process)
        e_val = val.error(sigmas, levels=ev)
        if prev is not None and "warm start" in inits and e_val > prev["e_val"]:  # monotone in NFE where it can be
            w = inits["warm start"]
            if val.error(w) < e_val:
                sigmas, ev, e_val = w, None, val.error(w)
                meta["kept_warm_start"] = True
        heldout = None
        if prev is not None and e_val > prev["e_val"]:
            # still worse on the stopping starts than the budget below: a budget may spend fewer
            # evaluations than it allows, so it keeps the smaller budget's schedule whole
            say(f"[schedule] {nfe} NFE: learned {e_val:.4g} on the stopping starts, worse than the {prev['nfe']}-NFE "
                f"schedule's {prev['e_val']:.4g}: keeping that one (it spends {prev['meta']['nfe_spent']})")
            sigmas, ev, e_val, sampler, afs = prev["sigmas"], prev["ev"], prev["e_val"], prev["sampler"], prev["afs"]
            meta = {k: v for k, v in prev["meta"].items() if k not in ("rms_heldout_best_fixed", "kept_smaller_budget")}
            meta["kept_smaller_budget"] = prev["nfe"]
            heldout = prev["meta"]["rms_heldout"]
        meta.update(rms_heldout=test.error(sigmas, levels=ev) if heldout is None else heldout,
                    rms_heldout_best_fixed=test.error(fixed), rms_val=e_val, n_train=a.n, n_val=len(x_val),
                    n_heldout=len(x_test))
        say(f"[schedule] RMS to the teacher's ODE solution on {len(x_test)} held-out starts (used neither to train "
            f"nor to stop): learned {meta['rms_heldout']:.4g}, best fixed grid ({fixed_name}) "
            f"{meta['rms_heldout_best_fixed']:.4g}")
        out = outs[nfe]
        out.parent.mkdir(parents=True, exist_ok=True)
        save_schedule(out, sigmas, ev, teacher=a.teacher, sampler=sampler, nfe=nfe, seed=a.seed, n=a.n,
                      sigma_min=model.sigma_min, sigma_max=top, seconds=time.time() - t0,
                      afs=afs or False, reference="exact flow" if flow is not None else "Heun on a fine grid", **meta)
        print(f"wrote {out}: {len(sigmas) - 1} steps, {meta['nfe_spent']} evaluations, "
              f"sigmas {', '.join(f'{float(s):.4g}' for s in sigmas)}"
              + (f"; evaluation levels {', '.join(f'{float(s):.4g}' for s in ev)}" if ev is not None else ""))
        prev = {"nfe": nfe, "sigmas": sigmas, "ev": ev, "e_val": e_val, "sampler": sampler, "afs": afs, "meta": meta}
    return 0
