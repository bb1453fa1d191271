"""The measured sampling defaults (issue 21) -> src/fewstep/assets/sampling_defaults.json,
bench/out/defaults.json and the BENCHMARKS section "Default sampling configuration".

    .venv/bin/python bench/defaults.py                  # about 10 minutes on 2 cores
    .venv/bin/python bench/defaults.py --from-json bench/out/defaults.json --doc docs/BENCHMARKS.md

Every registered deterministic grid sampler (plus a few option variants), on every grid
family of :mod:`fewstep.grids` (Karras rho 7 and 3, log-SNR, polyexponential rho 2, VP-time
rho 1, 2 and 3), ending at 0 or at sigma_min, with and without the analytical first step, at every NFE
from 1 to 50, on the project's exact teachers (the tests' two mixtures and the sampler
bench's two): RMS error against the exact flow map from y = x0 + 80 eps to sigma = 0.

Choice rules (written into the table, read by :mod:`fewstep.samplers._choice`):
- ``by_nfe[K]``: the configuration with the smallest worst-case ratio, over the teachers,
  of its error to the best error any configuration reaches on that teacher at K;
- ``by_sampler[s][K]``: the same among sampler s's own configurations (its default
  options); refused where its error exceeds twice Euler's (Euler on its own default) on a
  teacher, and then the sampler says what to use;
- ``diverges[s][grid]``: the NFE at which grid as named (final 0, no AFS) is more than
  twice Euler's default error on some teacher.
The teachers here are the ones the table is chosen on; ``bench/samplers.py`` checks the
result on mixtures the choice never saw.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, publish  # noqa: E402

from fewstep import samplers as S  # noqa: E402
from fewstep.data.gmm import GaussianMixture  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "src" / "fewstep" / "assets" / "sampling_defaults.json"
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
NFES = list(range(1, 21)) + [22, 25, 30, 35, 40, 45, 50]  # a budget between rows uses the row below it
N_STARTS = 1024
RATIO = 2.0  # issue 21: no sampler on its default grid more than this times Euler's error
REFUSE = 1.6  # refused above this on the bench's starts: the margin for other starts (the CI test uses other seeds)
HEADING = "## Default sampling configuration (issue 21)"

GRIDS = [("karras", {}), ("karras", {"rho": 3.0}), ("logsnr", {}), ("polyexponential", {"rho": 2.0}),
         ("vp-time", {}), ("vp-time", {"rho": 2.0}), ("vp-time", {"rho": 3.0})]
VARIANTS = {"unipc": [{}, {"order": 3}], "deis": [{}, {"order": 3}]}


def ring_anisotropic(k: int, radius: float, seed: int) -> GaussianMixture:
    from samplers import ring_anisotropic as make

    return make(k, radius, seed=seed)


TEACHERS = {  # the project's exact teachers: tests/_exact.py and bench/samplers.py
    "ring8": (lambda: GaussianMixture.ring(8, radius=2.0, std=0.25), "2-D ring of 8, std 0.25 (tests gmm2)"),
    "random16": (lambda: GaussianMixture.random(k=4, dim=16, seed=3), "16-D, random(k=4, seed=3) (tests gmm16)"),
    "aniso8": (lambda: ring_anisotropic(8, 3.0, 0), "2-D, 8 anisotropic modes, radius 3 (bench gmm2d)"),
    "random16b": (lambda: GaussianMixture.random(k=8, dim=16, seed=0), "16-D, random(k=8, seed=0) (bench gmm16d)"),
}


def samplers(adaptive: bool = False) -> list:
    """(name, options) of every deterministic registered sampler with a grid, with variants
    (``adaptive``: the adaptive deterministic ones instead)."""
    out = []
    for name in S.names():
        si = S.info(name)
        if si.stochastic or si.adaptive != adaptive:
            continue
        for opts in VARIANTS.get(name, [{}]):
            out.append((name, opts))
    return out


MCMC = ("langevin", "mala", "annealed_langevin")  # samplers at fixed levels (issue 14), not flow discretisations
NEEDS_DATA = ("analytic_dpm",)  # needs data statistics: no default to measure


def stochastic_samplers(adaptive: bool = False) -> list:
    """Stochastic grid samplers measured by distribution distance (not RMS against the flow);
    ``adaptive``: the adaptive stochastic ones instead."""
    return [n for n in S.names() if S.info(n).stochastic and S.info(n).adaptive == adaptive
            and n not in MCMC + NEEDS_DATA]


ADAPTIVE_CONFIGS = [("karras", {}, False), ("karras", {"final_zero": False}, False)]  # only the ends matter


def configs() -> list:
    """Every (grid, grid_options, afs) tried."""
    out = []
    for grid, go in GRIDS:
        for final_zero in (True, False):
            for afs in (False, True):
                out.append((grid, {**go, **({} if final_zero else {"final_zero": False})}, afs))
    return out


def key(name, opts, grid, go, afs) -> str:
    return json.dumps([name, opts, grid, go, afs], sort_keys=True)


def _teacher_errors(args) -> tuple:
    """(teacher, {config key: {nfe: RMS}}, seconds) for one teacher (a worker process)."""
    tname, nfes, adaptive = args
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    gmm = TEACHERS[tname][0]()
    g = torch.Generator().manual_seed(1234)
    x0 = gmm.sample(N_STARTS, generator=g)
    y = x0 + SIGMA_MAX * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ref = gmm.flow(y, SIGMA_MAX, 0.0, rtol=1e-10)
    rows, t0 = {}, time.time()
    for name, opts in samplers(adaptive):
        for grid, go, afs in (ADAPTIVE_CONFIGS if adaptive else configs()):
            row = {}
            for nfe in nfes:
                try:
                    out = S.sample(gmm, y.clone(), name, nfe, grid, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                   grid_options=go, afs=afs, **opts)
                    e = float(((out - ref) ** 2).mean().sqrt())
                    row[nfe] = e if e == e else float("inf")
                except Exception:  # a budget with no step
                    row[nfe] = None
            rows[key(name, opts, grid, go, afs)] = row
    return tname, rows, time.time() - t0


N_DRAWS = 2000  # stochastic samplers: samples per run, scored by sliced W2 against fresh data


def _teacher_distribution(args) -> tuple:
    """(teacher, {config key: {nfe: sliced W2 to fresh data}}, floor) for the stochastic
    samplers and Euler (a worker process); floor = SW2 between two data sets of those sizes."""
    from fewstep.metrics import sliced_w2

    tname, nfes, adaptive = args
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    gmm = TEACHERS[tname][0]()
    g = torch.Generator().manual_seed(99)
    data = gmm.sample(N_DRAWS, generator=g)
    y = SIGMA_MAX * torch.randn((N_DRAWS, gmm.dim), generator=g, dtype=torch.float64)

    def sw(x):
        return sliced_w2(x, data, n_projections=128, generator=torch.Generator().manual_seed(7))

    floor = sw(gmm.sample(N_DRAWS, generator=g))
    rows = {}
    for name in stochastic_samplers(adaptive) + ([] if adaptive else ["euler"]):
        for grid, go, afs in (ADAPTIVE_CONFIGS if adaptive else configs()):
            if afs and name != "euler":  # Euler with AFS: the reference where Euler's default has it
                continue
            row = {}
            for nfe in nfes:
                try:
                    out = S.sample(gmm, y.clone(), name, nfe, grid, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                   grid_options=go, afs=afs, **({"generator": torch.Generator().manual_seed(nfe)}
                                                                if name != "euler" else {}))
                    e = sw(out) if bool(torch.isfinite(out).all()) else float("inf")
                    row[nfe] = e
                except Exception:
                    row[nfe] = None
            rows[key(name, {}, grid, go, afs)] = row
    return tname, rows, floor


def measure(quick: bool = False, jobs: int = 2, part: str = "all", nfes=None) -> dict:
    """errors[teacher][config key][nfe] = RMS against the exact flow (None where the budget
    allows no step), and distribution[...] = SW2 of the stochastic samplers; one worker
    process per teacher, ``jobs`` at a time."""
    import multiprocessing as mp

    nfes = nfes or ([1, 2, 3, 4, 6, 8, 10] if quick else NFES)
    out = {"nfes": nfes, "machine": machine(), "teachers": {k: v[1] for k, v in TEACHERS.items()}}
    with mp.get_context("spawn").Pool(jobs) as pool:
        if part in ("all", "flow"):
            errors = out["errors"] = {}
            for tname, rows, sec in pool.imap(_teacher_errors, [(t, nfes, False) for t in TEACHERS]):
                errors[tname] = rows
                print(f"{tname}: {len(rows)} configurations x {len(nfes)} NFE in {sec:.0f} s", flush=True)
        if part in ("all", "distribution"):
            dist, floors = out["distribution"], out["floors"] = {}, {}
            for tname, rows, floor in pool.imap(_teacher_distribution, [(t, nfes, False) for t in TEACHERS]):
                dist[tname], floors[tname] = rows, floor
                print(f"{tname}: stochastic samplers measured (SW2 floor {floor:.4f})", flush=True)
        if part in ("all", "adaptive"):  # merged into the rows above (adaptive samplers: two configurations)
            for tname, rows, sec in pool.imap(_teacher_errors, [(t, nfes, True) for t in TEACHERS]):
                out.setdefault("errors", {}).setdefault(tname, {}).update(rows)
            for tname, rows, floor in pool.imap(_teacher_distribution, [(t, nfes, True) for t in TEACHERS]):
                out.setdefault("distribution", {}).setdefault(tname, {}).update(rows)
            print("adaptive samplers measured", flush=True)
    return out


def _score(errs: dict, k: str, nfe: int, best: dict):
    """Worst ratio over teachers of config k's error to the best at nfe (None if it cannot run)."""
    r = []
    for t in errs:
        e = errs[t][k].get(nfe)
        if e is None:
            return None
        r.append(e / best[t])
    return max(r)


def choose(data: dict) -> dict:
    """The table :mod:`fewstep.samplers._choice` reads."""
    errs = {t: {k: {int(n): v for n, v in row.items()} for k, row in rows.items()} for t, rows in
            data["errors"].items()}
    parsed = {k: json.loads(k) for k in next(iter(errs.values()))}
    keys = [k for k, p in parsed.items() if not p[4] or S.info(p[0]).afs]  # AFS only where the sampler takes it
    by_nfe, by_sampler, diverges = {}, {}, {}
    for nfe in data["nfes"]:
        best = {t: min(v[nfe] for v in errs[t].values() if v.get(nfe) is not None) for t in errs}
        scored = [(s, k) for k in keys if not S.info(parsed[k][0]).adaptive  # the default: a fixed-step one
                  and (s := _score(errs, k, nfe, best)) is not None]
        s, k = min(scored)
        by_nfe[str(nfe)] = _entry(parsed[k], s)
        own = {}
        for k in keys:
            name, opts = parsed[k][0], parsed[k][1]
            if opts:
                continue
            sc = _score(errs, k, nfe, best)
            if sc is not None and (name not in own or sc < own[name][0]):
                own[name] = (sc, k)
        euler_k = own["euler"][1]
        for name, (sc, k) in own.items():
            worst = max(errs[t][k][nfe] / errs[t][euler_k][nfe] for t in errs)
            entry = _entry(parsed[k], sc)
            entry["vs_euler"] = round(worst, 3)
            if worst > REFUSE:
                entry = {"refuse": f"{worst:.3g}x Euler's", "vs_euler": round(worst, 3)}
            by_sampler.setdefault(name, {})[str(nfe)] = entry
        for k in keys:  # grids as a user names them: default options, final 0, no AFS
            name, opts, grid, go, afs = parsed[k]
            if opts or go or afs:
                continue
            v = [errs[t][k].get(nfe) for t in errs]
            if any(e is None for e in v):
                continue
            if max(e / errs[t][euler_k][nfe] for e, t in zip(v, errs)) > REFUSE:
                diverges.setdefault(name, {}).setdefault(grid, []).append(nfe)
        _choose_stochastic(data, nfe, euler_k, parsed, by_sampler)
    _apply_confirm(data, by_sampler)
    return {"format": 1, "chosen_on": data["teachers"], "sigma_max": SIGMA_MAX, "sigma_min": SIGMA_MIN,
            "criterion": "smallest worst-case ratio to the best error per teacher (RMS vs the exact flow)",
            "refuse_above": RATIO, "command": "bench/defaults.py", "date": data["machine"]["date"],
            "commit": data["machine"]["commit"], "by_nfe": by_nfe, "by_sampler": by_sampler, "diverges": diverges}


def _choose_stochastic(data: dict, nfe: int, euler_k: str, parsed: dict, by_sampler: dict) -> None:
    """by_sampler rows of the stochastic samplers at ``nfe``: the grid with the smallest
    worst ratio of its SW2 to Euler's (Euler on its default, floored at the two-data-set
    SW2), refused above REFUSE."""
    dist = data.get("distribution")
    if not dist:
        return
    p = json.loads(euler_k)
    ek = euler_k if euler_k in next(iter(dist.values())) else key(p[0], p[1], p[2], p[3], False)  # older runs
    ref = {t: max(dist[t][ek][str(nfe)], data["floors"][t]) for t in dist}
    own = {}
    for k in next(iter(dist.values())):
        name = json.loads(k)[0]
        if name == "euler":
            continue
        v = [dist[t][k].get(str(nfe)) for t in dist]
        if any(e is None for e in v):
            continue
        sc = max(e / ref[t] for e, t in zip(v, dist))
        if name not in own or sc < own[name][0]:
            own[name] = (sc, k)
    for name, (sc, k) in own.items():
        entry = _entry(json.loads(k), sc)
        entry["vs_euler"] = round(sc, 3)
        if sc > REFUSE:
            entry = {"refuse": f"{sc:.3g}x Euler's distance to the data", "vs_euler": round(sc, 3), "best": entry}
        by_sampler.setdefault(name, {})[str(nfe)] = entry


CONFIRM_NFES = list(range(1, 51))
CONFIRM_SEED = 77


def _row_config(rows: dict, nfe: int) -> dict:
    """The configuration a table row gives at ``nfe`` (the row at or below it), refused or not."""
    below = [int(j) for j in rows if int(j) <= nfe]
    if not below:
        return None
    e = rows[str(max(below))]
    return e.get("best", e) if e.get("refuse") else e


def _teacher_confirm(args) -> tuple:
    """(teacher, {sampler: {nfe: SW2 ratio to Euler}}) on a fresh draw (seed CONFIRM_SEED), at
    every NFE 1..50, each stochastic sampler on the configuration its table row gives (the
    row below for budgets between rows), Euler on its own: the refusal then rests on a draw
    the grid was not chosen on (no winner's curse) and on every budget, not only the rows."""
    from fewstep.metrics import sliced_w2

    tname, table = args
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    gmm = TEACHERS[tname][0]()
    g = torch.Generator().manual_seed(CONFIRM_SEED)
    data = gmm.sample(N_DRAWS, generator=g)
    y = SIGMA_MAX * torch.randn((N_DRAWS, gmm.dim), generator=g, dtype=torch.float64)

    def sw(x):
        return sliced_w2(x, data, n_projections=128, generator=torch.Generator().manual_seed(7))

    def run(name, nfe, cfg, **kw):
        return S.sample(gmm, y.clone(), name, nfe, cfg["grid"], sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                        grid_options=cfg.get("grid_options") or None, afs=cfg.get("afs") or None,
                        **cfg.get("options", {}), **kw)

    floor = sw(gmm.sample(N_DRAWS, generator=g))
    out = {}
    for nfe in CONFIRM_NFES:
        ref = max(sw(run("euler", nfe, _row_config(table["by_sampler"]["euler"], nfe))), floor)
        for name in table["stochastic"]:
            try:
                x = run(name, nfe, _row_config(table["by_sampler"][name], nfe),
                        generator=torch.Generator().manual_seed(nfe))
                r = sw(x) / ref if bool(torch.isfinite(x).all()) else float("inf")
            except Exception:
                r = None
            out.setdefault(name, {})[str(nfe)] = r
    return tname, out


def confirm(data: dict, table: dict, jobs: int = 2) -> dict:
    import multiprocessing as mp

    table = {**table, "stochastic": sorted(n for n in table["by_sampler"] if S.info(n).stochastic)}
    out = {}
    with mp.get_context("spawn").Pool(jobs) as pool:
        for tname, rows in pool.imap(_teacher_confirm, [(t, table) for t in TEACHERS]):
            out[tname] = rows
            print(f"{tname}: stochastic samplers confirmed at NFE 1-50", flush=True)
    return out


def _apply_confirm(data: dict, by_sampler: dict) -> None:
    """Stochastic samplers' rows from the confirming draw: every NFE 1..50, the row's
    configuration, refused where its ratio to Euler exceeds REFUSE on a teacher."""
    conf = data.get("confirm")
    if not conf:
        return
    for name in next(iter(conf.values())):
        rows = by_sampler[name]
        new = {}
        for nfe in CONFIRM_NFES:
            cfg = _row_config(rows, nfe)
            v = [conf[t][name].get(str(nfe)) for t in conf]
            if cfg is None or any(r is None for r in v):
                continue
            worst, cfg = max(v), dict(cfg)
            cfg["vs_euler"] = round(worst, 3)
            new[str(nfe)] = cfg if worst <= REFUSE else {"refuse": f"{worst:.3g}x Euler's distance to the data",
                                                        "vs_euler": round(worst, 3), "best": cfg}
        by_sampler[name] = new


def _entry(p: list, score: float) -> dict:
    name, opts, grid, go, afs = p
    e = {"sampler": name, "grid": grid, "score": round(score, 3)}
    if opts:
        e["options"] = opts
    if go:
        e["grid_options"] = go
    if afs:
        e["afs"] = True
    return e


def markdown(data: dict, table: dict) -> str:
    errs = data["errors"]
    lines = [HEADING, "",
             f"`{table['command']}` on {data['machine']['nproc']} cores ({data['machine']['cpu']}), "
             f"{data['machine']['date']}, commit {data['machine']['commit']}. RMS error against the exact flow map "
             f"from y = x0 + 80 eps to 0, {N_STARTS} starts per teacher; chosen on "
             + "; ".join(f"{k}: {v}" for k, v in data["teachers"].items()) + ".",
             "", "The default (`fewstep.sample(D, x, nfe=K)`, `fewstep sample RUN --nfe K`) at each K, its error on each "
             "teacher, and the best any configuration reaches there (ratio = worst over teachers):", "",
             "| NFE | default | " + " | ".join(errs) + " | best per teacher | worst ratio |",
             "|---|---|" + "---|" * len(errs) + "---|---|"]
    for nfe in data["nfes"]:
        e = table["by_nfe"][str(nfe)]
        k = key(e["sampler"], e.get("options", {}), e["grid"], e.get("grid_options", {}), e.get("afs", False))
        best = [min(v[str(nfe)] for v in errs[t].values() if v.get(str(nfe)) is not None) for t in errs]
        mine = [errs[t][k][str(nfe)] for t in errs]
        lines.append(f"| {nfe} | {_label(e)} | " + " | ".join(f"{v:.4f}" for v in mine) + " | "
                     + " / ".join(f"{v:.4f}" for v in best) + f" | {e['score']:.2f} |")
    refused = {s: [int(k) for k, v in rows.items() if v.get("refuse")] for s, rows in table["by_sampler"].items()}
    refused = {s: v for s, v in refused.items() if v}
    lines += ["", "Samplers that refuse a budget (more than 2x Euler's error on their best grid): "
              + ("; ".join(f"{s}: NFE {_ranges(v)}" for s, v in sorted(refused.items())) or "none") + "."]
    return "\n".join(lines) + "\n"


def _label(e: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in e.get("options", {}).items())
    go = ", ".join(f"{k}={v}" for k, v in e.get("grid_options", {}).items())
    return (f"{e['sampler']}{f' ({opts})' if opts else ''} / {e['grid']}{f' ({go})' if go else ''}"
            f"{' + AFS' if e.get('afs') else ''}")


def _ranges(v: list) -> str:
    out, start = [], None
    for i, n in enumerate(v):
        if start is None:
            start = n
        if i + 1 == len(v) or v[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="7 NFE values (a smoke run; writes no asset)")
    ap.add_argument("--from-json", help="rebuild table and docs from a saved run")
    ap.add_argument("--doc", help="rewrite the section in this markdown file")
    ap.add_argument("--part", choices=["all", "flow", "distribution", "adaptive", "confirm"], default="all",
                    help="flow: deterministic samplers (RMS); distribution: stochastic ones (SW2), added to --out")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "defaults.json"))
    a = ap.parse_args(argv)
    if a.from_json:
        data = json.loads(Path(a.from_json).read_text())
    else:
        old = json.loads(Path(a.out).read_text()) if a.part in ("distribution", "adaptive", "confirm") else {}
        new = measure(a.quick, part=a.part, nfes=old.get("nfes")) if a.part != "confirm" else {}
        for part in ("errors", "distribution"):  # an adaptive part adds rows to each teacher's
            if a.part == "adaptive" and part in old:
                for t, rows in new.get(part, {}).items():
                    old[part][t].update(rows)
                new.pop(part, None)
        data = json.loads(json.dumps({**old, **new}))  # NFE keys as strings, as when read back
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(data))
    if a.part in ("all", "confirm") and not a.from_json and not a.quick:  # on a fresh draw, every NFE
        data.pop("confirm", None)
        data["confirm"] = confirm(data, choose(data))
        Path(a.out).write_text(json.dumps(data))
    table = choose(data)
    if not a.quick:
        ASSET.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {ASSET}")
    md = markdown(data, table)
    if a.doc:
        publish(md, a.doc, HEADING)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
