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

3. ``student/`` -- the one-step student (eq. 45), knowledge distillation
   (:mod:`fewstep.methods.knowledge` with ``--distance chamfer|emd``, run as a nested
   stage): starting from the reflowed weights, one
   Euler step from the noise, G(z) = x_T - T v_phi(x_T, T) with T = t_max, x_T = T z
   (= D(sigma_max z, sigma_max) in sigma-space; PSF's x_T + f_phi(x_T, T) in its time),
   trained on the reflowed model's couplings (z, x = ODE_reflow(z)) with a distance
   between point sets, since the order of the points carries no meaning:

       min_phi E_z Dist(G(z), ODE_reflow(z)),   Dist = Chamfer (default) or exact EMD.

Each stage is a run folder holding a loadable model (``fewstep.load``), its own
checkpoints (``--resume`` continues the stage it stopped in) and, for stages 2 and 3,
the couplings (``pairs/``, made by :func:`fewstep.methods.pairs.make_pairs`). A
teacher may be given (``--teacher``: a flow-process, flow-prediction cloud model), then
stage 1 is skipped. The top folder's model is the student (``fewstep sample OUT --nfe 1``);
``eval.json`` holds MMD-CD, COV-CD and 1-NNA-CD of the teacher (multistep), the reflowed
flow and the student (one step) against held-out clouds, and ``samples.png`` renders a
few clouds of each.

Under ``accelerate launch --num_processes N`` (or torchrun) every stage trains on its
process's slice of each step's global batch (DDP averages the gradients, so the weights
and their EMA are those of one process with the same batch), the couplings are made shard
by shard (:func:`~fewstep.methods.pairs.make_pairs`), and the main process alone
creates the run folders and writes the checkpoints, the models, ``eval.json`` and
``samples.png`` (the stage runner, :mod:`fewstep.train.job`).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..process import LinearFlow
from ..train.checkpoint import write_json
from ..train.job import Plan, Task, Top
from ..train.options import LOOP_NAMES
from .common import check_positive, load_teacher
from .pairs import make_pairs

DEFAULTS = {
    "n_data": 2000,            # training clouds
    "teacher_steps": 4000,     # stage 1 (eq. 44)
    "reflow_steps": 2000,      # stage 2 (eq. 43 on the teacher's couplings)
    "pair_sampler": "euler",
    "pair_nfe": 32,
    "pair_grid": "time",
    "pairs": 2000,
    "pair_batch": 250,
    "distance": "chamfer",     # stage 3 (eq. 45): chamfer | emd (knowledge distillation's --distance)
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


def _flow_plan(D, B: int, net_cfg: dict, data, stage: str, couplings=None):
    """A flow stage (eq. 43/44): || v(x_t, t) - (eps - x0) ||^2 per sample (the ``simple``
    DSM loss of the ``flow`` prediction) on independent (data, fresh noise) pairs, or on
    ``couplings(st) -> (x0 [n], eps [n], info)`` (row k with row k)."""
    from ..train.losses import DenoisingLoss
    from ..train.teacher import model_meta

    dsm = DenoisingLoss("simple")

    def plan(st):
        if couplings is None:
            x0_all, eps_all, info = data.x, None, {}
        else:
            x0_all, eps_all, info = couplings(st)

        def draw(gen, step):
            idx = torch.randint(0, len(x0_all), (B,), generator=gen)
            t = D.process.sample_t(B, generator=gen)
            x0 = x0_all[idx]
            eps = torch.randn(x0.shape, generator=gen) if eps_all is None else eps_all[idx]
            return {"x0": x0, "t": t, "eps": eps}

        def loss(model, b):
            return dsm(D, b["x0"], b["t"], b["eps"], net=model)

        def describe(ema_module):
            """model.json of a flow stage: a plain flow model (any sampler, any NFE)."""
            meta = model_meta({"net": net_cfg, "conditional": False}, D, data)
            meta.update(default_sampler="euler", method="pointcloud", stage=stage, cost={"seconds": st.seconds})
            if info:
                meta.update(teacher=info["teacher"], pairs={k: info[k] for k in ("sampler", "nfe", "grid", "pairs")},
                            teacher_evals=info["teacher_evals"])
            return meta

        return Plan(Task(student=D.net, draw=draw, loss=loss), describe)

    return plan


def _student_config(cfg: dict, reflowed: str) -> dict:
    """Stage 3's options: knowledge distillation of the reflowed flow with a point-set distance."""
    from . import resolve

    keys = tuple(k for k in LOOP_NAMES if k not in ("steps", "seed")) + (
        "pair_sampler", "pair_nfe", "pair_grid", "pairs", "pair_batch", "distance")
    return resolve("knowledge", {**{k: cfg[k] for k in keys}, "teacher": reflowed, "init": "teacher",
                                 "steps": int(cfg["steps"]), "seed": int(cfg["seed"]) + 1})


def stages(job):
    """teacher (unless given) -> reflow on its couplings -> one-step student (nested KD)."""
    from ..nets import build_net, net_config_defaults
    from . import get
    from .common import net_config

    cfg = job.cfg
    _check(cfg)
    teacher = load_teacher(cfg["teacher"], str(job.device), required=False)
    if teacher is not None:
        _check_teacher(teacher)
    data = _dataset(cfg, teacher)
    net_cfg = net_config(cfg["net"], teacher, data.shape, data.kind) if cfg["net"] or teacher is not None \
        else net_config_defaults("clouds", data.shape)
    torch.manual_seed(int(cfg["seed"]))
    net_cfg = getattr(build_net(net_cfg), "config", net_cfg)  # a bad --net fails before any work
    sd = float(data.x.std())
    B, seed = int(cfg["batch_size"]), int(cfg["seed"])

    # 1. flow teacher (eq. 44)
    if teacher is None:
        torch.manual_seed(seed)
        D1 = _flow_denoiser(net_cfg, sd, LinearFlow())
        teacher = job.stage("teacher", _flow_plan(D1, B, net_cfg, data, "teacher"), steps=int(cfg["teacher_steps"]),
                            seed=seed, method="pointcloud", stage="teacher")

    # 2. reflow on the teacher's couplings (eq. 43)
    process = teacher.denoiser.process  # every stage on the teacher's interpolation
    D2 = _flow_denoiser(net_cfg, sd, process, _net_state(teacher))
    label = "teacher" if cfg["teacher"] is None else str(cfg["teacher"])

    def couplings(st):
        pcfg = {k: cfg[k] for k in ("pair_sampler", "pair_nfe", "pair_grid", "pairs", "pair_batch")}
        z, x1, info = make_pairs(teacher, {**pcfg, "seed": seed, "latent_dim": None, "teacher": label}, st)
        return x1, z / teacher.sigma_max, info

    reflowed = job.stage("reflow", _flow_plan(D2, B, net_cfg, data, "reflow", couplings),
                         steps=int(cfg["reflow_steps"]), seed=seed + 1, method="pointcloud", stage="reflow")

    # 3. one-step student with a point-set distance (eq. 45): knowledge distillation
    student = job.nested(get("knowledge"), _student_config(cfg, str((job.root / "reflow").resolve())), "student")
    return Top("student", lambda: _top_meta(job.root, cfg, data, teacher, reflowed, student))


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


def _top_meta(root, cfg: dict, data, teacher, reflowed, student) -> dict:
    """The top folder: eval.json, samples.png and the student's model.json naming the stages."""
    from ..plots import save_clouds_png

    ev, clouds = evaluate(cfg, data, teacher, reflowed, student)
    write_json(root / "eval.json", ev)
    save_clouds_png(clouds, root / "samples.png", n=int(cfg["renders"]))
    meta = dict(student.meta)
    meta.update(method="pointcloud", stage="student", distance=cfg["distance"])
    meta["stages"] = {s: s for s in STAGES if (root / s / "model.json").is_file()}
    if "teacher" not in meta["stages"]:
        meta["stages"]["teacher"] = str(teacher.name)
    return meta
