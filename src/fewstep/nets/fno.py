"""The diffusion operator of Zheng et al. 2022 ("Fast sampling of diffusion models via operator
learning", DFNO / DSNO): x_T -> the teacher's whole trajectory at K fixed levels, in one evaluation.

:class:`TemporalFourier` is the paper's temporal convolution (its Fourier layer over the time axis,
after the Fourier neural operator of Li et al. 2021): for features u(t_1..t_K) [B, K, C],

    (K u)(t_m) = IDFT_m[ R_k DFT_k(u) ],    R_k in C^{C x C'} learned for the lowest ``modes``
                                            frequencies k, zero above (the truncation),

a convolution along the level axis whose kernel is learned in Fourier space. :class:`OperatorNet`
(net kind ``fno``) places one temporal block after each block of a per-level backbone: the paper
inserts its temporal convolution blocks after the spatial blocks of the diffusion UNet, which runs
on every time point with that time's embedding; here the backbone is the project's FiLM-MLP block
(:class:`fewstep.nets.mlp.FiLMBlock`) on the flattened sample, run on all K levels at once (one
batch of B K rows), each with its level's embedding. See :mod:`fewstep.methods.operator`.

The kind ``fno`` is listed in :data:`fewstep.nets.NETS`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .embed import ConditionEmbedding
from .mlp import FiLMBlock


class TemporalFourier(nn.Module):
    """The temporal Fourier layer on [B, K, C] (module docstring): rfft along K, the lowest
    ``modes`` frequencies times learned complex matrices R_k (stored as real/imaginary pairs,
    [modes, C, C', 2]), the others zero, irfft back to K points."""

    def __init__(self, channels: int, modes: int, out_channels: int | None = None):
        super().__init__()
        out = int(out_channels or channels)
        if int(modes) < 1:
            raise UserError(f"temporal Fourier layer: modes must be at least 1, got {modes}")
        self.channels, self.out_channels, self.modes = int(channels), out, int(modes)
        scale = 1.0 / (self.channels * out)  # the FNO's initialisation scale
        self.weight = nn.Parameter(scale * torch.rand(self.modes, self.channels, out, 2))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        B, K, C = u.shape
        U = torch.fft.rfft(u.float(), dim=1)  # [B, K//2 + 1, C]
        m = min(self.modes, U.shape[1])
        R = torch.view_as_complex(self.weight[:m].float().contiguous())  # [m, C, C']
        out = torch.zeros(B, U.shape[1], self.out_channels, dtype=U.dtype, device=u.device)
        out[:, :m] = torch.einsum("bkc,kcd->bkd", U[:, :m], R)
        return torch.fft.irfft(out, n=K, dim=1).to(u.dtype)


class TemporalBlock(nn.Module):
    """h <- h + W_o silu(K(LN h)): the temporal convolution with a residual path; W_o starts at 0,
    so an untrained block passes the per-level features through."""

    def __init__(self, hidden: int, modes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.spectral = TemporalFourier(hidden, modes)
        self.out = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.out(F.silu(self.spectral(self.norm(h))))


def level_c(sigmas: torch.Tensor) -> torch.Tensor:
    """A level's embedding input: 1000 (2/pi) arctan(sigma), its VP time in [0, 1000) (finite at 0)."""
    return 1000.0 * (2.0 / math.pi) * torch.atan(sigmas.double()).float()


class OperatorNet(nn.Module):
    """``net(z_T, c_noise)`` -> the state at the last level; ``net(z_T, c_noise, trajectory=True)``
    -> all K levels [B, K, *shape], both in the VP scaling z = x / sqrt(1 + sigma^2) of sigma-space
    states x (:mod:`fewstep.methods.operator`). ``levels``: the K output levels (decreasing),
    ``sigma_max`` the input's. Layout: input layer, ``depth`` x (per-level FiLM block, temporal
    block), a zero-initialised output layer; the output is the departure from the pure-noise part
    c_m z_T, c_m = (sigma_m / sqrt(1 + sigma_m^2)) / (sigma_T / sqrt(1 + sigma_T^2)).
    ``c_noise`` is ignored: the levels are the net's own."""

    def __init__(self, dim: int, levels: list, sigma_max: float, hidden: int = 256, depth: int = 4, modes: int = 0,
                 emb_dim: int = 128, num_classes: int = 0):
        super().__init__()
        levels = [float(s) for s in levels]
        if not levels or any(a <= b for a, b in zip(levels, levels[1:])) or min(levels) < 0:
            raise UserError(f"fno net: levels must be a decreasing list of sigmas >= 0, got {levels}")
        K = len(levels)
        modes = int(modes) or K // 2 + 1
        if not 1 <= modes <= K // 2 + 1:
            raise UserError(f"fno net: modes must lie in 1..{K // 2 + 1} for {K} levels, got {modes}")
        self.config = dict(kind="fno", dim=int(dim), levels=levels, sigma_max=float(sigma_max), hidden=int(hidden),
                           depth=int(depth), modes=modes, emb_dim=int(emb_dim), num_classes=int(num_classes))
        self.dim, self.K = int(dim), K
        sig = torch.tensor(levels, dtype=torch.float64)
        a = sig / torch.sqrt(1 + sig**2)
        a_T = float(sigma_max) / math.sqrt(1 + float(sigma_max) ** 2)
        self.register_buffer("c_noise_part", (a / a_T).float(), persistent=False)
        self.register_buffer("level_c", level_c(sig), persistent=False)
        self.embed = ConditionEmbedding(emb_dim, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(FiLMBlock(hidden, emb_dim) for _ in range(depth))
        self.temporal = nn.ModuleList(TemporalBlock(hidden, modes) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise=None, labels=None, cond=None, trajectory: bool = False) -> torch.Tensor:
        if cond is not None:
            raise UserError("the fno net takes no 'cond' input")
        B, K = x.shape[0], self.K
        flat = x.reshape(B, -1)
        if flat.shape[1] != self.dim:
            raise UserError(f"fno net built for {self.dim} values per sample got input of shape {tuple(x.shape)}")
        rows = flat.new_zeros(B * K)  # one row per (sample, level)
        if labels is not None:
            labels = torch.as_tensor(labels, device=x.device).reshape(-1).expand(B).repeat_interleave(K)
        emb = self.embed(rows, self.level_c.to(x.device).repeat(B), labels)
        h = self.inp(flat)[:, None, :].expand(B, K, -1)
        for block, temporal in zip(self.blocks, self.temporal):
            h = block(h.reshape(B * K, -1), emb).reshape(B, K, -1)
            h = temporal(h)
        out = self.out(F.silu(self.out_norm(h)))  # [B, K, dim]
        z = self.c_noise_part.to(out.dtype)[None, :, None] * flat[:, None, :].to(out.dtype) + out
        if trajectory:
            return z.reshape((B, K) + tuple(x.shape[1:]))
        return z[:, -1].reshape(x.shape)

