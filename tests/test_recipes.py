"""The GPU recipes (teachers and their distillation) run end to end at toy size on CPU, from
local MNIST IDX / CIFAR-10 binary files (written here with random content in the real formats):
the same options, only the width, steps, batch and number of rounds/pairs made small."""
import gzip
import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fewstep.model import load
from fewstep.train.config import read_config_file
from fewstep.train.teacher import train_teacher

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _mnist(folder: Path, n=32, prefix="train"):
    rng = np.random.default_rng(0 if prefix == "train" else 2)
    img = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    lab = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + img.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + lab.tobytes())


def _fashion(folder: Path, n=32):
    """Fashion-MNIST's layout (both splits) in ``folder``, named by $FEWSTEP_FASHION_DIR."""
    _mnist(folder, n)
    _mnist(folder, n, prefix="t10k")
    os.environ["FEWSTEP_FASHION_DIR"] = str(folder)


def _cifar(folder: Path, n=32):
    rng = np.random.default_rng(1)
    rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
    (folder / "data_batch_1.bin").write_bytes(rec.tobytes())


def _toy_teacher(recipe: str, data: str, folder: Path, evaluate: bool = True) -> str:
    cfg = read_config_file(RECIPES / recipe)
    cfg["net"] = {**cfg["net"], "base_channels": 16, "attn_resolutions": []}  # toy width, same structure
    cfg.update(data="fashion" if data == "fashion" else f"{data}:{folder}", steps=2, batch_size=4, checkpoint_every=1, eval_samples=2, eval_nfe=2,
               device="cpu", warmup=1)
    return train_teacher(cfg, str(folder / "run"), progress=False, evaluate=evaluate)


@pytest.fixture(autouse=True)
def _no_fashion_dir_leak():
    before = os.environ.get("FEWSTEP_FASHION_DIR")
    yield
    if before is None:
        os.environ.pop("FEWSTEP_FASHION_DIR", None)
    else:
        os.environ["FEWSTEP_FASHION_DIR"] = before


@pytest.mark.parametrize("recipe,data,make", [("mnist_teacher.json", "mnist", _mnist),
                                             ("mnist_teacher_uncond.json", "mnist", _mnist),
                                             ("fashion_teacher.json", "fashion", _fashion),
                                             ("fashion_teacher_uncond.json", "fashion", _fashion),
                                             ("cifar10_teacher.json", "cifar10", _cifar)])
def test_recipe_runs_at_toy_size(tmp_path, recipe, data, make):
    make(tmp_path)
    out = _toy_teacher(recipe, data, tmp_path)
    m = load(out, device="cpu")
    shape = (3, 32, 32) if data == "cifar10" else (1, 28, 28)
    assert m.shape == shape and json.loads((Path(out) / "model.json").read_text())["data"]["kind"] == "image"


# ------------------------------------------------------------------------- distillation
DISTILL = sorted(p.name for p in RECIPES.glob("*_distill_*.json"))
TEACHER_OF = {"mnist": ("mnist_teacher_uncond.json", _mnist), "cifar10": ("cifar10_teacher.json", _cifar),
              "fashion": ("fashion_teacher_uncond.json", _fashion)}
TOY = {"progressive": {"start_steps": 4},                       # rounds 2 -> 1 instead of 64 -> ... -> 1
       "consistency": {},
       "knowledge": {"pairs": 8, "pair_batch": 4, "pair_nfe": 2},
       "reflow": {"pairs": 8, "pair_batch": 4, "pair_nfe": 2, "reflow_nfe": 2, "distill_steps": 2, "eval_samples": 4}}


@pytest.fixture(scope="module")
def toy_teachers(tmp_path_factory):
    """One toy teacher per data set, made by its teacher recipe (lazily)."""
    made = {}

    def get(data):
        if data not in made:
            folder = tmp_path_factory.mktemp(data)
            recipe, make = TEACHER_OF[data]
            make(folder)
            made[data] = (_toy_teacher(recipe, data, folder, evaluate=False), folder)
        if data == "fashion":  # the students read --data fashion through the same folder
            os.environ["FEWSTEP_FASHION_DIR"] = str(made[data][1])
        return made[data][0]

    return get


def test_distill_recipes_are_complete():
    """Progressive and consistency for both sizes; every option valid for its method; the
    comment names the teacher recipe, the network, the GPU time and the command."""
    from fewstep.methods import resolve

    assert {"mnist_distill_progressive.json", "mnist_distill_consistency.json",
            "cifar10_distill_progressive.json", "cifar10_distill_consistency.json"} <= set(DISTILL)
    for name in DISTILL:
        data, _, method = name[:-5].split("_", 2)
        about = json.loads((RECIPES / name).read_text())["_about"]
        assert TEACHER_OF[data][0] in about and "GPU" in about and "param UNet" in about, name
        assert f"fewstep distill {method} --config recipes/{name}" in about, name
        resolve(method, None, str(RECIPES / name))  # unknown or invalid options fail here


@pytest.mark.parametrize("recipe", DISTILL)
def test_distill_recipe_runs_at_toy_size(toy_teachers, tmp_path, recipe):
    from fewstep.methods import distill

    data, _, method = recipe[:-5].split("_", 2)
    teacher = toy_teachers(data)
    toy = {"teacher": teacher, "steps": 2, "batch_size": 4, "checkpoint_every": 1, "warmup": 1, "device": "cpu",
           **TOY[method]}
    out = distill(method, toy, str(tmp_path / "student"), config_file=str(RECIPES / recipe), progress=False)
    student, t = load(out, device="cpu"), load(teacher, device="cpu")
    meta = json.loads((Path(out) / "model.json").read_text())
    assert meta["role"] == "student" and meta["method"] == method and meta["net"] == t.meta["net"]
    x, _ = student.sample(3, nfe=1, seed=0)
    assert x.shape == (3, *t.shape) and bool(x.isfinite().all())


def test_renders_teacher_recipe_runs_at_toy_size(tmp_path):
    """recipes/renders_teacher.json (the SDS teacher of issue 16) on 16 renders, 2 steps, toy width."""
    cfg = read_config_file(RECIPES / "renders_teacher.json")
    assert cfg["data"].startswith("renders:") and cfg["conditional"] and cfg["net"]["num_classes"] == 5
    cfg["net"] = {**cfg["net"], "base_channels": 16}
    cfg.update(n_data=16, steps=2, batch_size=4, checkpoint_every=1, eval_samples=2, eval_nfe=2, device="cpu",
               warmup=1)
    model = load(train_teacher(cfg, str(tmp_path / "run"), progress=False))
    assert model.num_classes == 5 and tuple(model.shape) == (3, 16, 16)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is installed by .ci/run")
def test_speech_teacher_recipe_runs_at_toy_size(tmp_path):
    """recipes/speech_teacher.json (issue 18's ProDiff teacher) on 8 utterances, 2 steps, toy width;
    its final check speaks held-out sentences and writes the mel L1 beside the mean-frame guess."""
    cfg = read_config_file(RECIPES / "speech_teacher.json")
    assert cfg["data"].startswith("speech:") and cfg["net"]["kind"] == "prodiff" and cfg["prediction"] == "x0"
    cfg["net"] = {**cfg["net"], "hidden": 32, "encoder_layers": 1, "residual_layers": 2, "residual_channels": 32}
    cfg.update(data="speech:8", steps=2, batch_size=4, checkpoint_every=1, eval_nfe=2, device="cpu", warmup=1)
    run = Path(train_teacher(cfg, str(tmp_path / "run"), progress=False))
    model = load(str(run))
    ev = json.loads((run / "eval.json").read_text())
    assert model.kind == "speech" and tuple(model.shape) == (1024, 80)
    assert ev["utterances"] == 8 and math.isfinite(ev["mel_l1"]) and ev["mel_l1_mean_frame"] > 0
    assert (run / "samples.png").is_file()
