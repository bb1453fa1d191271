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


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(TORCHRUN),
                                    reason="torchrun not installed")


def _one_and_two(tmp_path, args, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "fewstep", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), "-m", "fewstep", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "two" / "model.json").read_text())["num_processes"] == 2
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    return a, b


@needs_torchrun
def test_two_processes_match_one(tmp_path):
    _one_and_two(tmp_path, ARGS, 29533)
    assert len(list((tmp_path / "two" / "checkpoints").glob("step_*"))) >= 1


@needs_torchrun
@pytest.mark.parametrize("family, extra, port", [
    # the EBM's replay buffer: every process writes its slice's chain ends, gathered, so both
    # copies stay the buffer one process has; a diverged buffer would change the weights from
    # the second step on (the chains start from it)
    ("ebm", ["--ebm-buffer", "200", "--ebm-steps", "5"], 29541),
    # sliced score matching: the Hutchinson projections are drawn per step for the global batch
    ("sm", ["--sm-objective", "sliced"], 29542),
])
def test_two_processes_match_one_for_families(tmp_path, family, extra, port):
    args = [a if a != "12" else "8" for a in ARGS] + ["--family", family, *extra]
    _one_and_two(tmp_path, args, port)
