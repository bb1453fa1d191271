"""``fewstep samplers``: list the registered samplers (name and kind)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("samplers", help="list the registered samplers")
    p.set_defaults(func=cmd_samplers)


def cmd_samplers(a) -> int:
    from ..samplers import info, names

    for n in names():
        i = info(n)
        kind = "adaptive" if i.adaptive else ("stochastic" if i.stochastic else f"order {i.order}")
        print(f"{n:22s} {kind}")
    return 0
