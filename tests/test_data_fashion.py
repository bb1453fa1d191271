"""Fashion-MNIST (`--data fashion`) and official test splits: training never sees the test
images, evaluation draws from them. The synthetic IDX folders check the logic exactly; the
tests marked `real` read Debian's dataset-fashion-mnist (installed by .ci/run)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.data.registry import FASHION_DIR, held_out, load_dataset, test_split
from fewstep.errors import UserError
from test_data import write_idx

REAL = Path(FASHION_DIR) / "t10k-images-idx3-ubyte.gz"
real = pytest.mark.skipif(not REAL.is_file(), reason="Debian's dataset-fashion-mnist is not installed "
                          "(apt-get install dataset-fashion-mnist; .ci/run does)")


def _folder(tmp_path, n_train=40, n_test=20, size=6):
    """IDX files whose train pixels are all below 128 and test pixels all 200 or more."""
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 128, (n_train, size, size), dtype=np.uint8), True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", (np.arange(n_train) % 10).astype(np.uint8), True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(200, 256, (n_test, size, size), dtype=np.uint8), True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", (np.arange(n_test) % 10).astype(np.uint8), True)
    return tmp_path


def test_mnist_folder_has_both_splits_kept_apart(tmp_path):
    d = _folder(tmp_path)
    train, test = load_dataset(f"mnist:{d}"), load_dataset(f"mnist:{d}:test")
    assert len(train) == 40 and len(test) == 20 and train.num_classes == test.num_classes == 10
    assert float(train.x.max()) < 0 and float(test.x.min()) > 0.5  # 127 -> -0.004, 200 -> 0.57
    assert test_split(f"mnist:{d}") == f"mnist:{d}:test"
    held, how = held_out(f"mnist:{d}", 15, seed=3, train_n=None)
    assert how == "test" and len(held) == 15 and float(held.x.min()) > 0.5
    # a folder without the t10k files has no test split: held-out data comes from the training set
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    assert test_split(f"mnist:{d}") is None
    assert held_out(f"mnist:{d}", 10, seed=0)[1] == "training"
    with pytest.raises(UserError, match="t10k-images"):
        load_dataset(f"mnist:{d}:test")


def test_fashion_name_reads_its_folder_and_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_FASHION_DIR", str(_folder(tmp_path)))
    assert len(load_dataset("fashion")) == 40 and len(load_dataset("fashion:test")) == 20
    assert test_split("fashion") == "fashion:test"
    monkeypatch.setenv("FEWSTEP_FASHION_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as e:
        load_dataset("fashion")
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg and "mnist:DIR" in msg


def test_bench_reference_sets_come_from_the_test_split(tmp_path, monkeypatch):
    """The bench's set A (what methods are measured against) is test images, B (the floor's
    second set) training images, also per class for a conditional teacher."""
    from types import SimpleNamespace

    from fewstep.report.bench import conditional_sets, real_sets

    monkeypatch.setenv("FEWSTEP_FASHION_DIR", str(_folder(tmp_path, n_train=200, n_test=100)))
    teacher = SimpleNamespace(kind="image", shape=(1, 6, 6), num_classes=10, meta={"data": "fashion"},
                              config={"data": "fashion"})
    a, b, spec = real_sets(teacher, "run", 30, seed=0, data="fashion")
    assert spec == "fashion" and len(a) == len(b) == 30
    assert float(a.min()) > 0.5 and float(b.max()) < 0
    labels = torch.arange(30) % 10
    a, b, _, kept = conditional_sets(teacher, "run", labels, seed=0, data="fashion")
    assert torch.equal(kept, labels) and float(a.min()) > 0.5 and float(b.max()) < 0


@real
def test_real_fashion_mnist():
    train, test = load_dataset("fashion"), load_dataset("fashion:test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.num_classes == 10 and torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert float(train.x.min()) == -1.0 and float(train.x.max()) == 1.0
