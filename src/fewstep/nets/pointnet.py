"""A permutation-equivariant network for point clouds ``x [B, N, D]`` (DeepSets /
PointNet style: Zaheer et al. 2017, Qi et al. 2017).

Every point goes through the same per-point layers; points exchange information only
through symmetric pooling (max and mean over the points), so for any permutation P of
the points ``F(P x) = P F(x)`` exactly (up to the rounding order of the mean). Block l:

    n_i = LN(h_i),   g = W_g [max_i n_i, mean_i n_i] + emb          (one context per cloud)
    (s, b) = W_e silu(g),   h_i <- h_i + W_2 silu(W_1 silu(n_i) (1 + s) + b)

with ``emb`` the noise-level (and class, guidance) embedding of
:class:`~fewstep.nets.embed.ConditionEmbedding`. The output layer is zero-initialised, as
in the MLP, so an untrained net outputs 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .embed import ConditionEmbedding


class PointBlock(nn.Module):
    """One residual per-point block, FiLM-conditioned on the pooled cloud context + emb."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.pool = nn.Linear(2 * hidden, emb_dim)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        n = self.norm(h)
        g = self.pool(torch.cat([n.amax(1), n.mean(1)], -1)) + emb
        scale, shift = self.film(F.silu(g)).unsqueeze(1).chunk(2, dim=-1)
        a = self.fc1(F.silu(n))
        return h + self.fc2(F.silu(a * (1 + scale) + shift))


class PointNet(nn.Module):
    """``F(x, c_noise, labels, cond)`` for clouds ``x [B, N, dim]``, output shaped like x.

    Any number of points N works (the weights do not depend on N)."""

    def __init__(self, dim: int = 3, hidden: int = 128, depth: int = 4, emb_dim: int = 128,
                 num_classes: int = 0, use_cond: bool = False):
        super().__init__()
        if int(dim) < 1 or int(hidden) < 1 or int(depth) < 1:
            raise UserError(f"pointnet: dim, hidden and depth must be positive, got {dim}, {hidden}, {depth}")
        self.config = dict(kind="pointnet", dim=int(dim), hidden=int(hidden), depth=int(depth),
                           emb_dim=int(emb_dim), num_classes=int(num_classes), use_cond=bool(use_cond))
        self.dim = int(dim)
        self.embed = ConditionEmbedding(emb_dim, num_classes, use_cond)
        self.inp = nn.Linear(self.dim, hidden)
        self.blocks = nn.ModuleList(PointBlock(hidden, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise, labels=None, cond=None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise UserError(f"pointnet built for clouds [B, N, {self.dim}] got input of shape {tuple(x.shape)}; "
                            f"rebuild the net with dim={x.shape[-1]} or give clouds [B, N, D]")
        emb = self.embed(x, c_noise, labels, cond)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))
