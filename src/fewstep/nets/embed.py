"""Embeddings of the conditioning inputs shared by every network.

A net receives ``c_noise`` (a float per sample chosen by the parametrization, e.g.
``log(sigma) / 4`` in EDM or ``1000 t`` in DDPM), optional class ``labels`` and an
optional extra scalar ``cond`` (e.g. a guidance weight ``w``). :class:`ConditionEmbedding`
turns them into one vector per sample that every block adds or uses for FiLM.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


def per_sample(value, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or ``[B]``-sized input as a float32 tensor ``[B]`` on ``like``'s device
    (float32 even for half-precision ``x``: bfloat16 would round ``999`` to ``1000``)."""
    value = torch.as_tensor(value, device=like.device).float().reshape(-1)
    if value.numel() == 1:
        return value.expand(batch)
    if value.numel() != batch:
        raise UserError(f"network input: got {value.numel()} noise/condition values for a "
                        f"batch of {batch}; pass one per sample")
    return value


class SinusoidalEmbedding(nn.Module):
    """Transformer positional embedding of a scalar ``c`` (Vaswani et al. 2017; DDPM).

    ``e(c) = [cos(c f_i), sin(c f_i)]`` with ``f_i = max_period^(-i / half)``, ``i < half``:
    frequencies from 1 down to ``1 / max_period``. The highest frequency resolves the
    small ``log(sigma) / 4`` inputs, the lowest still varies over ``c`` up to ~1000.
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise UserError(f"embedding size must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angle = c.float()[:, None] * self.freqs
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class ScalarEmbedding(nn.Module):
    """A scalar per sample to a learned vector: sinusoidal features (float32), then a
    2-layer MLP in the parameters' dtype: ``W2 silu(W1 e(c))``."""

    def __init__(self, emb_dim: int, features: int = 128):
        super().__init__()
        self.features = SinusoidalEmbedding(features)
        self.fc1, self.fc2 = nn.Linear(features, emb_dim), nn.Linear(emb_dim, emb_dim)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        e = self.features(c).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(e)))


class ConditionEmbedding(nn.Module):
    """``emb = E_noise(c_noise) + E_class(labels) + E_cond(cond)``.

    Classes use ``num_classes + 1`` rows: the last (index ``num_classes``) is the 'null'
    class of classifier-free guidance, used where ``labels`` is None or ``-1``. An
    unconditional net (``num_classes == 0``) ignores labels. A net built without
    ``use_cond`` rejects ``cond``; with it, a missing ``cond`` counts as 0.
    """

    def __init__(self, emb_dim: int, num_classes: int = 0, use_cond: bool = False):
        super().__init__()
        self.num_classes, self.use_cond = int(num_classes), bool(use_cond)
        self.noise = ScalarEmbedding(emb_dim)
        self.label = nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes else None
        self.cond = ScalarEmbedding(emb_dim) if self.use_cond else None

    def _labels(self, labels: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        null = self.num_classes
        if labels is None:
            return torch.full((batch,), null, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long().reshape(-1)
        if labels.numel() not in (1, batch):
            raise UserError(f"network input: got {labels.numel()} labels for a batch of "
                            f"{batch}; pass one label per sample")
        labels = labels.expand(batch)
        if ((labels < -1) | (labels > null)).any():
            raise UserError(f"class labels must lie in -1..{null} (-1 and {null} mean "
                            f"'no class'), got {labels.min().item()}..{labels.max().item()}")
        return torch.where(labels < 0, torch.full_like(labels, null), labels)

    def forward(self, x: torch.Tensor, c_noise, labels=None, cond=None) -> torch.Tensor:
        batch = x.shape[0]
        emb = self.noise(per_sample(c_noise, batch, x))
        if self.label is not None:
            emb = emb + self.label(self._labels(labels, batch, x.device)).to(emb.dtype)
        if cond is not None and self.cond is None:
            raise UserError("this network was built without use_cond, but a 'cond' input "
                            "was given; build it with use_cond=True or drop cond")
        if self.cond is not None:
            emb = emb + self.cond(per_sample(0.0 if cond is None else cond, batch, x))
        return emb
