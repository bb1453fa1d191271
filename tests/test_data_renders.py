"""Multi-view renders of the procedural shapes: the splatter against closed forms of a
sphere (silhouette disc, colour and depth at the ray-sphere hit), real gaps kept, the
dataset spec, determinism and its errors."""
import math

import pytest
import torch

from fewstep.data import renders as rd
from fewstep.data.pointclouds import _sphere, _torus
from fewstep.data.registry import held_out, load_dataset
from fewstep.errors import UserError
from fewstep.nets.cameras import orbit, random_orbit


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sphere_views(n, r, size, seed=0):
    """Dense points of a sphere of radius r at the origin, n random cameras, and per pixel
    centre the closed-form front hit: (cameras, points, hit point [n,S,S,3], depth [n,S,S],
    distance of the pixel centre from the image centre [S,S])."""
    g = gen(seed)
    pts = (_sphere(n, rd.points_per_object(size), g) * (r / 0.8)).float()
    cams = random_orbit(n, g)
    o, d = cams.rays(size)
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - r * r)
    t = -b - disc.clamp_min(0).sqrt()
    hit = o + t[..., None] * d
    depth = t * (d * -cams.rotation[:, None, None, :, 2]).sum(-1)
    c = torch.arange(size) + 0.5 - size / 2
    dist = (c[:, None] ** 2 + c[None, :] ** 2).sqrt()
    return cams, pts, hit, depth, dist


def test_sphere_is_a_centred_disc_of_the_projected_radius():
    size, r, h = 32, 0.8, 1 / rd.SUPERSAMPLE
    cams, pts, hit, depth, dist = sphere_views(6, r, size)
    img, cover = rd.render_points(pts, cams, size)
    # silhouette of a sphere at distance d: a circle of angular radius asin(r/d), i.e.
    # f tan(asin(r/d)) = f r / sqrt(d^2 - r^2) image-plane units, times size/2 pixels
    R = cams.focal * r / math.sqrt(3.0**2 - r**2) * size / 2
    area = cover.sum((1, 2, 3))
    # splatting covers each fine pixel the disc touches: between pi R^2 and the area of the
    # fine pixels touching it, pi R^2 + 4 R h + h^2 (Minkowski sum with a fine pixel)
    lo, hi = math.pi * R**2, math.pi * R**2 + 4 * R * h + h**2
    assert bool((area > lo - 2).all()) and bool((area < hi + 2).all()), (area, lo, hi)
    c = torch.arange(size) + 0.5
    cy = (cover[:, 0].sum(2) * c).sum(1) / area
    cx = (cover[:, 0].sum(1) * c).sum(1) / area
    assert torch.allclose(cx, torch.full_like(cx, size / 2), atol=0.05)
    assert torch.allclose(cy, torch.full_like(cy, size / 2), atol=0.05)
    inside, outside = dist < R - 0.75, dist > R + 0.75  # half a pixel diagonal + h/2 clear of the edge
    assert bool((cover[:, 0][:, inside] == 1).all())          # no holes
    assert bool((img[:, :, outside] == -1).all()) and bool((cover[:, 0][:, outside] == 0).all())
    # colour 0.1 + 0.9 q of the front hit (the back of the sphere never wins); the pixel
    # averages its fine pixels' nearest points, so away from the limb the error is the
    # colour's change within a pixel (measured 0.023 here)
    core = dist < 0.6 * R
    want = (0.1 + 0.9 * hit).permute(0, 3, 1, 2)
    assert (img - want)[:, :, core].abs().max() < 0.05


def test_depth_shading_is_brighter_nearer_and_matches_the_closed_form():
    size, r = 32, 0.9
    cams, pts, hit, depth, dist = sphere_views(4, r, size, seed=1)
    img, _ = rd.render_points(pts, cams, size, shade="depth")
    assert img.shape == (4, 1, size, size)
    R = cams.focal * r / math.sqrt(9 - r * r) * size / 2
    core = dist < 0.6 * R
    want = -0.8 + 1.8 * ((3 + 1 - depth) / 2).clamp(0, 1)
    assert (img[:, 0] - want)[:, core].abs().max() < 0.03  # depth change within a pixel (0.013)
    # nearest point (the centre of the disc, depth 3 - r) brightest; rings darken outwards
    centre = img[:, 0, size // 2 - 1:size // 2 + 1, size // 2 - 1:size // 2 + 1].mean((1, 2))
    assert torch.allclose(centre, torch.full_like(centre, -0.8 + 1.8 * (1 + r) / 2), atol=0.02)
    rings = [img[:, 0][:, (dist >= a) & (dist < a + 2)].mean() for a in (0, 3, 6, 9)]
    assert all(a > b for a, b in zip(rings, rings[1:]))


def test_a_real_gap_stays_open():
    """A torus seen from straight above: its hole is background, its ring fully covered."""
    size = 32
    pts = _torus(1, rd.points_per_object(size), gen()).float()
    top = orbit(torch.zeros(1), torch.full((1,), math.pi / 2))
    img, cover = rd.render_points(pts, top, size)
    # the hole's edge: the inner tube (rho = 0.4 at z = 0, 0.1326 rad just below it) at
    # camera height 3; the outer edge rho = 0.9 at depth about 3
    px = top.focal * size / 2
    c = torch.arange(size) + 0.5 - size / 2
    dist = (c[:, None] ** 2 + c[None, :] ** 2).sqrt()
    hole, ring = dist < 0.1326 * px - 1.5, (dist > 0.1334 * px + 1.5) & (dist < 0.3 * px - 1.5)
    assert int(hole.sum()) >= 30 and bool((img[0][:, hole] == -1).all()) and bool((cover[0, 0][hole] == 0).all())
    assert bool((cover[0, 0][ring] == 1).all())


def test_gap_fill_hides_the_back_surface():
    """The largest sphere (radius 1) has the sparsest front: without the fill a few percent
    of its fine pixels show the back half through gaps between the random points, with it
    (nearly) none. Depths from the z-buffer against the closed-form front hit."""
    size, fine = 16, 16 * rd.SUPERSAMPLE
    g = gen(3)
    pts = _sphere(20, rd.points_per_object(size), g).float() * 1.25
    cams = random_orbit(20, g)
    o, d = cams.rays(fine)
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 1)
    front = (-b - disc.clamp_min(0).sqrt()) * (d * -cams.rotation[:, None, None, :, 2]).sum(-1)
    key = rd._zbuffer(pts, cams, fine)
    inner = disc > 0.05
    for filled, most in ((False, None), (True, 1e-3)):
        k = rd._fill_holes(key) if filled else key
        depth = (k >> rd._INDEX_BITS).double() / rd._DEPTH_STEPS
        behind = float(((depth - front)[inner] > 0.1).double().mean())
        if filled:
            assert behind < most
        else:
            assert behind > 0.02


def test_dataset_spec_shapes_range_labels_and_determinism():
    spec = "renders:size=8,classes=torus+cone+cube"
    d = load_dataset(spec, n=60, seed=3)
    assert d.kind == "image" and d.x.shape == (60, 3, 8, 8) and d.x.dtype == torch.float32
    assert d.num_classes == 3 and set(d.labels.tolist()) == {0, 1, 2}
    assert float(d.x.min()) == -1.0 and float(d.x.max()) <= 1.0 and float(d.x[d.x > -1].min()) > -1.0
    assert torch.equal(d.x, load_dataset(spec, n=60, seed=3).x)
    other = load_dataset(spec, n=60, seed=4)
    assert not torch.equal(d.x, other.x) and not torch.equal(d.labels, other.labels)
    depth = load_dataset("renders:size=8,shade=depth,pose=yaw,elevation=10+20", n=5)
    assert depth.x.shape == (5, 1, 8, 8) and depth.num_classes == 5
    full = load_dataset("renders:size=16", n=100, seed=1)
    assert full.num_classes == 5 and set(full.labels.tolist()) == set(range(5))
    # every object lies in the unit ball, whose silhouette (6.8 px at 16) misses the border ring
    border = torch.cat([full.x[..., 0, :], full.x[..., -1, :], full.x[..., :, 0], full.x[..., :, -1]], -1)
    assert bool((border == -1).all()) and bool(((full.x > -1).flatten(1).sum(1) >= 3 * 9).all())


def test_cameras_are_the_orbit_cameras_and_yaw_turns_the_object():
    x, y, k, cams = rd.make_renders(12, 8, generator=gen(2), return_cameras=True)
    assert len(cams) == 12 and torch.allclose(cams.origin.norm(dim=-1), torch.full((12,), 3.0))
    el = torch.rad2deg(torch.asin(cams.origin[:, 2] / 3))
    assert bool(((el >= -15 - 1e-4) & (el <= 60 + 1e-4)).all())
    # the same draws but a yaw turn: same labels and cameras, different images
    a = rd.make_renders(8, 8, classes=("cube",), pose="none", generator=gen(5))[0]
    b = rd.make_renders(8, 8, classes=("cube",), pose="yaw", generator=gen(5))[0]
    assert not torch.equal(a, b)


def test_held_out_is_fresh():
    ref, where = held_out("renders:size=8", n=10, seed=7)
    assert where == "fresh" and ref.x.shape == (10, 3, 8, 8)
    assert torch.equal(ref.x, load_dataset("renders:size=8", n=10, seed=7).x)


@pytest.mark.parametrize("spec, match", [
    ("renders:classes=sphere+donut", "render class 'donut'"),
    ("renders:classes=", "classes= is empty"),
    ("renders:size=4", "size=4"),
    ("renders:size=big", "not an integer"),
    ("renders:size=1000", "8 to 128"),
    ("renders:pose=so3", "pose"),
    ("renders:shade=normal", "shade"),
    ("renders:elevation=60+-15", "elevation"),
    ("renders:elevation=10", "elevation"),
    ("renders:elevation=-95+10", "elevation"),
    ("renders:elevation=a+b", "elevation"),
    ("renders:colour=red", "bad option"),
    ("renders:size", "bad option"),
])
def test_bad_specs_raise_one_line(spec, match):
    with pytest.raises(UserError, match=match) as err:
        load_dataset(spec, n=2)
    assert "\n" not in str(err.value)
