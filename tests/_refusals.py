"""Bad input: one line, and no run folder left behind (the shape every method's tests check)."""
from __future__ import annotations

import pytest

from fewstep.errors import UserError
from fewstep.methods import distill


def one_line(e) -> str:
    """The message of a caught UserError, checked to be one line."""
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def refused_leaving_no_folder(method: str, base: dict, cases, tmp_path) -> None:
    """Each (overrides, needle) of ``cases`` makes ``distill(method, base + overrides)`` refuse in one
    line naming ``needle``, before any run folder exists."""
    for i, (over, needle) in enumerate(cases):
        out = tmp_path / f"r{i}"
        with pytest.raises(UserError) as e:
            distill(method, {**base, **over}, str(out), progress=False)
        assert needle in one_line(e), (needle, str(e.value))
        assert not out.exists(), over
