"""A small differentiable radiance field and volume renderer in pure PyTorch (the 3-D
generator of score distillation, Poole et al. 2022; coarse-to-fine as in Lin et al. 2022).

Fields map world points ``[..., 3]`` to ``(density [...] >= 0, colour [..., C] in [-1, 1])``
and are zero outside the box ``[-bound, bound]^3`` (the scene of
:mod:`fewstep.nets.cameras`: z up, cameras at radius 3 looking at the origin):

- :class:`VoxelField`: density and colour grids, trilinear lookup (one ``grid_sample``
  call for all points); :meth:`VoxelField.upsampled` gives Magic3D's stage-2 start.
- :class:`MLPField`: NeRF's positional encoding (Mildenhall et al. 2020, eq. 4) and an MLP,
  with DreamFusion's optional Gaussian density blob at the centre.

Rendering is the emission-absorption optical model (Max 1995) with NeRF's quadrature
(Mildenhall et al. 2020, eq. 3), see :func:`composite`; :func:`render` casts the cameras'
rays, clips them to the box (slab method) and places ``samples`` points on each.

Every field carries ``config`` (JSON-serialisable); :func:`build_field` rebuilds the
architecture from it (then ``load_state_dict`` for the values).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, unknown_name
from .cameras import Cameras


def softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = y`` for ``y > 0`` (``log(expm1(y))``, stable form)."""
    y = float(y)
    return y + math.log(-math.expm1(-y))


def _inside(points: torch.Tensor, bound: float) -> torch.Tensor:
    return (points.abs() <= bound).all(dim=-1)


def _positive(name: str, where: str, value, integer: bool = False, minimum=None):
    ok = value > 0 if minimum is None else value >= minimum
    if not ok or (integer and int(value) != value):
        need = f">= {minimum}" if minimum is not None else "> 0"
        raise UserError(f"{where}: {name} must be {'an integer ' if integer else ''}{need}, got {value}; "
                        f"fix the field config")


class VoxelField(nn.Module):
    """A density-and-colour voxel grid over ``[-bound, bound]^3`` with trilinear lookup.

    Parameters ``density_grid [1, 1, R, R, R]`` and ``colour_grid [1, C, R, R, R]`` hold raw
    values at the vertices ``-bound + 2 bound k / (R - 1)``; ``grid[..., k, j, i]`` sits at
    ``(x_i, y_j, z_k)`` (``grid_sample``'s order, ``align_corners=True``). A point's
    raw values are the trilinear interpolation of its cell's 8 vertices; then

        density = softplus(raw_density),   colour = tanh(raw_colour),

    and density is 0 outside the box. The density grid starts constant at
    ``softplus^-1(init_density)`` (``init_density`` per unit length: a near-empty field,
    opacity ``1 - exp(-2 init_density)`` along an axis, whose softplus still passes
    gradient), the colour grid at ``N(0, noise^2)`` drawn from ``seed``.
    """

    def __init__(self, resolution: int = 32, channels: int = 3, bound: float = 1.0, init_density: float = 0.1,
                 seed: int = 0, noise: float = 0.1):
        super().__init__()
        _positive("resolution", "voxel field", resolution, integer=True, minimum=2)
        _positive("channels", "voxel field", channels, integer=True, minimum=1)
        _positive("bound", "voxel field", bound)
        _positive("init_density", "voxel field", init_density)
        if not noise >= 0:
            raise UserError(f"voxel field: noise must be >= 0, got {noise}; fix the field config")
        self.config = dict(kind="voxel", resolution=int(resolution), channels=int(channels), bound=float(bound),
                           init_density=float(init_density), seed=int(seed), noise=float(noise))
        self.resolution, self.channels, self.bound = int(resolution), int(channels), float(bound)
        r = self.resolution
        g = torch.Generator().manual_seed(int(seed))
        self.density_grid = nn.Parameter(torch.full((1, 1, r, r, r), softplus_inverse(init_density)))
        self.colour_grid = nn.Parameter(float(noise) * torch.randn(1, self.channels, r, r, r, generator=g))

    def raw(self, points: torch.Tensor) -> torch.Tensor:
        """Trilinearly interpolated raw values ``[..., 1 + C]`` (density first) at ``points``."""
        grid = torch.cat([self.density_grid, self.colour_grid], dim=1)
        coords = (points / self.bound).reshape(1, -1, 1, 1, 3).to(grid.dtype)
        out = F.grid_sample(grid, coords, mode="bilinear", padding_mode="border", align_corners=True)
        return out.reshape(1 + self.channels, -1).t().reshape(*points.shape[:-1], 1 + self.channels)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.raw(points)
        density = F.softplus(raw[..., 0]) * _inside(points, self.bound).to(raw.dtype)
        return density, torch.tanh(raw[..., 1:])

    def upsampled(self, resolution: int) -> "VoxelField":
        """A new field at ``resolution`` whose raw grids are this one's trilinear
        interpolation at the new vertices (Magic3D-style stage-2 start): the same function up
        to interpolation error, exactly the same when ``resolution - 1`` is a multiple of
        ``self.resolution - 1`` (the new cells subdivide the old ones, and a trilinear
        function restricted to a sub-box is trilinear)."""
        out = VoxelField(**{**{k: v for k, v in self.config.items() if k != "kind"}, "resolution": int(resolution)})
        out = out.to(device=self.density_grid.device, dtype=self.density_grid.dtype)
        size = (int(resolution),) * 3
        with torch.no_grad():
            for name in ("density_grid", "colour_grid"):
                new = F.interpolate(getattr(self, name).detach(), size=size, mode="trilinear", align_corners=True)
                getattr(out, name).copy_(new)
        return out


class MLPField(nn.Module):
    """A NeRF-style field: ``gamma(p / bound)`` through an MLP to (density, colour).

    Positional encoding (Mildenhall et al. 2020, eq. 4, with the identity term kept as in
    their code): ``gamma(p) = (p, sin(2^k pi p), cos(2^k pi p))`` for ``k < frequencies``,
    each coordinate of ``p / bound``; ``3 (1 + 2 frequencies)`` inputs. Then ``layers``
    hidden layers of width ``hidden`` with SiLU (smooth, so density-gradient normals are
    defined everywhere; NeRF uses ReLU) and a linear output of ``1 + C`` raw values:

        density = softplus(raw_0 + softplus^-1(init_density) + blob exp(-|p|^2 / (2 (blob_radius bound)^2)))
        colour = tanh(raw_1..C)

    The bias makes the initial field near-empty (about ``init_density`` per unit length)
    while softplus keeps a gradient; ``blob > 0`` adds DreamFusion's density-bias
    initialisation (a bump at the centre, in raw units; Poole et al. 2022, appendix), off by
    default. Density is 0 outside the box. Weights are drawn from ``seed`` without touching
    the global random state.
    """

    def __init__(self, channels: int = 3, hidden: int = 64, layers: int = 3, frequencies: int = 6, bound: float = 1.0,
                 seed: int = 0, init_density: float = 0.1, blob: float = 0.0, blob_radius: float = 0.5):
        super().__init__()
        _positive("channels", "mlp field", channels, integer=True, minimum=1)
        _positive("hidden", "mlp field", hidden, integer=True, minimum=1)
        _positive("layers", "mlp field", layers, integer=True, minimum=1)
        _positive("frequencies", "mlp field", frequencies, integer=True, minimum=0)
        _positive("bound", "mlp field", bound)
        _positive("init_density", "mlp field", init_density)
        _positive("blob_radius", "mlp field", blob_radius)
        self.config = dict(kind="mlp", channels=int(channels), hidden=int(hidden), layers=int(layers),
                           frequencies=int(frequencies), bound=float(bound), seed=int(seed),
                           init_density=float(init_density), blob=float(blob), blob_radius=float(blob_radius))
        self.channels, self.bound, self.frequencies = int(channels), float(bound), int(frequencies)
        self.density_bias = softplus_inverse(init_density)
        self.blob, self.blob_sigma = float(blob), float(blob_radius) * float(bound)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(self.frequencies, dtype=torch.float32),
                             persistent=False)
        dims = [3 * (1 + 2 * self.frequencies)] + [int(hidden)] * int(layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
            self.out = nn.Linear(dims[-1], 1 + self.channels)

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """NeRF eq. 4 on ``points / bound``: ``[..., 3] -> [..., 3 (1 + 2 frequencies)]``."""
        p = points / self.bound
        arg = (p[..., None, :] * self.freqs.to(p.dtype)[:, None]).flatten(-2)  # [..., F * 3]
        return torch.cat([p, torch.sin(arg), torch.cos(arg)], dim=-1)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encode(points)
        for layer in self.hidden:
            h = F.silu(layer(h))
        raw = self.out(h)
        pre = raw[..., 0] + self.density_bias
        if self.blob:
            pre = pre + self.blob * torch.exp(-(points ** 2).sum(-1) / (2 * self.blob_sigma ** 2))
        density = F.softplus(pre) * _inside(points, self.bound).to(raw.dtype)
        return density, torch.tanh(raw[..., 1:])


FIELDS = {"voxel": VoxelField, "mlp": MLPField}


def build_field(config: dict) -> nn.Module:
    """The field described by ``config = {"kind": "voxel" | "mlp", **kwargs}`` (fresh values)."""
    from . import build_from

    return build_from(FIELDS, config, "field", refused=(TypeError, ValueError))


def composite(density: torch.Tensor, colour: torch.Tensor, deltas: torch.Tensor,
              background: Union[float, torch.Tensor] = -1.0) -> dict:
    """Volume rendering quadrature (Max 1995 emission-absorption; Mildenhall et al. 2020, eq. 3).

    With ``tau_i = density_i delta_i``:

        alpha_i = 1 - exp(-tau_i),   T_i = exp(-sum_{j<i} tau_j) = prod_{j<i} (1 - alpha_j),
        w_i = T_i alpha_i,           C = sum_i w_i c_i + (1 - sum_i w_i) background.

    ``T`` is the exclusive cumulative sum in log space (no product of many small factors).
    Exact for density and colour constant on each interval. Shapes: ``density [..., S]``,
    ``colour [..., S, C]``, ``deltas [..., S]``, ``background`` a float or broadcastable to
    ``[..., C]``. Returns ``colour [..., C]``, ``weights [..., S]``, ``opacity [...]``
    (``sum w``), ``transmittance [..., S]`` (``T_i``, before sample ``i``).
    """
    tau = density * deltas
    total = torch.cumsum(tau, dim=-1)
    before = torch.cat([torch.zeros_like(total[..., :1]), total[..., :-1]], dim=-1)
    trans = torch.exp(-before)
    alpha = -torch.expm1(-tau)
    weights = trans * alpha
    opacity = weights.sum(-1)
    out = (weights[..., None] * colour).sum(-2) + (1 - opacity)[..., None] * background
    return {"colour": out, "weights": weights, "opacity": opacity, "transmittance": trans}


def ray_box(origins: torch.Tensor, dirs: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances ``[...]`` of rays ``o + t d`` (``t >= 0``) through the box
    ``[-bound, bound]^3`` (slab method: the intersection of the three axis slabs' intervals).
    A ray hits when ``far > near``; a ray starting inside has ``near = 0``."""
    tiny = torch.finfo(dirs.dtype).tiny ** 0.5
    safe = torch.where(dirs.abs() < tiny, torch.where(dirs < 0, -tiny, tiny), dirs)
    t1, t2 = (-bound - origins) / safe, (bound - origins) / safe
    near = torch.minimum(t1, t2).amax(-1).clamp_min(0)
    far = torch.maximum(t1, t2).amin(-1)
    return near, far


SHADING = ("none", "lambertian", "textureless")


def _shade(field, points, colour, light, mode, ambient, eps):
    """DreamFusion-style diffuse shading of per-sample colours: the normal is
    ``-grad density / |grad density|`` (central differences of step ``eps``), and with the
    albedo ``a = (c + 1) / 2`` (1 for ``textureless``) the shaded colour is
    ``2 a (ambient + (1 - ambient) max(0, n . l)) - 1``."""
    offsets = eps * torch.eye(3, dtype=points.dtype, device=points.device)
    probe = torch.stack([points + offsets[k] * s for k in range(3) for s in (1.0, -1.0)])
    dens = field(probe)[0]
    grad = torch.stack([(dens[2 * k] - dens[2 * k + 1]) / (2 * eps) for k in range(3)], dim=-1)
    normal = -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    lam = (normal * light[:, None, :]).sum(-1).clamp_min(0)[..., None]
    albedo = torch.ones_like(colour) if mode == "textureless" else (colour + 1) / 2
    return 2 * albedo * (ambient + (1 - ambient) * lam) - 1


def _march(field, origins, dirs, near, step, offsets, background, light, shading, ambient, eps):
    """Render ``M`` rays that hit the box: samples at ``near + (i + offset_i) step``."""
    samples = offsets.shape[-1]
    idx = torch.arange(samples, dtype=origins.dtype, device=origins.device)
    t = near[:, None] + (idx + offsets) * step[:, None]                      # [M, S]
    points = origins[:, None, :] + t[..., None] * dirs[:, None, :]           # [M, S, 3]
    density, colour = field(points)
    if shading != "none":
        colour = _shade(field, points, colour, light, shading, ambient, eps)
    deltas = step[:, None].expand_as(t)
    out = composite(density, colour, deltas, background)
    opacity = out["opacity"]
    depth = torch.where(opacity > 0, (out["weights"] * t).sum(-1) / opacity.clamp_min(1e-30),
                        torch.zeros_like(opacity))
    return out["colour"], opacity, depth, out["weights"]


def render(field: nn.Module, cameras: Cameras, size: int, samples: int = 48,
           background: Union[float, torch.Tensor] = -1.0, generator: Optional[torch.Generator] = None,
           chunk: Optional[int] = None, shading: str = "none", light: Optional[torch.Tensor] = None,
           ambient: float = 0.1, normal_eps: Optional[float] = None) -> dict:
    """Render ``field`` from ``cameras`` at ``size x size`` pixels.

    Each ray of :meth:`Cameras.rays` is clipped to the field's box (:func:`ray_box`); the
    interval ``[near, far]`` is cut into ``samples`` equal pieces of length ``delta`` and
    the field is read at each piece's midpoint, or, with ``generator``, at a uniform point
    inside it (NeRF's stratified sampling). Each sample stands for its piece, so ``delta`` is
    the piece length (exact for piecewise-constant density, unbiased optical depth when
    jittered; NeRF instead uses the gaps between consecutive samples). Then
    :func:`composite` (NeRF eq. 3). Rays that miss the box get exactly the background and
    opacity 0.

    ``background``: a float, ``[C]``, or ``[n, C, size, size]`` (one image per view).
    ``chunk``: at most this many rays per field call (bounds memory). ``shading``:
    ``"none"``, ``"lambertian"`` or ``"textureless"`` (see :func:`_shade`) with ``light``
    unit directions towards the light, ``[3]`` or ``[n, 3]`` (default: towards each camera).

    Returns ``image [n, C, size, size]``, ``opacity [n, 1, size, size]`` and ``depth
    [n, 1, size, size]`` (expected distance from the camera, ``sum w_i t_i / opacity``
    where opacity > 0, else 0) and the per-sample ``weights [n, samples, size, size]`` (``w_i``,
    0 on rays that miss; for regularisers such as SJC's emptiness loss). Differentiable in the field's parameters; device and dtype
    follow them.
    """
    if int(size) < 1 or int(samples) < 1:
        raise UserError(f"render: size and samples must be positive, got size={size}, samples={samples}")
    if shading not in SHADING:
        raise unknown_name("shading", shading, SHADING)
    param = next(field.parameters())
    dtype, device = param.dtype, param.device
    cams = cameras.to(device=device, dtype=dtype)
    n, size, samples, channels = len(cams), int(size), int(samples), int(field.channels)
    bound = float(field.bound)
    origins, dirs = cams.rays(size)
    rays = n * size * size
    origins, dirs = origins.reshape(rays, 3), dirs.reshape(rays, 3)

    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.ndim == 4:
        if tuple(bg.shape) != (n, channels, size, size):
            raise UserError(f"render: background image of shape {tuple(bg.shape)} does not fit "
                            f"[{n}, {channels}, {size}, {size}]; give a float, [C] or [n, C, size, size]")
        bg = bg.permute(0, 2, 3, 1).reshape(rays, channels)
    elif bg.ndim <= 1 and bg.numel() in (1, channels):
        bg = bg.reshape(1, -1).expand(rays, channels)
    else:
        raise UserError(f"render: background of shape {tuple(bg.shape)}; give a float, [{channels}] "
                        f"or [n, {channels}, size, size]")

    view = torch.arange(n, device=device).repeat_interleave(size * size)
    if shading != "none":
        lt = cams.origin if light is None else torch.as_tensor(light, dtype=dtype, device=device).reshape(-1, 3)
        lt = (lt / lt.norm(dim=-1, keepdim=True).clamp_min(1e-12)).expand(n, 3)
    eps = 0.01 * bound if normal_eps is None else float(normal_eps)

    near, far = ray_box(origins, dirs, bound)
    hit = torch.nonzero(far > near).squeeze(1)
    if generator is not None:
        offsets = torch.rand(rays, samples, generator=generator, dtype=dtype, device=generator.device).to(device)
    else:
        offsets = torch.full((rays, samples), 0.5, dtype=dtype, device=device)
    step = (far - near) / samples

    pieces = []
    per = hit.numel() if not chunk else int(chunk)
    for sub in (torch.split(hit, max(per, 1)) if hit.numel() else ()):
        pieces.append(_march(field, origins[sub], dirs[sub], near[sub], step[sub], offsets[sub], bg[sub],
                             lt[view[sub]] if shading != "none" else None, shading, float(ambient), eps))
    image = bg.clone()
    opacity = torch.zeros(rays, dtype=dtype, device=device)
    depth = torch.zeros(rays, dtype=dtype, device=device)
    weights = torch.zeros(rays, samples, dtype=dtype, device=device)
    if pieces:
        col, op, dep, wts = (torch.cat(p) for p in zip(*pieces))
        image = image.index_put((hit,), col)
        opacity = opacity.index_put((hit,), op)
        depth = depth.index_put((hit,), dep)
        weights = weights.index_put((hit,), wts)
    return {"image": image.reshape(n, size, size, channels).permute(0, 3, 1, 2),
            "opacity": opacity.reshape(n, 1, size, size),
            "depth": depth.reshape(n, 1, size, size),
            "weights": weights.reshape(n, size, size, samples).permute(0, 3, 1, 2)}


__all__ = ["VoxelField", "MLPField", "FIELDS", "build_field", "composite", "ray_box", "render", "SHADING",
           "softplus_inverse"]
