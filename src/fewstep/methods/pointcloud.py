"""PSF: point-cloud generation in three stages, flow -> reflow -> one step (Wu et al. 2022;
survey eq. 44-45), composed of the reflow method's stages (:mod:`fewstep.methods.reflow`)
and its knowledge-distillation student with a point-set distance.

Clouds x0 [N, 3] (``--data pointclouds:...``), Gaussian noise eps of the same shape, the
:class:`~fewstep.process.LinearFlow` interpolation x_t = (1 - t) x0 + t eps and a
permutation-equivariant velocity net v (:class:`~fewstep.nets.pointnet.PointNet`, the
``flow`` prediction: in sigma-space the denoiser is D(y, sigma) = x_t - t v(x_t, t), one
Euler step from t to 0).

1. ``round1/`` -- the flow teacher (eq. 44), reflow's round 1 on independent (data, noise) pairs:

       min_theta E_{t ~ U, x0 ~ data, eps ~ N(0, I)} || v_theta(x_t, t) - (eps - x0) ||^2

2. ``round2/`` -- reflow (eq. 43) on the teacher's couplings (z, x1 = ODE_teacher(z)),
   z ~ N(0, I), target z - x1: the paths straighten, so few Euler steps suffice. Starts
   from the teacher's weights.

3. ``student/`` -- the one-step student (eq. 45), knowledge distillation
   (:mod:`fewstep.methods.knowledge` with ``--distance chamfer|emd``) of the reflowed flow,
   starting from its weights, i.e. as its one Euler step G(z) = x_T - T v_phi(x_T, T), on its
   own couplings (z, x = ODE_reflow(z)) with a distance between point sets, since the order of
   the points carries no meaning:

       min_phi E_z Dist(G(z), ODE_reflow(z)),   Dist = Chamfer (default) or exact EMD.

A teacher may be given (``--teacher``: a flow-process, flow-prediction cloud model); then
stage 1 is that teacher, and ``round1/`` is the reflow on its couplings. The top folder's
model is the student (``fewstep sample OUT --nfe 1``); ``eval.json`` holds MMD-CD, COV-CD and
1-NNA-CD of the teacher (multistep), the reflowed flow and the student (one step) against
held-out clouds (the cloud evaluation hook, :func:`evaluate`), ``samples.png`` renders a few
clouds of each, and ``reflow.json`` reflow's own measures. Processes, resume and the stage
folders are the stage runner's (:mod:`fewstep.train.job`), as for every method.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..process import LinearFlow
from ..io import write_json
from ..train.job import Top
from ..train.options import LOOP_NAMES, Option, table_defaults, table_help
from .common import load_teacher

DISTANCES = ("chamfer", "emd")
OPTIONS = (
    Option("n_data", int, 2000, "number of training clouds drawn from --data (default 2000)", low=1),
    Option("teacher_steps", int, 4000, "training steps of the flow teacher, stage 1 (skipped with --teacher)", low=1),
    Option("reflow_steps", int, 2000, "training steps of the reflow stage on the teacher's couplings", low=1),
    Option("pair_sampler", str, "euler", "sampler that solves the teacher's / reflowed ODE for the couplings "
           "(default euler)"),
    Option("pair_nfe", int, 32, "evaluations per coupling (default 32)", low=1),
    Option("pair_grid", str, "time", "sigma grid of the couplings' sampler (default time: uniform in t)"),
    Option("pairs", int, 2000, "couplings per stage (default 2000)", low=1),
    Option("pair_batch", int, 250, "couplings made per batch, one resumable chunk each", low=1),
    # distance keeps its own refusal in _check (an unknown point-cloud distance, with the valid ones)
    Option("distance", str, "chamfer", "one-step student loss between clouds: chamfer (PSF) or emd (exact, "
           "Hungarian)"),
    Option("eval_clouds", int, 100, "clouds per set for MMD-CD / COV-CD / 1-NNA-CD in eval.json (default 100)",
           low=2),
    Option("eval_nfe", int, 32, "evaluations of the multistep teacher in eval.json (default 32)", low=1),
    Option("eval_sampler", str, "euler", "sampler of the multistep teacher in eval.json (default euler, grid uniform "
           "in t)"),
    Option("eval_emd", bool, False, "also MMD/COV/1-NNA with the EMD ground distance (slow: N^3 per pair)"),
    Option("renders", int, 4, "clouds per model in samples.png", low=1),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)
COMMON_OVERRIDES = {"batch_size": 32, "steps": 1000}


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


def _check_teacher(teacher) -> None:
    T = teacher.denoiser
    if teacher.kind != "clouds" or not isinstance(getattr(T, "process", None), LinearFlow) \
            or getattr(T, "prediction", None) != "flow":
        raise UserError(f"--teacher {teacher.name}: PSF needs a point-cloud flow teacher (process flow, prediction "
                        f"flow); leave --teacher out to train one")


# ------------------------------------------------------------------------------ stages
def reflow_config(cfg: dict, data, net_cfg: dict, given_teacher: bool) -> dict:
    """PSF's options as the reflow method's: two rounds on independent couplings (one on the
    given teacher's), the couplings' solver PSF's, the student with a point-set distance."""
    from . import resolve

    keys = tuple(k for k in LOOP_NAMES if k != "steps") + ("teacher", "pairs", "pair_batch", "pair_sampler",
                                                           "pair_nfe", "pair_grid", "distance", "n_data")
    over = {k: cfg[k] for k in keys}
    over.update(data=cfg["data"] or data.name, net=net_cfg, distill_steps=int(cfg["steps"]),
                steps=int(cfg["reflow_steps"]), reflow_sampler=cfg["pair_sampler"], reflow_nfe=int(cfg["pair_nfe"]),
                eval_samples=int(cfg["eval_clouds"]))
    if given_teacher:
        over.update(couplings="teacher", rounds=1, round_steps=[int(cfg["reflow_steps"])])
    else:
        over.update(couplings="independent", rounds=2, round_steps=[int(cfg["teacher_steps"]), int(cfg["reflow_steps"])])
    return resolve("reflow", over)


def stages(job):
    """flow teacher (unless given) -> reflow on its couplings -> one-step student: the reflow
    method's stages on this job, then the cloud evaluation."""
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
    top = get("reflow").stages(job.with_config(reflow_config(cfg, data, net_cfg, teacher is not None)))
    names = {"teacher": "round1", "reflow": "round2"} if teacher is None else {"reflow": "round1"}

    def describe():
        meta = top.describe()  # reflow's (writes reflow.json)
        root = job.root
        t = job.load(root / names["teacher"]) if teacher is None else teacher
        ev, clouds = evaluate(cfg, data, t, job.load(root / names["reflow"]), job.load(root / "student"))
        write_json(root / "eval.json", ev)
        from ..plots import save_clouds_png

        save_clouds_png(clouds, root / "samples.png", n=int(cfg["renders"]))
        meta.update(method="pointcloud", stage="student", distance=cfg["distance"],
                    stages={**names, "student": "student", **({"teacher": str(teacher.name)} if teacher else {})})
        return meta

    return Top(top.source, describe)


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
        x, _ = model.sample(n, nfe, sampler=sampler, grid="time" if sampler else None, x=noise)
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
