"""The training-loop options, declared once.

``fewstep train`` and every ``fewstep distill METHOD`` run the same loop
(:func:`fewstep.train.loop.fit`), so they take the same loop options: each is declared here
once, with its type, default and help line, and from this table come

* the defaults: :data:`fewstep.train.config.TRAIN_DEFAULTS` (with ``lr`` overridden, see
  there) and :data:`fewstep.methods.common.COMMON_DEFAULTS`;
* the command-line flags of both commands (:func:`add_loop_arguments`);
* the one validation (:func:`validate_loop`), called by both ``resolve`` functions, so a
  value that cannot be meant, from the command line or a JSON ``--config`` file, ends in
  one line that names the option, instead of a traceback or a silently odd run.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..errors import UserError


@dataclass(frozen=True)
class LoopOption:
    """One loop option: ``type`` is int, float or str; the value must lie in [``low``,
    ``high``) (``low`` excluded with ``above``), match ``pattern`` or be one of ``choices``;
    ``none`` says what null means where null is allowed (None: it is not); ``must`` is
    what a value must be, for the error line (default: said from the bounds)."""

    name: str
    type: type
    default: Any
    help: str
    low: Optional[float] = None
    above: bool = False        # low itself excluded
    high: Optional[float] = None  # always excluded
    choices: tuple = ()
    pattern: Optional[str] = None
    none: Optional[str] = None
    must: str = ""             # what a value must be, where the bounds do not say it well

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def need(self) -> str:
        """What a value must be, for the error line."""
        if self.must:
            return self.must
        if self.choices:
            return "one of " + ", ".join(self.choices)
        kind = "a whole number" if self.type is int else "a finite number"
        if self.high is not None:
            return f"{kind} from {self.low:g} up to, not including, {self.high:g}"
        if self.low is not None:
            return f"{kind} {'above' if self.above else 'of at least'} {self.low:g}"
        return kind


LOOP_OPTIONS: tuple[LoopOption, ...] = (
    LoopOption("steps", int, 2000, "training steps", low=1),
    LoopOption("batch_size", int, 256, "global batch size, split across processes", low=1),
    LoopOption("lr", float, 1e-3, "AdamW peak learning rate", low=0.0, above=True),
    LoopOption("warmup", int, 100, "linear learning-rate warm-up steps, 0 for none", low=0),
    LoopOption("weight_decay", float, 0.0, "AdamW weight decay", low=0.0),
    LoopOption("grad_clip", float, 1.0, "gradient-norm clip, 0 for none", low=0.0),
    LoopOption("ema_decay", float, 0.995, "EMA decay of the saved weights, in [0, 1); 0 keeps the last weights",
               low=0.0, high=1.0),
    LoopOption("seed", int, 0, "random seed", low=-2**63, high=2**63,
               must="a whole number (of magnitude below 2**63)"),
    LoopOption("device", str, None, "cpu, cuda or cuda:N", pattern=r"cpu|cuda|cuda:\d+",
               none="CUDA when present, else CPU", must="cpu, cuda or cuda:N (N a GPU index)"),
    LoopOption("mixed_precision", str, "no", "mixed precision on a GPU: no, fp16 or bf16; CPU runs use no",
               choices=("no", "fp16", "bf16")),
    LoopOption("checkpoint_every", int, 500, "steps between checkpoints", low=1),
    LoopOption("keep_checkpoints", int, 2, "newest checkpoints kept; null in a config file keeps all", low=1,
               none="all"),
    LoopOption("log_every", int, 50, "steps between metrics lines", low=1),
)

LOOP_NAMES: tuple[str, ...] = tuple(o.name for o in LOOP_OPTIONS)
_BY_NAME = {o.name: o for o in LOOP_OPTIONS}


def option(name: str) -> LoopOption:
    return _BY_NAME[name]


def loop_defaults(overrides: Optional[dict] = None) -> dict:
    """``{name: default}`` of the table, with a command's own ``overrides`` (loop options only)."""
    extra = set(overrides or {}) - set(LOOP_NAMES)
    if extra:
        raise KeyError(f"not loop options: {sorted(extra)}")
    return {o.name: (overrides or {}).get(o.name, o.default) for o in LOOP_OPTIONS}


def _show(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def cli_number(text: str):
    """argparse ``type`` of the numeric loop options: an int, else a float, else the text as
    given, so that :func:`validate_loop` (not argparse's two-line usage error) reports it."""
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


def _checked(o: LoopOption, v):
    """The value normalised to ``o.type``, or raise ValueError."""
    if v is None:
        if o.none is None:
            raise ValueError
        return None
    if o.type is str:
        if not isinstance(v, str):
            raise ValueError
        v = v.strip()
        if o.choices and v not in o.choices:
            raise ValueError
        if o.pattern and not re.fullmatch(o.pattern, v):
            raise ValueError
        return v
    if not _number(v) or not math.isfinite(v):
        raise ValueError
    if o.type is int:
        if v != int(v):
            raise ValueError
        v = int(v)
    else:
        v = float(v)
    if o.low is not None and (v < o.low or (o.above and v == o.low)):
        raise ValueError
    if o.high is not None and v >= o.high:
        raise ValueError
    return v


def validate_loop(cfg: dict, file: Optional[str] = None, file_keys: Iterable[str] = ()) -> dict:
    """Check (and normalise in place: ints for counts, floats for rates) every loop option
    present in ``cfg``; returns ``cfg``. A value that cannot be meant raises one
    :class:`UserError` line naming the option; ``file_keys`` (values taken from the config
    file ``file``) are named as that file's keys, the others as command-line flags."""
    from_file = set(file_keys)
    for name in LOOP_NAMES:
        if name not in cfg:
            continue
        o, v = _BY_NAME[name], cfg[name]
        try:
            cfg[name] = _checked(o, v)
        except (ValueError, OverflowError, TypeError):
            example = o.default if o.default is not None else "cpu"
            if name in from_file:
                import json

                try:
                    shown = json.dumps(v)
                except (TypeError, ValueError):
                    shown = repr(v)
                raise UserError(f"config file {file}: \"{name}\" ({o.flag}) must be {o.need()}, got {shown}; "
                                f"give e.g. \"{name}\": {json.dumps(example)}, or leave it out for the default") from None
            raise UserError(f"{o.flag} must be {o.need()}, got {v}; give e.g. {o.flag} {_show(example)}") from None
    return cfg
