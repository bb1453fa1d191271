"""User point clouds from .npy / .npz files: read as clouds [n, N, 3] only when marked
(``clouds:FILE`` or an .npz array named clouds / points), never mistaken for grayscale
images 3 pixels wide; malformed and ambiguous arrays refused in one line."""
import numpy as np
import pytest
import torch

from fewstep.data import images
from fewstep.data.registry import load_dataset
from fewstep.errors import UserError


def _clouds(n=6, N=20, seed=0):
    return np.random.default_rng(seed).normal(size=(n, N, 3))


def test_clouds_prefix_reads_npy_and_npz_as_clouds(tmp_path):
    c = _clouds()
    np.save(tmp_path / "c.npy", c)
    ds = load_dataset(f"clouds:{tmp_path / 'c.npy'}")
    assert ds.kind == "clouds" and ds.shape == (20, 3) and len(ds) == 6 and ds.labels is None
    assert torch.equal(ds.x, torch.from_numpy(c).float())
    assert ds.name == f"clouds:{tmp_path / 'c.npy'}"  # the name loads the same data again
    assert torch.equal(load_dataset(ds.name).x, ds.x)
    # a subset of n clouds, drawn with the seed; labels from the npz
    np.savez(tmp_path / "c.npz", x=c, labels=np.array([0, 1, 2, 0, 1, 2]))
    sub = load_dataset(f"clouds:{tmp_path / 'c.npz'}", n=4, seed=3)
    assert sub.kind == "clouds" and len(sub) == 4 and sub.num_classes == 3
    rows = [int(np.argmin(np.abs(c - row.numpy()).sum((1, 2)))) for row in sub.x]
    assert np.allclose(c[rows], sub.x.numpy(), atol=1e-6) and len(set(rows)) == 4
    assert sub.labels.tolist() == [r % 3 for r in rows]
    # integer coordinates are coordinates, not 8-bit pixels
    np.save(tmp_path / "u8.npy", np.full((2, 4, 3), 200, dtype=np.uint8))
    assert float(load_dataset(f"clouds:{tmp_path / 'u8.npy'}").x.max()) == 200.0


@pytest.mark.parametrize("key", ["clouds", "points"])
def test_npz_arrays_named_clouds_or_points_are_clouds(tmp_path, key):
    c = _clouds(5, 7)
    np.savez(tmp_path / "k.npz", **{key: c, "y": np.arange(5)})
    ds = load_dataset(str(tmp_path / "k.npz"))
    assert ds.kind == "clouds" and ds.shape == (7, 3) and ds.num_classes == 5
    assert torch.equal(ds.x, torch.from_numpy(c).float())


def test_images_are_not_read_as_clouds(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (4, 10, 12), dtype=np.uint8)
    np.save(tmp_path / "g.npy", imgs)
    ds = load_dataset(str(tmp_path / "g.npy"))
    assert ds.kind == "image" and ds.shape == (1, 10, 12)
    rgb = np.random.default_rng(2).integers(0, 256, (4, 10, 12, 3), dtype=np.uint8)  # trailing 3, rank 4
    np.save(tmp_path / "rgb.npy", rgb)
    ds = load_dataset(str(tmp_path / "rgb.npy"))
    assert ds.kind == "image" and ds.shape == (3, 10, 12)
    assert torch.allclose(ds.x, torch.from_numpy(rgb.transpose(0, 3, 1, 2)).float() / 127.5 - 1)


def test_ambiguous_and_malformed_arrays_are_refused(tmp_path):
    np.save(tmp_path / "amb.npy", _clouds())  # [n, N, 3] unmarked: clouds or 3-pixel-wide images?
    with pytest.raises(UserError, match=r"amb.npy: shape \(6, 20, 3\) is ambiguous.*clouds:"):
        load_dataset(str(tmp_path / "amb.npy"))
    np.savez(tmp_path / "both.npz", x=_clouds(), clouds=_clouds())
    with pytest.raises(UserError, match="both.npz: holds both 'x' and 'clouds'"):
        load_dataset(str(tmp_path / "both.npz"))
    bad = {"two_d.npy": np.zeros((6, 20, 2)), "rank4.npy": np.zeros((6, 20, 3, 1)), "flat.npy": np.zeros((6, 3)),
           "empty.npy": np.zeros((0, 20, 3)), "text.npy": np.array([[["a", "b", "c"]]])}
    for name, arr in bad.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(UserError, match=rf"clouds:.*{name}: expected point clouds \[n, N, 3\]"):
            load_dataset(f"clouds:{tmp_path / name}")
    np.savez(tmp_path / "pts.npz", points=np.zeros((6, 2)))
    with pytest.raises(UserError, match=r"array 'points' of .*pts.npz: expected point clouds \[n, N, 3\]"):
        load_dataset(str(tmp_path / "pts.npz"))
    with pytest.raises(UserError, match="needs a .npy or .npz"):
        load_dataset(f"clouds:{tmp_path / 'c.txt'}")
    with pytest.raises(UserError, match="file not found"):
        load_dataset(f"clouds:{tmp_path / 'missing.npy'}")
    np.save(tmp_path / "nan.npy", np.full((2, 4, 3), np.nan))
    with pytest.raises(UserError, match="nan.npy: contains NaN"):
        images.read_array_file(tmp_path / "nan.npy", clouds=True)


def test_command_line_refuses_an_ambiguous_file_in_one_line(tmp_path, capsys):
    from fewstep.cli import main

    np.save(tmp_path / "amb.npy", _clouds())
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "amb.npy"), "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ambiguous" in err and not out.exists()


def test_psf_distils_clouds_from_a_file_and_scores_them_on_clouds_left_out(tmp_path):
    from fewstep.methods import distill

    c = load_dataset("pointclouds:points=12,classes=sphere+cube,pose=none", n=40, seed=4).x.numpy()
    np.savez(tmp_path / "mine.npz", clouds=c)
    cfg = {"data": str(tmp_path / "mine.npz"), "net": {"kind": "pointnet", "dim": 3, "hidden": 8, "depth": 1,
                                                       "emb_dim": 8},
           "n_data": 32, "teacher_steps": 2, "reflow_steps": 2, "steps": 2, "pairs": 8, "pair_batch": 8,
           "pair_nfe": 2, "eval_clouds": 6, "eval_nfe": 2, "renders": 1, "batch_size": 4, "device": "cpu"}
    out = distill("pointcloud", cfg, str(tmp_path / "run"), progress=False)
    import json

    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert out == str(tmp_path / "run") and ev["reference"] == "held-out" and ev["reference_clouds"] == 6
    assert load_dataset(str(tmp_path / "mine.npz")).kind == "clouds" and "mmd_cd" in ev["models"]["student_1"]
