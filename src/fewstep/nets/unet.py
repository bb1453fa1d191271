"""A small UNet for images, after DDPM (Ho et al. 2020) and ADM (Dhariwal & Nichol 2021).

Encoder levels of GroupNorm/SiLU residual blocks conditioned by FiLM on the embedding of
``(c_noise, labels, cond)``, stride-2 downsampling, a middle block with self-attention,
and a mirrored decoder that concatenates the encoder's activations. Upsampling resizes to
the size of the matching skip, so odd sizes (28 -> 14 -> 7 -> 4 -> 7) work. The output
convolution and the last convolution of each block start at zero (ADM), so the untrained
net outputs 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .embed import ConditionEmbedding


def _groups(ch: int) -> int:
    """GroupNorm groups: the largest divisor of ``ch`` up to ``min(32, ch / 4)``."""
    limit = max(1, min(32, ch // 4))
    return max(g for g in range(1, limit + 1) if ch % g == 0)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(ch), ch)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """ADM residual block with scale-shift (FiLM) conditioning:

    ``h = conv1(silu(GN(x)))``, ``(s, b) = W silu(emb)``,
    ``out = skip(x) + conv2(dropout(silu(GN(h) (1 + s) + b)))``.
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the ``H W`` positions, heads of 32 channels:
    ``x + proj(softmax(Q K^T / sqrt(d)) V)`` with ``Q, K, V`` from ``GN(x)``."""

    def __init__(self, ch: int, head_dim: int = 32):
        super().__init__()
        self.heads = ch // head_dim if ch % head_dim == 0 else 1
        self.norm, self.qkv = _norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [b, heads, hw, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    """Attention of the ``H W`` positions to a text's token states (latent diffusion's
    conditioning, Rombach et al. 2022 eq. 3): ``x + proj(softmax(Q K^T / sqrt(d)) V)`` with
    ``Q`` from ``GN(x)`` and ``K, V`` from the states [B, L, D], padding tokens masked."""

    def __init__(self, ch: int, context_dim: int, head_dim: int = 32):
        super().__init__()
        self.heads = ch // head_dim if ch % head_dim == 0 else 1
        self.norm, self.q = _norm(ch), nn.Conv2d(ch, ch, 1)
        self.kv = nn.Linear(context_dim, 2 * ch)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q = self.q(self.norm(x)).reshape(b, self.heads, d, h * w).transpose(-1, -2)   # [b, heads, hw, d]
        k, v = self.kv(states.to(x.dtype)).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # [b, heads, L, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Block(nn.Module):
    """A residual block, followed by self-attention when ``attn`` (and then cross-attention to
    the text when the net has a ``context_dim``)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, attn: bool, context_dim: int = 0):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, dropout)
        self.attn = SelfAttention(cout) if attn else None
        self.cross = CrossAttention(cout, context_dim) if attn and context_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, text=None) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.cross is not None:
            x = self.cross(x, text[0], text[1])
        return x


class Downsample(nn.Conv2d):
    """Stride-2 3x3 convolution: ``H -> ceil(H / 2)``."""

    def __init__(self, ch: int):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the skip's size, then a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNet(nn.Module):
    """``F(x, c_noise, labels, cond)`` for images ``x`` of shape ``[B, C, H, W]``.

    Level ``i`` has ``base_channels * channel_mult[i]`` channels at resolution
    ``ceil(image_size / 2^i)``; self-attention follows each block whose resolution is in
    ``attn_resolutions`` (and always sits in the middle). ``image_size`` only places the
    attention: any input size works.
    """

    def __init__(self, in_channels: int, base_channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 num_classes: int = 0, use_cond: bool = False, image_size: int = 32,
                 out_channels: int | None = None, emb_dim: int | None = None, context_dim: int = 0,
                 context_length: int = 0):
        super().__init__()
        out_channels = int(out_channels or in_channels)
        emb_dim = int(emb_dim or 4 * base_channels)
        if bool(context_dim) != bool(context_length):
            raise ValueError("context_dim and context_length go together (a text encoder's state size and length)")
        if context_dim and num_classes:
            raise ValueError("a UNet takes class labels (num_classes) or a text context (context_dim), not both")
        self.config = dict(
            kind="unet", in_channels=int(in_channels), base_channels=int(base_channels),
            channel_mult=[int(m) for m in channel_mult], num_res_blocks=int(num_res_blocks),
            attn_resolutions=[int(r) for r in attn_resolutions], dropout=float(dropout),
            num_classes=int(num_classes), use_cond=bool(use_cond), image_size=int(image_size),
            out_channels=out_channels, emb_dim=emb_dim)
        if context_dim:
            self.config.update(context_dim=int(context_dim), context_length=int(context_length))
        self.in_channels, self.context_dim = int(in_channels), int(context_dim)
        self.embed = ConditionEmbedding(emb_dim, num_classes, use_cond)
        if context_dim:  # the text: pooled into the embedding, tokens through cross-attention
            self.pooled = nn.Linear(context_dim, emb_dim)
            self.register_buffer("null_context", torch.zeros(int(context_length), int(context_dim) + 1))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self._build(self.config)
        top = base_channels * channel_mult[0]
        self.out = nn.Sequential(_norm(top), nn.SiLU(),
                                 _zero(nn.Conv2d(top, out_channels, 3, padding=1)))

    def _build(self, cfg: dict) -> None:
        """Encoder, middle and decoder; the decoder consumes the encoder's outputs in
        reverse (``num_res_blocks + 1`` per level)."""
        base, mults, nrb = cfg["base_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
        ctx = int(cfg.get("context_dim", 0))

        def block(cin: int, cout: int, res: int) -> Block:
            return Block(cin, cout, cfg["emb_dim"], cfg["dropout"], res in cfg["attn_resolutions"], ctx)

        sizes = [cfg["image_size"]]
        for _ in mults[1:]:
            sizes.append(math.ceil(sizes[-1] / 2))
        ch, skips = base, [base]
        self.down = nn.ModuleList()
        for level, mult in enumerate(mults):
            for _ in range(nrb):
                self.down.append(block(ch, base * mult, sizes[level]))
                ch = base * mult
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self.mid = nn.ModuleList([Block(ch, ch, cfg["emb_dim"], cfg["dropout"], True, ctx),
                                  Block(ch, ch, cfg["emb_dim"], cfg["dropout"], False)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(mults))):
            for _ in range(nrb + 1):
                self.up.append(block(ch + skips.pop(), base * mults[level], sizes[level]))
                ch = base * mults[level]
            if level > 0:
                self.up.append(Upsample(ch))

    def forward(self, x: torch.Tensor, c_noise, labels=None, cond=None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise UserError(f"UNet built for [B, {self.in_channels}, H, W] images got input "
                            f"of shape {tuple(x.shape)}; rebuild it with the data's channels")
        text = None
        if self.context_dim:
            text = self.text(labels, x.shape[0], x.device)
            emb = self.embed(x, c_noise, None, cond) + self.pooled(text[2].to(x.dtype))
        else:
            emb = self.embed(x, c_noise, labels, cond)
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h) if isinstance(m, Downsample) else m(h, emb, text)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb, text)
        for m in self.up:
            if isinstance(m, Upsample):
                h = m(h, hs[-1].shape[-2:])
            else:
                h = m(torch.cat([h, hs.pop()], dim=1), emb, text)
        return self.out(h)

    def text(self, labels, batch: int, device) -> tuple:
        """(token states [B, L, D], token mask [B, L], pooled [B, D]) of a text context
        ``labels`` [B, L, D + 1] (the states and the mask as the last channel, as
        :func:`text_context` packs them); a row of -1 (a dropped or null label, as classifier-free
        guidance makes them) or no labels: the null prompt (the ``null_context`` buffer)."""
        L, D = self.null_context.shape[0], self.context_dim
        if labels is None:
            ctx = self.null_context.expand(batch, L, D + 1)
        else:
            ctx = torch.as_tensor(labels, device=device)
            if ctx.ndim != 3 or ctx.shape[0] != batch or ctx.shape[2] != D + 1 or ctx.shape[1] != L:
                raise UserError(f"a text UNet needs its context as labels [batch, {L}, {D + 1}] (token states and "
                                f"mask), got {list(ctx.shape)}; give a prompt")
            null = (ctx[..., -1] < 0).all(1)
            if bool(null.any()):
                ctx = torch.where(null[:, None, None], self.null_context.to(ctx.dtype).expand_as(ctx), ctx)
        states, mask = ctx[..., :D].float(), ctx[..., D] > 0.5
        mask = mask | ~mask.any(1, keepdim=True)  # an empty mask would leave the attention undefined
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return states, mask, pooled


def text_context(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A text embedding's token states [B, L, D] and mask [B, L] as one tensor [B, L, D + 1]
    (the form the samplers, the runner and classifier-free guidance carry as ``labels``; -1
    everywhere means the null prompt)."""
    return torch.cat([states.float() * mask[..., None], mask[..., None].float()], dim=-1)


def drop_to_null(context: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``context`` [B, ...] with the rows where ``drop`` [B] is true replaced by -1: the null
    prompt of a text net (label dropout for classifier-free guidance)."""
    return torch.where(drop.reshape(-1, *([1] * (context.ndim - 1))), torch.full_like(context, -1.0), context)
