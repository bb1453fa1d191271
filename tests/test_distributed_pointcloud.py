"""PSF (``fewstep distill pointcloud``) under two processes (torchrun, gloo on CPU) trains
exactly what one process trains with the same global batch, in all three stages: the flow
teacher, the reflow on the teacher's couplings (made shard by shard) and the one-step
Chamfer student on the reflowed couplings; every run folder, checkpoint, coupling chunk,
model, eval.json and samples.png is written once, by the main process.

Run as a script (``torchrun ... tests/test_distributed_pointcloud.py OUT``) it distils into OUT.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CFG = {"data": "pointclouds:points=16,classes=sphere+cube,pose=none",
       "net": {"kind": "pointnet", "dim": 3, "hidden": 16, "depth": 1, "emb_dim": 16},
       "n_data": 32, "teacher_steps": 40, "reflow_steps": 4, "steps": 4, "pairs": 32, "pair_batch": 8,
       "pair_nfe": 3, "eval_clouds": 6, "eval_nfe": 3, "renders": 2, "batch_size": 8, "lr": 1e-2, "warmup": 2,
       "ema_decay": 0.9, "device": "cpu", "checkpoint_every": 20, "seed": 5}
FILES = ("round1/model.safetensors", "round2/model.safetensors", "student/model.safetensors", "model.safetensors")
# Adam steps behind each file's weights (round 2 starts from round 1's, the student from round 2's)
STEPS = {"round1": 40, "round2": 44, "student": 48, "model.safetensors": 48}


def tolerance(name: str) -> float:
    """Two processes add the gradient halves in another order than one process: ~1e-7
    relative differences in a gradient. Adam turns a gradient difference into an update
    difference of at most lr per step per weight (only where m/sqrt(v) is ill-conditioned,
    e.g. a sign change), and later stages inherit earlier ones' differences through their
    start and their couplings. A real error (another batch slice, a double-counted shard)
    moves most weights by O(lr) every step; 1% of the lr * steps envelope separates the two."""
    return 0.01 * CFG["lr"] * STEPS[name.split("/")[0]]


def distill_pointcloud(out: Path) -> None:
    from fewstep.methods import distill

    distill("pointcloud", dict(CFG), str(out), progress=False)


def _torchrun():
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return exe if os.path.exists(exe) else shutil.which("torchrun")


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed")
def test_two_processes_match_one_in_every_stage(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    two = subprocess.run([_torchrun(), "--nproc_per_node", "2", "--master_port", "29549", __file__,
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "processes.txt").read_text() == "2"  # really two processes
    distill_pointcloud(tmp_path / "one")  # one process, here
    one, two_ = tmp_path / "one", tmp_path / "two"
    for name in FILES:
        a, b = load_file(one / name), load_file(two_ / name)
        assert a.keys() == b.keys()
        for k in a:
            assert float((a[k] - b[k]).abs().max()) <= tolerance(name), (name, k, float((a[k] - b[k]).abs().max()))
    # written once: the same files (checkpoints, coupling chunks, models, eval, renders) in both runs
    assert {p.relative_to(one) for p in one.rglob("*")} == {p.relative_to(two_) for p in two_.rglob("*")}
    for stage in ("round2", "student"):  # 4 chunks each, made 2 + 2 under two processes
        assert len(list((two_ / stage / "pairs").glob("chunk_*.safetensors"))) == 4
    ev1, ev2 = (json.loads((d / "eval.json").read_text()) for d in (one, two_))
    for key, m in ev1["models"].items():
        assert m["mmd_cd"] == pytest.approx(ev2["models"][key]["mmd_cd"], rel=1e-3), key
    # every stage really moved the weights it started from
    for start, end in (("round1", "round2"), ("round2", "student")):
        a, b = load_file(two_ / start / "model.safetensors"), load_file(two_ / end / "model.safetensors")
        assert any(not torch.allclose(a[k], b[k]) for k in a), end


if __name__ == "__main__":
    from accelerate import PartialState

    torch.set_num_threads(1)
    distill_pointcloud(Path(sys.argv[1]))
    state = PartialState()
    if state.is_main_process:
        (Path(sys.argv[1]).parent / "processes.txt").write_text(str(state.num_processes))
