"""Exponential moving average of a model's weights (the distillation ``target``).

theta_ema <- decay * theta_ema + (1 - decay) * theta  =  lerp(theta_ema, theta, 1 - decay)

Buffers (e.g. normalisation statistics) are copied, not averaged, as in NVlabs/edm.
"""
from __future__ import annotations

import copy
from typing import Callable, Union

import torch
from torch import nn

from fewstep.errors import UserError

Decay = Union[float, Callable[[int], float]]


def _check_decay(decay: float, where: str) -> float:
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise UserError(f"EMA decay {decay} ({where}) is outside [0, 1]; use e.g. 0.999")
    return decay


class EMA:
    """A frozen shadow copy ``ema.module`` of ``model``, updated by :meth:`update`.

    ``decay`` is a number or a schedule ``num_updates -> decay`` (e.g. a consistency
    model's mu(k)); update number k (0-based) uses ``decay(k)``. Pass the bare model, not
    a DDP wrapper. Checkpoints store ``ema.module``'s weights plus ``num_updates``.
    """

    def __init__(self, model: nn.Module, decay: Decay = 0.999):
        if not callable(decay):
            _check_decay(decay, "EMA(decay=...)")
        self.model = model
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if callable(self.decay):
            return _check_decay(self.decay(self.num_updates), f"schedule at update "
                                f"{self.num_updates}")
        return float(self.decay)

    @torch.no_grad()
    def update(self) -> None:
        """theta_ema = lerp(theta_ema, theta, 1 - decay); buffers are copied."""
        decay = self.current_decay()
        src = list(self.model.parameters())
        dst = list(self.module.parameters())
        if src and dst[0].device != src[0].device:
            self.module.to(src[0].device)
            dst = list(self.module.parameters())
        if src:
            torch._foreach_lerp_(dst, [p.detach() for p in src], 1.0 - decay)
        bufs_src, bufs_dst = list(self.model.buffers()), list(self.module.buffers())
        if bufs_src:
            torch._foreach_copy_(bufs_dst, bufs_src)
        self.num_updates += 1

    def state_dict(self) -> dict:
        """``{"module": shadow state_dict, "num_updates": int}``."""
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (strict key match)."""
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state.get("num_updates", 0))
