"""PSF: point-cloud generation in three stages, flow -> reflow -> one step (Wu et al. 2022;
survey eq. 44-45).

Clouds x0 [N, 3] (``--data pointclouds:...``), Gaussian noise eps of the same shape, the
:class:`~fewstep.process.LinearFlow` interpolation x_t = (1 - t) x0 + t eps and a
permutation-equivariant velocity net v (:class:`~fewstep.nets.pointnet.PointNet`, the
``flow`` prediction: in sigma-space the denoiser is D(y, sigma) = x_t - t v(x_t, t), one
Euler step from t to 0).

1. ``teacher/`` -- the flow teacher (eq. 44), on independent (data, noise) pairs:

       min_theta E_{t ~ U, x0 ~ data, eps ~ N(0, I)} || v_theta(x_t, t) - (eps - x0) ||^2

2. ``reflow/`` -- the same objective (eq. 43) on the teacher's couplings
   (z, x1 = ODE_teacher(z)), z ~ N(0, I), x_t = (1 - t) x1 + t z, target z - x1: the
   paths straighten, so few Euler steps suffice. Starts from the teacher's weights.

3. ``student/`` -- the one-step student (eq. 45): starting from the reflowed weights, one
   Euler step from the noise, G(z) = x_T - T v_phi(x_T, T) with T = t_max, x_T = T z
   (= D(sigma_max z, sigma_max) in sigma-space; PSF's x_T + f_phi(x_T, T) in its time),
   trained on the reflowed model's couplings (z, x = ODE_reflow(z)) with a distance
   between point sets, since the order of the points carries no meaning:

       min_phi E_z Dist(G(z), ODE_reflow(z)),   Dist = Chamfer (default) or exact EMD.

Each stage is a run folder holding a loadable model (``fewstep.load``), its own
checkpoints (``--resume`` continues the stage it stopped in) and, for stages 2 and 3,
the couplings (``pairs/``, made by :func:`fewstep.methods.knowledge.make_pairs`). A
teacher may be given (``--teacher``: a flow-process, flow-prediction cloud model), then
stage 1 is skipped. The top folder's model is the student (``fewstep sample OUT --nfe 1``);
``eval.json`` holds MMD-CD, COV-CD and 1-NNA-CD of the teacher (multistep), the reflowed
flow and the student (one step) against held-out clouds, and ``samples.png`` renders a
few clouds of each.

Under ``accelerate launch --num_processes N`` (or torchrun) every stage trains on its
process's slice of each step's global batch (DDP averages the gradients, so the weights
and their EMA are those of one process with the same batch), the couplings are made shard
by shard (:func:`~fewstep.methods.knowledge.make_pairs`), and the main process alone
creates the run folders (:func:`~fewstep.train.runfolder.open_run`) and writes the
checkpoints, the models, ``eval.json`` and ``samples.png``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..process import LinearFlow
from ..train.checkpoint import save_checkpoint, write_json
from ..train.loop import Task, fit, make_accelerator
from ..train.runfolder import RunFolder, open_run
from .common import (Timer, batch_slice, call_denoiser, check_positive, fit_config, fixed_grids, load_teacher,
                     student_meta)

DEFAULTS = {
    "n_data": 2000,            # training clouds
    "teacher_steps": 4000,     # stage 1 (eq. 44)
    "reflow_steps": 2000,      # stage 2 (eq. 43 on the teacher's couplings)
    "pair_sampler": "euler",
    "pair_nfe": 32,
    "pair_grid": "time",
    "pairs": 2000,
    "pair_batch": 250,
    "distance": "chamfer",     # stage 3 (eq. 45): chamfer | emd
    "eval_clouds": 100,
    "eval_nfe": 32,
    "eval_sampler": "euler",
    "eval_emd": False,
    "renders": 4,
}
COMMON_OVERRIDES = {"batch_size": 32, "steps": 1000}
HELP = {
    "n_data": "number of training clouds drawn from --data (default 2000)",
    "teacher_steps": "training steps of the flow teacher, stage 1 (skipped with --teacher)",
    "reflow_steps": "training steps of the reflow stage on the teacher's couplings",
    "pair_sampler": "sampler that solves the teacher's / reflowed ODE for the couplings (default euler)",
    "pair_nfe": "evaluations per coupling (default 32)",
    "pair_grid": "sigma grid of the couplings' sampler (default time: uniform in t)",
    "pairs": "couplings per stage (default 2000)",
    "pair_batch": "couplings made per batch, one resumable chunk each",
    "distance": "one-step student loss between clouds: chamfer (PSF) or emd (exact, Hungarian)",
    "eval_clouds": "clouds per set for MMD-CD / COV-CD / 1-NNA-CD in eval.json (default 100)",
    "eval_nfe": "evaluations of the multistep teacher in eval.json (default 32)",
    "eval_sampler": "sampler of the multistep teacher in eval.json (default euler, grid uniform in t)",
    "eval_emd": "also MMD/COV/1-NNA with the EMD ground distance (slow: N^3 per pair)",
    "renders": "clouds per model in samples.png",
}
STAGES = ("teacher", "reflow", "student")
DISTANCES = ("chamfer", "emd")


def cloud_distance(name: str):
    """The per-pair training distance of stage 3: [B, N, 3] x [B, N, 3] -> [B]."""
    from ..metrics.pointcloud import chamfer_loss, emd_loss

    return {"chamfer": chamfer_loss, "emd": emd_loss}[name]


# ------------------------------------------------------------------------------ checks
def _dataset(cfg: dict, teacher):
    from ..data.registry import load_dataset

    spec = cfg["data"] or (teacher.meta.get("data", {}).get("name") if teacher is not None else None) or "pointclouds"
    data = load_dataset(spec, n=int(cfg["n_data"]), seed=int(cfg["seed"]))
    if data.kind != "clouds":
        raise UserError(f"--data {spec} holds {data.kind}, not point clouds; use pointclouds[:points=N,classes=a+b]")
    if teacher is not None and tuple(teacher.shape) != tuple(data.shape):
        raise UserError(f"--data {spec} has clouds {list(data.shape)}, the teacher {list(teacher.shape)}")
    return data


def _check(cfg: dict) -> None:
    from ..grids import make_grid
    from ..samplers import info

    for key in ("n_data", "teacher_steps", "reflow_steps", "pair_nfe", "pairs", "pair_batch", "eval_nfe", "renders"):
        if int(cfg[key]) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {cfg[key]}")
    if int(cfg["eval_clouds"]) < 2:
        raise UserError(f"--eval-clouds must be at least 2, got {cfg['eval_clouds']}")
    if cfg["distance"] not in DISTANCES:
        from ..errors import unknown_name

        raise unknown_name("point-cloud distance", cfg["distance"], DISTANCES)
    info(cfg["pair_sampler"])
    info(cfg["eval_sampler"])
    if not str(cfg["pair_grid"]).endswith(".json"):
        make_grid(cfg["pair_grid"], 2, 1e-3, 999.0, process=LinearFlow())
    check_positive(cfg, "lr")


def _check_teacher(teacher) -> None:
    T = teacher.denoiser
    if teacher.kind != "clouds" or not isinstance(getattr(T, "process", None), LinearFlow) \
            or getattr(T, "prediction", None) != "flow":
        raise UserError(f"--teacher {teacher.name}: PSF needs a point-cloud flow teacher (process flow, prediction "
                        f"flow); leave --teacher out to train one")


# ------------------------------------------------------------------------------ stages
def _flow_denoiser(net_cfg: dict, sigma_data: float, process: LinearFlow, state=None):
    """A velocity net under ``process`` with the ``flow`` prediction (optionally with weights)."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net

    net = build_net(net_cfg)
    if state is not None:
        net.load_state_dict(state)
    return ModelDenoiser(net, process, "flow", sigma_data)


def _net_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.denoiser.net.state_dict().items()}


def _flow_meta(D, net_cfg: dict, data, stage: str, seconds: float, **extra) -> dict:
    """model.json of a flow stage: a plain flow model (any sampler, any NFE)."""
    from ..train.teacher import model_meta

    meta = model_meta({"net": net_cfg, "conditional": False}, D, data)
    meta.update(default_sampler="euler", method="pointcloud", stage=stage, cost={"seconds": seconds}, **extra)
    return meta


def _stage(root: Path, name: str, cfg: dict, steps: int, seed: int, D, make_loss, write_model, acc, progress):
    """Run one stage in ``root/name`` (resumed if started): ``make_loss(run)`` prepares the
    stage (e.g. its couplings) and returns the loss; ``write_model(folder, ema, timer)``
    writes model.*. Returns the stage's loaded Model."""
    from ..model import load

    folder = root / name
    if not (folder / "model.json").is_file():
        scfg = {**fit_config(cfg), "steps": int(steps), "seed": int(seed), "method": "pointcloud", "stage": name}
        timer = Timer()
        with open_run(acc, folder, scfg, (folder / "config.json").is_file()) as rf:
            loss = make_loss(rf)
            ema = fit(Task(student=D.net, loss=loss), rf, scfg, accelerator=acc, progress=progress)
            if acc.is_main_process:
                write_model(folder, ema, timer)
        acc.wait_for_everyone()
    return load(str(folder), device=str(acc.device))


def _couplings(source, label: str, cfg: dict, rf: RunFolder, seed: int, progress: bool, acc):
    """(z, x = ODE_source(z)) in ``rf/pairs``: z in sigma-space (sigma_max eps); ``label``
    names the source in ``pairs.json`` (a stage name, so the run folder may move). Under
    several processes each makes its share of the chunks, then all read every chunk."""
    from .knowledge import make_pairs

    pcfg = {k: cfg[k] for k in ("pair_sampler", "pair_nfe", "pair_grid", "pairs", "pair_batch")}
    pcfg.update(seed=int(seed), latent_dim=None, teacher=label)
    z, x, info = make_pairs(source, pcfg, rf, progress, acc)
    return z, x, info


def _flow_loss(D, B: int, x0_all, eps_all):
    """Eq. 43/44 per sample, || v(x_t, t) - (eps - x0) ||^2 (the ``simple`` DSM loss of the
    ``flow`` prediction), on data/noise pairs: independent (``eps_all`` None: fresh
    noise) or coupled (row k of ``x0_all`` with row k of ``eps_all``)."""
    from ..train.losses import DenoisingLoss

    dsm = DenoisingLoss("simple")

    def loss(model, gen, rank, world, device):
        idx = torch.randint(0, len(x0_all), (B,), generator=gen)
        t = D.process.sample_t(B, generator=gen)
        x0 = x0_all[idx]
        eps = torch.randn(x0.shape, generator=gen) if eps_all is None else eps_all[idx]
        sl = batch_slice(B, rank, world)
        return dsm(D, x0[sl].to(device), t[sl].to(device), eps[sl].to(device), net=model)

    return loss


# -------------------------------------------------------------------------------- run
def run(cfg: dict, out: str, resume: bool = False, progress: bool = True) -> str:
    from ..nets import build_net, net_config_defaults
    from .common import net_config

    _check(cfg)
    acc = make_accelerator(cfg["device"], cfg["mixed_precision"])
    teacher = load_teacher(cfg["teacher"], str(acc.device), required=False)
    if teacher is not None:
        _check_teacher(teacher)
    data = _dataset(cfg, teacher)
    net_cfg = net_config(cfg["net"], teacher, data.shape, data.kind) if cfg["net"] or teacher is not None \
        else net_config_defaults("clouds", data.shape)
    torch.manual_seed(int(cfg["seed"]))
    net_cfg = getattr(build_net(net_cfg), "config", net_cfg)  # a bad --net fails before any work
    sd = float(data.x.std())
    B, seed = int(cfg["batch_size"]), int(cfg["seed"])
    show = progress and acc.is_main_process
    with open_run(acc, out, cfg, resume) as top:
        root = top.root
        try:
            # 1. flow teacher (eq. 44)
            if teacher is None:
                torch.manual_seed(seed)
                D1 = _flow_denoiser(net_cfg, sd, LinearFlow())
                teacher = _stage(root, "teacher", cfg, cfg["teacher_steps"], seed, D1,
                                 lambda rf: _flow_loss(D1, B, data.x, None),
                                 lambda folder, ema, timer: save_checkpoint(
                                     folder, ema.module.state_dict(),
                                     _flow_meta(D1, net_cfg, data, "teacher", timer.seconds), name="model"),
                                 acc, show)
            teacher.denoiser.eval().requires_grad_(False)

            # 2. reflow on the teacher's couplings (eq. 43)
            process = teacher.denoiser.process  # every stage on the teacher's interpolation
            D2 = _flow_denoiser(net_cfg, sd, process, _net_state(teacher))
            pinfo = {}

            def reflow_loss(rf):
                label = "teacher" if cfg["teacher"] is None else str(cfg["teacher"])
                z, x1, info = _couplings(teacher, label, cfg, rf, seed, show, acc)
                pinfo.update(info)
                return _flow_loss(D2, B, x1, z / teacher.sigma_max)

            def write_reflow(folder, ema, timer):
                meta = _flow_meta(D2, net_cfg, data, "reflow", timer.seconds, teacher=str(teacher.name),
                                  pairs={k: pinfo[k] for k in ("sampler", "nfe", "grid", "pairs")},
                                  teacher_evals=pinfo["teacher_evals"])
                save_checkpoint(folder, ema.module.state_dict(), meta, name="model")

            reflowed = _stage(root, "reflow", cfg, cfg["reflow_steps"], seed + 1, D2, reflow_loss, write_reflow,
                              acc, show)
            reflowed.denoiser.eval().requires_grad_(False)

            # 3. one-step student with a point-set distance (eq. 45)
            D3 = _flow_denoiser(net_cfg, sd, process, _net_state(reflowed))
            dist = cloud_distance(cfg["distance"])
            sigma_T = float(reflowed.sigma_max)
            sinfo = {}

            def student_loss(rf):
                z, x, info = _couplings(reflowed, "reflow", cfg, rf, seed + 1, show, acc)
                sinfo.update(info)

                def loss(model, gen, rank, world, device):
                    """Dist(G(z), ODE_reflow(z)) with G(z) = D(z, sigma_max): one Euler step."""
                    idx = torch.randint(0, len(z), (B,), generator=gen)[batch_slice(B, rank, world)]
                    zb, xb = z[idx].to(device), x[idx].to(device)
                    pred = call_denoiser(D3, model, zb, torch.full((len(zb),), sigma_T, device=device))
                    return dist(pred, xb)

                return loss

            def write_student(folder, ema, timer):
                sampling = {"sampler": "euler", "grids": fixed_grids({1: [sigma_T, 0.0]})}
                meta = student_meta("pointcloud", D3, net_cfg, data.shape, data.kind, data.name,
                                    float(reflowed.sigma_min), sigma_T, sampling, cfg, stage="student",
                                    distance=cfg["distance"],
                                    pairs={k: sinfo[k] for k in ("sampler", "nfe", "grid", "pairs")},
                                    cost={"teacher_evals": sinfo["teacher_evals"], "seconds": timer.seconds})
                save_checkpoint(folder, ema.module.state_dict(), meta, name="model")

            student = _stage(root, "student", cfg, cfg["steps"], seed + 2, D3, student_loss, write_student, acc, show)
        except BaseException:
            if any((root / s / "checkpoints").is_dir() or (root / s / "pairs").is_dir() for s in STAGES):
                top.commit()  # finished or checkpointed stages are worth resuming
            raise
        if acc.is_main_process:
            _write_top(root, cfg, data, teacher, reflowed, student)
        acc.wait_for_everyone()
    return str(root)


# ------------------------------------------------------------------------- evaluation
def evaluate(cfg: dict, data, teacher, reflowed, student) -> tuple[dict, dict]:
    """MMD-CD, COV-CD, 1-NNA-CD (and the EMD ones with ``eval_emd``) of each model against
    ``eval_clouds`` held-out clouds (:func:`~fewstep.data.registry.held_out`: a fresh draw of
    a generated set, the clouds left out of training of a file), all models from the
    same noise. Returns (eval dict, {row title: clouds} for the renders)."""
    from ..data.registry import held_out
    from ..metrics.pointcloud import PAIRWISE, cloud_set_metrics

    n, k, seed = int(cfg["eval_clouds"]), int(cfg["eval_nfe"]), int(cfg["seed"])
    ref, source = held_out(cfg["data"] or data.name, n, seed + 7919, int(cfg["n_data"]), seed)
    real = ref.x
    noise = teacher.noise(n, seed=seed + 104729)
    runs = {
        "teacher": (teacher, k, cfg["eval_sampler"]),
        "teacher_1": (teacher, 1, "euler"),
        "reflow": (reflowed, k, cfg["eval_sampler"]),
        "reflow_1": (reflowed, 1, "euler"),
        "student_1": (student, 1, None),
    }
    results, clouds = {}, {"data": real}
    among = {d: PAIRWISE[d][0](real, real) for d in (("chamfer", "emd") if cfg["eval_emd"] else ("chamfer",))}
    for key, (model, nfe, sampler) in runs.items():
        x, _ = model.sample(n, nfe, sampler=sampler, grid="time" if sampler else "karras", x=noise)
        x = x.float().cpu()
        m = {"nfe": nfe, "sampler": sampler or "euler"}
        if torch.isfinite(x).all():
            for d, d_rr in among.items():
                m.update(cloud_set_metrics(x, real, distance=d, real_pairwise=d_rr))
        results[key] = m
        clouds[f"{key.split('_')[0]}, {nfe} NFE"] = x
    ratios = {}
    for metric in ("mmd_cd", "nna_cd"):
        if metric in results["student_1"] and metric in results["teacher"]:
            ratios[metric] = results["student_1"][metric] / results["teacher"][metric]
    out = {"clouds": n, "data": data.name, "reference": source, "reference_clouds": len(real),
           "reference_seed": seed + 7919, "models": results,
           "student_over_teacher": ratios, "student_over_init": {
               m: results["student_1"][m] / results["reflow_1"][m] for m in ("mmd_cd", "nna_cd")
               if m in results["student_1"] and m in results["reflow_1"]}}
    return out, clouds


def _write_top(root: Path, cfg: dict, data, teacher, reflowed, student) -> None:
    """The top folder: the student's model.*, eval.json and samples.png."""
    from ..plots import save_clouds_png
    from ..train.checkpoint import read_json

    ev, clouds = evaluate(cfg, data, teacher, reflowed, student)
    write_json(root / "eval.json", ev)
    save_clouds_png(clouds, root / "samples.png", n=int(cfg["renders"]))
    meta = read_json(root / "student" / "model.json")
    meta["stages"] = {s: s for s in STAGES if (root / s / "model.json").is_file()}
    if "teacher" not in meta["stages"]:
        meta["stages"]["teacher"] = str(teacher.name)
    shutil.copyfile(root / "student" / "model.safetensors", root / ".model.safetensors.tmp")
    (root / ".model.safetensors.tmp").replace(root / "model.safetensors")
    write_json(root / "model.json", meta)
