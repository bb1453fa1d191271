"""Differentiable generators x = g(phi) that score distillation sampling optimises
(:mod:`fewstep.methods.sds`): the parameters phi are trained, the teacher is not.

- :class:`PointsGenerator` (``"points"``): ``count`` learnable samples of the teacher's shape:
  the deterministic generator in its simplest form, x_i = phi_i.
- :class:`ImageGenerator` (``"image"``): ``count`` images, either a pixel grid per image
  (``param="pixels"``: x = tanh(phi), so the image stays in the data range [-1, 1]) or a small
  convolutional decoder from one fixed latent per image (``param="cnn"``: x = tanh(CNN_phi(z_i)),
  the z_i a seeded buffer, not trained).
- :class:`NerfGenerator` (``"nerf"``): a radiance field (:mod:`fewstep.nets.nerf`, a voxel grid
  or an MLP with positional encoding) rendered from cameras on a sphere
  (:mod:`fewstep.nets.cameras`): x = render(phi, camera). Renders at ``render_size`` and, when
  that differs from the teacher's ``size``, resized bilinearly to it (SJC does this for its
  pixel-space teachers; the coarse stage of coarse-to-fine renders small).

Each has ``config`` (JSON; :func:`build_generator` rebuilds it) and ``outputs(n, generator)``:
what ``fewstep sample`` returns (the first ``n`` points or images; ``n`` random views of the
field).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import unknown_name


class PointsGenerator(nn.Module):
    """``count`` learnable samples of shape ``shape``, started as ``init_std`` N(0, I) (seeded)."""

    def __init__(self, count: int, shape: Sequence[int], init_std: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.points = nn.Parameter(float(init_std) * torch.randn((int(count), *map(int, shape)), generator=g))
        self.config = {"kind": "points", "count": int(count), "shape": [int(s) for s in shape],
                       "init_std": float(init_std), "seed": int(seed)}

    @property
    def count(self) -> int:
        return self.points.shape[0]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.points[index]

    @torch.no_grad()
    def outputs(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.points[: int(n)].detach().clone()


class _Decoder(nn.Module):
    """z [n, latent] -> [n, C, size, size]: a linear map to a 4x4 (or smaller) map, then
    (nearest 2x upsampling, 3x3 convolution, SiLU) until the size, and a 3x3 output convolution."""

    def __init__(self, latent: int, channels: int, size: int, width: int = 64):
        super().__init__()
        start = size
        while start > 4 and start % 2 == 0:
            start //= 2
        self.start, self.width = start, width
        self.fc = nn.Linear(latent, width * start * start)
        ups = []
        s = start
        while s < size:
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
            s *= 2
        self.body = nn.Sequential(*ups)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.fc(z)).reshape(len(z), self.width, self.start, self.start)
        return self.out(self.body(h))


class ImageGenerator(nn.Module):
    """``count`` images ``[C, size, size]`` in [-1, 1]: tanh of a pixel grid (``pixels``) or of a
    small CNN's output from fixed seeded latents (``cnn``)."""

    PARAMS = ("pixels", "cnn")

    def __init__(self, count: int, channels: int, size: int, param: str = "pixels", latent: int = 64,
                 width: int = 64, init_std: float = 0.1, seed: int = 0):
        super().__init__()
        if param not in self.PARAMS:
            raise unknown_name("image generator parametrization", param, self.PARAMS)
        g = torch.Generator().manual_seed(int(seed))
        self.param = param
        if param == "pixels":
            self.raw = nn.Parameter(float(init_std) * torch.randn((int(count), int(channels), int(size), int(size)),
                                                                 generator=g))
        else:
            torch.manual_seed(int(seed))
            self.decoder = _Decoder(int(latent), int(channels), int(size), int(width))
            self.register_buffer("latents", torch.randn((int(count), int(latent)), generator=g))
        self.config = {"kind": "image", "count": int(count), "channels": int(channels), "size": int(size),
                       "param": param, "latent": int(latent), "width": int(width), "init_std": float(init_std),
                       "seed": int(seed)}

    @property
    def count(self) -> int:
        return int(self.config["count"])

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if self.param == "pixels":
            return torch.tanh(self.raw[index])
        return torch.tanh(self.decoder(self.latents[index]))

    @torch.no_grad()
    def outputs(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self(torch.arange(min(int(n), self.count), device=self._device())).detach().clone()

    def _device(self):
        return next(self.parameters()).device


class NerfGenerator(nn.Module):
    """A radiance field rendered from cameras: ``forward(origin, rotation) -> [n, C, size, size]``.

    ``field`` is a :func:`fewstep.nets.nerf.build_field` config; renders are ``render_size``
    pixels square with ``samples`` points per ray and the data's background, resized
    (bilinear) to the teacher's ``size`` when different; cameras at ``radius`` with field of
    view ``fov`` (degrees), drawn for training and for :meth:`outputs` with elevations in
    ``elevation`` (degrees) by :func:`fewstep.nets.cameras.random_orbit`."""

    def __init__(self, field: dict, channels: int, size: int, render_size: Optional[int] = None, samples: int = 48,
                 background: float = -1.0, radius: float = 3.0, fov: float = 45.0,
                 elevation: Sequence[float] = (-15.0, 60.0)):
        super().__init__()
        from .nerf import build_field

        self.field = build_field(dict(field))
        self.config = {"kind": "nerf", "field": dict(getattr(self.field, "config", field)), "channels": int(channels),
                       "size": int(size), "render_size": int(render_size or size), "samples": int(samples),
                       "background": float(background), "radius": float(radius), "fov": float(fov),
                       "elevation": [float(e) for e in elevation]}

    def cameras(self, origin: torch.Tensor, rotation: torch.Tensor):
        from .cameras import Cameras

        return Cameras(origin, rotation, self.config["fov"])

    def render(self, origin: torch.Tensor, rotation: torch.Tensor, size: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> dict:
        """The renderer's dict (image, opacity, depth) at ``size`` (default ``render_size``)."""
        from .nerf import render

        c = self.config
        return render(self.field, self.cameras(origin, rotation), int(size or c["render_size"]), samples=c["samples"],
                      background=c["background"], generator=generator)

    def forward(self, origin: torch.Tensor, rotation: torch.Tensor, generator: Optional[torch.Generator] = None,
                details: bool = False):
        """Renders at the teacher's size ``[n, C, size, size]``; with ``details`` also the
        renderer's dict (opacity, depth, per-sample weights at ``render_size``)."""
        out = self.render(origin, rotation, generator=generator)
        img = out["image"]
        if img.shape[-1] != self.config["size"]:
            img = F.interpolate(img, size=(self.config["size"],) * 2, mode="bilinear", align_corners=False)
        return (img, out) if details else img

    def draw_cameras(self, n: int, generator: Optional[torch.Generator] = None):
        from .cameras import random_orbit

        c = self.config
        return random_orbit(int(n), generator, radius=c["radius"], elevation=c["elevation"], fov=c["fov"])

    @torch.no_grad()
    def outputs(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        cams = self.draw_cameras(n, generator)
        dev = next(self.parameters()).device
        return self(cams.origin.to(dev), cams.rotation.to(dev)).detach()

    @torch.no_grad()
    def turntable(self, views: int = 8, elevation: float = 20.0) -> torch.Tensor:
        """``views`` renders evenly spaced in azimuth at one elevation, at the teacher's size."""
        from .cameras import turntable

        c = self.config
        cams = turntable(int(views), elevation, c["radius"], c["fov"])
        dev = next(self.parameters()).device
        return self(cams.origin.to(dev), cams.rotation.to(dev)).detach()


GENERATORS = {"points": PointsGenerator, "image": ImageGenerator, "nerf": NerfGenerator}


def build_generator(config: dict) -> nn.Module:
    """The generator described by ``config`` (``{"kind": ..., **kwargs}``), fresh parameters."""
    from . import build_from

    return build_from(GENERATORS, config, "generator")
