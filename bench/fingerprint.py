"""Fixed-seed runs of every distillation method on the exact 2-D ring teacher, fingerprinted:
the SHA-256 of each stage's model.safetensors (tensor bytes in key order) and the sliced-W2 of
the final student's 1-step samples to the exact mixture. Run it before and after a refactor of
the runner: equal hashes mean the same student bit for bit.

    .venv/bin/python bench/fingerprint.py --out bench/out/fingerprint_after.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewstep.data.gmm import GaussianMixture
from fewstep.methods import distill
from fewstep.metrics import sliced_w2
from fewstep.model import load

MLP = {"kind": "mlp", "dim": 2, "hidden": 64, "depth": 2, "emb_dim": 32}
LOOP = {"batch_size": 64, "lr": 2e-3, "warmup": 10, "ema_decay": 0.9, "device": "cpu", "checkpoint_every": 100,
        "net": MLP}


def runs(spec: str) -> dict:
    return {
        "knowledge": ("knowledge", {"teacher": spec, "steps": 150, "pairs": 512, "pair_batch": 256, "pair_nfe": 16}),
        "progressive": ("progressive", {"teacher": spec, "steps": 60, "start_steps": 8, "end_steps": 1}),
        "consistency_cd": ("consistency", {"teacher": spec, "steps": 150}),
        "consistency_ict": ("consistency", {"data": spec, "mode": "training", "schedule": "ict", "steps": 150}),
        "reflow_teacher": ("reflow", {"teacher": spec, "couplings": "teacher", "rounds": 2, "steps": 80, "pairs": 256,
                                      "pair_batch": 128, "pair_nfe": 16, "reflow_nfe": 16, "eval_samples": 200}),
        "reflow_independent": ("reflow", {"data": spec, "couplings": "independent", "rounds": 1, "steps": 80,
                                          "pairs": 256, "pair_batch": 128, "reflow_nfe": 16, "eval_samples": 200}),
        "pointcloud": ("pointcloud", {"data": "pointclouds:points=32,classes=sphere+cube,pose=none", "n_data": 64,
                                      "net": {"kind": "pointnet", "dim": 3, "hidden": 32, "depth": 2, "emb_dim": 32},
                                      "teacher_steps": 40, "reflow_steps": 30, "steps": 30, "pairs": 32,
                                      "pair_batch": 16, "pair_nfe": 4, "eval_clouds": 8, "eval_nfe": 4, "renders": 1,
                                      "batch_size": 8}),
    }


def tensor_hash(path: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path)).items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(1)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        gmm = GaussianMixture.ring(8, radius=2.0, std=0.25)
        gmm.save(Path(tmp) / "ring.npz")
        spec = f"gmm:{Path(tmp) / 'ring.npz'}"
        ref = gmm.sample(2000, generator=torch.Generator().manual_seed(5)).float()
        for name, (method, opts) in runs(spec).items():
            if a.only and name not in a.only:
                continue
            cfg = {**LOOP, **opts}
            t0 = time.time()
            out = distill(method, cfg, str(Path(tmp) / name), progress=False)
            hashes = {str(p.parent.relative_to(out)): tensor_hash(p) for p in sorted(Path(out).rglob("model.safetensors"))}
            row = {"hashes": hashes, "seconds": round(time.time() - t0, 1)}
            if method != "pointcloud":
                m = load(out)
                x = m.sample(2000, 1, seed=3)[0].float()
                row["sliced_w2_1nfe"] = sliced_w2(x, ref)
            result[name] = row
            print(name, json.dumps(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
