"""Rectified flow and reflow (issue 5) against the peers -> bench/out/reflow_<part>.json and the
markdown tables for docs/BENCHMARKS.md ("Rectified flow and reflow (issue 5)").

    OMP_NUM_THREADS=1 .venv/bin/python bench/reflow.py            # both parts, a few CPU minutes
    OMP_NUM_THREADS=1 .venv/bin/python bench/reflow.py --quick    # smaller budgets, a smoke run
    .venv/bin/python bench/reflow.py --part moons|gmm

Parts: ``moons`` (the 2-D toy, 20000 training points) and ``gmm`` (a 2-D Gaussian mixture of
five strongly anisotropic, rotated modes, whose exact probability-flow map is known). Every
model is the same residual MLP, trained with the same loop (:func:`fewstep.train.loop.fit`:
AdamW, warm-up, clipping, EMA), steps and batch:

    ours k-RF       ``fewstep distill reflow --rounds 3`` on (data x noise): round k is the
                    k-rectified flow (round 1 = eq. 43 on independent couplings, round k > 1
                    on (z, ODE_{k-1}(z)), DPM-Solver++(2M) at 64 NFE on the uniform-t grid)
    ours 3-RF + KD  the one-step student distilled from the 3-rectified flow
    ours teacher-RF (gmm) one round on the exact mixture's couplings (z, exact ODE(z)) (Heun 64)
    torchcfm I-CFM  ``ConditionalFlowMatcher(sigma=0)``: independent couplings, the 1-RF objective
    torchcfm OT-CFM ``ExactOptimalTransportConditionalFlowMatcher(sigma=0)``: minibatch-OT couplings

Each model is sampled from the same noise z with 1, 2 and 4 Euler steps uniform in t (ours
through its own sampling rule, the torchcfm nets by a plain Euler loop in their time
convention): sliced-W2 (n_eval = 4000 samples) to 20000 fresh data points, and for the mixture the RMS error against
its exact flow map z -> x0 (the map the 1-RF objective defines; OT-CFM learns another map,
so its column is marked). Straightness S(Z) (Liu et al. 2022, Def. 3.5) on each flow's own
64-step Euler paths; the coupling residual S of eq. 43 for our rounds. CPU seconds are this
process's, one torch thread. ``rectified-flow-pytorch`` imports torchvision at import time,
which does not import beside the torch 2.13 CPU build here, so it is not run (said in the table).

torchcfm is installed for this script only: ``.venv/bin/pip install --no-deps torchcfm pot``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from fewstep.data.gmm import GaussianMixture  # noqa: E402
from fewstep.data.toys import make_toy  # noqa: E402
from fewstep.methods import distill  # noqa: E402
from fewstep.methods.common import data_source, quiet_sample  # noqa: E402
from fewstep.methods.reflow import euler_grid, flow_straightness  # noqa: E402
from fewstep.metrics import rms, sliced_w2  # noqa: E402
from fewstep.model import load  # noqa: E402
from fewstep.nets import build_net  # noqa: E402
from fewstep.process import LinearFlow  # noqa: E402
from fewstep.train.loop import Task, fit  # noqa: E402
from fewstep.train.runfolder import RunFolder  # noqa: E402

NET = {"kind": "mlp", "dim": 2, "hidden": 128, "depth": 3, "emb_dim": 64}
NFES = (1, 2, 4)
PEER_MISSING = ("rectified-flow-pytorch", "not run: `rectified_flow.py` imports torchvision at import time; torchvision "
                "does not import beside the torch 2.13 CPU build (it asks for torch 2.14.1 CUDA, ~5.5 GB)")


def anisotropic_gmm() -> GaussianMixture:
    """Five modes on a circle of radius 2, each a thin Gaussian (std 0.6 x 0.06) turned by its own angle."""
    k, means, covs = 5, [], []
    for i in range(k):
        a, b = 2 * math.pi * i / k, math.pi * (0.15 + 0.37 * i)
        means.append([2.0 * math.cos(a), 2.0 * math.sin(a)])
        R = torch.tensor([[math.cos(b), -math.sin(b)], [math.sin(b), math.cos(b)]], dtype=torch.float64)
        covs.append(R @ torch.diag(torch.tensor([0.6**2, 0.06**2], dtype=torch.float64)) @ R.T)
    return GaussianMixture(torch.tensor([0.3, 0.1, 0.25, 0.15, 0.2]), means, torch.stack(covs))


def part_data(part: str, folder: Path):
    """(data spec for fewstep, fresh evaluation data [n, 2], the mixture or None)."""
    if part == "moons":
        return "moons", None
    gmm = anisotropic_gmm()
    gmm.save(folder / "aniso.npz")
    return f"gmm:{folder / 'aniso.npz'}", gmm


def fresh_data(gmm, n: int, seed: int = 999) -> torch.Tensor:
    """Fresh data (not the training set): moons or the mixture, float64."""
    g = torch.Generator().manual_seed(seed)
    return make_toy("moons", n, g)[0].double() if gmm is None else gmm.sample(n, generator=g)


class CFMDenoiser(torch.nn.Module):
    """A torchcfm-trained velocity net u(x, s) (s = 0 noise -> s = 1 data, x_s = s x1 + (1-s) x0)
    as a fewstep sigma-space denoiser: t = 1 - s = sigma / (1 + sigma), x_t = (1 - t) y,
    v = dx/dt = -u, D = x_t - t v (only for S(Z); its samples come from :func:`cfm_euler`)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, y, sigma):
        t = (sigma / (1 + sigma)).to(y.dtype)[:, None]
        x = (1 - t) * y
        return x + t * self.net(x, 1000.0 * (1 - t[:, 0]))


def gmm_euler(gmm, z: torch.Tensor, k: int) -> torch.Tensor:
    """k Euler steps uniform in t of the exact 1-rectified flow of the mixture."""
    from fewstep.samplers import get

    p = LinearFlow()
    return get("euler")(gmm, p.sigma_max * z, euler_grid(p, k))


@torch.no_grad()
def cfm_euler(net, z: torch.Tensor, k: int) -> torch.Tensor:
    """k Euler steps of dx/ds = u(x, s) from s = 0 (x = z) to s = 1."""
    x = z.clone()
    for i in range(k):
        s = torch.full((len(x),), i / k)
        x = x + net(x, 1000.0 * s) / k
    return x


def train_cfm(matcher, spec: str, steps: int, batch: int, lr: float, seed: int) -> torch.nn.Module:
    """The same MLP and the same loop as ours; the coupling, interpolant and target from torchcfm:
    E || u(x_s, s) - (x1 - x0) ||^2 with x0 ~ N(0, I), x1 ~ data (paired by the matcher)."""
    data = data_source(spec, seed=seed)
    torch.manual_seed(seed)
    np.random.seed(seed)  # the OT plan is sampled with numpy
    net = build_net(NET)

    def draw(gen, step):
        x1 = data.draw(batch, gen)
        x0 = torch.randn(x1.shape, generator=gen)
        s = torch.rand(batch, generator=gen)
        s, xs, ut = matcher.sample_location_and_conditional_flow(x0, x1, s)
        return {"xs": xs, "s": s, "ut": ut}

    def loss(model, b):
        return (model(b["xs"], 1000.0 * b["s"]) - b["ut"]).pow(2).mean(1)

    cfg = {"steps": steps, "batch_size": batch, "lr": lr, "warmup": 100, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.995,
           "seed": seed, "device": "cpu", "mixed_precision": "no", "checkpoint_every": steps, "keep_checkpoints": 1,
           "log_every": 100}
    with tempfile.TemporaryDirectory() as tmp:
        run = RunFolder.create(Path(tmp) / "cfm", cfg)
        ema = fit(Task(student=net, draw=draw, loss=loss), run, cfg, progress=False)
    return ema.module.eval()


def measures(sample, D, z, data, gmm, exact_map, same_map: bool = True) -> dict:
    """sliced-W2 and exact-map error at 1/2/4 NFE; for a flow D (None: a one-step student) also
    S(Z) and the same two for its accurate ODE (DPM-Solver++(2M), 64 NFE, uniform-t grid)."""
    row = {"sliced_w2": {}, "exact_error": {}}
    for k in NFES:
        x = sample(k)
        if x is None:
            continue
        row["sliced_w2"][str(k)] = sliced_w2(x.double(), data)
        row["exact_error"][str(k)] = rms(x.double(), exact_map) if gmm is not None and same_map else None
    if D is not None:
        p = LinearFlow()
        x = quiet_sample(D, p.sigma_max * z, sampler="dpmpp_2m", nfe=64, grid="time-trailing", sigma_min=p.sigma_min,
                         sigma_max=p.sigma_max, process=p).double()
        row["ode64"] = {"sliced_w2": sliced_w2(x, data),
                        "exact_error": rms(x, exact_map) if gmm is not None and same_map else None}
        row["flow_straightness"] = flow_straightness(D, p, z)
    return row


def run_part(part: str, a, folder: Path) -> dict:
    spec, gmm = part_data(part, folder)
    data = fresh_data(gmm, 5 * a.n_eval)  # the reference sample: 5x larger, so its own noise matters less
    z = torch.randn(a.n_eval, 2, generator=torch.Generator().manual_seed(100))
    s_max = LinearFlow().sigma_max
    exact_map = gmm.flow(s_max * z.double(), s_max, 0.0, rtol=1e-7) if gmm is not None else None
    base = {"net": NET, "steps": a.steps, "batch_size": a.batch, "lr": a.lr, "device": "cpu", "pairs": a.pairs,
            "eval_samples": 1000, "seed": 0}
    floor = sorted(sliced_w2(fresh_data(gmm, a.n_eval, seed=s), data) for s in range(1, 21))
    rows = [{"model": f"data: 20 fresh samples of {a.n_eval}", "nfe_free": True,
             "sliced_w2": {"-": 0.5 * (floor[9] + floor[10]), "min": floor[0], "max": floor[-1]}}]
    if gmm is not None:  # the ideal 1-RF: the mixture's own velocity (exact denoiser), Euler steps
        z64 = z.double()
        row = measures(lambda k: gmm_euler(gmm, z64, k), gmm, z64, data, gmm, exact_map)
        row.update(model="exact 1-RF (the mixture's own velocity)", train_steps=0, teacher_evals=0)
        rows.append(row)

    # ours: rounds 1..3 and the one-step student, one reflow run
    c0 = time.process_time()
    out = distill("reflow", {**base, "data": spec, "rounds": a.rounds, "distill_steps": a.steps},
                  str(folder / f"{part}_reflow"), progress=False)
    ours_cpu = time.process_time() - c0
    summary = json.loads((Path(out) / "reflow.json").read_text())
    for r in summary["rounds"]:
        flow = load(f"{out}/round{r['round']}")
        row = measures(lambda k: flow.sample(a.n_eval, k, x=flow.sigma_max * z)[0], flow.denoiser, z, data, gmm,
                       exact_map)
        row.update(model=f"ours {r['round']}-RF", coupling_straightness=r["straightness"],
                   train_steps=a.steps * r["round"], teacher_evals=sum(x["cost"]["teacher_evals"]
                                                                       for x in summary["rounds"][:r["round"]]))
        rows.append(row)
    student = load(out)
    row = measures(lambda k: student.sample(a.n_eval, 1, x=student.sigma_max * z)[0] if k == 1 else None, None, z,
                   data, gmm, exact_map)
    row.update(model=f"ours {a.rounds}-RF + one-step KD", train_steps=a.steps * (a.rounds + 1),
               teacher_evals=student.meta["cost"]["teacher_evals"], cpu_seconds_all_ours=ours_cpu)
    rows.append(row)

    if gmm is not None:  # one round on the exact teacher's couplings
        c0 = time.process_time()
        out_t = distill("reflow", {**base, "teacher": spec, "rounds": 1, "distill_steps": 0},
                        str(folder / f"{part}_teacher_rf"), progress=False)
        flow = load(f"{out_t}/round1")
        row = measures(lambda k: flow.sample(a.n_eval, k, x=flow.sigma_max * z)[0], flow.denoiser, z, data, gmm,
                       exact_map)
        r = json.loads((Path(out_t) / "reflow.json").read_text())["rounds"][0]
        row.update(model="ours RF on the exact teacher's couplings", coupling_straightness=r["straightness"],
                   train_steps=a.steps, teacher_evals=r["cost"]["teacher_evals"],
                   cpu_seconds=time.process_time() - c0)
        rows.append(row)

    from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                    ExactOptimalTransportConditionalFlowMatcher)

    for name, matcher, same in (("torchcfm I-CFM", ConditionalFlowMatcher(sigma=0.0), True),
                                ("torchcfm OT-CFM", ExactOptimalTransportConditionalFlowMatcher(sigma=0.0), False)):
        c0 = time.process_time()
        net = train_cfm(matcher, spec, a.steps, a.batch, a.lr, 0)
        cpu = time.process_time() - c0
        row = measures(lambda k: cfm_euler(net, z, k), CFMDenoiser(net), z, data, gmm, exact_map, same_map=same)
        row.update(model=name, train_steps=a.steps, teacher_evals=0, cpu_seconds=cpu)
        rows.append(row)
    rows.append({"model": PEER_MISSING[0], "note": PEER_MISSING[1]})
    return {"part": part, "data": spec if gmm is None else "anisotropic 2-D mixture (5 modes)", "rows": rows,
            "options": vars(a), "machine": machine()}


def fmt(v, digits=3):
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(res: dict) -> str:
    gmm = res["part"] == "gmm"
    cols = ["model", "train steps", "teacher evals", "S (eq. 43)", "S(Z)", "sliced-W2 1 / 2 / 4 NFE",
            "sliced-W2 ODE 64"] + (["exact-map RMS 1 / 2 / 4 NFE", "exact-map RMS ODE 64"] if gmm else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        if "note" in r:
            lines.append(f"| {r['model']} | {r['note']} |" + " |" * (len(cols) - 2))
            continue
        sw, ode = r["sliced_w2"], r.get("ode64", {})
        if r.get("nfe_free"):
            cells = ["", "", "", "", f"noise floor: median {sw['-']:.3f} ({sw['min']:.3f} to {sw['max']:.3f})", ""] \
                + (["", ""] if gmm else [])
        else:
            S, SZ = r.get("coupling_straightness"), r.get("flow_straightness")
            cells = [str(r["train_steps"]), f"{r['teacher_evals']:,}", "—" if S is None else f"{S:.2g}",
                     "—" if SZ is None else f"{SZ:.2g}", " / ".join(fmt(sw.get(str(k))) for k in NFES),
                     fmt(ode.get("sliced_w2"))]
            if gmm:
                other = r["model"].endswith("OT-CFM")
                cells += ["other map"] * 2 if other else [" / ".join(fmt(r["exact_error"].get(str(k))) for k in NFES),
                                                          fmt(ode.get("exact_error"))]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["moons", "gmm", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="600 steps, 4000 pairs, 2000 evaluation samples")
    p.add_argument("--steps", type=int, default=None, help="training steps per flow (default 2000; quick 600)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pairs", type=int, default=None, help="couplings per reflow round (default 10000; quick 4000)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-eval", type=int, default=None)
    a = p.parse_args()
    a.steps = a.steps or (600 if a.quick else 2000)
    a.pairs = a.pairs or (4000 if a.quick else 10000)
    a.n_eval = a.n_eval or (2000 if a.quick else 4000)
    torch.set_num_threads(1)
    outdir = Path(__file__).resolve().parent / "out"
    outdir.mkdir(exist_ok=True)
    parts = ["moons", "gmm"] if a.part == "all" else [a.part]
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            c0 = time.process_time()
            res = run_part(part, a, Path(tmp))
            res["cpu_seconds"] = time.process_time() - c0
            (outdir / f"reflow_{part}.json").write_text(json.dumps(res, indent=1))
            print(f"\n### {part} ({res['cpu_seconds']:.0f} CPU s, load {res['machine']['load_average']})\n")
            print(markdown(res), flush=True)


if __name__ == "__main__":
    main()
