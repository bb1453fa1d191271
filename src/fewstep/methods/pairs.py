"""Teacher couplings (x_T, x_0 = teacher sampler(x_T)) shared by the methods that train on
them: knowledge distillation's pairs (Luhman & Luhman 2021), reflow's couplings (Liu et al.
2022), PSF's (Wu et al. 2022).

The pairs live in ``<stage>/pairs/``: ``pairs.json`` (their spec: teacher, sampler, NFE,
grid, count, seed) and chunks ``chunk_NNNNN.safetensors`` + ``.json``, each drawn from its
own seed and written atomically, so an interrupted job resumes at the first missing chunk
and the pairs do not depend on the number of processes.
"""
from __future__ import annotations

import math
import time

import torch

from ..errors import UserError
from ..io import load_weights, read_json, save_checkpoint, write_json
from .common import Conditioning, EvalCounter, quiet_sample


PAIR_SAMPLER = "heun"  # a teacher with no sampler of its own makes pairs with Heun (accurate at pair budgets)


def pair_spec(cfg: dict, teacher, cond: Conditioning = Conditioning()) -> dict:
    """The pairs a config asks for (``pair_sampler``, ``pair_nfe``, ``pair_grid``, ``pairs``,
    ``pair_batch``, ``seed``, ``latent_dim``), checked before any work."""
    from ..grids import make_grid
    from ..samplers import info

    sampler = cfg["pair_sampler"] or teacher.default_sampler or PAIR_SAMPLER
    info(sampler)  # unknown names fail before any work
    if isinstance(cfg["pair_grid"], str) and not cfg["pair_grid"].endswith(".json"):
        make_grid(cfg["pair_grid"], 2, teacher.sigma_min, teacher.sigma_max, process=teacher.process)
    for key in ("pair_nfe", "pairs", "pair_batch"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or int(cfg[key]) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be an integer of at least 1, got {cfg[key]!r}")
    if cfg.get("latent_dim") is not None and (not isinstance(cfg["latent_dim"], int) or int(cfg["latent_dim"]) < 1):
        raise UserError(f"--latent-dim must be an integer of at least 1, got {cfg['latent_dim']!r}")
    from ..train.options import check_batch_memory

    check_batch_memory("--pairs", int(cfg["pairs"]), teacher.shape, copies=2, fix="make fewer pairs")
    check_batch_memory("--pair-batch", int(cfg["pair_batch"]), teacher.shape, copies=4,
                       fix="make them in smaller batches")
    spec = {"teacher": str(cfg["teacher"]), "sampler": sampler, "nfe": int(cfg["pair_nfe"]),
            "grid": cfg["pair_grid"], "pairs": int(cfg["pairs"]), "batch": int(cfg["pair_batch"]),
            "seed": int(cfg["seed"]), "latent_dim": cfg.get("latent_dim"), "sigma_max": teacher.sigma_max}
    if cond.on:
        spec.update(classes=cond.num_classes, **cond.meta())
    return spec


def chunk_folder(st, name: str, spec: dict):
    """``<stage>/<name>/``, the folder of a resumable set of chunks made from the teacher, with its
    ``<name>.json`` spec: written by process 0 the first time; a stored spec that differs from this
    run's is one line (the chunks were made for another run)."""
    folder = st.run.path(f"{name}/{name}.json").parent
    if (folder / f"{name}.json").is_file():
        stored = read_json(folder / f"{name}.json")
        if stored != spec:
            raise UserError(f"{folder} holds {name} made with {stored}; this run asks for {spec}")
    elif st.rank == 0:
        write_json(folder / f"{name}.json", spec)
    return folder


def make_pairs(teacher, cfg: dict, st, cond: Conditioning = Conditioning()):
    """Pairs (latent, x_0 = teacher sampler(x_T)) in ``<stage>/pairs/`` (module docstring).

    ``st`` is the :class:`~fewstep.train.job.Stage`: process r of W makes chunks r, r + W, ...;
    after a barrier every process reads all of them. With a conditional ``cond`` each pair
    has a label (drawn after its noise) and x_0 is the guided teacher's sample for it.
    Returns (latents, x0, info); ``info["labels"]`` holds the labels (None: unconditional)."""
    from tqdm.auto import tqdm

    from ..samplers import info

    start = time.time()
    spec = pair_spec(cfg, teacher, cond)
    folder = chunk_folder(st, "pairs", spec)
    n, b = spec["pairs"], spec["batch"]
    chunks = math.ceil(n / b)
    shape, d = tuple(teacher.shape), math.prod(teacher.shape)
    m = int(spec["latent_dim"]) if spec["latent_dim"] else None
    stochastic = info(spec["sampler"]).stochastic
    for i in tqdm(range(st.rank, chunks, st.world), disable=not st.progress, desc="pairs", dynamic_ncols=True,
                  mininterval=1.0):
        name = f"chunk_{i:05d}"
        if (folder / f"{name}.json").is_file():
            continue
        t0 = time.time()
        g = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + 7919 * i + 17)
        k = min(b, n - i * b)
        if m is None:
            latent = torch.randn((k,) + shape, generator=g, dtype=torch.float64)
            x_T = latent
        else:
            latent = torch.randn(k, m, generator=g, dtype=torch.float64)
            parts = [latent[:, :min(m, d)]] + ([torch.randn(k, d - m, generator=g, dtype=torch.float64)] if m < d else [])
            x_T = torch.cat(parts, 1).reshape((k,) + shape)
        x_T = (teacher.sigma_max * x_T).to(teacher.device, teacher.dtype)
        labels = cond.draw(k, g)
        counter = EvalCounter(teacher.denoiser)
        opts = {"generator": torch.Generator(device=teacher.device).manual_seed(int(g.initial_seed()) + 1)} if stochastic else {}
        if labels is not None:
            opts["extra_args"] = {"labels": labels.to(teacher.device)}
        x0 = quiet_sample(cond.teacher(counter), x_T, sampler=spec["sampler"], nfe=spec["nfe"], grid=spec["grid"],
                          sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max, process=teacher.process, **opts)
        tensors = {"latent": (teacher.sigma_max * latent).float(), "x0": x0.float().cpu()}
        if labels is not None:
            tensors["labels"] = labels.cpu()
        save_checkpoint(folder, tensors, {"pairs": k, "teacher_evals": counter.evals, "seconds": time.time() - t0},
                        name=name)
        st.commit()  # pairs on disk are worth resuming
    st.barrier()  # every process's chunks are on disk
    lat, x0, labels, evals, secs = [], [], [], 0, 0.0
    for i in range(chunks):
        w = load_weights(folder / f"chunk_{i:05d}.safetensors")
        meta = read_json(folder / f"chunk_{i:05d}.json")
        lat.append(w["latent"])
        x0.append(w["x0"])
        if cond.on:
            labels.append(w["labels"])
        evals, secs = evals + int(meta["teacher_evals"]), secs + float(meta["seconds"])
    if not bool(torch.isfinite(torch.cat(x0)).all()):
        raise UserError(f"the teacher's pairs in {folder} hold NaN or inf; use another --pair-sampler or more --pair-nfe")
    return torch.cat(lat), torch.cat(x0), {"teacher_evals": evals, "pair_seconds": secs, **spec,
                                           "pair_seconds_here": time.time() - start,
                                           "labels": torch.cat(labels) if cond.on else None}


def stage_cost(st, info: dict) -> dict:
    """A stage's cost when it made (or read) teacher pairs: the pairs' own seconds (summed over
    their chunks, also those an interrupted process made) plus the training this process did
    (its seconds less the time it spent on the pairs); a training interrupted and resumed counts
    from the resume only, as every stage's seconds do."""
    train = st.seconds - float(info["pair_seconds_here"])
    return {"teacher_evals": info["teacher_evals"], "pair_seconds": info["pair_seconds"], "train_seconds": train,
            "seconds": train + float(info["pair_seconds"])}
