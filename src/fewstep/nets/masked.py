"""Masked networks for autoregressive models (survey sec. 1, eq. 1): every output of
coordinate i depends only on the coordinates before i in a fixed order.

- :class:`MADE` (Germain et al. 2015, "MADE: Masked Autoencoder for Distribution
  Estimation"): a fully connected net whose weight matrices are multiplied by binary
  masks built from *degrees*, with the natural ordering. Input j has degree j + 1, hidden
  unit k a degree m(k) in 1..d-1 (assigned cyclically, so every layer holds every degree
  when it is at least d - 1 wide), output coordinate i degree i + 1. A connection u -> v
  exists iff m(v) >= m(u) into a hidden unit and iff m(v) > m(u) into an output (the
  paper's mask rules); so output i sees inputs j < i only, and output 0 sees none (a
  learned constant, its bias). An optional direct input -> output connection (the paper's
  direct connections) has the strictly lower-triangular mask.
- :class:`PixelCNN` (van den Oord et al. 2016, "Pixel Recurrent Neural Networks",
  sec. 3.3-3.5): masked convolutions over an image [C, H, W] in raster order (row by row,
  left to right) **with the channels of a pixel in order too** (channel 0, then 1, ...;
  R, G, B in the paper). Feature maps are split into C contiguous groups; at the kernel
  centre, group g of a layer's output sees the input groups < g (mask A, the first layer)
  or <= g (mask B, every later layer); kernel positions before the centre in raster order
  are fully connected, those after it not at all. Coordinate (h, w, c) thus sees every
  channel of the pixels before (h, w) within the receptive field (this plain PixelCNN has
  the blind spot above-right that the gated PixelCNN of van den Oord et al. 2016b removes)
  and the channels < c of its own pixel. A 7x7
  mask-A convolution, a stack of residual blocks ``h + conv1x1_B(relu(conv3x3_B(relu h)))``
  (a simpler form of the paper's residual block, Fig. 5: 1x1, 3x3, 1x1 at half width) and
  two 1x1 mask-B output layers.
  No normalisation layer: GroupNorm or BatchNorm statistics would mix later pixels (and
  later channel groups) into earlier outputs.

Both output P parameters per coordinate: MADE ``[B, d, P]``, PixelCNN ``[B, C, H, W, P]``
(the distribution's parameters, not an x-shaped tensor; so these nets are not in
:data:`fewstep.nets.NETS`). Each carries ``.config``, from which :func:`build_masked`
rebuilds it; the masks are buffers rebuilt from the config, not saved weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, build_named


def _positive(name: str, value, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise UserError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class MaskedLinear(nn.Linear):
    """``y = x (W * M)^T + b`` with a fixed binary mask ``M [out, in]`` (a MADE layer)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if mask.shape != (out_features, in_features):
            raise ValueError(f"mask of shape {tuple(mask.shape)} for a {in_features} -> {out_features} layer")
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def made_degrees(dim: int, width: int) -> torch.Tensor:
    """Degrees of a hidden layer of ``width`` units: 1..max(d-1, 1), cyclically."""
    return torch.arange(width) % max(dim - 1, 1) + 1


class MADE(nn.Module):
    """``net(x [B, dim]) -> [B, dim, params]``, output i a function of ``x[:, :i]`` only.

    ``depth`` hidden layers of ``hidden`` ReLU units (the paper's activation), the masks
    of the module docstring, and a direct masked input -> output layer when ``direct``.
    """

    def __init__(self, dim: int, params: int, hidden: int = 256, depth: int = 2, direct: bool = True):
        super().__init__()
        where = "MADE"
        dim, params = _positive("dim", dim, where), _positive("params", params, where)
        hidden, depth = _positive("hidden", hidden, where), _positive("depth", depth, where)
        self.config = dict(kind="made", dim=dim, params=params, hidden=hidden, depth=depth, direct=bool(direct))
        self.dim, self.params = dim, params
        d_in = torch.arange(dim) + 1                       # input degrees 1..d
        d_out = (torch.arange(dim) + 1).repeat_interleave(params)  # output (i, p) has degree i + 1
        d_hid = made_degrees(dim, hidden)
        layers, prev = [], d_in
        for _ in range(depth):
            layers.append(MaskedLinear(len(prev), hidden, (d_hid[:, None] >= prev[None, :]).float()))
            prev = d_hid
        self.hidden = nn.ModuleList(layers)
        self.out = MaskedLinear(hidden, dim * params, (d_out[:, None] > d_hid[None, :]).float())
        self.direct = (MaskedLinear(dim, dim * params, (d_out[:, None] > d_in[None, :]).float(), bias=False)
                       if direct else None)

    def output_bias(self) -> torch.Tensor:
        """The output layer's bias as ``[dim, params]`` (a view: the constant part of each
        coordinate's parameters)."""
        return self.out.bias.view(self.dim, self.params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise UserError(f"MADE built for {self.dim} coordinates got input of shape {tuple(x.shape)}")
        h = x
        for layer in self.hidden:
            h = F.relu(layer(h))
        y = self.out(h)
        if self.direct is not None:
            y = y + self.direct(x)
        return y.view(x.shape[0], self.dim, self.params)


def _groups(channels: int, groups: int) -> torch.Tensor:
    """Channel k of ``channels`` belongs to group k * groups // channels (contiguous)."""
    return torch.arange(channels) * groups // channels


def pixel_mask(cin: int, cout: int, kernel: int, groups: int, mask_type: str,
               in_groups: torch.Tensor | None = None, out_groups: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[cout, cin, k, k]`` mask of van den Oord et al. 2016 (sec. 3.4): positions
    before the centre in raster order on, after it off; at the centre out group g sees in
    groups < g (type ``'A'``) or <= g (type ``'B'``)."""
    gi = _groups(cin, groups) if in_groups is None else in_groups
    go = _groups(cout, groups) if out_groups is None else out_groups
    m = torch.zeros(cout, cin, kernel, kernel)
    c = kernel // 2
    m[:, :, :c, :] = 1.0
    m[:, :, c, :c] = 1.0
    centre = go[:, None] > gi[None, :] if mask_type == "A" else go[:, None] >= gi[None, :]
    m[:, :, c, c] = centre.float()
    return m


class MaskedConv2d(nn.Conv2d):
    """A same-padded convolution with a fixed mask on its kernel (PixelCNN)."""

    def __init__(self, cin: int, cout: int, kernel: int, mask: torch.Tensor):
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ResidualMaskedBlock(nn.Module):
    """``h + conv1x1_B(relu(conv3x3_B(relu(h))))`` (both masks of type B)."""

    def __init__(self, hidden: int, groups: int):
        super().__init__()
        self.conv = MaskedConv2d(hidden, hidden, 3, pixel_mask(hidden, hidden, 3, groups, "B"))
        self.mix = MaskedConv2d(hidden, hidden, 1, pixel_mask(hidden, hidden, 1, groups, "B"))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mix(F.relu(self.conv(F.relu(h))))


class PixelCNN(nn.Module):
    """``net(x [B, C, H, W]) -> [B, C, H, W, params]`` in raster order, channels in order.

    ``hidden`` feature maps (at least C: each channel's group must be non-empty),
    ``blocks`` residual blocks, a first mask-A convolution of ``kernel`` (odd) size.
    """

    def __init__(self, channels: int, params: int, hidden: int = 64, blocks: int = 4, kernel: int = 7):
        super().__init__()
        where = "PixelCNN"
        channels, params = _positive("channels", channels, where), _positive("params", params, where)
        hidden, blocks = _positive("hidden", hidden, where, channels), _positive("blocks", blocks, where, 0)
        kernel = _positive("kernel", kernel, where)
        if kernel % 2 == 0:
            raise UserError(f"PixelCNN: kernel must be odd (a centre pixel), got {kernel}")
        self.config = dict(kind="pixelcnn", channels=channels, params=params, hidden=hidden, blocks=blocks,
                           kernel=kernel)
        self.channels, self.params = channels, params
        C = channels
        self.inp = MaskedConv2d(C, hidden, kernel, pixel_mask(C, hidden, kernel, C, "A"))
        self.blocks = nn.ModuleList(ResidualMaskedBlock(hidden, C) for _ in range(blocks))
        self.head = MaskedConv2d(hidden, hidden, 1, pixel_mask(hidden, hidden, 1, C, "B"))
        # output channel c * params + p belongs to channel c's group
        out_groups = torch.arange(C).repeat_interleave(params)
        self.out = MaskedConv2d(hidden, C * params, 1,
                                pixel_mask(hidden, C * params, 1, C, "B", out_groups=out_groups))

    def output_bias(self) -> torch.Tensor:
        """The output layer's bias as ``[channels, params]`` (a view)."""
        return self.out.bias.view(self.channels, self.params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise UserError(f"PixelCNN built for {self.channels}-channel images [B, C, H, W] got input of "
                            f"shape {tuple(x.shape)}")
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        y = self.out(F.relu(self.head(F.relu(h))))  # [B, C * P, H, W]
        B, _, H, W = y.shape
        return y.view(B, self.channels, self.params, H, W).permute(0, 1, 3, 4, 2)


MASKED_NETS = {"made": MADE, "pixelcnn": PixelCNN}


def build_masked(config: dict) -> nn.Module:
    """Rebuild a masked net from its ``.config`` (``{"kind": "made" | "pixelcnn", ...}``)."""
    config = dict(config)
    return build_named(MASKED_NETS, config.pop("kind", None), "masked network", config)
