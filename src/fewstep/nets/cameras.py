"""Pinhole cameras on a sphere around the origin: the one camera model of the render data
set (:mod:`fewstep.data.renders`) and of the NeRF renderer (:mod:`fewstep.nets.nerf`).

World frame: z up. A camera sits at ``origin`` and looks at the world origin; its rotation
``rotation[:, :, k]`` holds the camera's axes in world coordinates, columns (right, up,
back): the view direction is ``-back`` (the OpenGL convention). A pixel (row, col) of a
``size x size`` image, centres at ``(col + 0.5) / size`` etc., maps to the camera-frame
direction ``(u tan(fov/2), -v tan(fov/2), -1)`` with ``u, v`` in ``(-1, 1)`` left to right
and top to bottom. :meth:`Cameras.project` is the exact inverse of :meth:`Cameras.rays`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

DEFAULT_RADIUS = 3.0
DEFAULT_FOV = 45.0  # degrees, full vertical (= horizontal) field of view
DEFAULT_ELEVATION = (-15.0, 60.0)  # degrees above the xy-plane


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def look_at(origins: torch.Tensor) -> torch.Tensor:
    """Rotations ``[n, 3, 3]`` (columns right, up, back) of cameras at ``origins [n, 3]``
    looking at the world origin with z up (a camera straight above uses y as its up)."""
    back = _unit(origins)
    z = torch.zeros_like(back)
    z[:, 2] = 1.0
    polar = back[:, 2].abs() > 1 - 1e-6
    z[polar] = torch.tensor([0.0, 1.0, 0.0], dtype=back.dtype, device=back.device)
    right = _unit(torch.cross(z, back, dim=-1))
    up = torch.cross(back, right, dim=-1)
    return torch.stack([right, up, back], dim=-1)


@dataclass
class Cameras:
    """``n`` cameras: ``origin [n, 3]``, ``rotation [n, 3, 3]`` (see the module docstring),
    a common field of view ``fov`` in degrees."""

    origin: torch.Tensor
    rotation: torch.Tensor
    fov: float = DEFAULT_FOV

    def __len__(self) -> int:
        return self.origin.shape[0]

    @property
    def focal(self) -> float:
        """``1 / tan(fov / 2)``: image-plane units per unit of lateral offset at depth 1."""
        return 1.0 / math.tan(math.radians(self.fov) / 2)

    def to(self, device=None, dtype=None) -> "Cameras":
        return Cameras(self.origin.to(device=device, dtype=dtype), self.rotation.to(device=device, dtype=dtype), self.fov)

    def rays(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions, each ``[n, size, size, 3]`` (world frame)."""
        dtype, device = self.origin.dtype, self.origin.device
        c = (torch.arange(size, dtype=dtype, device=device) + 0.5) / size * 2 - 1
        v, u = torch.meshgrid(c, c, indexing="ij")
        cam = torch.stack([u / self.focal, -v / self.focal, -torch.ones_like(u)], dim=-1)  # [H, W, 3]
        d = _unit(torch.einsum("nij,hwj->nhwi", self.rotation, cam))
        o = self.origin[:, None, None, :].expand_as(d)
        return o, d

    def project(self, points: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Points ``[n, P, 3]`` (world) -> (col, row, depth), each ``[n, P]``: continuous pixel
        coordinates (pixel k covers [k, k+1)) and the distance in front of the camera along
        its view axis (negative behind it)."""
        local = torch.einsum("nji,npj->npi", self.rotation, points - self.origin[:, None, :])
        depth = -local[..., 2]
        safe = depth.clamp_min(1e-9)
        u = local[..., 0] / safe * self.focal
        v = -local[..., 1] / safe * self.focal
        return (u + 1) / 2 * size, (v + 1) / 2 * size, depth


def orbit(azimuth: torch.Tensor, elevation: torch.Tensor, radius: float = DEFAULT_RADIUS,
          fov: float = DEFAULT_FOV) -> Cameras:
    """Cameras at the given azimuths and elevations (radians, ``[n]``) on a sphere of
    ``radius`` around the origin, looking at it."""
    azimuth, elevation = torch.as_tensor(azimuth), torch.as_tensor(elevation)
    origin = radius * torch.stack([torch.cos(elevation) * torch.cos(azimuth),
                                   torch.cos(elevation) * torch.sin(azimuth),
                                   torch.sin(elevation)], dim=-1)
    return Cameras(origin, look_at(origin), float(fov))


def random_orbit(n: int, generator: Optional[torch.Generator] = None, radius: float = DEFAULT_RADIUS,
                 elevation: Sequence[float] = DEFAULT_ELEVATION, fov: float = DEFAULT_FOV,
                 dtype=torch.float32) -> Cameras:
    """``n`` random views: azimuth uniform on the circle, elevation (degrees) drawn so that
    the cameras are uniform in area on the sphere's band between ``elevation[0]`` and
    ``elevation[1]``."""
    lo, hi = (math.sin(math.radians(e)) for e in elevation)
    az = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    el = torch.asin(lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64))
    cams = orbit(az, el, radius, fov)
    return cams.to(dtype=dtype)


def turntable(n: int = 8, elevation: float = 20.0, radius: float = DEFAULT_RADIUS, fov: float = DEFAULT_FOV,
              dtype=torch.float32) -> Cameras:
    """``n`` views evenly spaced in azimuth at one elevation (degrees): a turntable strip."""
    az = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    el = torch.full((n,), math.radians(elevation), dtype=torch.float64)
    return orbit(az, el, radius, fov).to(dtype=dtype)
