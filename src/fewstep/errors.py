"""User-facing errors.

Anything a user can get wrong (an unknown name, a missing or corrupt file, a shape that
does not fit, a diverging loss) raises :class:`UserError` with one line that says what,
where and what to do. The command line prints that line and exits with status 2; it never
shows a traceback for these.
"""
from __future__ import annotations

from difflib import get_close_matches
from typing import Iterable


class UserError(Exception):
    """A problem in the user's input, reported as one line (what, where, what to do)."""

    exit_code = 2


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UserError:
    """A :class:`UserError` for an unknown ``name`` of ``kind``, listing the valid names."""
    valid = sorted(valid)
    close = get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown {kind} '{name}'{hint}; valid: {', '.join(valid)}")


def build_named(table: dict, kind: str, what: str, options: dict):
    """``table[kind](**options)``: a class chosen by name from a config, with one UserError
    line for an unknown name or options the class does not take (processes, masked nets)."""
    if kind not in table:
        raise unknown_name(what, kind, table)
    try:
        return table[kind](**options)
    except TypeError as err:
        raise UserError(f"{what} '{kind}': bad options {options}: {err}") from None
