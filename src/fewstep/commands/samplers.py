"""``fewstep samplers``: list the registered samplers (name and kind), and with ``--nfe K``
the measured default configuration at K and each sampler's best grid there."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ..train.options import cli_number

    p = sub.add_parser("samplers", help="list the registered samplers (with --nfe: the measured defaults)")
    p.add_argument("--nfe", type=cli_number, help="show the default configuration and each sampler's best grid "
                                                  "at this budget")
    p.set_defaults(func=cmd_samplers)


def cmd_samplers(a) -> int:
    from ..checks import whole
    from ..errors import UserError
    from ..samplers import info, names, recommend

    nfe = None if a.nfe is None else whole(a.nfe, "--nfe")
    if nfe is not None:
        print(f"default at {nfe} NFE: {recommend(nfe).describe()}")
    for n in names():
        i = info(n)
        kind = "adaptive" if i.adaptive else ("stochastic" if i.stochastic else f"order {i.order}")
        if nfe is None:
            print(f"{n:22s} {kind}")
            continue
        try:
            c = recommend(nfe, n)
            shown = c.describe().split(":")[0].split(" on ", 1)[-1] if c.source != "not measured" else "karras"
        except UserError as e:
            shown = "refused: " + str(e).split(":", 1)[1].split(";")[0].strip()
        print(f"{n:22s} {kind:12s} {shown}")
    return 0
