"""``fewstep demo``: the whole story on an embedded default, in minutes on a CPU (see :mod:`fewstep.demo`)."""
from __future__ import annotations


def _checks() -> tuple:
    """The rules of this command's values (:class:`fewstep.train.options.Option`)."""
    from ..data.toys import TOYS
    from ..train.options import Option, option

    return (Option("data", str, "moons", "", choices=tuple(TOYS), must=f"a 2-D toy set: {', '.join(TOYS)} (the demo "
                   f"trains and distils a 2-D teacher; other data: fewstep train and fewstep distill)"),
            Option("steps", int, 3000, "", low=1), option("seed"), option("device"))


def add_parser(sub) -> None:
    from ..train.options import cli_number

    p = sub.add_parser("demo", help="the whole story on an embedded default, in minutes on a CPU",
                       description="Train a 2-D teacher, distil it into few-step students (knowledge, progressive, "
                                   "consistency, reflow), sample it with every sampler at several NFE, measure "
                                   "teacher and students against the data and the teacher's exact ODE, write "
                                   "plots, metrics and a report. Run again, it continues where it stopped.")
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--data", default="moons", help="2-D toy set (default moons)")
    p.add_argument("--steps", type=cli_number, default=3000, help="teacher training steps (default 3000)")
    p.add_argument("--students", default=None,
                   help="comma-separated demo students, or none (default knowledge,progressive,consistency,reflow)")
    p.add_argument("--seed", type=cli_number, default=0, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a) -> int:
    from ..demo import run_demo
    from ..train.options import check_args
    from ..train.runfolder import check_output

    check_args(a, _checks())
    check_output(a.out, allow=lambda p: True)  # a demo folder continues; the demo refuses another folder
    run_demo(a.out, data=a.data, steps=a.steps, seed=a.seed, device=a.device, progress=not a.quiet,
             students=a.students)
    return 0
