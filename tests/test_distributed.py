"""Two processes on CPU (gloo, through torchrun) train exactly what one process trains
with the same global batch: each process takes its slice of the step's global batch and
DDP averages the gradients."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["train", "--data", "moons", "--steps", "12", "--batch-size", "64", "--checkpoint-every", "6",
        "--device", "cpu", "--seed", "1", "--quiet"]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "fewstep", *ARGS, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "fewstep", *ARGS,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "two" / "model.json").read_text())["num_processes"] == 2
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert len(list((tmp_path / "two" / "checkpoints").glob("step_*"))) >= 1
