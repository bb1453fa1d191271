"""Tests for fewstep.data: toys, procedural and file-based image sets, the registry."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from fewstep.data import TOYS, Dataset, dataset_names, load_dataset, make_toy
from fewstep.data import images
from fewstep.errors import UserError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- toys
@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_shape_determinism_and_scale(name):
    x, labels, k = make_toy(name, 20000, gen(0))
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    assert torch.equal(x, make_toy(name, 20000, gen(0))[0])
    assert not torch.equal(x, make_toy(name, 20000, gen(1))[0])
    assert x.mean(0).abs().max() < 0.05
    assert 0.85 < x.std(0).pow(2).mean().sqrt() < 1.15
    if labels is None:
        assert k == 0
    else:
        assert labels.dtype == torch.long and labels.shape == (20000,)
        assert labels.min() == 0 and labels.max() == k - 1


def test_toy_labels_mean_something():
    x, labels, k = make_toy("8gaussians", 4000, gen(0))
    centres = torch.stack([x[labels == j].mean(0) for j in range(k)])
    assert torch.cdist(centres, centres).add(torch.eye(k) * 9).min() > 0.5  # distinct modes
    x, labels, _ = make_toy("rings", 4000, gen(0))
    radius = x.norm(dim=1)
    assert all(radius[labels == j].mean() < radius[labels == j + 1].mean() for j in range(3))


def test_toy_errors():
    with pytest.raises(UserError, match="did you mean 'moons'"):
        make_toy("moon", 10)
    with pytest.raises(UserError, match="positive"):
        make_toy("moons", 0)


# ----------------------------------------------------------------------------- images
def test_shapes_deterministic_labelled_in_range():
    x, labels, k = images.shapes(300, 16, gen(3))
    assert x.shape == (300, 3, 16, 16) and x.dtype == torch.float32 and k == 3
    assert x.min() >= -1 and x.max() <= 1
    assert set(labels.tolist()) == {0, 1, 2}
    assert torch.equal(x, images.shapes(300, 16, gen(3))[0])
    corners = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == -1).float().mean() > 0.9  # black background
    hard, _, _ = images.shapes(50, 32, gen(0), antialias=False)
    assert hard.shape == (50, 3, 32, 32)
    soft = x[x > -1]
    assert ((soft > -1) & (soft < 1)).any()


def test_shapes_classes_differ_in_area():
    x, labels, _ = images.shapes(3000, 32, gen(0), antialias=False)
    area = (x > -1).any(1).float().mean((1, 2))
    # same radius distribution: circle (pi r^2) > square (2.56 r^2) > triangle (1.30 r^2)
    means = [area[labels == j].mean() for j in range(3)]
    assert means[0] > means[1] > means[2]


def test_digits():
    x, labels, k = images.digits()
    assert x.shape == (1797, 1, 8, 8) and k == 10
    assert x.min() == -1 and x.max() == 1
    assert set(labels.tolist()) == set(range(10))


def write_idx(path, array: np.ndarray, compress=False):
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", imgs, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    x, y, k = images.read_mnist_idx(tmp_path / f"train-images-idx3-ubyte{suffix}",
                                    tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert x.shape == (7, 1, 5, 4)
    assert torch.allclose(x[:, 0], torch.from_numpy(imgs).float() / 127.5 - 1)
    assert y.tolist() == labels.tolist() and k == int(labels.max()) + 1
    ds = load_dataset(f"mnist:{tmp_path}")
    assert ds.kind == "image" and ds.shape == (1, 5, 4) and torch.equal(ds.x, x)


def test_mnist_errors_name_the_path(tmp_path):
    good = tmp_path / "imgs"
    write_idx(good, np.zeros((3, 4, 4), np.uint8))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        images.read_mnist_idx(truncated)
    bad = tmp_path / "bad_magic"
    bad.write_bytes(b"\x12\x34\x08\x03" + good.read_bytes()[4:])
    with pytest.raises(UserError, match="bad_magic"):
        images.read_mnist_idx(bad)
    with pytest.raises(UserError, match="nowhere"):
        images.read_mnist_idx(tmp_path / "nowhere")
    write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    with pytest.raises(UserError, match="labels"):
        images.read_mnist_idx(good, tmp_path / "labels")  # 4 labels for 3 images
    with pytest.raises(UserError, match="empty"):
        load_dataset(f"mnist:{tmp_path / 'empty'}")


def write_cifar(path, n, rng):
    rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, n)
    path.write_bytes(rec.tobytes())
    return rec


def test_cifar10_binary_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rec1 = write_cifar(tmp_path / "data_batch_1.bin", 3, rng)
    rec2 = write_cifar(tmp_path / "data_batch_2.bin", 2, rng)
    (tmp_path / "test_batch.bin").write_bytes(b"ignored")
    x, y, k = images.read_cifar10_bin(tmp_path)
    rec = np.concatenate([rec1, rec2])
    assert x.shape == (5, 3, 32, 32) and k == 10
    assert y.tolist() == rec[:, 0].tolist()
    expected = torch.from_numpy(rec[:, 1:].reshape(5, 3, 32, 32)).float() / 127.5 - 1
    assert torch.allclose(x, expected)
    assert images.read_cifar10_bin(tmp_path / "data_batch_2.bin")[0].shape[0] == 2
    assert load_dataset(f"cifar10:{tmp_path}", n=4).x.shape == (4, 3, 32, 32)


def test_cifar10_errors(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(3000))
    with pytest.raises(UserError, match="data_batch_1.bin"):
        images.read_cifar10_bin(tmp_path)
    with pytest.raises(UserError, match="sub"):
        images.read_cifar10_bin(tmp_path / "sub")
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="no CIFAR-10"):
        images.read_cifar10_bin(tmp_path / "other")


# ----------------------------------------------------------------------------- PNG folders
def save_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_png_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for cls in ("cat", "dog"):
        for i in range(3):
            arrays[(cls, i)] = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            save_png(tmp_path / cls / f"{i}.png", arrays[(cls, i)])
    x, y, k = images.read_png_folder(tmp_path)
    assert x.shape == (6, 3, 6, 5) and k == 2 and y.tolist() == [0, 0, 0, 1, 1, 1]
    expected = torch.from_numpy(arrays[("dog", 1)]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(x[4], expected)
    ds = load_dataset(str(tmp_path))
    assert ds.kind == "image" and ds.num_classes == 2


def test_png_folder_flat_grayscale(tmp_path):
    for i in range(4):
        save_png(tmp_path / f"{i}.png", np.full((8, 8), 40 * i, np.uint8))
    x, y, k = images.read_png_folder(tmp_path)
    assert x.shape == (4, 1, 8, 8) and y is None and k == 0
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([0, 40, 80, 120]) / 127.5 - 1)


def test_png_folder_errors(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    save_png(tmp_path / "b.png", np.zeros((9, 8), np.uint8))
    with pytest.raises(UserError, match="b.png"):
        images.read_png_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        images.read_png_folder(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="x.png"):
        images.read_png_folder(tmp_path / "broken")


# ----------------------------------------------------------------------------- arrays
def test_npy_points_and_npz_labels(tmp_path):
    pts = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "pts.npy", pts)
    ds = load_dataset(str(tmp_path / "pts.npy"))
    assert ds.kind == "points" and ds.shape == (3,) and ds.dim == 3 and ds.labels is None
    assert ds.name == "pts" and torch.allclose(ds.x, torch.from_numpy(pts).float())
    np.savez(tmp_path / "lab.npz", samples=pts, y=np.arange(50) % 4)
    ds = load_dataset(str(tmp_path / "lab.npz"), n=20, seed=1)
    assert ds.num_classes == 4 and len(ds) == 20 and ds.labels.dtype == torch.long
    assert torch.equal(ds.x, load_dataset(str(tmp_path / "lab.npz"), n=20, seed=1).x)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
def test_npz_images_layouts(tmp_path, layout):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 3, 10, 12), dtype=np.uint8)
    stored = {"nchw": imgs, "nhwc": imgs.transpose(0, 2, 3, 1), "nhw": imgs[:, 0]}[layout]
    np.savez(tmp_path / "im.npz", x=stored, labels=np.array([0, 1, 1, 0]))
    x, y, k = images.read_array_file(tmp_path / "im.npz")
    channels = 1 if layout == "nhw" else 3
    assert x.shape == (4, channels, 10, 12) and k == 2
    assert torch.allclose(x, torch.from_numpy(imgs[:, :channels]).float() / 127.5 - 1)


def test_array_file_errors(tmp_path):
    np.savez(tmp_path / "nokey.npz", foo=np.zeros((3, 2)))
    with pytest.raises(UserError, match="nokey.npz.*foo"):
        images.read_array_file(tmp_path / "nokey.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="obj.npy"):
        images.read_array_file(tmp_path / "obj.npy")
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(UserError, match="flat.npy"):
        images.read_array_file(tmp_path / "flat.npy")
    np.savez(tmp_path / "badlab.npz", x=np.zeros((3, 2)), labels=np.zeros(4, int))
    with pytest.raises(UserError, match="badlab.npz"):
        images.read_array_file(tmp_path / "badlab.npz")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]]))
    with pytest.raises(UserError, match="nan.npy"):
        images.read_array_file(tmp_path / "nan.npy")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.npz"):
        images.read_array_file(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_defaults():
    assert set(TOYS) <= set(dataset_names())
    assert {"digits", "shapes16", "shapes32"} <= set(dataset_names())
    ds = load_dataset("moons")
    assert isinstance(ds, Dataset) and ds.kind == "points" and len(ds) == 20000
    assert ds.num_classes == 2 and ds.name == "moons" and ds.shape == (2,)
    assert torch.equal(load_dataset("pinwheel", n=100, seed=5).x,
                       load_dataset("pinwheel", n=100, seed=5).x)
    assert not torch.equal(load_dataset("pinwheel", n=100, seed=5).x,
                           load_dataset("pinwheel", n=100, seed=6).x)
    shapes = load_dataset("shapes16", n=64, seed=2)
    assert shapes.shape == (3, 16, 16) and shapes.num_classes == 3 and shapes.dim == 768
    digits = load_dataset("digits", n=100, seed=0)
    assert len(digits) == 100 and digits.shape == (1, 8, 8)
    assert torch.equal(digits.x, load_dataset("digits", n=100, seed=0).x)


def test_registry_errors(tmp_path):
    with pytest.raises(UserError, match="did you mean 'moons'"):
        load_dataset("mons")
    with pytest.raises(UserError, match="missing.npz"):
        load_dataset(str(tmp_path / "missing.npz"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="notes.txt"):
        load_dataset(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="positive"):
        load_dataset("moons", n=0)
