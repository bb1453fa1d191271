"""The NeRF field and renderer (fewstep.nets.nerf) against closed forms.

Compositing is exact for piecewise-constant density (Max 1995; NeRF eq. 3), so the slab
checks hold to float64 rounding; the stochastic and interpolation checks carry their own
error budgets, stated where they are used.
"""
import math

import pytest
import torch
from torch import nn

from fewstep.errors import UserError
from fewstep.nets.cameras import Cameras, look_at, orbit, turntable
from fewstep.nets.nerf import MLPField, VoxelField, build_field, composite, ray_box, render, softplus_inverse

F64 = torch.float64


def axis_camera(fov=45.0):
    """One camera at (3, 0, 0) looking at the origin: its centre ray runs along -x."""
    return orbit(torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), 3.0, fov)


def constant_voxel(rho, colour, resolution=4):
    """A float64 voxel field with density ``rho`` and colour ``colour`` everywhere in the box."""
    field = VoxelField(resolution, channels=len(colour), init_density=rho, noise=0.0).double()
    with torch.no_grad():                 # refill in float64 (the constructor rounds to float32)
        field.density_grid.fill_(softplus_inverse(rho))
        field.colour_grid.copy_(torch.atanh(torch.tensor(colour, dtype=F64)).reshape(1, -1, 1, 1, 1))
    return field


class GaussField(nn.Module):
    """A smooth analytic field: density a exp(-|p|^2 / (2 0.4^2)), colour tanh(1.5 p)."""

    channels, bound = 3, 1.0

    def __init__(self, a=3.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, p):
        return self.a * torch.exp(-(p ** 2).sum(-1) / (2 * 0.4 ** 2)), torch.tanh(1.5 * p)


def path_in_box(origins, dirs, bound=1.0, t_max=6.0, steps=600_001):
    """Length of each ray inside the box by dense sampling in t (independent of the slab
    method): error at most 2 dt (one sample step at each end)."""
    t = torch.linspace(0, t_max, steps, dtype=F64)
    inside = torch.stack([((o + t[:, None] * d).abs() <= bound).all(-1).sum() for o, d in zip(origins, dirs)])
    return inside.to(F64) * (t_max / (steps - 1)), 2 * t_max / (steps - 1)


# 1. transmittance and compositing on a constant-density slab -------------------------------

def test_composite_matches_closed_form_on_slabs():
    rho, L, S = 1.3, 2.0, 64
    c, b = torch.tensor([0.5, -0.25, 0.9], dtype=F64), torch.tensor([-1.0, 0.2, 0.0], dtype=F64)
    out = composite(torch.full((S,), rho, dtype=F64), c.expand(S, 3), torch.full((S,), L / S, dtype=F64), b)
    T = math.exp(-rho * L)
    # exact for constant density: only rounding of a 64-term cumsum (~1e-15) -> 1e-12
    assert torch.allclose(out["colour"], c * (1 - T) + b * T, rtol=0, atol=1e-12)
    assert abs(out["opacity"].item() - (1 - T)) < 1e-12
    s = torch.arange(S, dtype=F64) * (L / S)                      # depth of each interval's start
    assert torch.allclose(out["transmittance"], torch.exp(-rho * s), rtol=0, atol=1e-12)
    assert torch.allclose(out["weights"].sum(), out["opacity"], rtol=0, atol=1e-14)
    # two slabs (rho1, L1, c1) then (rho2, L2, c2), batched with a float background
    r1, l1, r2, l2 = 0.7, 0.5, 4.0, 0.3
    c1, c2 = torch.tensor([0.3], dtype=F64), torch.tensor([-0.8], dtype=F64)
    dens = torch.tensor([r1] * 5 + [r2] * 3, dtype=F64).expand(2, 8)
    cols = torch.cat([c1.expand(5, 1), c2.expand(3, 1)]).expand(2, 8, 1)
    dlt = torch.tensor([l1 / 5] * 5 + [l2 / 3] * 3, dtype=F64).expand(2, 8)
    want = c1 * (1 - math.exp(-r1 * l1)) + math.exp(-r1 * l1) * c2 * (1 - math.exp(-r2 * l2)) \
        + math.exp(-r1 * l1 - r2 * l2) * 0.25
    got = composite(dens, cols, dlt, 0.25)["colour"]
    assert got.shape == (2, 1) and torch.allclose(got, want.expand(2, 1), rtol=0, atol=1e-12)


def test_render_constant_box_matches_closed_form():
    rho, c, b = 1.3, [0.5, -0.25, 0.9], torch.tensor([-1.0, 0.2, 0.0], dtype=F64)
    field, cams, size, S = constant_voxel(rho, c), axis_camera(), 5, 48
    out = render(field, cams, size, samples=S, background=b)
    cv = torch.tensor(c, dtype=F64)
    # centre pixel: the ray along -x crosses 2 bound = 2; constant density makes the
    # quadrature exact, so only rounding is left (softplus(softplus^-1(rho)), cumsum) -> 1e-12
    T = math.exp(-2 * rho)
    assert torch.allclose(out["image"][0, :, 2, 2], cv * (1 - T) + b * T, rtol=0, atol=1e-12)
    assert abs(out["opacity"][0, 0, 2, 2].item() - (1 - T)) < 1e-12
    w = out["weights"][0, :, 2, 2]                                  # T_i alpha_i, intervals of d = 2 / S
    i = torch.arange(S, dtype=F64)
    assert out["weights"].shape == (1, S, size, size)
    assert torch.allclose(w, torch.exp(-rho * i * 2 / S) * (1 - math.exp(-rho * 2 / S)), rtol=0, atol=1e-12)
    # expected depth: entry at 2, mean of the exponential truncated at 2; the midpoint of each
    # interval stands for its conditional mean, off by <= rho d^2 / 12 per interval to first
    # order (d = 2 / S), so rho d^2 / 6 covers it with margin
    mean = 1 / rho - 2 * T / (1 - T)
    d = 2 / S
    assert abs(out["depth"][0, 0, 2, 2].item() - (2 + mean)) < rho * d * d / 6
    # every pixel: path length L from dense sampling (error e_L); |dC/dL| <= rho |c - b| <= 2 rho
    o, dirs = cams.rays(size)
    L, e_L = path_in_box(o.reshape(-1, 3), dirs.reshape(-1, 3))
    T = torch.exp(-rho * L)[:, None]
    want = (cv * (1 - T) + b * T).reshape(size, size, 3).permute(2, 0, 1)
    assert (L > 0).all()
    assert (out["image"][0] - want).abs().max() < 2 * rho * e_L + 1e-12


# 2. gradients and stratified sampling -------------------------------------------------------

@pytest.mark.parametrize("field", [VoxelField(8, seed=1), MLPField(hidden=16, layers=2, frequencies=3, seed=1)],
                         ids=["voxel", "mlp"])
def test_gradients_reach_every_parameter(field):
    cams = turntable(3)
    out = render(field, cams, 8, samples=12, generator=torch.Generator().manual_seed(0))
    loss = (out["image"] - 0.3).square().mean() + out["opacity"].mean() + 0.1 * out["depth"].mean()
    loss.backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_stratified_renders_average_to_the_midpoint_render():
    field, cams, size, S, K = GaussField(), turntable(4, dtype=F64), 8, 16, 32
    mid = render(field, cams, size, samples=S)["image"].detach()
    ref = render(field, cams, size, samples=1024)["image"].detach()
    runs = torch.stack([render(field, cams, size, samples=S, generator=torch.Generator().manual_seed(k))["image"]
                        for k in range(K)]).detach()
    assert (runs[0] - runs[1]).abs().max() > 1e-2                 # different seeds, different jitter
    # budget per pixel: 5 standard errors of the mean of K runs (768 pixels: a false alarm
    # has probability < 1e-3), + the midpoint rule's own error (|mid - ref|), + the Jensen
    # bias of compositing a jittered optical depth, <= max|C''| Var(tau) / 2 with
    # |C''| <= 2 and Var(tau) <= S d^4 max|rho'|^2 / 12 (d <= box diagonal / S,
    # max|rho'| = a e^{-1/2} / 0.4)
    se = runs.std(0) / math.sqrt(K)
    d = 2 * math.sqrt(3) / S
    jensen = S * d ** 4 * (3.0 * math.exp(-0.5) / 0.4) ** 2 / 12
    assert ((runs.mean(0) - mid).abs() <= 5 * se + (mid - ref).abs() + jensen).all()


# 3. coarse-to-fine and config round trip ----------------------------------------------------

def smooth_voxel(resolution=17, seed=0):
    """A float64 voxel field whose raw grids sample smooth functions with known second
    derivatives: raw density 1 + 2 cos(pi x/2) cos(pi y/2) cos(pi z/2), raw colour channel
    k = 0.8 sin(pi (x + k/3) / 2) cos(pi y / 2): every |second partial| <= 2 (pi/2)^2."""
    field = VoxelField(resolution, seed=seed).double()
    g = torch.linspace(-1, 1, resolution, dtype=F64)
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    h = math.pi / 2
    with torch.no_grad():
        field.density_grid.copy_((1 + 2 * torch.cos(h * x) * torch.cos(h * y) * torch.cos(h * z))[None, None])
        field.colour_grid.copy_(torch.stack([0.8 * torch.sin(h * (x + k / 3)) * torch.cos(h * y)
                                             for k in range(3)])[None])
    return field


def test_upsampled_is_the_same_function():
    field, cams = smooth_voxel(17), turntable(3, dtype=F64)
    base = render(field, cams, 12, samples=32)["image"].detach()
    fine = field.upsampled(33)                                      # 32 = 2 x 16: cells subdivide
    assert fine.config == {**field.config, "resolution": 33}
    assert fine.density_grid.shape == (1, 1, 33, 33, 33) and fine.density_grid.dtype == F64
    # nested grids: a trilinear function on a sub-box is trilinear -> exact up to rounding
    assert (render(fine, cams, 12, samples=32)["image"] - base).abs().max() < 1e-10
    # non-nested (17 -> 24): each grid interpolates f with error <= h^2 / 8 * sum_k max|f_kk|
    # (= e(h)); the new field sits within e(h_old) + e(h_new) of f, so within
    # 2 e(h_old) + e(h_new) of the old field. Through tanh (slope <= 1) and softplus
    # (slope <= 1), and |dC/d sigma| integrated along a ray <= 2 * (box diagonal), the image
    # moves by at most e_c + 2 e_sigma 2 sqrt(3).
    other = field.upsampled(24)
    curv = 3 * 2 * (math.pi / 2) ** 2

    def e(res):
        return (2 / (res - 1)) ** 2 / 8 * curv

    err = 2 * e(17) + e(24)
    diff = (render(other, cams, 12, samples=32)["image"] - base).abs().max()
    assert 0 < diff <= err * (1 + 2 * 2 * math.sqrt(3))
    pts = 2 * torch.rand(4096, 3, generator=torch.Generator().manual_seed(0), dtype=F64) - 1
    assert (other.raw(pts) - field.raw(pts)).abs().max() <= err     # the raw grids' budget itself


@pytest.mark.parametrize("field", [VoxelField(6, channels=2, bound=1.5, init_density=0.3, seed=3),
                                   MLPField(channels=2, hidden=8, layers=2, frequencies=2, bound=1.5, seed=3,
                                            blob=2.0, blob_radius=0.3)], ids=["voxel", "mlp"])
def test_build_field_round_trip(field):
    import json

    config = json.loads(json.dumps(field.config))
    rebuilt = build_field(config)
    rebuilt.load_state_dict(field.state_dict())
    cams = turntable(2)
    a, b = render(field, cams, 6, samples=8), render(rebuilt, cams, 6, samples=8)
    assert a["image"].shape == (2, 2, 6, 6)
    for key in ("image", "opacity", "depth"):
        assert torch.equal(a[key], b[key]), key
    # the seed decides the initial values
    assert torch.equal(build_field(config).state_dict()[next(iter(field.state_dict()))],
                       next(iter(field.state_dict().values())))


def test_bad_field_configs():
    for bad in [{"kind": "octree"}, {"resolution": 8}, {"kind": "voxel", "resolutoin": 8},
                {"kind": "voxel", "resolution": 1}, {"kind": "mlp", "hidden": 0}, {"kind": "mlp", "bound": -1.0},
                {"kind": "voxel", "init_density": 0.0}, "voxel"]:
        with pytest.raises(UserError) as err:
            build_field(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError):
        render(VoxelField(4), turntable(2), 4, background=torch.zeros(3, 3))
    with pytest.raises(UserError):
        render(VoxelField(4), turntable(2), 4, shading="phong")


# 4. rays that miss ---------------------------------------------------------------------------

def test_missing_rays_give_exactly_the_background():
    field = VoxelField(8, init_density=50.0, noise=1.0).double()
    b = torch.tensor([0.3, -0.2, 0.7], dtype=F64)
    # a wide view from (3, 0, 0): the image corners miss the box (checked by dense sampling)
    cams, size = axis_camera(fov=90.0), 9
    out = render(field, cams, size, samples=16, background=b)
    o, d = cams.rays(size)
    L, _ = path_in_box(o.reshape(-1, 3), d.reshape(-1, 3), steps=60_001)
    miss = (L == 0).reshape(size, size)
    assert 0 < miss.sum() < size * size
    img = out["image"][0].permute(1, 2, 0)
    assert torch.equal(img[miss], b.expand(int(miss.sum()), 3))
    assert (out["opacity"][0, 0][miss] == 0).all() and (out["depth"][0, 0][miss] == 0).all()
    assert (out["weights"][0].permute(1, 2, 0)[miss] == 0).all()
    assert (out["opacity"][0, 0][~miss] > 0.5).all()
    # a camera at (3, 0, 0) looking away: every ray misses, also with chunks and a background image
    away = Cameras(torch.tensor([[3.0, 0, 0]], dtype=F64), look_at(torch.tensor([[-3.0, 0, 0]], dtype=F64)))
    bg = torch.rand(1, 3, 5, 5, dtype=F64)
    out = render(field, away, 5, background=bg, chunk=7)
    assert torch.equal(out["image"], bg) and (out["opacity"] == 0).all()
    near, far = ray_box(*(t.reshape(-1, 3) for t in away.rays(5)), 1.0)
    assert (far <= near).all()


def test_chunks_and_dtype_follow_the_field():
    field = MLPField(hidden=8, layers=2, frequencies=2, seed=2, blob=3.0)
    cams = turntable(2, dtype=F64)                                  # float64 cameras, float32 field
    whole = render(field, cams, 7, samples=10)
    parts = render(field, cams, 7, samples=10, chunk=5)
    assert whole["image"].dtype == torch.float32
    for key in whole:
        assert torch.allclose(whole[key], parts[key], rtol=0, atol=1e-6), key


def test_lambertian_shading_on_a_planar_density():
    """Density rising along -x (towards the back, seen from (3, 0, 0)): the normal is +x,
    so a light from the camera gives full diffuse (shaded colour 1 for textureless) and a
    light along y or from behind gives only ambient (2 ambient - 1); compositing is then the slab closed
    form with the density varying along the ray, checked through opacity."""
    field = VoxelField(2, channels=1, noise=0.0).double()
    with torch.no_grad():                                           # raw density 1 - x: linear
        field.density_grid.copy_(torch.tensor([2.0, 0.0], dtype=F64).reshape(1, 1, 1, 1, 2).expand(1, 1, 2, 2, 2))
    cams = axis_camera()
    for light, colour in [(None, 1.0), (torch.tensor([0.0, 1.0, 0.0]), 2 * 0.1 - 1),
                          (torch.tensor([-1.0, 0.0, 0.0]), 2 * 0.1 - 1)]:      # from behind: no diffuse
        out = render(field, cams, 5, samples=48, background=-1.0, shading="textureless", light=light)
        op = out["opacity"][0, 0, 2, 2]
        assert abs(out["image"][0, 0, 2, 2].item() - (colour * op - (1 - op)).item()) < 1e-12
    lit = render(field, cams, 5, samples=48, shading="lambertian")["image"]
    assert torch.isfinite(lit).all()
