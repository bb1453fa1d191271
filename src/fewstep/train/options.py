"""Options, declared once, each with its type, range, default and help line.

``fewstep train`` and every ``fewstep distill METHOD`` run the same loop
(:func:`fewstep.train.loop.fit`), so they take the same loop options (:data:`LOOP_OPTIONS`);
the teacher's own options are :data:`fewstep.train.config.TRAIN_OPTIONS`, the options every
method shares :data:`fewstep.methods.common.COMMON_OPTIONS` and each method's its module's
``OPTIONS``. An option is an :class:`Option`: from these tables come

* the defaults: :data:`fewstep.train.config.TRAIN_DEFAULTS` (with ``lr`` overridden, see
  there), :data:`fewstep.methods.common.COMMON_DEFAULTS` and each method's ``DEFAULTS``
  (:func:`table_defaults`), and the help lines (:func:`table_help`);
* the command-line flags (:func:`add_loop_arguments` and the distill command's own loop);
* the one validation (:func:`validate`; :func:`validate_loop` for the loop's), called by both
  ``resolve`` functions before anything is written, so a value that cannot be meant, from
  the command line or a JSON ``--config`` file, ends in one line that names the option (and
  the file), instead of a traceback or a silently odd run. Rules between options (s0 < s1,
  w_min <= w_max, ...) live beside a method's table, in its ``check_options``.

The other commands (sample, bench, schedule, demo, export) check their own flags with the
same :class:`Option` (:func:`check_args`); :func:`check_memory` refuses a count whose arrays
alone exceed this machine's memory, with the estimate.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from ..errors import UserError

_KIND = {int: "a whole number", float: "a finite number", str: "text", bool: "true or false",
         dict: "a JSON object", list: "a list"}


@dataclass(frozen=True)
class Option:
    """One option: ``type`` is int, float, str, bool, dict or list, or a tuple of them (any
    one); a number must lie in [``low``, ``high``) (``low`` excluded with ``above``), text
    match ``pattern`` or be one of ``choices``, and ``test`` (on the normalised value) hold;
    ``none`` says what null means where null is allowed (None: it is not); ``must`` is what a
    value must be, for the error line (default: said from the type and bounds); ``example`` a
    good value for the line (default: the default); ``cli`` False for a config-file-only key."""

    name: str
    type: Any
    default: Any
    help: str
    low: Optional[float] = None
    above: bool = False        # low itself excluded
    high: Optional[float] = None  # always excluded
    choices: tuple = ()
    pattern: Optional[str] = None
    none: Optional[str] = None
    must: str = ""             # what a value must be, where the bounds do not say it well
    test: Optional[Callable[[Any], bool]] = None
    example: Any = None
    cli: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def types(self) -> tuple:
        return self.type if isinstance(self.type, tuple) else (self.type,)

    def need(self) -> str:
        """What a value must be, for the error line."""
        if self.must:
            return self.must
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.types[0] in (int, float):
            kind = _KIND[self.types[0]]
            if self.high is not None:
                return f"{kind} from {self.low:g} up to, not including, {self.high:g}"
            if self.low is not None:
                return f"{kind} {'above' if self.above else 'of at least'} {self.low:g}"
            return kind
        return " or ".join(_KIND[t] for t in self.types)


LoopOption = Option  # the loop's options are options like any other


def power_of_two(n) -> bool:
    return n >= 1 and n & (n - 1) == 0


LOOP_OPTIONS: tuple[Option, ...] = (
    Option("steps", int, 2000, "training steps", low=1),
    Option("batch_size", int, 256, "global batch size, split across processes", low=1),
    Option("lr", float, 1e-3, "AdamW peak learning rate", low=0.0, above=True),
    Option("warmup", int, 100, "linear learning-rate warm-up steps, 0 for none", low=0),
    Option("weight_decay", float, 0.0, "AdamW weight decay", low=0.0),
    Option("grad_clip", float, 1.0, "gradient-norm clip, 0 for none", low=0.0),
    Option("ema_decay", float, 0.995, "EMA decay of the saved weights, in [0, 1); 0 keeps the last weights",
           low=0.0, high=1.0),
    # every seed is mixed into others (seed * 1_000_003 + ..., seed + k) that must stay in torch's 64 bits
    Option("seed", int, 0, "random seed", low=0, high=2**32, must="a whole number from 0 to 4294967295 (2**32 - 1)"),
    Option("device", str, None, "cpu, cuda or cuda:N", pattern=r"cpu|cuda|cuda:\d+",
           none="CUDA when present, else CPU", must="cpu, cuda or cuda:N (N a GPU index)", example="cpu"),
    Option("mixed_precision", str, "no", "mixed precision on a GPU: no, fp16 or bf16; CPU runs use no",
           choices=("no", "fp16", "bf16")),
    Option("checkpoint_every", int, 500, "steps between checkpoints", low=1),
    Option("keep_checkpoints", int, 2, "newest checkpoints kept; null in a config file keeps all", low=1,
           none="all"),
    Option("log_every", int, 50, "steps between metrics lines", low=1),
)

LOOP_NAMES: tuple[str, ...] = tuple(o.name for o in LOOP_OPTIONS)
_BY_NAME = {o.name: o for o in LOOP_OPTIONS}


def option(name: str) -> Option:
    return _BY_NAME[name]


def loop_defaults(overrides: Optional[dict] = None) -> dict:
    """``{name: default}`` of the table, with a command's own ``overrides`` (loop options only)."""
    extra = set(overrides or {}) - set(LOOP_NAMES)
    if extra:
        raise KeyError(f"not loop options: {sorted(extra)}")
    return {o.name: (overrides or {}).get(o.name, o.default) for o in LOOP_OPTIONS}


def table_defaults(table: Iterable[Option]) -> dict:
    """``{name: default}`` of a table (a method's ``DEFAULTS``)."""
    return {o.name: o.default for o in table}


def table_help(table: Iterable[Option]) -> dict:
    """``{name: help line}`` of a table (a method's ``HELP``)."""
    return {o.name: o.help for o in table}


def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if isinstance(v, float) else str(v)


def cli_number(text: str):
    """argparse ``type`` of the numeric options: an int, else a float, else the text as
    given, so that :func:`validate` (not argparse's usage error) reports it."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def add_loop_arguments(parser, defaults: Optional[dict] = None, notes: Optional[dict] = None,
                       title: str = "training loop") -> None:
    """Add every loop option to ``parser`` (in an argument group ``title``) as ``--flag``
    with ``default=None`` (not given); the help shows ``defaults[name]`` (the command's
    default, the table's where absent) and ``notes[name]`` after the table's help line."""
    defaults, notes = defaults or {}, notes or {}
    group = parser.add_argument_group(title, "shared by fewstep train and every fewstep distill METHOD")
    for o in LOOP_OPTIONS:
        d = defaults.get(o.name, o.default)
        note = f"; {notes[o.name]}" if notes.get(o.name) else ""
        text = o.help + (f" (default {_show(d)}{note})" if d is not None else f" (default: {o.none}{note})")
        kw = {"metavar": "{" + ",".join(o.choices) + "}"} if o.choices else {}
        group.add_argument(o.flag, dest=o.name, type=str if o.type is str else cli_number, default=None,
                           help=text.replace("%", "%%"), **kw)


def _number(v) -> bool:
    """An int or float (numpy's too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _as(o: Option, t, v):
    """``v`` normalised to type ``t`` under the rules of ``o``, or raise ValueError."""
    if t is str:
        if not isinstance(v, str):
            raise ValueError
        v = v.strip()
        if (o.choices and v not in o.choices) or (o.pattern and not re.fullmatch(o.pattern, v)) or not v:
            raise ValueError
    elif t is bool:
        if not (isinstance(v, bool) or type(v).__name__ == "bool_"):
            raise ValueError
        v = bool(v)
    elif t is dict:
        if not isinstance(v, dict):
            raise ValueError
    elif t is list:
        if not isinstance(v, (list, tuple)):
            raise ValueError
        v = list(v)
    else:
        if not _number(v) or not math.isfinite(v):
            raise ValueError
        if t is int:
            if v != int(v):
                raise ValueError
            v = int(v)
        else:
            v = float(v)
        if o.low is not None and (v < o.low or (o.above and v == o.low)):
            raise ValueError
        if o.high is not None and v >= o.high:
            raise ValueError
    if o.test is not None and not o.test(v):
        raise ValueError
    return v


def _checked(o: Option, v):
    """The value normalised to ``o``'s type, or raise ValueError."""
    if v is None:
        if o.none is None:
            raise ValueError
        return None
    for t in o.types:
        try:
            return _as(o, t, v)
        except (ValueError, OverflowError, TypeError):
            continue
    raise ValueError


def _json(v) -> str:
    import json

    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse(o: Option, v, file: Optional[str] = None) -> UserError:
    """The one line for value ``v`` of option ``o`` (from config file ``file`` when given)."""
    import json

    example = o.example if o.example is not None else o.default
    if file:
        named = f"\"{o.name}\" ({o.flag})" if o.cli else f"\"{o.name}\""
        hint = f"give e.g. \"{o.name}\": {json.dumps(example)}, or " if example is not None else ""
        return UserError(f"config file {file}: {named} must be {o.need()}, got {_json(v)}; {hint}leave it out "
                         f"for the default")
    shown = _show(v) if isinstance(v, (int, float, str)) or v is None else _json(v)
    if o.cli:
        hint = f"give e.g. {o.flag} {_show(example)}" if example is not None else f"leave {o.flag} out"
        return UserError(f"{o.flag} must be {o.need()}, got {shown}; {hint}")
    hint = f"give e.g. \"{o.name}\": {json.dumps(example)}" if example is not None else f"leave \"{o.name}\" out"
    return UserError(f"\"{o.name}\" must be {o.need()}, got {shown}; {hint}")


def validate(cfg: dict, table: Iterable[Option], file: Optional[str] = None, file_keys: Iterable[str] = ()) -> dict:
    """Check (and normalise in place: ints for counts, floats for rates, stripped text) every
    option of ``table`` present in ``cfg``; returns ``cfg``. A value that cannot be meant
    raises one :class:`UserError` line naming the option; ``file_keys`` (values taken from
    the config file ``file``) are named as that file's keys, the others as command-line flags."""
    from_file = set(file_keys)
    for o in table:
        if o.name not in cfg:
            continue
        try:
            cfg[o.name] = _checked(o, cfg[o.name])
        except (ValueError, OverflowError, TypeError):
            raise refuse(o, cfg[o.name], file if o.name in from_file else None) from None
    return cfg


def validate_loop(cfg: dict, file: Optional[str] = None, file_keys: Iterable[str] = ()) -> dict:
    """:func:`validate` with the loop's table (:data:`LOOP_OPTIONS`)."""
    return validate(cfg, LOOP_OPTIONS, file, file_keys)


def check_args(args, table: Iterable[Option]) -> None:
    """Check the parsed command-line arguments ``args`` (an argparse namespace) named in
    ``table`` in place; values not given (None) pass."""
    for o in table:
        v = getattr(args, o.name, None)
        if v is not None:
            try:
                setattr(args, o.name, _checked(o, v))
            except (ValueError, OverflowError, TypeError):
                raise refuse(o, v) from None


# ------------------------------------------------------------------------------- nets
def read_net(net, where: str) -> dict:
    """A ``--net`` value as a config dict: a net kind alone (``prodiff``, ``unet``: its
    defaults for the data), JSON text, a .json file, or a dict; checked by :func:`check_net`."""
    from ..nets import NETS

    if isinstance(net, str) and net.strip() in NETS:
        return {"kind": net.strip()}
    if isinstance(net, str):
        import json
        from pathlib import Path

        try:
            net = json.loads(Path(net).read_text() if net.strip().endswith(".json") else net)
        except (OSError, ValueError) as e:
            raise UserError(f"{where} {_json(net)}: not a net kind ({', '.join(NETS)}), a JSON net config or a "
                            f"readable .json file ({' '.join(str(e).split())[:80]})") from None
    if not isinstance(net, dict):
        raise UserError(f"{where} must be a net kind ({', '.join(NETS)}) or a JSON object such as "
                        f"{{\"kind\": \"mlp\", \"hidden\": 128}}, got {_json(net)}")
    return dict(net)


def check_net(net, where: str) -> None:
    """A net config (``{"kind": ..., **options}``; JSON text or a .json file are read) checked
    before anything is built: a known kind, known options, and each option of the type and
    range its constructor takes (whole numbers >= 0, dropout in [0, 1), true/false, lists of
    whole numbers). ``where`` names it in the error line (``--net``, a file's "net")."""
    import inspect

    from ..nets import NETS

    net = read_net(net, where)
    kind = net.get("kind")
    if kind not in NETS:
        from ..errors import unknown_name

        raise UserError(f"{where}: {unknown_name('network kind', kind, NETS)}")
    params = {n: p for n, p in inspect.signature(NETS[kind].__init__).parameters.items() if n != "self"}
    extra = sorted(set(net) - set(params) - {"kind"})
    if extra:
        raise UserError(f"{where}: unknown option(s) {', '.join(map(str, extra))} of the '{kind}' net; valid: "
                        f"{', '.join(params)}")
    for key, v in net.items():
        if key == "kind":
            continue
        ann = str(params[key].annotation)
        o = _net_rule(key, ann)
        if o is None:
            continue
        try:
            _checked(o, v)
        except (ValueError, OverflowError, TypeError):
            raise UserError(f"{where}: \"{key}\" of the '{kind}' net must be {o.need()}, got {_json(v)}") from None


def _net_rule(key: str, ann: str) -> Optional[Option]:
    """The :class:`Option` of a net constructor's argument from its annotation (None: unchecked)."""
    none = "the net's default" if "None" in ann else None
    if key == "dropout":
        return Option(key, float, 0.0, "", low=0.0, high=1.0, none=none)
    if ann.startswith("bool"):
        return Option(key, bool, False, "", none=none)
    if ann.startswith("int"):
        low = 0 if key == "num_classes" else 1
        return Option(key, int, 0, "", low=low, high=2**31, none=none,
                      must=f"a whole number of at least {low}" + (" or null" if none else ""))
    if ann.startswith("float"):
        return Option(key, float, 0.0, "", low=0.0, none=none)
    if ann.startswith("Sequence[int]"):
        return Option(key, list, [], "", none=none, test=lambda xs: all(_number(x) and x == int(x) and 1 <= x < 2**31
                                                                        for x in xs),
                      must="a list of whole numbers of at least 1")
    return None


# ----------------------------------------------------------------------------- memory
def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} bytes"


def check_memory(what: str, need: float, detail: str, fix: str) -> None:
    """Refuse, before any work, a request whose arrays alone (``need`` bytes: ``detail``)
    exceed this machine's physical memory: one line with the estimate and ``fix``."""
    from ..data.images import _memory_bytes

    mem = _memory_bytes()
    if mem is not None and need > mem:
        raise UserError(f"{what} needs at least {_size(need)} of memory ({detail}), more than this machine's "
                        f"{_size(mem)}; {fix}")


def check_batch_memory(what: str, count: int, shape, copies: int = 3, fix: str = "") -> None:
    """:func:`check_memory` for ``copies`` float32 arrays of ``count`` samples of ``shape``
    (a batch: data, noise, noisy input, ...)."""
    per = math.prod(int(s) for s in shape) if shape else 1
    check_memory(f"{what} {count:,}", float(count) * per * copies * 4,
                 f"{copies} float32 arrays of {count:,} x {per:,} values", fix or f"give a smaller {what}")
