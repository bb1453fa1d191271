"""Training-based accelerators beside a frozen teacher (issue 17): covariance networks (Bao et
al. 2022a, SN-/NPR-DPM), discriminator guidance (Kim et al. 2022) and classifier-based feature
distillation (Sun et al. 2022) -> bench/out/accel_<part>.json and the markdown tables of
docs/BENCHMARKS.md ("Covariance networks, discriminator guidance and CFD (issue 17)").

    OMP_NUM_THREADS=1 .venv/bin/python bench/accelerators.py --part cov-exact   # ring + d16 mixtures
    OMP_NUM_THREADS=1 .venv/bin/python bench/accelerators.py --part cov-trained # moons + 8x8 digits teachers
    OMP_NUM_THREADS=1 .venv/bin/python bench/accelerators.py --part elbo        # the chain's bound, all four
    OMP_NUM_THREADS=1 .venv/bin/python bench/accelerators.py --part dg
    OMP_NUM_THREADS=1 .venv/bin/python bench/accelerators.py --part cfd
    .venv/bin/python bench/accelerators.py --table cov-exact   # the markdown of a finished part

Covariance: each teacher gets an NPR and an SN head (``fewstep distill covariance``, its
defaults, ``--head-steps``); their error against the exact posterior covariance per level
(exact teachers; the run's eval.json) and the samples of DDPM (posterior variance "small" and
beta "large"), DDIM (eta 0), Analytic-DPM (scalar optimal variance from 2000 data samples,
eta 1 and 0) and DDPM / DDIM(eta 0) with each head's per-dimension optimal variance, at NFE 10,
25 and 50 on the Karras grid (rho 7) from the teacher's sigma_max, same noise for all: energy
distance to 4000 exact (held-out) samples for points, classifier Frechet distance to 898
held-out digits for the digits teacher. The trained teachers are ``fewstep train`` runs kept
in bench/out/accel_runs (moons: EDM MLP, 3000 steps; digits: the EDM MLP 512x4 of
bench/one_step.py, 3000 steps), reused on reruns.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import fewstep  # noqa: E402
from fewstep.methods import distill  # noqa: E402
from fewstep.metrics import energy_distance  # noqa: E402
from fewstep.model import load, load_covariance  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
RUNS = OUT / "accel_runs"
N = 4000
NFES = (10, 25, 50)
DIGITS_NET = {"kind": "mlp", "dim": 64, "hidden": 512, "depth": 4, "emb_dim": 128}


def _save(part: str, res: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"accel_{part}.json").write_text(json.dumps(res, indent=1))


def _load(part: str) -> dict:
    f = OUT / f"accel_{part}.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def trained_teacher(name: str, steps: int = 3000) -> str:
    """A ``fewstep train`` run folder in bench/out/accel_runs (made once)."""
    from fewstep.train.teacher import train_teacher

    folder = RUNS / (f"teacher_{name}" + ("" if steps == 3000 else f"_{steps}"))
    if not (folder / "model.json").is_file():
        cfg = {"data": name, "steps": steps, "device": "cpu", "seed": 0}
        if name == "digits":
            cfg["net"] = DIGITS_NET
        train_teacher(cfg, str(folder), progress=False, evaluate=False, resume=folder.exists())
    return str(folder)


def cases(part: str) -> dict:
    """name -> (teacher spec, reference samples, metric name, data samples for Analytic-DPM)."""
    from fewstep.data.registry import load_dataset

    RUNS.mkdir(parents=True, exist_ok=True)
    out = {}
    if part == "cov-exact" or part == "dg":
        ring = fewstep.GaussianMixture.ring(8, radius=2.0, std=0.3)
        d16 = fewstep.GaussianMixture.random(4, 16, seed=3)
        for name, g in (("ring", ring), ("d16", d16)):
            g.save(RUNS / f"{name}.npz")
            gen = torch.Generator().manual_seed(7)
            out[name] = (f"gmm:{RUNS / f'{name}.npz'}", g.sample(N, generator=gen).double(), "ED",
                         g.sample(2000, generator=gen).double())
    else:
        moons = load_dataset("moons", n=N + 2000, seed=123).x.double()
        out["moons"] = (trained_teacher("moons"), moons[:N], "ED", moons[N:])
        ref, other = digits_held()
        out["digits"] = (trained_teacher("digits"), ref, "FD", other)
    return out


def digits_held() -> tuple:
    """Two disjoint sets of 898 digits (the reference, and Analytic-DPM's data / the floor)."""
    from fewstep.data.registry import load_dataset

    held = load_dataset("digits", n=2 * 898, seed=123).x.float()
    return held[:898], held[898:]


def metric(kind: str, x, ref) -> float:
    if kind == "ED":
        return float(energy_distance(x.double()[:N], ref.double()[:N]))
    from fewstep.metrics import frechet_distance

    return float(frechet_distance(x.float(), ref.float(), "digits"))


def heads(spec: str, name: str, steps: int) -> dict:
    """{form: run folder} of the case's NPR and SN heads (made once)."""
    got = {}
    for form in ("npr", "sn"):
        folder = RUNS / f"cov_{name}_{form}"
        if not (folder / "model.json").is_file():
            distill("covariance", {"teacher": spec, "form": form, "steps": steps, "device": "cpu"}, out=str(folder),
                    progress=False, resume=folder.exists())
        got[form] = str(folder)
    return got


def run_cov(part: str, head_steps: int) -> dict:
    res = _load(part) or {"part": part, "machine": machine(), "head_steps": head_steps, "cases": {}}
    for name, (spec, ref, kind, data) in cases(part).items():
        if name in res["cases"]:
            continue
        t0 = time.time()
        hs = heads(spec, name, head_steps)
        head_secs = {f: json.loads((Path(p) / "model.json").read_text())["cost"]["seconds"] for f, p in hs.items()}
        model = load(spec, device="cpu")
        n = len(ref)
        x_T = model.noise(n, seed=100)
        cov = {f: load_covariance(p, device="cpu") for f, p in hs.items()}
        rng = dict(data_range=(-1.0, 1.0)) if model.kind == "image" else {}
        rows = {"ddpm (small)": ("ddpm", {}), "ddpm (large)": ("ddpm", {"variance": "large"}),
                "ddim eta 0": ("ddim", {}),
                "analytic-dpm eta 1": ("analytic_dpm", {"data": data.to(model.dtype), "eta": 1.0, **rng}),
                "analytic-dpm eta 0": ("analytic_dpm", {"data": data.to(model.dtype), "eta": 0.0, **rng}),
                "ddpm + NPR head": ("ddpm", {"covariance": cov["npr"], **rng}),
                "ddpm + SN head": ("ddpm", {"covariance": cov["sn"], **rng}),
                "ddim eta 0 + NPR head": ("ddim", {"covariance": cov["npr"], **rng})}
        if spec.startswith("gmm:"):
            g = model.denoiser
            rows["ddpm + exact Cov"] = ("ddpm", {"covariance": lambda y, s, d, **c: g.posterior_variance(y, s)})
        table = {}
        for label, (sampler, opts) in rows.items():
            table[label] = {}
            for k in NFES:
                x, _ = _quiet(model.sample, n, k, sampler=sampler, seed=100, x=x_T, grid="karras",
                              generator=torch.Generator().manual_seed(5), **opts)
                table[label][str(k)] = metric(kind, x, ref)
            print(name, label, table[label], flush=True)
        evals = {f: json.loads((Path(p) / "eval.json").read_text())["per_level"] for f, p in hs.items()}
        res["cases"][name] = {"metric": kind, "table": table, "head_eval": evals, "head_seconds": head_secs,
                              "seconds": time.time() - t0, "floor": _floor(kind, ref, data, spec)}
        _save(part, res)
    return res


def _floor(kind: str, ref, data, spec: str) -> float:
    """The estimator's floor: the metric between two exact / held-out sets."""
    if kind == "ED":
        if spec.startswith("gmm:"):
            g = fewstep.GaussianMixture.load(spec[4:])
            return metric(kind, g.sample(len(ref), generator=torch.Generator().manual_seed(11)).double(), ref)
        return metric(kind, data, ref[: len(data)])
    return metric(kind, data, ref)


def _f(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}")


def _header(title: str, first: str, nfes, last: str = "") -> list:
    """A case's bold title line and its table's two header rows (NFE columns, one optional more)."""
    cols = [f"NFE {k}" for k in nfes] + ([last] if last else [])
    return [title + "\n", f"| {first} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]


def cov_table(res: dict) -> str:
    out = []
    for name, c in res["cases"].items():
        out += _header(f"**{name}** ({c['metric']}; floor {_f(c['floor'])}; heads {res['head_steps']} steps, "
                       f"NPR {c['head_seconds']['npr']:.0f} s, SN {c['head_seconds']['sn']:.0f} s)", "sampler", NFES)
        for label, row in c["table"].items():
            out.append(f"| {label} | " + " | ".join(_f(row[str(k)]) for k in NFES) + " |")
        out.append("")
        ev = c["head_eval"]
        key = "relative_error" if "relative_error" in ev["npr"][0] else "calibration"
        what = ("relative error of the head's Cov[x0|y] to the exact posterior covariance" if key == "relative_error"
                else "calibration E Cov_head / E (x0 - D)^2 (1 = calibrated on average)")
        out.append(f"{what}, per level:\n")
        out.append("| head | " + " | ".join(f"s={r['sigma']:.3g}" for r in ev["npr"]) + " |")
        out.append("|---|" + "---|" * len(ev["npr"]))
        for form in ("npr", "sn"):
            out.append(f"| {form.upper()} | " + " | ".join(_f(r[key]) for r in ev[form]) + " |")
        out.append("")
    m = res["machine"]
    out.append(f"Machine: {m['cpu']}, {m['nproc']} cores, torch {m['torch']}, {m['date']}, commit {m['commit']}.")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ ELBO
def run_elbo(head_steps: int) -> dict:
    """The DDPM chain's bound (``fewstep.metrics.likelihood.chain_elbo``) with each reverse
    variance at NFE 10, 25, 50 on the Karras grid: the fixed small / large ones, Analytic-DPM's
    scalar, the NPR and SN heads (the cov parts' runs, made here if absent) and, on the
    mixtures, the exact posterior covariance; beside the exact NLL (mixtures) or the teacher's
    probability-flow ODE NLL (trained teachers). Points in nats per dimension; digits in bits
    per dimension of the dequantised data (bin 1/8)."""
    from fewstep.metrics.likelihood import bits_per_dim, chain_elbo, dequantize, nll
    from fewstep.report.bench import _bin_width
    from fewstep.samplers.analytic_dpm import analytic_dpm_stats
    from fewstep.grids import make_grid

    res = _load("elbo") or {"part": "elbo", "machine": machine(), "head_steps": head_steps, "cases": {}}
    every = {**cases("cov-exact"), **cases("cov-trained")}
    for name, (spec, ref, kind, data) in every.items():
        if name in res["cases"]:
            continue
        t0 = time.time()
        model = load(spec, device="cpu")
        hs = heads(spec, name, head_steps)
        cov = {f: load_covariance(p, device="cpu") for f, p in hs.items()}
        rng = dict(data_range=(-1.0, 1.0)) if model.kind == "image" else {}
        bw = _bin_width("digits") if model.kind == "image" else None
        x0 = ref.double() if bw is None else dequantize(ref.double(), bw)
        x0 = x0.to(model.dtype)
        d = x0[0].numel()

        def per_dim(v):
            return bits_per_dim(v, d, bw) if bw is not None else float(v.mean()) / d

        variants = {"ddpm (small)": ("small", {}), "ddpm (large)": ("large", {}),
                    "analytic-dpm (scalar)": ("analytic", rng), "NPR head": ("covariance", {"covariance": cov["npr"], **rng}),
                    "SN head": ("covariance", {"covariance": cov["sn"], **rng})}
        if spec.startswith("gmm:"):
            g = model.denoiser
            variants["exact Cov"] = ("covariance", {"covariance": lambda y, s, D, **c: g.posterior_variance(y, s)})
            reference = {"exact NLL": per_dim(-g.log_prob(x0.double(), 0.0))}
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v = nll(model.denoiser, x0, model.sigma_min, model.sigma_max, rtol=1e-5 if bw is None else 1e-4,
                        atol=1e-5 if bw is None else 1e-4)
            reference = {f"probability-flow ODE NLL (at sigma_min {model.sigma_min:g})": per_dim(v)}
        table = {}
        for k in NFES:
            sig = make_grid("karras", k, model.sigma_min, model.sigma_max)
            gam = analytic_dpm_stats(model.denoiser, data.to(model.dtype), sig[:-1], len(data), cache=False)
            for label, (variance, opts) in variants.items():
                v = chain_elbo(model.denoiser, x0, sig, variance, gamma=gam, generator=torch.Generator().manual_seed(5),
                               **opts)
                table.setdefault(label, {})[str(k)] = {"value": per_dim(v),
                                                       "stderr": float(v.std() / math.sqrt(len(v))) / d
                                                       / (math.log(2) if bw is not None else 1.0)}
        print(name, {lab: {k: round(c["value"], 3) for k, c in row.items()} for lab, row in table.items()}, reference,
              flush=True)
        res["cases"][name] = {"unit": "bits/dim" if bw is not None else "nats/dim", "table": table,
                              "reference": reference, "n": len(x0), "seconds": time.time() - t0}
        _save("elbo", res)
    return res


def elbo_table(res: dict) -> str:
    out = []
    for name, c in res["cases"].items():
        ref = "; ".join(f"{k} {v:.3f}" for k, v in c["reference"].items())
        out += _header(f"**{name}** (-ELBO in {c['unit']}, {c['n']} held-out samples; {ref})", "reverse variance", NFES)
        for label, row in c["table"].items():
            out.append(f"| {label} | " + " | ".join(
                f"{row[str(k)]['value']:.3f} ± {row[str(k)]['stderr']:.3f}" if math.isfinite(row[str(k)]["value"])
                else "inf" for k in NFES) + " |")
        out.append("")
    m = res["machine"]
    out.append(f"Machine: {m['cpu']}, {m['nproc']} cores, torch {m['torch']}, {m['date']}, commit {m['commit']}.")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ CFD
def run_cfd(round_steps: int) -> dict:
    """PD and CFD on the digits teacher, same rounds (16 -> 8 -> 4 -> 2 -> 1) and budget; FD of
    the 1-, 2- and 4-step students by the classifier CFD trains against (a) and a second,
    differently built classifier (b) it never sees."""
    from fewstep.metrics import frechet_distance
    from fewstep.metrics.features import classifier_for, feature_extractor

    res = _load("cfd") or {"part": "cfd", "machine": machine(), "round_steps": round_steps, "runs": {}}
    spec = trained_teacher("digits")
    ref = digits_held()[0]
    feat_b = feature_extractor(classifier_for("digits", arch="b"))
    teacher = load(spec, device="cpu")
    x_T = teacher.noise(len(ref), seed=100)

    def fds(x):
        return {"a": float(frechet_distance(x.float(), ref, "digits")), "b": float(frechet_distance(x.float(), ref,
                                                                                                    feat_b))}
    if "teacher" not in res["runs"]:
        res["runs"]["teacher"] = {str(k): fds(_quiet(teacher.sample, len(ref), k, sampler="heun" if k > 4 else "euler",
                                                     x=x_T, seed=100)[0]) for k in (1, 2, 4, 63)}
        _save("cfd", res)
    for name, method, extra in (("PD", "progressive", {}), ("CFD", "cfd", {}),
                                ("CFD + pixel loss", "cfd", {"pixel_weight": 1.0})):
        if name in res["runs"]:
            continue
        folder = RUNS / f"cfd_{name.replace(' ', '_').replace('+', 'plus')}"
        t0 = time.time()
        distill(method, {"teacher": spec, "start_steps": 16, "steps": round_steps, "device": "cpu", **extra},
                out=str(folder), progress=False, resume=folder.exists())
        model = load(str(folder), device="cpu")
        res["runs"][name] = {str(k): fds(_quiet(model.sample, len(ref), k, x=x_T, seed=100)[0]) for k in (1, 2, 4)}
        res["runs"][name]["seconds"] = time.time() - t0
        print(name, res["runs"][name], flush=True)
        _save("cfd", res)
    return res


def cfd_table(res: dict) -> str:
    out = ["| model | NFE 1 (a / b) | NFE 2 (a / b) | NFE 4 (a / b) | wall s |", "|---|---|---|---|---|"]
    t = res["runs"]["teacher"]
    out.append("| teacher Euler | " + " | ".join(f"{t[str(k)]['a']:.1f} / {t[str(k)]['b']:.1f}" for k in (1, 2, 4))
               + " | - |")
    for name in ("PD", "CFD", "CFD + pixel loss"):
        r = res["runs"].get(name)
        if r:
            out.append(f"| {name} | " + " | ".join(f"{r[str(k)]['a']:.1f} / {r[str(k)]['b']:.1f}" for k in (1, 2, 4))
                       + f" | {r['seconds']:.0f} |")
    out.append(f"\nTeacher Heun at 63 NFE: {t['63']['a']:.1f} / {t['63']['b']:.1f}. Rounds 16 -> 1, "
               f"{res['round_steps']} steps each; CFD's defaults (features KL, tau 0.9, from the 4-step round on); "
               f"'+ pixel loss': --pixel-weight 1 (PD's loss beside it). FD (a): the classifier CFD trains against; "
               f"(b): the second, differently built classifier, never seen in training.")
    m = res["machine"]
    out.append(f"Machine: {m['cpu']}, {m['nproc']} cores, torch {m['torch']}, {m['date']}, commit {m['commit']}.")
    return "\n".join(out)


# ------------------------------------------------------------------------ discriminator guidance
DG_NFES = (8, 16, 32)
WEAK_STEPS = 800  # a deliberately under-trained digits teacher (FD 17-32 where the 3000-step one is at the floor)
DG_SAMPLERS = ("heun", "dpmpp_2m")


def _perturbed_ring() -> tuple:
    """(teacher, data): the ring of 8 with weights 2:1 alternating (the deliberately imperfect
    "teacher") and the true ring of equal weights (the data)."""
    true = fewstep.GaussianMixture.ring(8, radius=2.0, std=0.3)
    w = torch.tensor([2.0, 1.0] * 4, dtype=torch.float64)
    bad = fewstep.GaussianMixture(w / w.sum(), true.means, true.covs)
    return bad, true


def run_dg(steps: int) -> dict:
    """Discriminator guidance on the perturbed ring (exact teacher, true data; the exact optimal
    discriminator log p_data - log p_teacher as the bound) and on the digits teacher."""
    from fewstep.denoiser import DiscriminatorGuided

    res = _load("dg") or {"part": "dg", "machine": machine(), "steps": steps, "cases": {}}
    RUNS.mkdir(parents=True, exist_ok=True)
    bad, true = _perturbed_ring()
    bad.save(RUNS / "ring_2to1.npz")
    true.save(RUNS / "ring.npz")
    ref_ring = true.sample(N, generator=torch.Generator().manual_seed(7)).double()
    digits_ref, _ = digits_held()
    todo = {"ring 2:1": (f"gmm:{RUNS / 'ring_2to1.npz'}", f"gmm:{RUNS / 'ring.npz'}", ref_ring, "ED", "dg_ring"),
            "digits": (trained_teacher("digits"), "digits", digits_ref, "FD", "dg_digits"),
            f"digits, {WEAK_STEPS}-step teacher": (trained_teacher("digits", WEAK_STEPS), "digits", digits_ref, "FD",
                                                   f"dg_digits_{WEAK_STEPS}")}
    for name, (spec, data, ref, kind, run_name) in todo.items():
        if name in res["cases"]:
            continue
        folder = RUNS / run_name
        t0 = time.time()
        if not (folder / "model.json").is_file():
            distill("discriminator", {"teacher": spec, "data": data, "steps": steps, "device": "cpu"}, out=str(folder),
                    progress=False, resume=folder.exists())
        train_s = time.time() - t0
        model = load(spec, device="cpu")
        meta = json.loads((folder / "model.json").read_text())
        w0 = float(meta.get("dg_weight", 1.0))
        variants = {"no guidance": model, f"DG w={w0:g}": model.with_discriminator(str(folder))}
        if run_name.endswith(f"_{WEAK_STEPS}"):  # a smaller weight too, where the run's own one makes it worse
            variants[f"DG w={w0 / 4:g}"] = model.with_discriminator(str(folder), w0 / 4)
        if kind == "ED":
            def exact_logit(y, sigma, **c):
                return true.log_prob(y, sigma) - bad.log_prob(y, sigma)
            opt = copy.copy(model)
            opt.denoiser = DiscriminatorGuided(model.denoiser, exact_logit, 1.0)
            variants["exact discriminator, w=1"] = opt
        n = len(ref)
        x_T = model.noise(n, seed=100)
        table = {}
        for label, m in variants.items():
            for sampler in DG_SAMPLERS:
                row = {}
                for k in DG_NFES:
                    t1 = time.time()
                    x, _ = _quiet(m.sample, n, k, sampler=sampler, seed=100, x=x_T, grid="karras")
                    row[str(k)] = {"value": metric(kind, x, ref), "seconds": time.time() - t1}
                table[f"{sampler}, {label}"] = row
                print(name, sampler, label, {k: round(v["value"], 4) for k, v in row.items()}, flush=True)
        train_s = float(meta.get("cost", {}).get("seconds", train_s))  # the run's own time, also when reused
        res["cases"][name] = {"metric": kind, "table": table, "train_seconds": train_s, "dg_weight": w0,
                              "floor": _floor(kind, ref, digits_held()[1] if kind == "FD" else ref,
                                              f"gmm:{RUNS / 'ring.npz'}" if kind == "ED" else spec),
                              "eval": meta.get("eval")}
        _save("dg", res)
    return res


def dg_table(res: dict) -> str:
    out = []
    for name, c in res["cases"].items():
        out += _header(f"**{name}** ({c['metric']} to the data; floor {_f(c['floor'])}; discriminator "
                       f"{res['steps']} steps, {c['train_seconds']:.0f} s with its teacher samples)",
                       "sampler, guidance", DG_NFES, "s at NFE 32")
        for label, row in c["table"].items():
            out.append(f"| {label} | " + " | ".join(_f(row[str(k)]["value"]) for k in DG_NFES)
                       + f" | {row[str(DG_NFES[-1])]['seconds']:.2f} |")
        out.append("")
    m = res["machine"]
    out.append(f"Machine: {m['cpu']}, {m['nproc']} cores, torch {m['torch']}, {m['date']}, commit {m['commit']}.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("cov-exact", "cov-trained", "elbo", "dg", "cfd"))
    ap.add_argument("--table", choices=("cov-exact", "cov-trained", "elbo", "dg", "cfd"))
    ap.add_argument("--head-steps", type=int, default=2000)
    ap.add_argument("--round-steps", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.table:
        res = _load(args.table)
        print({"cfd": cfd_table, "dg": dg_table, "elbo": elbo_table}.get(args.table, cov_table)(res))
        return
    if args.part in ("cov-exact", "cov-trained"):
        print(cov_table(run_cov(args.part, args.head_steps)))
    elif args.part == "elbo":
        print(elbo_table(run_elbo(args.head_steps)))
    elif args.part == "cfd":
        print(cfd_table(run_cfd(args.round_steps)))
    elif args.part == "dg":
        print(dg_table(run_dg(args.head_steps)))


if __name__ == "__main__":
    main()
