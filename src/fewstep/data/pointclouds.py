"""Procedural 3-D point clouds: surfaces of simple solids, N points per cloud.

Spec (``fewstep.data.registry.load_dataset``)::

    pointclouds                                  every class, 256 points, random rotation
    pointclouds:points=512,classes=sphere+torus,pose=yaw

Options: ``points`` (N per cloud, default 256; the point-cloud literature uses 2048),
``classes`` (``+``-joined names from :data:`CLASSES`, default all), ``pose`` (``so3``: a
uniformly random rotation, the default; ``yaw``: about the z axis; ``none``).

Each cloud is ``N`` points drawn uniformly by area on the surface of its class's solid in
a canonical frame, stretched by a random aspect ``diag(a)`` (``log a_k ~ U(-0.25, 0.25)``),
scaled by ``s ~ U(0.75, 1.1)``, rotated by ``R`` and centred (its point mean removed):

    x_i = R (s a * p_i) - mean_j R (s a * p_j),    p_i ~ Uniform(surface).

The label is the class index. Area-uniform sampling: the sphere by normalised Gaussians;
the cube by a face chosen uniformly (equal areas); the torus ``(R0 + r cos v)`` weighted
by rejection; the cylinder's side and caps chosen in proportion to their areas; the cone's
side by a radial fraction ``sqrt(u)`` from the apex.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import UserError, unknown_name

DEFAULT_POINTS = 256
DEFAULT_CLOUDS = 2000
POSES = ("so3", "yaw", "none")


# ------------------------------------------------------------------- canonical surfaces
def _sphere(k: int, n: int, g: torch.Generator) -> torch.Tensor:
    p = torch.randn(k, n, 3, generator=g, dtype=torch.float64)
    return 0.8 * p / p.norm(dim=-1, keepdim=True)


def _cube(k: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Surface of [-0.6, 0.6]^3: a face (axis, sign) uniformly, then uniform on the face."""
    p = 2 * torch.rand(k, n, 3, generator=g, dtype=torch.float64) - 1
    axis = torch.randint(0, 3, (k, n, 1), generator=g)
    sign = torch.randint(0, 2, (k, n, 1), generator=g).to(torch.float64) * 2 - 1
    p = p.scatter(2, axis, sign)
    return 0.6 * p


def _torus(k: int, n: int, g: torch.Generator, R0: float = 0.65, r: float = 0.25) -> torch.Tensor:
    """Area element (R0 + r cos v) du dv: v by rejection against (R0 + r cos v) / (R0 + r)."""
    v = torch.empty(k * n, dtype=torch.float64)
    filled = 0
    while filled < k * n:
        cand = 2 * math.pi * torch.rand(2 * (k * n - filled) + 16, generator=g, dtype=torch.float64)
        keep = cand[torch.rand(len(cand), generator=g, dtype=torch.float64) * (R0 + r) < R0 + r * cand.cos()]
        take = keep[: k * n - filled]
        v[filled:filled + len(take)] = take
        filled += len(take)
    v = v.reshape(k, n)
    u = 2 * math.pi * torch.rand(k, n, generator=g, dtype=torch.float64)
    rho = R0 + r * v.cos()
    return torch.stack([rho * u.cos(), rho * u.sin(), r * v.sin()], -1)


def _cylinder(k: int, n: int, g: torch.Generator, r: float = 0.45, h: float = 1.3) -> torch.Tensor:
    """Side (area 2 pi r h) and two caps (pi r^2 each), chosen in proportion to area."""
    side_p = h / (h + r)
    u = 2 * math.pi * torch.rand(k, n, generator=g, dtype=torch.float64)
    on_side = torch.rand(k, n, generator=g, dtype=torch.float64) < side_p
    z_side = (torch.rand(k, n, generator=g, dtype=torch.float64) - 0.5) * h
    rad_cap = r * torch.rand(k, n, generator=g, dtype=torch.float64).sqrt()
    z_cap = 0.5 * h * (2 * torch.randint(0, 2, (k, n), generator=g).to(torch.float64) - 1)
    rad = torch.where(on_side, torch.full_like(u, r), rad_cap)
    z = torch.where(on_side, z_side, z_cap)
    return torch.stack([rad * u.cos(), rad * u.sin(), z], -1)


def _cone(k: int, n: int, g: torch.Generator, r: float = 0.6, h: float = 1.3) -> torch.Tensor:
    """Lateral surface, apex at z = h/2: the distance fraction from the apex is sqrt(U)."""
    f = torch.rand(k, n, generator=g, dtype=torch.float64).sqrt()
    u = 2 * math.pi * torch.rand(k, n, generator=g, dtype=torch.float64)
    return torch.stack([r * f * u.cos(), r * f * u.sin(), 0.5 * h - h * f], -1)


CLASSES = {"sphere": _sphere, "cube": _cube, "torus": _torus, "cylinder": _cylinder, "cone": _cone}


# ------------------------------------------------------------------------------- poses
def random_rotations(k: int, pose: str, g: torch.Generator) -> torch.Tensor:
    """[k, 3, 3] rotations: Haar-uniform on SO(3) (QR of a Gaussian matrix, signs fixed by
    diag(R), det made +1 by a reflection of one column), about z, or the identity."""
    if pose == "none":
        return torch.eye(3, dtype=torch.float64).expand(k, 3, 3).clone()
    if pose == "yaw":
        a = 2 * math.pi * torch.rand(k, generator=g, dtype=torch.float64)
        c, s, z, o = a.cos(), a.sin(), torch.zeros(k, dtype=torch.float64), torch.ones(k, dtype=torch.float64)
        return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], 1)
    if pose != "so3":
        raise unknown_name("point-cloud pose", pose, POSES)
    q, r = torch.linalg.qr(torch.randn(k, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)
    flip = torch.linalg.det(q) < 0
    q[flip, :, 0] = -q[flip, :, 0]
    return q


def make_clouds(n: int, points: int = DEFAULT_POINTS, classes=tuple(CLASSES), pose: str = "so3",
                generator: Optional[torch.Generator] = None):
    """``(x [n, points, 3] float32, labels [n], len(classes))``: classes drawn uniformly."""
    for c in classes:
        if c not in CLASSES:
            raise unknown_name("point-cloud class", c, CLASSES)
    if pose not in POSES:
        raise unknown_name("point-cloud pose", pose, POSES)
    g = generator or torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(classes), (n,), generator=g)
    x = torch.empty(n, points, 3, dtype=torch.float64)
    for j, c in enumerate(classes):
        idx = (labels == j).nonzero().squeeze(1)
        if len(idx):
            x[idx] = CLASSES[c](len(idx), points, g)
    aspect = torch.exp(0.5 * torch.rand(n, 1, 3, generator=g, dtype=torch.float64) - 0.25)
    scale = 0.75 + 0.35 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    x = (scale * aspect * x) @ random_rotations(n, pose, g).transpose(1, 2)
    x = x - x.mean(1, keepdim=True)
    return x.float(), labels, len(classes)


# -------------------------------------------------------------------------------- spec
def spec_options(spec: str, keys, usage: str):
    """The ``(key, value)`` pairs of ``name:key=value,...``; an item without ``=`` or with a key
    not in ``keys`` is one line naming ``usage``."""
    _, _, rest = spec.partition(":")
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in keys:
            raise UserError(f"dataset '{spec}': bad option '{item}'; use {usage}")
        yield key, value


def spec_int(spec: str, key: str, value: str, low: int, high: Optional[int] = None, need: str = "") -> int:
    """``key=value`` as a whole number in [low, high]; else one line (``need`` says what it is)."""
    try:
        v = int(value)
    except ValueError:
        raise UserError(f"dataset '{spec}': {key}={value} is not an integer") from None
    if v < low or (high is not None and v > high):
        raise UserError(f"dataset '{spec}': {key}={value}; {need}")
    return v


def spec_classes(spec: str, value: str, what: str) -> tuple:
    """``a+b`` as a tuple of names of :data:`CLASSES` (one line for none or an unknown one)."""
    names = tuple(v for v in value.split("+") if v)
    if not names:
        raise UserError(f"dataset '{spec}': classes= is empty; name some of {', '.join(CLASSES)}")
    for c in names:
        if c not in CLASSES:
            raise unknown_name(what, c, CLASSES)
    return names


def parse_spec(spec: str) -> dict:
    """``pointclouds[:points=N,classes=a+b,pose=P]`` -> make_clouds keyword arguments."""
    opts = {"points": DEFAULT_POINTS, "classes": tuple(CLASSES), "pose": "so3"}
    for key, value in spec_options(spec, opts, "pointclouds:points=N,classes=a+b,pose=so3|yaw|none"):
        if key == "points":
            opts["points"] = spec_int(spec, key, value, 2, need="a cloud needs at least 2 points")
        elif key == "classes":
            opts["classes"] = spec_classes(spec, value, "point-cloud class")
        else:
            if value not in POSES:
                raise unknown_name("point-cloud pose", value, POSES)
            opts["pose"] = value
    return opts


def is_spec(spec: str) -> bool:
    return spec == "pointclouds" or spec.startswith("pointclouds:")


def load(spec: str, n: Optional[int], generator: torch.Generator):
    """The (x, labels, num_classes) triple of a ``pointclouds`` spec, ``n`` clouds."""
    return make_clouds(DEFAULT_CLOUDS if n is None else n, generator=generator, **parse_spec(spec))
