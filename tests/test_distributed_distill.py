"""Every distillation method under two processes (torchrun, gloo on CPU) trains exactly the
student one process trains with the same global batch: each process takes its slice of the
step's global batch, DDP averages the gradients, the EMA (and the consistency target) follow
the synchronised weights, knowledge distillation's pairs are made shard by shard, and the run
folder, its checkpoints and the student are written once, by the main process.

Run as a script (``torchrun ... tests/test_distributed_distill.py GMM OUT``) it distils all
methods into OUT, in one launch (one process-group start for the three methods).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NET = {"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16}
COMMON = {"net": NET, "batch_size": 16, "lr": 3e-3, "warmup": 2, "ema_decay": 0.9, "device": "cpu",
          "checkpoint_every": 3, "seed": 3}
METHODS = {  # run folder: (method, options)
    "knowledge": ("knowledge", {"steps": 6, "pairs": 64, "pair_batch": 16, "pair_nfe": 4, "pair_sampler": "heun"}),
    "progressive": ("progressive", {"steps": 3, "start_steps": 4, "end_steps": 2, "level_groups": 4}),
    "consistency": ("consistency", {"steps": 6, "n": 6, "mu": 0.9, "level_groups": 4, "solver": "heun"}),
    # iCT: no target network, the DDP-wrapped student is also called (without gradients) for the target
    "ict": ("consistency", {"steps": 6, "mode": "training", "schedule": "ict", "s0": 4, "s1": 16}),
    # reflow: two rounds (round 2 on round 1's couplings) and the nested one-step student
    "reflow": ("reflow", {"steps": 4, "rounds": 2, "pairs": 32, "pair_batch": 8, "pair_nfe": 4, "reflow_nfe": 4,
                          "eval_samples": 16}),
    # a conditional teacher (the exact 3-class mixture): labels in the pairs and the batch, guided targets
    "knowledge_cond": ("knowledge", {"steps": 6, "pairs": 64, "pair_batch": 16, "pair_nfe": 4, "guidance": 2.0,
                                     "label_dropout": 0.25, "net": {**NET, "num_classes": 3}, "cond": True}),
    "progressive_cond": ("progressive", {"steps": 3, "start_steps": 4, "end_steps": 2, "level_groups": 4,
                                         "guidance": 2.0, "net": {**NET, "num_classes": 3}, "cond": True}),
    # a second network trained alternately (the loop's Critic): DMD2's and SiD's fake scores, their optimizers,
    # the update ratio, the fake-score-only start; DMD2 also with backward simulation, the GAN head and labels
    "dmd2": ("dmd2", {"steps": 6, "update_ratio": 2, "fake_warmup": 1, "eval_samples": 16}),
    "dmd2_cond": ("dmd2", {"steps": 6, "update_ratio": 2, "fake_warmup": 1, "gan": True, "gen_steps": 2,
                           "eval_samples": 16, "net": {**NET, "num_classes": 3}, "cond": True}),
    "sid": ("sid", {"steps": 6, "fake_warmup": 1, "eval_samples": 16}),
    # CTM: the teacher's solver rows per level group, the EMA target carrying both sides to 0, the DSM term
    "ctm": ("ctm", {"steps": 6, "levels": 6, "eval_samples": 16}),
    # sCM: the JVP tangent through the DDP-wrapped student's own forward, the learned weighting in the student
    "scm": ("scm", {"steps": 6, "tangent_warmup": 3, "eval_samples": 16}),
    # SDS: a generator (learnable points, no net) under the teacher's score, rows cycling through the points
    "sds": ("sds", {"steps": 6, "count": 16, "net": None}),
}


def distill_all(spec: str, out: Path) -> None:
    from fewstep.methods import distill

    cond = Path(spec[4:]).with_name("cond.npz")  # written by the test beside the ring
    for folder, (method, opts) in METHODS.items():
        opts = dict(opts)
        teacher = f"gmm:{cond}" if opts.pop("cond", False) else spec
        distill(method, {"teacher": teacher, **COMMON, **opts}, str(out / folder), progress=False)


def _torchrun():
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return exe if os.path.exists(exe) else shutil.which("torchrun")


@pytest.mark.skipif(_torchrun() is None, reason="torchrun not installed")
def test_two_processes_match_one_for_every_method(tmp_path):
    from safetensors.torch import load_file

    from fewstep.data.gmm import GaussianMixture

    GaussianMixture.ring(4, radius=2.0, std=0.3).save(tmp_path / "ring.npz")
    GaussianMixture.labelled_ring().save(tmp_path / "cond.npz")
    spec = f"gmm:{tmp_path / 'ring.npz'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    two = subprocess.run([_torchrun(), "--nproc_per_node", "2", "--master_port", "29547", __file__, spec,
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "processes.txt").read_text() == "2"  # really two processes (not one, see notes)
    distill_all(spec, tmp_path / "one")  # one process, here
    for name in METHODS:
        a = load_file(tmp_path / "one" / name / "model.safetensors")
        b = load_file(tmp_path / "two" / name / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (name, k, float((a[k] - b[k]).abs().max()))
    # written once: the same files in both runs (checkpoints, rounds, pair chunks)
    for name in METHODS:
        for extra in ("round1/model.safetensors", "round2/model.safetensors", "student/model.safetensors"):
            if (tmp_path / "one" / name / extra).is_file():  # every stage of a staged method
                a, b = (load_file(tmp_path / d / name / extra) for d in ("one", "two"))
                assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), (name, extra)
        files = {p.relative_to(tmp_path / "one" / name) for p in (tmp_path / "one" / name).rglob("*")}
        assert files == {p.relative_to(tmp_path / "two" / name) for p in (tmp_path / "two" / name).rglob("*")}, name
    assert len(list((tmp_path / "two" / "knowledge" / "pairs").glob("chunk_*.safetensors"))) == 4
    # the training really moved the weights (the comparison is not between two initialisations)
    from fewstep.nets import build_net

    torch.manual_seed(COMMON["seed"])
    init = build_net(NET).state_dict()
    moved = load_file(tmp_path / "two" / "consistency" / "model.safetensors")
    assert any(not torch.allclose(init[k], moved[k]) for k in init)


if __name__ == "__main__":
    from accelerate import PartialState

    torch.set_num_threads(1)
    distill_all(sys.argv[1], Path(sys.argv[2]))
    state = PartialState()
    if state.is_main_process:
        (Path(sys.argv[2]) / "processes.txt").write_text(str(state.num_processes))
