"""Rectified flow and reflow (Liu et al. 2022; survey eq. 43), then a one-step student.

A rectified flow is the ODE dx_t/dt = v(x_t, t) whose velocity field is fitted to the
straight interpolation of a coupling (x0 data, x1 noise), time running from noise at
t = 1 to data at t = 0 (the paper's time reversed, as every fewstep process):

    x_t = (1 - t) x0 + t x1,     min_v  E_{t ~ U[0,1]} E_{(x0, x1)} || (x1 - x0) - v(x_t, t) ||^2    (eq. 43)

That is the :class:`~fewstep.process.LinearFlow` process with the ``flow`` prediction: in
sigma-space y = x_t / (1 - t), sigma = t / (1 - t), the denoiser is D(y, sigma) =
x_t - t v(x_t, t), and the velocity of any denoiser is v = (y - D) / sigma - D. Euler in t
on the flow is Euler (DDIM) in sigma on D, so every round is an ordinary flow model that
``fewstep sample`` / :func:`fewstep.load` and every sampler can use; its own rule is Euler
on the grid uniform in t (t_i = t_max - i (t_max - t_min) / k, then 0).

Couplings of round 1 (``--couplings``):
    independent   x0 ~ data, x1 ~ N(0, I), fresh every step: the 1-rectified flow
    teacher       x1 = z ~ N(0, I), x0 = teacher sampler(sigma_max z): any fewstep model
                  (run folder, gmm:FILE.npz, a reflow round) with any sampler / NFE / grid
Round k > 1 (reflow) trains on (z, ODE_{k-1}(z)), the previous round's own ODE solution
(``--reflow-sampler`` at ``--reflow-nfe`` on the uniform-t grid), starting from its weights.

Measured per round (``roundK/round.json`` and ``reflow.json``), on fixed evaluation noise:
    straightness       S = E_{t} E_{(x0,x1) ~ couplings} || (x1 - x0) - v(x_t, t) ||^2
                       (squared norm, t at 16 midpoints of [0, 1]): the residual of eq. 43,
                       whose minimum over v is 0 iff the coupling's straight paths do not cross
    flow_straightness  S(Z) = int_0^1 E || (Z_1 - Z_0) - v(Z_t, t) ||^2 dt, Liu et al.'s
                       straightness, on the flow's own paths (64 Euler steps from Z_1 = z)
    euler_error[k]     RMS of k Euler steps against the reference map z -> x0: the exact
                       Gaussian-mixture flow when the teacher or data is a mixture, else the
                       teacher's own sampler; euler_self_error[k] against the round's own
                       accurate ODE; euler_sliced_w2[k] to data (fresh samples of a mixture,
                       else drawn from the training set) (k = 1, 2, 4)

Then (``--distill-steps`` > 0, default ``--steps``) the final flow is distilled into a
one-step generator by knowledge distillation (:mod:`fewstep.methods.knowledge`) on its
own couplings, the student starting from the flow's weights, i.e. as its one Euler step
x0 = x1 - v(x1, 1) (Liu et al.'s "k-rectified flow + distillation"). The run's model is that student
(or, without distillation, the final flow); other NFE sample the final round.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..grids import time_uniform
from ..process import LinearFlow
from ..io import read_json, write_json
from ..train.job import Plan, Task, Top
from ..train.options import LOOP_NAMES, Option, check_batch_memory, table_defaults, table_help
from ..train.losses import DenoisingLoss
from .common import (N_DATA, Conditioning, bcast, check_student_net, conditioning, data_source, data_spec, fixed_grids,
                     flow_straightness, is_exact, load_teacher, net_config, quiet_sample, student_meta,
                     teacher_net_state)
from .pairs import PAIR_SAMPLER, make_pairs, pair_spec

OPTIONS = (
    # couplings and init keep their own refusals in _check ("use independent or teacher")
    Option("couplings", str, None, "round 1 couplings: independent (data x noise, 1-rectified flow) or teacher "
           "(z, teacher(z))", none="teacher when --teacher is given, else independent", example="independent"),
    Option("rounds", int, 2, "number of flows: round 1, then rounds - 1 reflows on the previous round's couplings",
           low=1),
    Option("pairs", int, 20000, "couplings per round made by the teacher or the previous round (default 20000)",
           low=1),
    Option("pair_batch", int, 1000, "couplings made per batch, one resumable chunk each (default 1000)", low=1),
    Option("pair_sampler", str, None, "the teacher's sampler for round 1's couplings (default: its own)",
           none="the teacher's own", example="heun"),
    Option("pair_nfe", int, 64, "teacher evaluations per coupling (default 64)", low=1),
    Option("pair_grid", str, None, "sigma grid of the teacher's sampler (default karras; time-trailing for a flow "
           "teacher)", none="karras; time-trailing for a flow teacher", example="karras"),
    Option("reflow_sampler", str, "dpmpp_2m", "sampler of a round's ODE for the next round's couplings (default "
           "dpmpp_2m: exact on straight paths)"),
    Option("reflow_nfe", int, 64, "evaluations of that ODE per coupling (default 64)", low=1),
    Option("init", str, "auto", "auto (previous round's weights; a flow teacher's for round 1) or random"),
    Option("distill_steps", int, None, "steps of the one-step student (knowledge distillation of the final flow); "
           "0: none", low=0, none="--steps", example=2000),
    Option("round_steps", (str, list, int), None, "training steps of each round, comma-separated (e.g. 4000,2000; "
           "default: --steps each)", none="--steps each", must="comma-separated whole numbers, one per round "
           "(e.g. 4000,2000), or a list of them"),
    Option("distance", str, "mse", "the one-step student's loss: mse, or for point clouds chamfer / emd (PSF)",
           choices=("mse", "chamfer", "emd")),
    N_DATA,
    Option("eval_samples", int, 2000, "evaluation samples per round (default 2000)", low=2),
)
DEFAULTS = table_defaults(OPTIONS)
HELP = table_help(OPTIONS)


def check_options(cfg: dict) -> None:
    """The rules between options, checked before anything is written: one --round-steps
    entry per round."""
    round_steps(cfg)


EVAL_NFES = (1, 2, 4)
RULE_NFES = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128)  # NFE of a round's own Euler rule
FLOW_GRID = "time-trailing"


# ------------------------------------------------------------------------ the flow
def euler_grid(process, k: int) -> torch.Tensor:
    """k Euler steps uniform in t: sigma(t_max - i (t_max - t_min) / k), i < k, then 0."""
    return time_uniform(process, int(k), "trailing")


def velocity(D, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v(x_t, t) = eps^ - x0^ of any sigma-space denoiser, at y = x_t / (1 - t), sigma = t / (1 - t)."""
    sigma = t / (1 - t)
    y = x_t / bcast(1 - t, x_t)
    den = D(y, sigma)
    return (y - den) / bcast(sigma, y) - den


@torch.no_grad()
def coupling_straightness(D, x0: torch.Tensor, x1: torch.Tensor, levels: int = 16) -> float:
    """E_t E || (x1 - x0) - v(x_t, t) ||^2, x_t = (1 - t) x0 + t x1, t at ``levels`` midpoints."""
    total = 0.0
    for j in range(levels):
        t = torch.full((len(x0),), (j + 0.5) / levels, dtype=x0.dtype, device=x0.device)
        x_t = (1 - bcast(t, x0)) * x0 + bcast(t, x0) * x1
        total += float(((x1 - x0) - velocity(D, x_t, t)).pow(2).flatten(1).sum(1).mean())
    return total / levels


def flow_denoiser(net, sigma_data: float):
    from ..denoiser import ModelDenoiser

    return ModelDenoiser(net, LinearFlow(), "flow", sigma_data)


# ------------------------------------------------------------------------ options
def _check(cfg: dict, teacher) -> str:
    """Validate the options before any work; returns the couplings of round 1."""
    from ..samplers import info

    couplings = cfg["couplings"] or ("teacher" if teacher is not None else "independent")
    if couplings not in ("independent", "teacher"):
        raise UserError(f"--couplings {couplings}: use independent or teacher")
    if couplings == "teacher" and teacher is None:
        raise UserError("--couplings teacher needs --teacher (a run folder or gmm:FILE.npz)")
    for key in ("rounds", "pairs", "pair_batch", "pair_nfe", "reflow_nfe"):
        if not isinstance(cfg[key], int) or int(cfg[key]) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be an integer >= 1, got {cfg[key]}")
    if int(cfg["eval_samples"]) < 2:
        raise UserError(f"--eval-samples must be at least 2, got {cfg['eval_samples']}")
    if cfg["distill_steps"] is not None and int(cfg["distill_steps"]) < 0:
        raise UserError(f"--distill-steps must be 0 (none) or more, got {cfg['distill_steps']}")
    if cfg["init"] not in ("auto", "random"):
        raise UserError(f"--init {cfg['init']}: use auto or random")
    if cfg["n_data"] is not None and (not isinstance(cfg["n_data"], int) or int(cfg["n_data"]) < 1):
        raise UserError(f"--n-data must be an integer of at least 1, got {cfg['n_data']!r}")
    round_steps(cfg)
    info(cfg["reflow_sampler"])  # unknown names fail here
    if couplings == "teacher":
        pair_spec(_pair_cfg(cfg, teacher, cfg["teacher"], 1), teacher)
    return couplings


def round_steps(cfg: dict) -> list:
    """The training steps of rounds 1..K (``--round-steps``, else ``--steps`` each)."""
    given, K = cfg["round_steps"], int(cfg["rounds"])
    if given is None:
        return [int(cfg["steps"])] * K
    items = str(given).split(",") if isinstance(given, (str, int)) else list(given)
    try:
        steps = [int(str(v).strip()) for v in items]
    except ValueError:
        raise UserError(f"--round-steps {given}: give {K} comma-separated whole numbers") from None
    if len(steps) != K or min(steps) < 1 or any(isinstance(v, (bool, float)) for v in items):
        raise UserError(f"--round-steps {given}: give {K} whole numbers of at least 1, one per round")
    return steps


def _pair_cfg(cfg: dict, source, label: str, r: int) -> dict:
    """Options of :func:`fewstep.methods.pairs.make_pairs` for round r's couplings."""
    if r == 1:
        grid = cfg["pair_grid"] or (FLOW_GRID if isinstance(source.process, LinearFlow) else "karras")
        sampler, nfe = cfg["pair_sampler"], cfg["pair_nfe"]
    else:
        grid, sampler, nfe = FLOW_GRID, cfg["reflow_sampler"], cfg["reflow_nfe"]
    return {"teacher": label, "pair_sampler": sampler, "pair_nfe": int(nfe), "pair_grid": grid,
            "pairs": int(cfg["pairs"]), "pair_batch": int(cfg["pair_batch"]), "seed": int(cfg["seed"]) + r,
            "latent_dim": None}


def _data(cfg: dict, teacher, couplings: str):
    """The data (independent couplings need it; otherwise only sliced-W2 uses it)."""
    try:
        return data_source(cfg["data"], teacher, int(cfg["seed"]), cfg["n_data"])
    except UserError:
        if couplings == "independent" or cfg["data"] is not None:
            raise
        return None


def _mixture(cfg: dict, teacher):
    """The exact Gaussian mixture behind the teacher or the data, if there is one."""
    from ..data.gmm import GaussianMixture

    if teacher is not None and is_exact(teacher):
        return teacher.denoiser
    spec = data_spec(cfg["data"], teacher)
    if spec is not None and str(spec).startswith("gmm:"):
        return GaussianMixture.load(str(spec)[4:])
    return None


# ----------------------------------------------------------------------- evaluation
class Evaluation:
    """Fixed evaluation noise z, the reference map's x0 = ref(z) (exact mixture flow, else the
    teacher's sampler, else none) and fresh data for sliced-W2."""

    def __init__(self, cfg: dict, teacher, data, gmm, shape, device, cond: Conditioning = Conditioning()):
        n, process = int(cfg["eval_samples"]), LinearFlow()
        g = torch.Generator().manual_seed(int(cfg["seed"]) + 424242)
        self.z = torch.randn((n,) + tuple(shape), generator=g).to(device)
        self.data = data.draw(n, g).to(device) if data is not None else None
        # conditional runs: every measure at fixed evaluation labels (no null labels)
        self.labels = Conditioning(cond.num_classes, prior=cond.prior).draw(n, g) if cond.on else None
        lab = {"labels": self.labels} if cond.on else {}
        self.process, self.cfg = process, cfg
        self.ref, self.reference = None, None
        s_ref = teacher.sigma_max if teacher is not None else process.sigma_max
        if gmm is not None:  # the exact probability-flow map from sigma_ref z (the 1-rectified flow's, too)
            z64 = self.z.double().cpu()
            guided = {"guidance": cond.guidance} if cond.on else {}
            self.ref = gmm.flow(s_ref * z64, s_ref, 0.0, rtol=1e-7, **lab, **guided).float().to(device)
            self.reference = "exact"
        elif teacher is not None:
            pc = _pair_cfg(cfg, teacher, "", 1)
            x = teacher.sample(n, pc["pair_nfe"], sampler=pc["pair_sampler"] or teacher.default_sampler or PAIR_SAMPLER,
                               grid=pc["pair_grid"], x=s_ref * self.z, guidance=cond.guidance if cond.on else None,
                               **lab)[0]
            self.ref, self.reference = x.float().to(device), "teacher"
        if self.labels is not None:
            self.labels = self.labels.to(device)

    def at_labels(self, D, labels=None):
        """D with the evaluation labels (or ``labels``) bound; D itself when unconditional."""
        labels = self.labels if labels is None else labels
        if labels is None:
            return D
        return lambda y, sigma, **kw: D(y, sigma, labels=labels, **kw)

    @torch.no_grad()
    def ode(self, D):
        """The flow's accurate solution from sigma_max z (the next round's couplings' solver)."""
        p = self.process
        return quiet_sample(self.at_labels(D), p.sigma_max * self.z, sampler=self.cfg["reflow_sampler"],
                            nfe=int(self.cfg["reflow_nfe"]), grid=FLOW_GRID, sigma_min=p.sigma_min,
                            sigma_max=p.sigma_max, process=p)

    @torch.no_grad()
    def round(self, D, x0, x1, labels=None) -> dict:
        """The measures of one round's flow D on its couplings (x0, x1) (with their labels)."""
        from ..metrics import rms, sliced_w2
        from ..samplers import get

        p, z = self.process, self.z
        x_T = p.sigma_max * z
        ode = self.ode(D)
        straight = coupling_straightness(self.at_labels(D, labels), x0, x1)
        D = self.at_labels(D)
        out = {"straightness": straight, "flow_straightness": flow_straightness(D, p, z),
               "reference": self.reference, "euler_error": {}, "euler_self_error": {}, "euler_sliced_w2": {},
               "ode": {"sampler": self.cfg["reflow_sampler"], "nfe": int(self.cfg["reflow_nfe"])}}
        for k in EVAL_NFES:
            x = get("euler")(D, x_T, euler_grid(p, k).to(z.device))
            out["euler_self_error"][str(k)] = rms(x, ode)
            out["euler_error"][str(k)] = rms(x, self.ref) if self.ref is not None else None
            out["euler_sliced_w2"][str(k)] = sliced_w2(x, self.data) if self.data is not None else None
        out["ode"]["error"] = rms(ode, self.ref) if self.ref is not None else None
        out["ode"]["sliced_w2"] = sliced_w2(ode, self.data) if self.data is not None else None
        return out

    @torch.no_grad()
    def one_step(self, model, flow) -> dict:
        """A one-step student from the same noise: error to the reference, sliced-W2, and
        ``self_error`` to the ODE of the ``flow`` it distils."""
        from ..metrics import rms, sliced_w2

        x = model.sample(len(self.z), 1, x=model.sigma_max * self.z, labels=self.labels)[0]
        return {"error": rms(x, self.ref) if self.ref is not None else None,
                "sliced_w2": sliced_w2(x, self.data) if self.data is not None else None,
                "self_error": rms(x, self.ode(flow.denoiser))}


# ---------------------------------------------------------------------------- rounds
def _round_net(r: int, prev, teacher, cfg: dict, net_cfg: dict):
    """Round r's velocity net: the previous round's weights (auto), a flow teacher's for
    round 1 when it has the student's architecture, else a fresh net."""
    from ..nets import build_net

    torch.manual_seed(int(cfg["seed"]) + r)
    net = build_net(net_cfg)
    state = None
    if cfg["init"] == "auto":
        src = prev if r > 1 else teacher
        flow_src = src is not None and not is_exact(src) and getattr(src.denoiser, "prediction", None) == "flow" \
            and isinstance(src.process, LinearFlow)
        state = teacher_net_state(src, getattr(net, "config", net_cfg)) if flow_src else None
    if state is not None:
        net.load_state_dict(state)
    return net


def _round_plan(r: int, prev, teacher, couplings: str, data, cfg: dict, net_cfg: dict, ev: "Evaluation",
                cond: Conditioning = Conditioning()):
    """Round r's stage: its couplings, eq. 43, its measures (``round.json``), its model.
    Conditional: round 1's couplings come from the guided teacher, later rounds' from the
    previous (already guided) round; labels go with every coupling."""
    import dataclasses

    kind = couplings if r == 1 else "reflow"
    B, loss_fn = int(cfg["batch_size"]), DenoisingLoss("simple")
    pair_cond = cond if r == 1 else dataclasses.replace(cond, guidance=1.0)

    def plan(st):
        dev = st.job.device
        pinfo = {"teacher_evals": 0}
        l_all = None
        if kind == "independent":
            x0_all = x1_all = None
        else:
            source = prev if r > 1 else teacher
            label = f"round{r - 1}" if r > 1 else str(cfg["teacher"])
            lat, x0_all, pinfo = make_pairs(source, _pair_cfg(cfg, source, label, r), st, pair_cond)
            l_all = pinfo.pop("labels")
            x1_all = lat / float(pinfo["sigma_max"])  # x_T = sigma_max z: the noise end is z
        net = _round_net(r, prev, teacher, cfg, net_cfg)
        if cond.on:
            check_student_net(net, cond)
        sd = data.sigma_data if data is not None else 0.5
        D = flow_denoiser(net, sd)

        def couple(n, gen):
            """n couplings (x0, x1, labels or None) of this round."""
            if x0_all is None:
                x0, lab = data.labelled(n, gen) if cond.on else (data.draw(n, gen), None)
                x1 = torch.randn(x0.shape, generator=gen)
                return x0, x1, cond.drop(lab, gen)
            idx = torch.randint(0, len(x0_all), (n,), generator=gen)
            return x0_all[idx], x1_all[idx], (l_all[idx] if l_all is not None else None)

        def draw(gen, step):
            x0, x1, lab = couple(B, gen)
            batch = {"x0": x0, "x1": x1, "t": D.process.sample_t(B, generator=gen)}
            if lab is not None:
                batch["labels"] = lab
            return batch

        def loss(model, b):
            """Eq. 43 per sample: || (x1 - x0) - v(x_t, t, c) ||^2 (mean over coordinates), t ~ U[t_min, t_max]."""
            cond_kw = {"labels": b["labels"]} if "labels" in b else {}
            return loss_fn(D, b["x0"], b["t"], b["x1"], net=model, **cond_kw)

        def describe(ema_module):
            x0c, x1c, lc = couple(len(ev.z), torch.Generator().manual_seed(int(cfg["seed"]) + 77 * r))
            D_ema = flow_denoiser(ema_module, sd).eval()
            lc = lc.to(dev) if lc is not None else None
            measures = {"round": r, "couplings": kind, **ev.round(D_ema, x0c.to(dev), x1c.to(dev), lc),
                        "cost": {"teacher_evals": int(pinfo["teacher_evals"]), "seconds": st.seconds}}
            write_json(st.folder / "round.json", measures)  # before model.json: a finished round has both
            p = D.process
            sampling = {"sampler": "euler", "grids": fixed_grids({k: euler_grid(p, k) for k in RULE_NFES})}
            return student_meta("reflow", D, getattr(net, "config", net_cfg), ev.z.shape[1:],
                                data.kind if data is not None else teacher.kind,
                                data.name if data is not None else teacher.name, p.sigma_min, p.sigma_max,
                                sampling, cfg, cond=cond, round={"index": r, "couplings": kind},
                                cost=measures["cost"])

        return Plan(Task(student=net, draw=draw, loss=loss), describe)

    return plan


def _student_config(final: str, cfg: dict) -> dict:
    """The one-step student's options: knowledge distillation of the final flow on its own
    couplings (Euler on the uniform-t grid), starting from the flow's weights."""
    from . import resolve

    keys = tuple(k for k in LOOP_NAMES if k != "steps") + ("pairs", "pair_batch", "label_dropout", "distance")
    return resolve("knowledge", {**{k: cfg[k] for k in keys}, "teacher": final, "init": "auto",
                                 "steps": int(cfg["distill_steps"] or cfg["steps"]),
                                 "pair_sampler": cfg["reflow_sampler"], "pair_nfe": int(cfg["reflow_nfe"]),
                                 "pair_grid": FLOW_GRID})


def _full_net_config(net_cfg: dict) -> dict:
    """The net config as the built net states it (defaults filled in), so rounds compare equal."""
    from ..nets import build_net

    return dict(getattr(build_net(net_cfg), "config", net_cfg))


def stages(job):
    """Rounds ``round1`` .. ``roundK`` (each a stage whose couplings come from the round
    before), then the one-step student (knowledge distillation, in ``student``)."""
    from . import get

    cfg = job.cfg
    teacher = load_teacher(cfg["teacher"], job.device, required=False, cfg=cfg, method="reflow")
    couplings = _check(cfg, teacher)
    data = _data(cfg, teacher, couplings)
    if teacher is None and data is not None:  # a teacher's batch is checked on load
        check_batch_memory("--batch-size", int(cfg["batch_size"]), data.shape)
    cond = conditioning(cfg, teacher, data)
    if cond.on and couplings == "independent" and (data is None or not data.num_classes):
        raise UserError("independent couplings of a class-conditional run need labelled --data")
    if cond.on and couplings == "independent" and cond.guidance != 1.0:
        raise UserError(f"--guidance {cond.guidance}: independent couplings come from data, which has no guidance; "
                        f"use --couplings teacher")
    shape = tuple(data.shape) if data is not None else tuple(teacher.shape)
    kind = data.kind if data is not None else teacher.kind
    net_cfg = _full_net_config(net_config(cfg["net"], teacher, shape, kind, cond.num_classes))
    ev = Evaluation(cfg, teacher, data, _mixture(cfg, teacher), shape, job.device, cond)
    distill_on = cfg["distill_steps"] is None or int(cfg["distill_steps"]) > 0
    rounds, prev = [], None
    for r, steps in zip(range(1, int(cfg["rounds"]) + 1), round_steps(cfg)):
        rcfg = {"seed": int(cfg["seed"]) + 1000 * (r - 1), "steps": steps, "method": "reflow", "round": r,
                "couplings": couplings if r == 1 else "reflow"}
        prev = job.stage(f"round{r}", _round_plan(r, prev, teacher, couplings, data, cfg, net_cfg, ev, cond), **rcfg)
        rounds.append(read_json(job.root / f"round{r}" / "round.json"))
    last = f"round{len(rounds)}"
    student = None
    if distill_on:
        job.nested(get("knowledge"), _student_config(str((job.root / last).resolve()), cfg), "student")
        student = "student"
    return Top(student or last, lambda: _top_meta(job, rounds, student, ev, cfg["teacher"], cond))


def _top_meta(job, rounds: list, student, ev: Evaluation, teacher=None, cond: Conditioning = Conditioning()) -> dict:
    """``reflow.json`` (every round's measures, the student's) and the run's model.json: the
    one-step student (other NFE: Euler on the final round) or the final flow. Its
    ``teacher`` is the run's own (None for independent couplings), so ``fewstep bench``
    finds the run beside that teacher; ``flow`` names the round it was distilled from."""
    root = job.root
    last = f"round{len(rounds)}"
    summary = {"rounds": rounds}
    meta = read_json(root / last / "model.json")
    if student is not None:
        st = ev.one_step(job.load(root / student), job.load(root / last))
        init = {f"init_{key}": rounds[-1][f"euler_{key}"]["1"] for key in ("error", "sliced_w2", "self_error")}
        summary["student"] = {**st, **init}  # init: the flow's one Euler step, where the student starts
        meta = read_json(root / student / "model.json")
        meta["sampling"] = {**meta["sampling"], "variants": {str(k): last for k in RULE_NFES if k > 1}}
    cost = [r["cost"] for r in rounds] + ([meta["cost"]] if student is not None else [])
    meta["cost"] = {"teacher_evals": sum(int(c.get("teacher_evals", 0)) for c in cost),
                    "seconds": sum(float(c.get("seconds", 0.0)) for c in cost)}
    meta.update(cond.meta())  # the student distils a guided flow: its guidance is the run's
    meta.update(method="reflow", teacher=str(teacher) if teacher else None, flow=last,
                rounds=[{"folder": f"round{r['round']}", "couplings": r["couplings"],
                         "straightness": r["straightness"]} for r in rounds])
    write_json(root / "reflow.json", summary)
    return meta
