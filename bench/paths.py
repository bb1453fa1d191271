"""Path distillation beyond reflow, side by side on the exact mixtures (issue 15) ->
bench/out/paths_<part>.json and the section "Path methods side by side (issue 15)" of
docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/paths.py --part gmm2 [--steps 2000] [--only "FM ot,torchcfm OT-CFM"]
    OMP_NUM_THREADS=1 .venv/bin/python bench/paths.py --part gmm16
    .venv/bin/python bench/paths.py --table gmm2             # the markdown of a finished part
    .venv/bin/python bench/paths.py --doc docs/BENCHMARKS.md  # write the section from the finished parts
    OMP_NUM_THREADS=1 .venv/bin/python bench/paths.py --part gmm2 --quick   # 200 steps, 1000 samples: a smoke run

Parts: the exact mixtures, the ring of 8 (d = 2) and the d = 16 mixture of 4 full-covariance
modes of bench/distill.py (the same as bench/one_step.py's), where the flow map and the data are
known; and two data sets, moons (scored against fresh samples) and 8x8 digits (the 1797 images,
as bench/one_step.py's digits part; every net there an MLP 256 x 4 on the 64 pixels, scored also
by the Frechet distance on the digits classifier's features), where the flow map is not known
(no RMS column) and the operator distils the trained teacher.
Every row is one ``fewstep distill`` run with its defaults, the default MLP (256 x 4), batch 256,
seed 0 and ``--steps`` (2000) loop steps per stage:

- 1-RF / 2-RF: ``reflow --data MIXTURE --couplings independent --rounds 2`` (round 1 is the
  1-rectified flow, round 2 its reflow on 20000 of its own ODE pairs), each with its one-step
  student (``--distill-steps``); "1-RF + student" is ``--rounds 1``.
- FM: ``flow-matching`` on the linear path with the couplings independent (I-CFM, = 1-RF), ot
  (exact minibatch OT, POT's ``ot.emd``) and sb (Sinkhorn, epsilon 1, its bridge noise), each also
  at seeds 1 and 2 (the run-to-run noise the torchcfm rows are read against); ot also with
  ``--ot-pairs sample`` (pairs drawn with replacement from the exact plan, torchcfm's OT-CFM draw)
  at seeds 0 and 1; and the independent coupling on the trig and VP paths.
- min-curvature (beta 10, the default, and beta 1): the learned coupling q(z | x0).
- operator (DFNO): the exact teacher's 8-level trajectories (20000, Heun on the Karras grid at
  64 NFE), one evaluation.
- SFT-PG and MMD-DDM fine-tune a network teacher (``fewstep train --data MIXTURE``, EDM, 4000
  steps, trained once per part): each is shown beside that teacher sampled with the very same
  rule (sampler, grid, noise) before tuning, at T' = 2 and 4.
- torchcfm 1.0.7 (``pip install --no-deps torchcfm``; a peer, not a dependency): its
  ConditionalFlowMatcher (I-CFM), ExactOptimalTransportConditionalFlowMatcher (OT-CFM) and
  SchrodingerBridgeConditionalFlowMatcher (SB-CFM, sigma = sqrt(epsilon / 2) = 0.707, with
  ``ot_method="sinkhorn"``: the same plan as ours; and with its default ``"exact"``, which pairs by
  the exact OT plan and adds the bridge noise) make (t, x_t, u_t); the same net, AdamW, learning rate, warm-up, clip, EMA, batch
  and steps as our loop's defaults train on them, and the net is sampled as a fewstep flow model
  with FM's own rule (Euler, uniform in t) from the same noise, so only the training targets differ;
  seeds 0, 1 and 2 (the seed of the net's initialisation and of every draw).

Measured per row from the same x_T (4000 samples): energy distance and sliced-W2 to 4000 exact
samples at 1, 2 and 4 NFE of the model's own rule; RMS against the exact flow map from that x_T
for the rows whose target is that map (1-RF, FM independent on every path, torchcfm I-CFM,
reflow's rounds and students, the operator); S(Z), Liu et al.'s straightness of the model's own
ODE path (64 Euler steps uniform in t, in its own path's x and t: the linear path for all rows but
FM's trig and VP ones, whose S(Z) is on their own curved interpolant and so not comparable with the
others; 0 for a straight flow, where one Euler step is exact); teacher
evaluations (network or exact-mixture calls made to build the targets: the teacher's for operator
and the trained teacher's rows, the previous round's for 2-RF and the students) and wall seconds
(the whole run, its own evaluation included; the rows of one run share it; torchcfm rows: training). The
exact mixture's own linear-path flow (the ideal 1-RF) and the exact flow map are the yardsticks.
Each row is saved as it finishes; a rerun skips those present (``--redo NAME`` drops one).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import publish  # noqa: E402
from distill import cost, exact_teacher  # noqa: E402

from fewstep.methods import distill  # noqa: E402
from fewstep.metrics import energy_distance, rms, sliced_w2  # noqa: E402
from fewstep.model import load  # noqa: E402

N = 4000
NFES = (1, 2, 4)
OUT = Path(__file__).resolve().parent / "out"
HEADING = "## Path methods side by side (issue 15)"
TEACHER_STEPS = 4000
SB_EPSILON = 1.0
SEEDS = (0, 1, 2)  # our three couplings and the torchcfm peers: the run-to-run spread
OT_SAMPLE = "FM ot, pairs drawn from the plan"
EXACT = ("gmm2", "gmm16")
PARTS = EXACT + ("moons", "digits")


DIGITS_NET = {"kind": "mlp", "dim": 64, "hidden": 256, "depth": 4, "emb_dim": 128}  # the mixtures' default MLP


def runs(spec: str, steps: int, net_teacher: str) -> dict:
    """name -> (method, options, folder inside the run to load, targets the exact flow map); the
    operator distils the exact mixture where there is one, else the trained teacher."""
    net = {"net": DIGITS_NET} if spec == "digits" else {}
    rf = {"data": spec, **net, "couplings": "independent", "round_steps": [steps, steps], "rounds": 2,
          "distill_steps": steps}
    out = {
        "1-RF (reflow round 1)": ("reflow", rf, "round1", True),
        "2-RF (reflow round 2)": ("reflow", rf, "round2", True),
        "2-RF + student": ("reflow", rf, "", True),
        "1-RF + student": ("reflow", {**rf, "rounds": 1, "round_steps": [steps]}, "", True),
    }
    fm = {"data": spec, **net, "steps": steps}
    for name, extra, target in (("FM independent (I-CFM)", {"coupling": "independent"}, True),
                                ("FM ot (OT-CFM)", {"coupling": "ot"}, False),
                                ("FM sb (SB-CFM)", {"coupling": "sb", "sb_epsilon": SB_EPSILON}, False),
                                ("FM trig path", {"coupling": "independent", "path": "trig"}, True),
                                ("FM vp path", {"coupling": "independent", "path": "vp"}, True)):
        out[name] = ("flow_matching", {**fm, **extra}, "", target)
        if name.split(" ")[1] in ("independent", "ot", "sb"):  # more seeds: the run-to-run noise
            for seed in SEEDS[1:]:
                out[f"{name}, seed {seed}"] = ("flow_matching", {**fm, **extra, "seed": seed}, "", target)
        if name.startswith("FM ot"):  # torchcfm's draw of the pairs from the same exact plan
            for seed in SEEDS[:2]:
                out[OT_SAMPLE + (f", seed {seed}" if seed else "")] = (
                    "flow_matching", {**fm, **extra, "ot_pairs": "sample", **({"seed": seed} if seed else {})}, "",
                    target)
    out["min-curvature (beta 10)"] = ("min_curvature", {"data": spec, **net, "steps": steps}, "", False)
    out["min-curvature (beta 1)"] = ("min_curvature", {"data": spec, **net, "steps": steps, "beta": 1.0}, "", False)
    exact = spec.startswith("gmm:")
    out["operator (DFNO)"] = ("operator", {"teacher": spec if exact else net_teacher, "steps": steps}, "", True)
    for T in (2, 4):
        out[f"SFT-PG T'={T}"] = ("sft", {"teacher": net_teacher, "data": spec, "steps": steps, "timesteps": T}, "",
                                 False)
        out[f"MMD-DDM T'={T}"] = ("mmd_ddm", {"teacher": net_teacher, "data": spec, "steps": steps, "timesteps": T},
                                  "", False)
    return out


TORCHCFM = {"torchcfm I-CFM": ("ConditionalFlowMatcher", {"sigma": 0.0}, True),
            "torchcfm OT-CFM": ("ExactOptimalTransportConditionalFlowMatcher", {"sigma": 0.0}, False),
            # the Sinkhorn plan of our sb coupling (torchcfm's reg = 2 sigma^2 = epsilon)
            "torchcfm SB-CFM": ("SchrodingerBridgeConditionalFlowMatcher",
                                {"sigma": math.sqrt(SB_EPSILON / 2), "ot_method": "sinkhorn"}, False),
            # torchcfm's default SB-CFM pairs by the exact OT plan and adds the bridge noise
            "torchcfm SB-CFM (exact plan, its default)": ("SchrodingerBridgeConditionalFlowMatcher",
                                                          {"sigma": math.sqrt(SB_EPSILON / 2)}, False)}
REFERENCE = "FM independent (I-CFM)"  # the fewstep model whose rule, net and process the torchcfm nets borrow


class VelocityDenoiser(torch.nn.Module):
    """A torchcfm-convention velocity net u(x, s) (s = 0 noise, 1 data; dx/ds = u) as the
    sigma-space denoiser of the linear flow: t = 1 - s = sigma / (1 + sigma), x_t = y / (1 + sigma),
    our velocity v = dx/dt = -u, and D = x_t - t v (reflow's flow prediction)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, y, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        sig = sigma.expand(y.shape[0]) if sigma.ndim == 0 else sigma
        t = (sig / (1 + sig)).reshape((-1,) + (1,) * (y.ndim - 1))
        x = y * (1 - t)
        u = self.net(x.float(), 1000.0 * t.flatten().float()).to(y.dtype)
        return x + t * u


class Part:
    """The data of a part: an exact mixture (gmm2, gmm16: fresh exact samples, the exact flow map)
    or a data set (moons: fresh samples; digits: the 1797 digits, FD on the digits classifier)."""

    def __init__(self, name: str, folder: Path):
        from fewstep.data.registry import load_dataset

        self.name = name
        if name in EXACT:
            self.spec, self.gmm = exact_teacher(name, folder)
            self.train = None
            self.data = self.gmm.sample(N, generator=torch.Generator().manual_seed(12345))
            self.other = self.gmm.sample(N, generator=torch.Generator().manual_seed(999))
        else:
            self.spec, self.gmm = name, None
            self.train = load_dataset(name).x.double()
            n = min(N, len(self.train) // 2) if name == "digits" else N
            ref = load_dataset(name, n=2 * n, seed=123).x.double()  # moons: fresh; digits: the set's own images
            self.data, self.other = ref[:n], ref[n:]
        self.n = len(self.data)

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.gmm is not None:
            return self.gmm.sample(n, generator=gen).float()
        return self.train[torch.randint(len(self.train), (n,), generator=gen)].float()

    def flow_map(self, x_T: torch.Tensor, sigma_max: float):
        return None if self.gmm is None else self.gmm.flow(x_T, sigma_max, 0.0, rtol=1e-7)

    def scores(self, x: torch.Tensor) -> dict:
        a, b = x.flatten(1), self.data.flatten(1)
        out = {"energy_distance": energy_distance(a, b), "sliced_w2": sliced_w2(a, b)}
        if self.name == "digits":
            from fewstep.metrics import frechet_distance

            out["fd"] = frechet_distance(x.float(), self.data.float(), "digits")
        return out


def train_torchcfm(name: str, reference, part, steps: int, seed: int = 0) -> tuple:
    """(the EMA net, seconds): torchcfm's matcher of ``name`` makes the targets; our loop's defaults
    (AdamW lr 1e-3, 100 warm-up steps, clip 1.0, EMA 0.995, batch 256) train the reference's net."""
    import torchcfm.conditional_flow_matching as cfm

    from fewstep.nets import build_net

    cls, kw, _ = TORCHCFM[name]
    matcher = getattr(cfm, cls)(**kw)
    torch.manual_seed(seed)  # torchcfm draws t and the noise of x_t from torch's global generator
    np.random.seed(seed)  # and its plan's pairs from numpy's
    net = build_net(reference.meta["net"])
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 100)
        data = part.batch(256, gen)
        noise = torch.randn(data.shape, generator=gen)
        s, xs, us = matcher.sample_location_and_conditional_flow(noise, data)
        # the net sees the linear flow's own time input (1000 t, t = 1 - s), as fewstep's flow models do
        loss = (net(xs, 1000.0 * (1 - s)) - us).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - 0.995)
    return ema.eval(), time.time() - t0


def straightness(model, z: torch.Tensor) -> float:
    """Liu et al.'s S(Z) on the model's own path and time (64 Euler steps uniform in its t, within its
    own sigma range): the linear path for every row but FM's trig and VP ones."""
    from fewstep.methods.common import flow_straightness

    return flow_straightness(model.denoiser, model.process, z.to(model.dtype))


def measure(model, part: Part, z, target: bool, flow: bool, nfes=NFES) -> dict:
    """ED / sliced-W2 (/ FD) / RMS at each NFE of the model's rule (of ``nfes``), from x_T =
    sigma_max z; S(Z) for flows."""
    x_T = z.double() * float(model.sigma_max)
    ref = part.flow_map(x_T, float(model.sigma_max)) if target else None
    out = {}
    for k in nfes:
        if model.rule_nfes() and k not in model.rule_nfes():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = model.sample(len(z), k, x=x_T.to(model.dtype), seed=101)[0].double().cpu()
        out[str(k)] = {**part.scores(x), "rms_flow": None if ref is None else rms(x, ref)}
    return {"nfe": out, "straightness": straightness(model, z[:2000]) if flow else None}


def net_teacher(spec: str, folder: Path, result: dict, steps: int = TEACHER_STEPS) -> str:
    from fewstep.train.teacher import train_teacher

    tdir = folder / "net_teacher"
    if not (tdir / "model.json").is_file():
        t0 = time.time()
        net = {"net": DIGITS_NET} if spec == "digits" else {}
        train_teacher({"data": spec, **net, "steps": steps, "device": "cpu", "seed": 0}, str(tdir), progress=False,
                      evaluate=False, resume=tdir.exists())
        result["net_teacher_seconds"], result["net_teacher_steps"] = time.time() - t0, steps
    return str(tdir)


def run_once(method: str, opts: dict, folder: Path) -> tuple:
    """(run folder, seconds) of ``fewstep distill method opts`` under ``folder``, named by its
    options: made once, resumed when interrupted, reused by every row that reads it."""
    key = json.dumps([method, opts], sort_keys=True)
    run_dir = folder / f"{method}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    stamp = run_dir / "bench_seconds.json"
    if (run_dir / "model.json").is_file() and stamp.is_file():
        return str(run_dir), json.loads(stamp.read_text())["seconds"]
    t0 = time.time()
    out = distill(method, {"seed": 0, **opts, "device": "cpu"}, str(run_dir), progress=False,
                  resume=run_dir.exists())
    stamp.write_text(json.dumps({"seconds": time.time() - t0}))
    return out, time.time() - t0


def run(part: str, steps: int, only, folder: Path, out_dir: Path = OUT, quick: bool = False) -> dict:
    path = out_dir / f"paths_{part}{'_quick' if quick else ''}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("steps") not in (None, steps):
        raise SystemExit(f"{path} holds a run at --steps {result['steps']}; move it away or give that budget")
    data = Part(part, folder)
    spec = data.spec
    teacher_run = net_teacher(spec, folder, result, TEACHER_STEPS // 10 if quick else TEACHER_STEPS)
    teacher = load(spec) if data.gmm is not None else load(teacher_run, device="cpu")
    z = teacher.noise(data.n, seed=100).double() / teacher.sigma_max
    result.update(part=part, steps=steps, n=data.n, machine=f"{platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} torch thread(s)", torch=torch.__version__)
    result.setdefault("floor", data.scores(data.other))
    rows = result.setdefault("rows", {})
    for name, (method, opts, sub, target) in runs(spec, steps, teacher_run).items():
        if (only and name not in only) or name in rows:
            continue
        out, wall = run_once(method, opts, folder)
        model = load(str(Path(out) / sub) if sub else out, device="cpu")
        flow = method in ("reflow", "flow_matching", "min_curvature") and not (method == "reflow" and not sub)
        row = {"method": method, "options": {k: v for k, v in opts.items() if k not in ("teacher", "data")},
               "wall_seconds": wall, "teacher_evals": 0 if sub == "round1" else cost(out).get("teacher_evals", 0),
               **measure(model, data, z, target, flow, (1,) if method == "reflow" and not sub else NFES)}
        if method in ("sft", "mmd_ddm"):  # the same rule on the teacher before tuning
            before = copy.copy(load(teacher_run, device="cpu"))
            before.meta = {**before.meta, "sampling": model.sampling}
            row["before"] = measure(before, data, z, False, False)
        rows[name] = row
        print(json.dumps({"row": name, "wall_seconds": round(wall), **row["nfe"]}), flush=True)
        out_dir.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    for base, seed in ((b, sd) for b in TORCHCFM for sd in SEEDS):
        name = base + (f", seed {seed}" if seed else "")
        if (only and name not in only) or name in rows:
            continue
        try:
            import torchcfm  # noqa: F401
        except ImportError:
            print(f"{name}: torchcfm is not installed (pip install --no-deps torchcfm); row left out", flush=True)
            continue
        method, opts, _, _ = runs(spec, steps, teacher_run)[REFERENCE]
        reference = load(run_once(method, opts, folder)[0], device="cpu")
        net, wall = train_torchcfm(base, reference, data, steps, seed)
        model = copy.copy(reference)
        model.denoiser = VelocityDenoiser(net)
        rows[name] = {"method": "torchcfm", "options": {"matcher": TORCHCFM[base][0], **TORCHCFM[base][1],
                                                        **({"seed": seed} if seed else {})},
                      "wall_seconds": wall, "teacher_evals": 0, **measure(model, data, z, TORCHCFM[base][2], True)}
        print(json.dumps({"row": name, "wall_seconds": round(wall), **rows[name]["nfe"]}), flush=True)
        path.write_text(json.dumps(result, indent=1))
    if "references" not in result:
        refs = {}
        if data.gmm is not None:
            method, opts, _, _ = runs(spec, steps, teacher_run)[REFERENCE]
            ideal = copy.copy(load(run_once(method, opts, folder)[0], device="cpu"))
            ideal.denoiser = teacher.denoiser
            refs["exact 1-RF flow (ideal independent coupling)"] = measure(ideal, data, z, True, True)
            flow_map = data.flow_map(z.double() * teacher.sigma_max, teacher.sigma_max)
            refs["exact flow map"] = {"nfe": {"-": {**data.scores(flow_map), "rms_flow": 0.0}}, "straightness": None}
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = teacher.sample(data.n, 64, "heun", x=(z * teacher.sigma_max).to(teacher.dtype))[0].double()
            refs["trained teacher, Heun 64 NFE (127 evaluations)"] = {"nfe": {"-": {**data.scores(x), "rms_flow": None}},
                                                                     "straightness": None}
        result["references"] = refs
    path.write_text(json.dumps(result, indent=1))
    return result


def _cell(v, f=".4f"):
    return "-" if v is None else format(v, f)


def table(result: dict) -> str:
    keys = [("energy_distance", "ED", ".4f"), ("sliced_w2", "SW2", ".4f")]
    if result["part"] == "digits":
        keys.append(("fd", "FD", ".2f"))
    if result["part"] in EXACT:
        keys.append(("rms_flow", "RMS", ".4f"))
    cols = " | ".join(f"{short} {k}" for _, short, _ in keys for k in NFES)
    lines = [f"| model | {cols} | S(Z) | teacher evaluations | wall s |",
             "|---|" + "---|" * (len(keys) * len(NFES) + 3)]

    def line(name, m, evals="-", wall=None):
        nfe = m["nfe"]
        if "-" in nfe:
            nfe = {str(k): nfe["-"] for k in NFES[:1]}
        cells = [_cell(nfe.get(str(k), {}).get(key), f) for key, _, f in keys for k in NFES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(m.get('straightness'))} | {evals} | "
                     f"{_cell(wall, '.0f')} |")

    for name, m in result.get("references", {}).items():
        line(f"*{name}*", m)
    order = list(runs("gmm:-", 1, "-"))
    at = order.index(f"FM sb (SB-CFM), seed {SEEDS[-1]}") + 1
    order[at:at] = [b + (f", seed {sd}" if sd else "") for b in TORCHCFM for sd in SEEDS]  # the peers beside ours
    for name, r in sorted(result["rows"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        if "before" in r:
            line(f"{name.split(' T')[0]} teacher before tuning, T'={name.split('=')[-1]}", r["before"])
        line(name, r, f"{r['teacher_evals']:.3g}", r["wall_seconds"])
    lines.append("")
    floor = result["floor"]
    what = "exact sets" if result["part"] in EXACT else "reference sets"
    lines.append(f"Floor (two {what} of {result['n']}): energy distance {floor['energy_distance']:.4f}"
                 + (f", sliced-W2 {floor['sliced_w2']:.4f}" if "sliced_w2" in floor else "")
                 + (f", FD {floor['fd']:.2f}" if "fd" in floor else "") + ".")
    if "net_teacher_seconds" in result:
        lines.append(f"Network teacher (SFT, MMD-DDM{'' if result['part'] in EXACT else ', operator'}): `fewstep "
                     f"train --data {result['part']} --steps {result.get('net_teacher_steps', TEACHER_STEPS)}`, {result['net_teacher_seconds']:.0f} s.")
    return "\n".join(lines)


READING = """Runs (gmm2, gmm16): 2026-12-04 18:47-20:35, the 2-core development VM (Intel Xeon), 1 torch thread, beside one or two other
jobs (wall seconds are upper bounds); bench/paths.py of commits 731d703-f51886f, whose measuring code differs only
in S(Z) on each model's own path (the trig and VP rows were measured again with it) and the seed-1 rows; the
seed-2 rows, the sampled-pairs OT rows and the torchcfm rows of seeds 1-2 and with the Sinkhorn plan 22:08-22:40
(commits bbe9b62-79ecdb3, beside another job).

**Reading** (the claims of the papers, confirmed or not):

- *OT couplings straighten paths at no teacher cost*: **confirmed.** S(Z) falls from 1.34 (ring) / 3.79 (d = 16)
  with the independent coupling to 0.0028 / 0.31 with minibatch OT (0.028-0.051 / 0.38-0.39 with the Sinkhorn
  plan), and the 1-step energy distance from 1.29-1.31 / 1.90-1.92 to 0.0012-0.0030 / 0.033, with 0 teacher
  evaluations. At d = 16 a distilled student still beats them at 1 step (1-RF + student -0.0002, 2-RF 0.0016,
  at 1.3-2.6e6 evaluations of the 1-RF flow).
- *Min-curvature lowers curvature against the independent coupling*: **confirmed**, modestly at the default
  beta 10 (S(Z) 0.87 vs 1.34 ring, 2.83 vs 3.79 d = 16; 1-step ED 0.93 / 1.35), strongly at beta 1 (0.087 /
  0.87; 1-step ED 0.050 / 0.105). Minibatch OT straightens more (0.0028 / 0.31) without an encoder.
- *SFT and MMD fine-tuning improve the teacher's 2-4-step samples over its untuned ones*: **confirmed for both**,
  same rule, same noise. MMD-DDM: T' = 2 1.25 -> 0.0029 (ring), 1.68 -> 0.0091 (d = 16); T' = 4 0.108 -> 0.0008,
  0.153 -> 0.0052. SFT-PG: T' = 2 1.25 -> 0.027, 1.69 -> 1.15; T' = 4 0.159 -> 0.012, 0.244 -> 0.139: smaller
  gains at d = 16 at this budget (its policy gradient has a WGAN critic to learn; MMD has an exact kernel loss).
- *torchcfm beside ours* (same net, steps, batch, loop defaults; three seeds each give the run-to-run spread; 1-step
  energy distance, ours / torchcfm): **I-CFM and OT-CFM equal within the spread on both mixtures**: I-CFM 1.285-1.309
  / 1.258-1.336 (ring), 1.872-1.921 / 1.877-1.931 (d = 16); OT-CFM 0.0012-0.0030 / 0.0018-0.0037 (ring),
  0.030-0.034 / 0.026-0.038 (d = 16; the gap of 25 % that two seeds showed was noise; pairs drawn from the plan
  as torchcfm does, `--ot-pairs sample`: 0.0011-0.0025 and 0.028-0.030, the same), S(Z) equal to two digits.
  SB-CFM with the same Sinkhorn plan (torchcfm `ot_method="sinkhorn"`; the two plans agree within 1e-3 in L1 on
  d = 16 batches): equal on the ring (0.0072-0.0105 / 0.0087-0.0101), at d = 16 ours better at 1 step (0.023-0.026 /
  0.035-0.052) and close at 4 (0.0037-0.0042 / 0.0043-0.0060), S(Z) 0.38-0.39 / 0.34-0.39: not explained (the
  draw of t, (0, 1) there, [0.001, 0.999] here, was tried and is not it). torchcfm's *default* SB-CFM pairs by
  the exact OT plan and adds the bridge noise: a different method, worse than both on the ring at 1 step
  (0.013-0.027) and at d = 16 (0.038-0.040).
- *Reflow*: 2-RF straightens to S(Z) 0.0001 / 0.008 (1-step ED 0.0010 / 0.0016) at 2.56e6 evaluations of the
  1-RF flow; its RMS against the exact map (0.059 / 0.175) is the 1-RF's own error, the map it reflows.
- *Operator (DFNO)*: at 1 NFE at the floor (ED 0.0006 / -0.0009) with RMS against the exact flow map 0.021 /
  0.110, the lowest RMS of any 1-NFE row here, for 1.26e6 exact-teacher evaluations (20000 trajectories).
- The trig and VP interpolants bring nothing over the linear one at this budget (VP is worse at 2 steps: 0.65
  vs 0.15 on the ring; its noise end is reached only approximately, alpha(1) = 0.0066). The ideal
  independent-coupling flow at 1 Euler step collapses to the data mean (ED 1.44 / 2.30); the trained 1-RF rows
  are a little better at 1 step only because their velocity errors near t = 1 spread the samples.
- Moons (`--part moons --steps 500`, a quarter of the mixtures' budget, 2026-12-04 21:00, 2 threads, the machine
  otherwise idle, commit d957b84): the same picture. OT straightens at no teacher cost (S(Z) 0.54 -> 0.0018-0.0020,
  1-step ED 0.44 -> 0.0022-0.0024); min-curvature lowers S(Z) to 0.39 (beta 10) / 0.049 (beta 1); MMD-DDM
  0.67 -> 0.0013 (T' = 2), 0.159 -> 0.0007 (T' = 4); SFT-PG gains little at 500 steps (0.67 -> 0.53, 0.23 -> 0.22);
  torchcfm equal within the three-seed spread (1-step ED, ours / torchcfm; seed-2 and torchcfm seed 1-2 / Sinkhorn
  rows 23:05-23:15, commit ee974c9): I-CFM 0.440-0.449 / 0.419-0.457; OT-CFM 0.0022-0.0033 / 0.0020-0.0032
  (sampled pairs 0.0020-0.0031); SB-CFM with the Sinkhorn plan 0.0058-0.0063 / 0.0057-0.0065 and one torchcfm seed at
  0.036; torchcfm's default SB-CFM (exact plan) 0.0065-0.0123.
- 8x8 digits (`--part digits --steps 2000`, 2026-12-04 21:24-23:00, 1 thread beside other jobs, commits 0bae080 and
  79ecdb3 for the seed-2 and torchcfm rows; FD on the digits classifier, floor 7.7, the trained teacher at Heun 64
  NFE 11.4): *OT straightens at no teacher cost*: **confirmed, but far from straight in 64-D with batches of 256**
  (S(Z) 8.1 -> 2.1; 1-step FD 1254-1278 -> 194-198, 4-step 83-84 -> 43-48), while the students that spend teacher
  evaluations reach FD 20-43 in one step (operator 19.9, 1-RF + student 33.6, 2-RF + student 37.4, 2-RF 43; 1.3-2.6e6 evaluations).
  *Min-curvature*: **confirmed** (S(Z) 6.4 at beta 10, 2.07 at beta 1). *SFT and MMD improve the teacher's few-step
  samples*: **confirmed by FD, not always by ED**: MMD-DDM FD 1411 -> 100 (T' = 2), 293 -> 31 (T' = 4), but its
  kernel sits on the same classifier's features as the FD (the paper's Inception stand-in) and the pixel-space
  energy distance gets worse at T' = 4 (0.36 -> 0.47; better at T' = 2, 2.16 -> 0.78); SFT-PG FD 1413 -> 995 and
  417 -> 289, ED 2.16 -> 1.73 and 0.52 -> 0.52. *torchcfm beside ours*: I-CFM 1-step ED 1.596-1.623 / 1.601-1.637
  and OT-CFM 0.213-0.218 / 0.213-0.225 (FD 194-198 / 206-217): equal within the spread. torchcfm's SB-CFM with the
  Sinkhorn plan is **not comparable here**: its plan is computed in float32 and exp(-M / epsilon) underflows for
  digits' costs (up to ~190 at epsilon 1), so it falls back to the uniform plan with a warning (checked on a
  batch: "reverting to uniform plan"), i.e. the independent coupling with bridge noise (S(Z) 3.7, FD 687-738);
  fewstep computes the plan in float64 and switches to log-domain iterations where exp would underflow. Its
  default (exact plan) SB-CFM: 0.016-0.068 / ours 0.012-0.047."""


def section(parts: dict) -> str:
    titles = {"gmm2": "Exact teacher, 2-D ring of 8 (`GaussianMixture.ring(8, radius 2, std 0.25)`)",
              "gmm16": "Exact teacher, d = 16 (`GaussianMixture.random(k=4, dim=16, seed=3)`)",
              "moons": "Data: two moons (fresh samples)",
              "digits": "Data: 8x8 digits (the 1797 images; classifier FD)"}
    commands = [ln.strip() for ln in __doc__.split("\n\n")[1].splitlines()]
    described = "Parts:" + __doc__.split("\nParts:", 1)[1]
    out = [HEADING, "", "```", *commands, "```", "", described.strip(), ""]
    for part, res in parts.items():
        out += [f"### {titles[part]}, `--steps {res['steps']}`", "", f"Machine: {res['machine']}, torch {res['torch']}.",
                "", table(res), ""]
    return "\n".join(out + [READING, ""])


def all_rows() -> list:
    return [*runs("gmm:-", 1, "-"), *(b + (f", seed {sd}" if sd else "") for b in TORCHCFM for sd in SEEDS)]


def row_names(text: str) -> set:
    """The rows named in a comma-separated list; names that hold commas themselves ("FM ot (OT-CFM),
    seed 1") are matched whole. An unknown name stops the script."""
    given = ",".join(t.strip() for t in text.split(",") if t.strip())
    if not given:
        return set()
    known = sorted(all_rows(), key=len, reverse=True)
    found, rest = set(), "," + given + ","
    for name in known:
        key = "," + ",".join(t.strip() for t in name.split(",")) + ","
        if key in rest:
            found.add(name)
            rest = rest.replace(key, ",")
    left = [t for t in rest.split(",") if t]
    if left:
        raise SystemExit(f"bench/paths.py: unknown rows {left}; rows are: {'; '.join(all_rows())}")
    return found


def main():
    global N
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=PARTS)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--only", default="", help="comma-separated row names")
    ap.add_argument("--redo", default="", help="comma-separated row names to drop and run again")
    ap.add_argument("--quick", action="store_true", help="200 steps and 1000 samples: a smoke run")
    ap.add_argument("--table", choices=PARTS)
    ap.add_argument("--doc", help="write the section of this markdown file from the finished parts")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads((OUT / f"paths_{a.table}.json").read_text())))
        return 0
    if a.doc:
        parts = {p: json.loads((OUT / f"paths_{p}.json").read_text()) for p in PARTS
                 if (OUT / f"paths_{p}.json").is_file()}
        publish(section(parts), a.doc, HEADING)
        return 0
    if not a.part:
        ap.error("give --part, --table or --doc")
    steps = 200 if a.quick else a.steps
    if a.quick:
        N = 1000
    only = row_names(a.only)
    if a.redo:
        path = OUT / f"paths_{a.part}{'_quick' if a.quick else ''}.json"
        res = json.loads(path.read_text())
        for name in row_names(a.redo):
            res["rows"].pop(name, None)
        res.pop("references", None)
        path.write_text(json.dumps(res, indent=1))
    folder = OUT / "paths_runs" / (a.part + ("_quick" if a.quick else ""))
    folder.mkdir(parents=True, exist_ok=True)
    run(a.part, steps, only, folder, quick=a.quick)
    print(table(json.loads((OUT / f"paths_{a.part}{'_quick' if a.quick else ''}.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
