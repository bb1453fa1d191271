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
