"""Residual MLP for low-dimensional data (2-D toys, flattened point sets)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .embed import ConditionEmbedding


class FiLMBlock(nn.Module):
    """Pre-norm residual block with FiLM conditioning (Perez et al. 2018):

    ``a = W1 silu(LN(h))``, ``(s, b) = W_e silu(emb)``, ``h' = h + W2 silu(a (1 + s) + b)``.
    """

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=1)
        a = self.fc1(F.silu(self.norm(h)))
        return h + self.fc2(F.silu(a * (1 + scale) + shift))


class MLP(nn.Module):
    """``F(x, c_noise, labels, cond)`` for ``x`` of ``dim`` values per sample.

    Input layer, ``depth`` :class:`FiLMBlock` s, then a zero-initialised output layer, so
    the untrained net outputs 0 (the preconditioned denoiser starts at ``c_skip x``).
    Inputs ``[B, ...]`` with ``dim`` values per sample are flattened and the output is
    reshaped back.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 128,
                 num_classes: int = 0, use_cond: bool = False):
        super().__init__()
        self.config = dict(kind="mlp", dim=int(dim), hidden=int(hidden), depth=int(depth),
                           emb_dim=int(emb_dim), num_classes=int(num_classes),
                           use_cond=bool(use_cond))
        self.dim = int(dim)
        self.embed = ConditionEmbedding(emb_dim, num_classes, use_cond)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(FiLMBlock(hidden, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise, labels=None, cond=None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise UserError(f"MLP built for {self.dim} values per sample got input of shape "
                            f"{tuple(x.shape)}; rebuild the net with dim={flat.shape[1]}")
        emb = self.embed(x, c_noise, labels, cond)
        h = self.inp(flat)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)
