"""Procedural point clouds: shapes on their surfaces, area-uniform sampling, Haar poses,
the dataset spec and its errors."""
import math

import pytest
import torch

from fewstep.data import pointclouds as pc
from fewstep.data.registry import load_dataset
from fewstep.errors import UserError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_canonical_points_lie_on_their_surfaces():
    s = pc._sphere(2, 500, gen())
    assert torch.allclose(s.norm(dim=-1), torch.full((2, 500), 0.8, dtype=torch.float64))
    c = pc._cube(2, 500, gen())
    assert torch.allclose(c.abs().amax(-1), torch.full((2, 500), 0.6, dtype=torch.float64))
    t = pc._torus(2, 500, gen())
    rho = t[..., :2].norm(dim=-1)
    assert torch.allclose((rho - 0.65) ** 2 + t[..., 2] ** 2, torch.full_like(rho, 0.25**2))
    y = pc._cylinder(2, 500, gen())
    r, z = y[..., :2].norm(dim=-1), y[..., 2]
    side, cap = (r - 0.45).abs() < 1e-12, (z.abs() - 0.65).abs() < 1e-12
    assert bool((side | cap).all()) and bool((r <= 0.45 + 1e-12).all())
    k = pc._cone(2, 500, gen())
    r, z = k[..., :2].norm(dim=-1), k[..., 2]
    assert torch.allclose(r, 0.6 * (0.65 - z) / 1.3)


def test_sampling_is_uniform_by_area():
    n = 40000
    # torus: the outer half (cos v > 0) holds (pi R0 + 2 r) / (2 pi R0) of the area
    t = pc._torus(1, n, gen(1))[0]
    outer = float((t[:, :2].norm(dim=-1) > 0.65).double().mean())
    assert outer == pytest.approx(0.5 + 0.25 / (math.pi * 0.65), abs=0.01)
    # cylinder: side area 2 pi r h against caps 2 pi r^2
    y = pc._cylinder(1, n, gen(2))[0]
    on_side = float(((y[:, :2].norm(dim=-1) - 0.45).abs() < 1e-12).double().mean())
    assert on_side == pytest.approx(1.3 / (1.3 + 0.45), abs=0.01)
    # cone: area within distance fraction f of the apex grows as f^2
    k = pc._cone(1, n, gen(3))[0]
    assert float((k[:, 2] > 0.0).double().mean()) == pytest.approx(0.25, abs=0.01)
    # cube: the six faces equally
    c = pc._cube(1, n, gen(4))[0]
    faces = torch.bincount((c.abs().argmax(-1) * 2 + (c.gather(1, c.abs().argmax(-1, keepdim=True))[:, 0] > 0)), minlength=6)
    assert torch.allclose(faces.double() / n, torch.full((6,), 1 / 6, dtype=torch.float64), atol=0.01)


def test_rotations_are_haar_on_so3():
    R = pc.random_rotations(4000, "so3", gen())
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(1, 2), eye.expand_as(R), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4000, dtype=torch.float64))
    assert R.mean(0).abs().max() < 0.05                    # E[R] = 0 under the Haar measure
    assert (R[:, 2, 2].abs() < 0.5).double().mean() == pytest.approx(0.5, abs=0.03)  # R e_z uniform on S^2
    Y = pc.random_rotations(10, "yaw", gen())
    assert torch.allclose(Y[:, 2], eye[2].expand(10, 3)) and torch.allclose(torch.linalg.det(Y), torch.ones(10, dtype=torch.float64))


def test_dataset_spec_shapes_labels_and_determinism():
    d = load_dataset("pointclouds:points=64,classes=torus+cone,pose=yaw", n=30, seed=3)
    assert d.kind == "clouds" and d.x.shape == (30, 64, 3) and d.shape == (64, 3) and d.x.dtype == torch.float32
    assert d.num_classes == 2 and set(d.labels.tolist()) == {0, 1}
    assert d.x.mean(1).abs().max() < 1e-6                 # every cloud is centred
    again = load_dataset("pointclouds:points=64,classes=torus+cone,pose=yaw", n=30, seed=3)
    assert torch.equal(d.x, again.x)
    assert not torch.equal(d.x, load_dataset(d.name, n=30, seed=4).x)
    default = load_dataset("pointclouds", n=5)
    assert default.shape == (pc.DEFAULT_POINTS, 3) and default.num_classes == len(pc.CLASSES)


@pytest.mark.parametrize("spec, match", [
    ("pointclouds:points=abc", "not an integer"),
    ("pointclouds:points=1", "at least 2"),
    ("pointclouds:classes=sphere+donut", "point-cloud class 'donut'"),
    ("pointclouds:pose=tilted", "pose"),
    ("pointclouds:colour=red", "bad option"),
])
def test_bad_specs_are_user_errors(spec, match):
    with pytest.raises(UserError, match=match):
        load_dataset(spec, n=4)
