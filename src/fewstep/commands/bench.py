"""``fewstep bench``: every sampler and distilled student of one teacher on the same noise,
one table, one Pareto plot, one report.html (see :mod:`fewstep.report.bench`)."""
from __future__ import annotations

import shlex
import sys

from fewstep.errors import UserError


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--nfe {text}: give comma-separated integers, e.g. 1,2,4,8") from None
    if not vals or min(vals) < 1:
        raise UserError(f"--nfe {text}: give positive integers, e.g. 1,2,4,8")
    return vals


def _checks() -> tuple:
    """The rules of this command's values (:class:`fewstep.train.options.Option`)."""
    from fewstep.train.options import Option, option

    return (Option("n", int, None, "", low=10, none="the default", example=2000),
            Option("nll", int, None, "", low=0, none="the default", example=250),
            Option("label", int, None, "", none="drawn labels", example=0),
            Option("guidance", float, None, "", low=0.0, none="1", example=2.0),
            Option("dg_weight", float, None, "", low=0.0, none="the run's", example=1.0), option("seed"),
            option("device"))


def _not_a_run(path) -> bool:
    """A non-empty --out is fine unless it is a run folder (a report would mix into it)."""
    return not any((path / name).is_file() for name in ("config.json", "model.json"))


def add_parser(sub) -> None:
    from fewstep.report.bench import DEFAULT_NFE, DEFAULT_SAMPLERS
    from fewstep.train.options import cli_number

    p = sub.add_parser(
        "bench", help="compare samplers and distilled students of one teacher; write a report",
        description="Run every requested sampler at every NFE budget and every distilled student with its own "
                    "sampling rule, all from the same noise; measure them against held-out data and the teacher's "
                    "accurate ODE solution; write results.json, results.csv, pareto.png, samples_*.png and "
                    "report.html (opens from disk) into --out.")
    p.add_argument("--teacher", required=True, metavar="RUN_OR_SPEC", help="teacher run folder or gmm:FILE.npz")
    p.add_argument("--samplers", default="default",
                   help=f"comma-separated sampler names, 'all' (every deterministic sampler) or 'none' "
                        f"(default: {','.join(DEFAULT_SAMPLERS)})")
    p.add_argument("--students", default="auto",
                   help="comma-separated student run folders, 'auto' (students of this teacher beside it: "
                        "siblings and students/*) or 'none' (default auto)")
    p.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFE)),
                   help=f"comma-separated NFE budgets (default {','.join(map(str, DEFAULT_NFE))})")
    p.add_argument("--grids", default="", help="comma-separated grid files from 'fewstep schedule', each run with "
                                               "its sampler at its NFE as the method 'SAMPLER @ FILE'")
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--n", type=cli_number, help="samples per method (default 2000 for points, 500 for images)")
    p.add_argument("--data", help="the teacher's dataset, if its run folder does not say")
    p.add_argument("--nll", type=cli_number, help="held-out samples for the teacher's NLL (default 250 points, "
                                           "32 images; 0 skips it)")
    p.add_argument("--no-reference", action="store_true", help="skip the accurate ODE solution (no flow error)")
    p.add_argument("--label", type=cli_number, help="class-conditional teacher: every sample of this class (default: "
                                             "labels drawn from --seed, with an exact mixture's class prior or "
                                             "uniformly); per-class rows are written either way")
    p.add_argument("--guidance", type=cli_number, help="class-conditional teacher: classifier-free guidance scale of its "
                                                  "samplers and reference (students distilled at another guidance "
                                                  "are skipped)")
    p.add_argument("--prompt", help="text-conditional teacher: this prompt for every sample (default: the captions of "
                                    "the held-out images it is measured against)")
    p.add_argument("--discriminator", metavar="DG_RUN", help="a 'fewstep distill discriminator' run of the teacher: "
                                                             "every sampler also runs with discriminator guidance")
    p.add_argument("--dg-weight", type=cli_number, help="discriminator guidance weight (default: the run's)")
    p.add_argument("--seed", type=cli_number, default=0, help="noise and data seed (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)


def cmd_bench(a) -> int:
    from fewstep.report.bench import run_bench

    from fewstep.train.options import check_args, check_batch_memory
    from fewstep.train.runfolder import check_output

    check_args(a, _checks())
    check_output(a.out, allow=_not_a_run)
    if a.n is not None and a.n > 100_000:  # only then is the teacher's sample size worth a look
        from fewstep.model import load

        check_batch_memory("--n", a.n, load(a.teacher, device=a.device).shape, copies=4,
                           fix="give a smaller --n (samples per method)")
    _, path = run_bench(a.teacher, samplers=a.samplers, students=a.students, nfe=_ints(a.nfe), out=a.out, n=a.n,
                        seed=a.seed, data=a.data, nll_n=a.nll, reference=not a.no_reference, device=a.device,
                        progress=not a.quiet, grids=[g for g in a.grids.split(",") if g],
                        label=a.label, guidance=a.guidance, discriminator=a.discriminator, dg_weight=a.dg_weight,
                        prompt=a.prompt, command="fewstep " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None)
    print(f"report: {path}")
    return 0
