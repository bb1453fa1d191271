"""``fewstep distill METHOD --teacher RUN_OR_SPEC --out DIR ...``: train a few-step student.

Each method of :mod:`fewstep.methods` is a sub-command with the shared options (the loop's,
``--teacher``, ``--data``, ``--net``) and its own (from the method's ``DEFAULTS``/``HELP``).
The student run folder is sampled like any model: ``fewstep sample DIR --nfe k``.
"""
from __future__ import annotations

import argparse

from ..errors import UserError

# the options every method takes besides the loop's (those are declared once, in
# fewstep.train.options, and shared with fewstep train)
COMMON_HELP = {
    "teacher": (str, "teacher: a run folder or gmm:FILE.npz (an exact Gaussian mixture)"),
    "data": (str, "training data where the method needs it: a dataset or gmm:FILE.npz (default: the teacher's)"),
    "net": (str, "student network as JSON or a .json file (default: the teacher's; an MLP for gmm)"),
}
LOOP_NOTES = {"steps": "per round for progressive"}


def _value(text: str):
    """A method option from the command line: none, true/false, an int, a float or text."""
    from ..train.options import cli_number

    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    return cli_number(text)


def add_parser(sub) -> None:
    from ..methods import defaults, get, names
    from ..methods.common import COMMON_HELP as COND_HELP
    from ..train.options import LOOP_NAMES, add_loop_arguments

    p = sub.add_parser("distill", help="distil a teacher into a few-step student",
                       description="Distil a teacher (run folder or gmm:FILE.npz) into a few-step student run folder. "
                                   "Sample it with 'fewstep sample DIR --nfe k' (its own rule without --sampler).")
    msub = p.add_subparsers(dest="method", metavar="METHOD")
    for name in names():
        mod = get(name)
        mp = msub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0],
                             aliases=[name.replace("_", "-")] if "_" in name else [],  # flow-matching = flow_matching
                             description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        dflt = defaults(name)
        for key, (typ, text) in COMMON_HELP.items():
            mp.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None,
                            help=f"{text} [{dflt[key]}]" if dflt.get(key) is not None else text)
        add_loop_arguments(mp, dflt, LOOP_NOTES)
        for key, text in {**COND_HELP, **mod.HELP}.items():
            # a true-or-false option is also a bare flag: --gan is --gan true
            flag = {"nargs": "?", "const": True} if isinstance(dflt.get(key), bool) else {}
            mp.add_argument("--" + key.replace("_", "-"), dest=key, type=_value, default=None,
                            help=f"{text} [{dflt[key]}]", **flag)
        mp.add_argument("--out", required=True, help="student run folder to create (or continue with --resume)")
        mp.add_argument("--config", help="JSON file of options")
        mp.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint: repeat the command that started "
                        "it and add --resume; options that differ from the stored ones are refused, except "
                        "--steps, --lr, --warmup, --grad-clip, --log-every, --checkpoint-every, --keep-checkpoints, "
                        "--device and --mixed-precision, which may change")
        mp.add_argument("--quiet", action="store_true", help="no progress bars")
        mp.set_defaults(func=cmd_distill, method_options=list(COMMON_HELP) + list(LOOP_NAMES) + list(COND_HELP)
                        + list(mod.HELP))
    p.set_defaults(func=_no_method)


def _no_method(a) -> int:
    from ..methods import names

    raise UserError(f"give a method: fewstep distill {{{','.join(names())}}} --teacher RUN_OR_SPEC --out DIR")


def cmd_distill(a) -> int:
    from ..methods import distill

    a.method = a.method.replace("-", "_")  # the alias flow-matching names the module flow_matching
    # with --resume the options given are checked against the stored run (fewstep.train.resume)
    overrides = {k: getattr(a, k) for k in a.method_options}
    if not a.resume:  # a new run: --out checked before any work (fewstep.train.runfolder.check_output)
        from ..train.runfolder import check_output

        check_output(a.out, kind=a.method)
    out = distill(a.method, overrides, a.out, a.config, resume=a.resume, progress=not a.quiet)
    from ..train.job import role_of

    role = role_of(out)
    what = {"covariance": "covariance head", "discriminator": "discriminator"}.get(role, "student")
    print(f"{what} written to {out}")
    return 0
