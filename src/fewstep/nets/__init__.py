"""Networks: MLP for low-dimensional data, a small UNet for images, a point-cloud net.

Every net is called as ``net(x, c_noise, labels=None, cond=None)`` and returns a tensor
shaped like ``x``; it carries ``net.config``, a JSON-serialisable dict with which
:func:`build_net` rebuilds it (same architecture; load the state dict for the weights).
"""
from __future__ import annotations

import inspect
from typing import Sequence

from torch import nn

from ..errors import UserError, unknown_name
from .embed import ConditionEmbedding, SinusoidalEmbedding
from .fno import OperatorNet
from .mlp import MLP
from .pointnet import PointNet
from .prodiff import ProDiffNet
from .unet import UNet

NETS = {"mlp": MLP, "unet": UNet, "pointnet": PointNet, "prodiff": ProDiffNet, "fno": OperatorNet}


def build_from(registry: dict, config: dict, what: str, refused: tuple = (TypeError,)) -> nn.Module:
    """The module ``registry[config["kind"]](**rest)`` with fresh parameters; a config that is
    not an object, an unknown kind, options the class does not take, or an error of the types
    ``refused`` from the class are one :class:`~fewstep.errors.UserError` line each (``what``:
    e.g. "network", "field"); other errors pass to the caller (model.json's loader names the
    file and field)."""
    if not isinstance(config, dict):
        raise UserError(f"{what} config must be an object with a \"kind\" ({', '.join(registry)}), got {config!r}")
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in registry:
        raise unknown_name(f"{what} kind", kind, registry)
    cls = registry[kind]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    extra = sorted(set(config) - set(accepted))
    if extra:
        raise UserError(f"{what} config for '{kind}': unknown option(s) {', '.join(extra)}; "
                        f"valid: {', '.join(accepted)}")
    try:
        return cls(**config)
    except refused as err:
        raise UserError(f"{what} config for '{kind}': {err}") from None


def build_net(config: dict) -> nn.Module:
    """Build the net described by ``config = {"kind": "mlp" | "unet" | "pointnet", **kwargs}``."""
    return build_from(NETS, config, "network")


def _unet_defaults(shape: Sequence[int]) -> dict:
    """Small UNets for CPU at 8-16 px (~1-1.7M parameters), ~9M parameters (a GPU size)
    from 28 px up."""
    channels, size = int(shape[0]), max(int(shape[1]), int(shape[2]))
    cfg = dict(kind="unet", in_channels=channels, image_size=size, num_res_blocks=2,
               attn_resolutions=[], dropout=0.0)
    if size <= 8:
        cfg.update(base_channels=32, channel_mult=[1, 2])
    elif size <= 16:
        cfg.update(base_channels=32, channel_mult=[1, 2, 2])
    elif size <= 32:
        cfg.update(base_channels=64, channel_mult=[1, 2, 2, 2], dropout=0.1)
    else:
        cfg.update(base_channels=64, channel_mult=[1, 2, 2, 2], attn_resolutions=[16],
                   dropout=0.1)
    return cfg


def net_config_defaults(kind: str, shape: Sequence[int], num_classes: int = 0,
                        use_cond: bool = False) -> dict:
    """A sensible default config for data of ``kind`` ('points', 'clouds' or 'image') and
    per-sample ``shape``: an MLP (hidden 256, depth 4) for points, a permutation-equivariant
    PointNet for clouds [N, D], a small UNet for images."""
    if kind == "points":
        dim = 1
        for s in shape:
            dim *= int(s)
        cfg = dict(kind="mlp", dim=dim, hidden=256 if dim <= 64 else 512, depth=4, emb_dim=128)
    elif kind == "clouds":
        cfg = dict(kind="pointnet", dim=int(shape[-1]), hidden=128, depth=4, emb_dim=128)
    elif kind == "image":
        if len(shape) != 3:
            raise UserError(f"image data must have per-sample shape [C, H, W], got {tuple(shape)}")
        cfg = _unet_defaults(shape)
    else:
        raise unknown_name("data kind", kind, ["points", "clouds", "image"])
    cfg.update(num_classes=int(num_classes), use_cond=bool(use_cond))
    return cfg


__all__ = ["MLP", "UNet", "PointNet", "NETS", "build_net", "net_config_defaults",
           "ConditionEmbedding", "SinusoidalEmbedding"]
