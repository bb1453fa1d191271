"""``fewstep train --data D --out DIR ...``: train a diffusion teacher into a run folder.

The loop options (``--steps``, ``--lr``, ...) are those of :mod:`fewstep.train.options`,
the same as for every ``fewstep distill METHOD``; only the default ``lr`` differs
(:data:`fewstep.train.config.TRAIN_LOOP_OVERRIDES`).
"""
from __future__ import annotations

from ..errors import UserError

# the teacher's own options (the loop's come from fewstep.train.options)
TRAIN_KEYS = ("data", "process", "prediction", "weighting", "conditional", "label_dropout", "n_data")


def add_parser(sub) -> None:
    from ..train.config import TRAIN_DEFAULTS, TRAIN_LOOP_OVERRIDES
    from ..train.options import add_loop_arguments, cli_number, option

    p = sub.add_parser("train", help="train a diffusion teacher into a run folder",
                       description="Train a teacher by weighted denoising score matching. Options not given "
                                   "come from --config, else the defaults (see fewstep.train.config).")
    from ..families import FAMILIES

    p.add_argument("--family", choices=list(FAMILIES),
                   help="model family (default diffusion): arm (autoregressive, exact likelihood), ebm (energy, "
                        "MCMC maximum likelihood), sm (one score network by score matching), ncsn (noise-conditional "
                        "scores, annealed Langevin), diffusion (the teacher the distillation methods take)")
    p.add_argument("--data", help="dataset: moons, swiss_roll, 8gaussians, checkerboard, rings, pinwheel, digits, "
                                  "shapes16, shapes32, mnist:DIR, cifar10:DIR, or a .npy/.npz file / PNG folder")
    p.add_argument("--process", help="noise process: vp, vp_cosine, vp_discrete (ddpm), ve, edm, flow")
    p.add_argument("--prediction", help="network parametrization: eps, x0, v, score, flow, edm")
    p.add_argument("--net", help="network: a kind (mlp, unet, pointnet, prodiff: its defaults for the data), a JSON "
                   "object {\"kind\": ..., **options} or a .json file (default: a net for the data)")
    p.add_argument("--weighting", help="loss weighting: simple, x0, snr, truncated_snr, min_snr, v, edm, likelihood")
    p.add_argument("--conditional", action="store_true", default=None, help="class-conditional (labelled data)")
    p.add_argument("--label-dropout", type=cli_number, default=None, metavar="P",
                   help="conditional: share of training labels replaced by the null label, the branch classifier-free "
                        "guidance needs (default 0.1)")
    p.add_argument("--n-data", type=int, help="number of training samples (default: the dataset's)")
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--config", help="JSON file of training options")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint: repeat the command that started "
                   "it and add --resume; options that differ from the stored ones are refused, except "
                   "--steps, --lr, --warmup, --grad-clip, --log-every, --checkpoint-every, --keep-checkpoints, "
                   "--device and --mixed-precision, which may change")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    notes = {k: f"kept from before, so existing teachers train the same; fewstep distill's is {option(k).default!r}"
             for k in TRAIN_LOOP_OVERRIDES}
    add_loop_arguments(p, TRAIN_DEFAULTS, notes)
    _add_family_arguments(p)
    p.set_defaults(func=cmd_train)


def family_keys() -> list:
    """Every family module's own option names (``arm_output``, ``ebm_buffer``, ...)."""
    from ..families import all_defaults

    return [k for d in all_defaults().values() for k in d]


def _add_family_arguments(p) -> None:
    """``--arm-output`` etc.: each family's options, parsed by the type of their default (a
    list or a None default takes JSON or comma-separated numbers); only the chosen family
    accepts its own (:func:`fewstep.train.config.resolve`)."""
    from ..families import FAMILIES, get

    for fam, mod in FAMILIES.items():
        if not mod:
            continue
        m = get(fam)
        g = p.add_argument_group(f"--family {fam} options ({m.__name__.rsplit('.', 1)[-1]})")
        for key, default in m.DEFAULTS.items():
            g.add_argument("--" + key.replace("_", "-"), dest=key, type=_parser(key, default), default=None,
                           metavar=type(default).__name__.upper() if default is not None and not isinstance(
                               default, (list, tuple)) else "VALUE",
                           help=f"{m.HELP.get(key, '')} (default {default!r})")


def _parser(key: str, default):
    """The argparse type of a family option: bool/int/float/str by its default, else JSON
    or comma-separated numbers; a bad value is one argparse line naming the flag."""
    import argparse
    import json

    flag = "--" + key.replace("_", "-")

    def parse(v: str):
        try:
            if isinstance(default, bool):
                if v.lower() in ("1", "true", "yes", "on"):
                    return True
                if v.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(default, int):
                return int(v)
            if isinstance(default, float):
                return float(v)
            if isinstance(default, str):
                return v
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                if "," in v:
                    return [float(t) for t in v.split(",")]
                return v
        except ValueError:
            kind = type(default).__name__ if default is not None else "a value"
            raise argparse.ArgumentTypeError(f"{flag} takes {kind}, got {v!r}") from None

    parse.__name__ = key
    return parse


def cmd_train(a) -> int:
    from ..train.options import LOOP_NAMES
    from ..train.teacher import train_teacher

    # with --resume the options given are checked against the stored run (fewstep.train.resume)
    overrides = {k: getattr(a, k) for k in TRAIN_KEYS + ("family",) + LOOP_NAMES + tuple(family_keys())}
    if a.net is not None:
        from ..train.options import check_net, read_net

        check_net(a.net, "--net")
        overrides["net"] = read_net(a.net, "--net")
    if not a.resume:  # a new run: --out checked before any work (fewstep.train.runfolder.check_output)
        from ..train.runfolder import check_output

        check_output(a.out, kind="teacher")
    out = train_teacher(overrides, a.out, a.config, resume=a.resume, progress=not a.quiet)
    print(f"teacher written to {out}")
    return 0
