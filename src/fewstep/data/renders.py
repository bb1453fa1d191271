"""Labelled multi-view renders of the procedural 3-D shapes: the image set a class-conditional
teacher is trained on, and that a radiance field is later distilled from by score
distillation sampling (the "prompt" is the class label).

Spec (``fewstep.data.registry.load_dataset``, default 10000 images)::

    renders                                      every class, 32x32, colour by position
    renders:classes=sphere+torus,size=16,pose=yaw,shade=depth,elevation=0+45

Options: ``classes`` (``+``-joined names of :data:`fewstep.data.pointclouds.CLASSES`,
default all), ``size`` (pixels, 8..128, default 32), ``pose`` (``none``, the default: the
object upright in its canonical orientation; ``yaw``: a random turn about the z axis),
``shade`` (``position``, the default: 3 channels; ``depth``: 1 channel), ``elevation``
(``LO+HI`` degrees of the camera band, default ``-15+60``).

One image: a class drawn uniformly, one instance of it exactly as
:func:`~fewstep.data.pointclouds.make_clouds` makes a cloud (area-uniform surface points,
random aspect and scale, centred), then shrunk if needed so that it lies in the unit ball
(hence in ``[-1, 1]^3`` and, at the camera distance 3 and 45 degree field of view, inside
the frame), turned by the pose, and seen by one camera of
:func:`fewstep.nets.cameras.random_orbit` -- the camera model the NeRF renderer uses, so a
field rendered with the same cameras can reproduce the images.

Rendering is z-buffer point splatting at ``supersample`` times the size: every surface
point falls in one fine pixel, the nearest point of each fine pixel wins (one
``scatter_reduce(amin)`` over the batch on a key packing quantised depth and point index),
a gap between the random points (an empty or see-through fine pixel farther than most of
its 8 neighbours by more than :data:`HOLE_DEPTH`: :func:`_fill_holes`) takes its nearest
neighbour's point, and the fine image is average-pooled to ``size`` (anti-aliased edges).
Values, in ``[-1, 1]`` like every image set:

- background exactly ``-1`` where no surface point projects;
- ``shade=position``: ``0.1 + 0.9 q`` per channel, ``q`` the surface point in the
  object's own frame (after aspect and scale, before the pose turn; ``|q| <= 1``), so in
  ``[-0.8, 1]``: a view-independent colour field, the same map for every class (a
  classifier must read shape, and a field with view-independent colour can represent the
  renders, up to the splatting's edge error below);
- ``shade=depth``: ``-0.8 + 1.8 b`` with ``b = (radius + 1 - depth) / 2`` clamped to
  ``[0, 1]``, ``radius`` the camera's distance from the origin (3) and ``depth`` the
  distance along its view axis (near bright: the nearest possible surface point, at depth
  ``radius - 1``, is ``1``, the farthest ``-0.8``).

Point counts: :data:`POINTS_PER_PIXEL` points per fine pixel of the image, enough that
(with the hole fill) a surface has no holes. Splatting marks a fine pixel covered when any
point falls in it, so silhouettes are dilated by up to one fine pixel (a disc of radius
``R`` output pixels covers between ``pi R^2`` and ``pi R^2 + 4 R h + h^2``, ``h =
1 / supersample``: the area of the fine pixels it touches). The cone is its lateral
surface only, as in the point clouds, so a view from below sees into it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError, unknown_name
from ..nets.cameras import DEFAULT_ELEVATION, DEFAULT_FOV, DEFAULT_RADIUS, Cameras, random_orbit
from .pointclouds import CLASSES, make_clouds, random_rotations, spec_classes, spec_int, spec_options

DEFAULT_SIZE = 32
DEFAULT_RENDERS = 10000
POSES = ("none", "yaw")
SHADES = ("position", "depth")
MIN_SIZE, MAX_SIZE = 8, 128
SUPERSAMPLE = 2
POINTS_PER_PIXEL = 8
HOLE_DEPTH = 0.1  # world units: how much farther than its neighbours a fine pixel must be to be a gap
BACKGROUND = -1.0
_CHUNK_POINTS = 1_000_000  # surface points rendered at once (bounds memory: ~0.4 GB)
_INDEX_BITS = 24  # the z-buffer key: quantised depth << 24 | point index
_DEPTH_STEPS = float(1 << 20)  # depth quantum 2^-20 world units
_EMPTY = 1 << 62


# ------------------------------------------------------------------------- the splatter
def _zbuffer(points: torch.Tensor, cameras: Cameras, fine: int) -> torch.Tensor:
    """Keys ``[n, fine, fine]`` (int64) of the nearest point per fine pixel: ``depth_q << 24 |
    index``, ``_EMPTY`` where no point falls."""
    n, p, _ = points.shape
    if p >= 1 << _INDEX_BITS:
        raise UserError(f"renders: {p} points per object; at most {(1 << _INDEX_BITS) - 1} fit the z-buffer key")
    col, row, depth = cameras.project(points, fine)
    ix, iy = col.floor().long(), row.floor().long()
    ok = (ix >= 0) & (ix < fine) & (iy >= 0) & (iy < fine) & (depth > 0)
    key = ((depth.clamp_min(0) * _DEPTH_STEPS).long() << _INDEX_BITS) | torch.arange(p)
    key = torch.where(ok, key, torch.full_like(key, _EMPTY))
    pix = (torch.arange(n)[:, None] * fine + iy.clamp(0, fine - 1)) * fine + ix.clamp(0, fine - 1)
    buf = torch.full((n * fine * fine,), _EMPTY, dtype=torch.long)
    buf.scatter_reduce_(0, pix.reshape(-1), key.reshape(-1), "amin")
    return buf.view(n, fine, fine)


def _fill_holes(key: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Close the gaps between random surface points: a fine pixel whose depth exceeds that
    of ``k`` of its 8 neighbours by more than :data:`HOLE_DEPTH` takes its nearest
    neighbour's key, with ``k = 7`` for an empty pixel (an outside pixel of a convex
    silhouette has at most 3 covered neighbours, so silhouettes stay) and ``k = 5`` for a
    covered one (a back surface seen through a gap of the front one; a back pixel beside a
    front part's edge has at most 3 nearer neighbours, or 5 in a concave corner); ``passes``
    times, so that gaps of a few fine pixels close too. Gaps of the true geometry narrower
    than about two fine pixels close with them."""
    n, h, w = key.shape
    margin = int(HOLE_DEPTH * _DEPTH_STEPS) << _INDEX_BITS
    for _ in range(int(passes)):
        pad = F.pad(key, (1, 1, 1, 1), value=_EMPTY)
        neigh = torch.stack([pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                             for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
        nearer = ((neigh < _EMPTY) & (neigh + margin < key)).sum(0)
        hole = torch.where(key < _EMPTY, nearer >= 5, nearer >= 7)
        key = torch.where(hole, neigh.amin(0), key)
    return key


def render_points(points: torch.Tensor, cameras: Cameras, size: int, shade: str = "position",
                  frame: Optional[torch.Tensor] = None, supersample: int = SUPERSAMPLE,
                  fill_holes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Splat surface points ``[n, P, 3]`` (world frame) seen by ``cameras`` (one each) into
    ``(images [n, C, size, size], coverage [n, 1, size, size])`` (see the module docstring);
    ``frame`` ``[n, P, 3]`` are the points in the objects' own frames for ``shade=position``
    (default the world points); coverage is the fraction of each pixel's fine pixels that
    a point covers."""
    if shade not in SHADES:
        raise unknown_name("render shade", shade, SHADES)
    n = points.shape[0]
    fine = int(size) * int(supersample)
    key = _zbuffer(points, cameras, fine)
    if fill_holes:
        key = _fill_holes(key)
    hit = key < _EMPTY
    index = (key & ((1 << _INDEX_BITS) - 1)).view(n, -1)
    if shade == "position":
        q = (points if frame is None else frame).to(torch.float32)
        value = (0.1 + 0.9 * q.gather(1, index[..., None].expand(n, index.shape[1], 3))).clamp(-1, 1)
        value = value.transpose(1, 2).reshape(n, 3, fine, fine)
    else:
        depth = (key >> _INDEX_BITS).to(torch.float32) / _DEPTH_STEPS
        radius = cameras.origin.norm(dim=-1).to(torch.float32)[:, None, None]  # each camera's distance
        bright = ((radius + 1 - depth) / 2).clamp(0, 1)
        value = (-0.8 + 1.8 * bright)[:, None]
    img = torch.where(hit[:, None], value, torch.full_like(value, BACKGROUND))
    pool = int(supersample)
    return F.avg_pool2d(img, pool), F.avg_pool2d(hit[:, None].float(), pool)


def points_per_object(size: int, supersample: int = SUPERSAMPLE) -> int:
    """Surface points drawn per object: :data:`POINTS_PER_PIXEL` per fine pixel."""
    return POINTS_PER_PIXEL * (int(size) * int(supersample)) ** 2


# ---------------------------------------------------------------------------- the set
def make_renders(n: int, size: int = DEFAULT_SIZE, classes: Sequence[str] = tuple(CLASSES), pose: str = "none",
                 shade: str = "position", elevation: Sequence[float] = DEFAULT_ELEVATION,
                 generator: Optional[torch.Generator] = None, radius: float = DEFAULT_RADIUS,
                 fov: float = DEFAULT_FOV, supersample: int = SUPERSAMPLE, return_cameras: bool = False):
    """``(x [n, C, size, size] float32, labels [n], len(classes))`` (and the ``Cameras``
    with ``return_cameras``): ``n`` renders, classes drawn uniformly, deterministic given
    ``generator`` (default seed 0). Made in chunks of at most ~1M surface points."""
    if pose not in POSES:
        raise unknown_name("render pose", pose, POSES)
    if shade not in SHADES:
        raise unknown_name("render shade", shade, SHADES)
    if int(n) < 1 or int(size) < 1 or int(supersample) < 1:
        raise UserError(f"renders: need n, size and supersample >= 1, got n={n}, size={size}, "
                        f"supersample={supersample}")
    g = generator or torch.Generator().manual_seed(0)
    n, size, classes = int(n), int(size), tuple(classes)
    p = points_per_object(size, supersample)
    chunk = max(1, _CHUNK_POINTS // p)
    xs, ys, origins, rotations = [], [], [], []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        q, labels, _ = make_clouds(b, p, classes, "none", g)  # the object frame: centred, stretched
        q = q / q.norm(dim=-1).amax(1).clamp_min(1.0)[:, None, None]  # into the unit ball
        world = q @ random_rotations(b, pose, g).to(q.dtype).transpose(1, 2)
        cams = random_orbit(b, g, radius=radius, elevation=elevation, fov=fov)
        img, _ = render_points(world, cams, size, shade, frame=q, supersample=supersample)
        xs.append(img)
        ys.append(labels)
        origins.append(cams.origin)
        rotations.append(cams.rotation)
    x, y = torch.cat(xs), torch.cat(ys)
    if return_cameras:
        return x, y, len(classes), Cameras(torch.cat(origins), torch.cat(rotations), float(fov))
    return x, y, len(classes)


# -------------------------------------------------------------------------------- spec
_USAGE = "renders:classes=a+b,size=S,pose=none|yaw,shade=position|depth,elevation=LO+HI"


def parse_spec(spec: str) -> dict:
    """``renders[:classes=a+b,size=S,pose=P,shade=D,elevation=LO+HI]`` -> make_renders
    keyword arguments."""
    opts = {"size": DEFAULT_SIZE, "classes": tuple(CLASSES), "pose": "none", "shade": "position",
            "elevation": tuple(DEFAULT_ELEVATION)}
    for key, value in spec_options(spec, opts, _USAGE):
        if key == "size":
            opts["size"] = spec_int(spec, key, value, MIN_SIZE, MAX_SIZE, f"give {MIN_SIZE} to {MAX_SIZE} pixels")
        elif key == "classes":
            opts["classes"] = spec_classes(spec, value, "render class")
        elif key == "pose":
            if value not in POSES:
                raise unknown_name("render pose", value, POSES)
            opts["pose"] = value
        elif key == "shade":
            if value not in SHADES:
                raise unknown_name("render shade", value, SHADES)
            opts["shade"] = value
        else:
            opts["elevation"] = _elevation(spec, value)
    return opts


def _elevation(spec: str, value: str) -> tuple[float, float]:
    """``LO+HI`` degrees, ``-90 <= LO <= HI <= 90`` (the first ``+`` after LO's sign splits)."""
    cut = value.find("+", 1)
    lo, hi = (value[:cut], value[cut + 1:]) if cut > 0 else (value, "")
    bad = UserError(f"dataset '{spec}': elevation={value}; give LO+HI degrees with -90 <= LO <= HI <= 90, "
                    f"e.g. elevation=-15+60")
    try:
        lo_f, hi_f = float(lo), float(hi)
    except ValueError:
        raise bad from None
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)) or not -90 <= lo_f <= hi_f <= 90:
        raise bad
    return lo_f, hi_f


def is_spec(spec: str) -> bool:
    return spec == "renders" or spec.startswith("renders:")


def load(spec: str, n: Optional[int], generator: torch.Generator):
    """The (x, labels, num_classes) triple of a ``renders`` spec, ``n`` images."""
    return make_renders(DEFAULT_RENDERS if n is None else n, generator=generator, **parse_spec(spec))
