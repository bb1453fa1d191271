"""The GPU recipes run end to end at toy size on CPU, from local MNIST IDX / CIFAR-10 binary
files (written here with random content in the real formats)."""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from fewstep.model import load
from fewstep.train.config import read_config_file
from fewstep.train.teacher import train_teacher

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _mnist(folder: Path, n=32):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    lab = rng.integers(0, 10, n, dtype=np.uint8)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + img.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + lab.tobytes())


def _cifar(folder: Path, n=32):
    rng = np.random.default_rng(1)
    rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
    (folder / "data_batch_1.bin").write_bytes(rec.tobytes())


@pytest.mark.parametrize("recipe,data,make", [("mnist_teacher.json", "mnist", _mnist),
                                             ("cifar10_teacher.json", "cifar10", _cifar)])
def test_recipe_runs_at_toy_size(tmp_path, recipe, data, make):
    make(tmp_path)
    cfg = read_config_file(RECIPES / recipe)
    cfg["net"] = {**cfg["net"], "base_channels": 16, "attn_resolutions": []}  # toy width, same structure
    cfg.update(data=f"{data}:{tmp_path}", steps=2, batch_size=4, checkpoint_every=1, eval_samples=2, eval_nfe=2,
               device="cpu", warmup=1)
    out = train_teacher(cfg, str(tmp_path / "run"), progress=False)
    m = load(out, device="cpu")
    shape = (1, 28, 28) if data == "mnist" else (3, 32, 32)
    assert m.shape == shape and json.loads((Path(out) / "model.json").read_text())["data"]["kind"] == "image"
