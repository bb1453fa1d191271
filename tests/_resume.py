"""The shape every resume test shares: a run stopped at a chosen step of the loop (as a
KeyboardInterrupt, what Ctrl-C or a killed job leaves) and the weights of two runs compared bit
for bit."""
import pytest
import torch

import fewstep.train.loop as loop
from fewstep.model import load


def interrupt(monkeypatch, when, run) -> None:
    """``run()`` with the loop stopped by a KeyboardInterrupt at the first step for which
    ``when(seed, step)`` holds (``seed``: the stage's loop seed, e.g. seed + 1000 in a second
    round); the interruption must happen."""
    real = loop.step_generator

    def stop(seed, step, device="cpu"):
        if when(seed, step):
            raise KeyboardInterrupt
        return real(seed, step, device)

    monkeypatch.setattr(loop, "step_generator", stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(loop, "step_generator", real)


def same_weights(a: str, b: str) -> None:
    """The two runs' saved networks are equal bit for bit."""
    sa, sb = load(a).denoiser.net.state_dict(), load(b).denoiser.net.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def full_and_resumed(monkeypatch, method: str, cfg: dict, tmp_path, at: int) -> tuple:
    """(an uninterrupted run, the same run stopped at loop step ``at`` of a one-stage method, its
    folder without a model.json, then resumed with ``--resume``): the two run folders."""
    from fewstep.methods import distill

    full = distill(method, cfg, str(tmp_path / "full"), progress=False)
    interrupt(monkeypatch, lambda seed, step: step == at,
              lambda: distill(method, cfg, str(tmp_path / "cut"), progress=False))
    assert not (tmp_path / "cut" / "model.json").exists()
    return full, distill(method, {}, str(tmp_path / "cut"), resume=True, progress=False)
