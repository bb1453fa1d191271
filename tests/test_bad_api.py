"""Bad calls of the Python API and bad input files: every one a single-line UserError naming
what is wrong, nothing written, nothing silently accepted (NaN samples, a symmetrised
covariance, a 2e12-element allocation); valid calls unchanged.

Each row of ``CASES`` is (id, call(ctx), a word the message must contain); ``ctx`` holds a
tiny trained run folder, broken copies of it, mixtures and array / grid files, all made
once, so the rows themselves only call the API. Count by kind: see ``test_case_counts``.
"""
import io
import json
import math
import shutil
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import fewstep
from fewstep import GaussianMixture as GMM
from fewstep.data.images import read_array_file
from fewstep.errors import UserError

NET = {"kind": "mlp", "dim": 2, "hidden": 16, "depth": 1, "emb_dim": 8}
EYE = torch.eye(2, dtype=torch.float64)


def _forged_npy(shape, dtype="<f8", data=64) -> bytes:
    """A .npy header claiming ``shape`` followed by only ``data`` bytes."""
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return b.getvalue() + b"\0" * data


def _tree(root: Path) -> dict:
    """{relative path: (size, mtime_ns)} of everything under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from fewstep.train.teacher import train_teacher

    root = tmp_path_factory.mktemp("bad_api")
    run = Path(train_teacher({"data": "moons", "steps": 2, "batch_size": 16, "n_data": 64, "device": "cpu",
                              "net": NET}, str(root / "run"), progress=False, evaluate=False))
    meta = json.loads((run / "model.json").read_text())
    state = safetensors.torch.load_file(str(run / "model.safetensors"))

    def variant(name, meta_obj=None, tensors=None):
        d = root / name
        shutil.copytree(run, d)
        if meta_obj is not None:
            (d / "model.json").write_text(json.dumps(meta_obj))
        if tensors is not None:
            safetensors.torch.save_file(tensors, str(d / "model.safetensors"))
        return str(d)

    def edit(**changes):
        m = json.loads(json.dumps(meta))
        for dotted, v in changes.items():
            obj, *rest = dotted.split("__")
            if rest:
                m[obj][rest[0]] = v
            elif v is None:
                m.pop(obj)
            else:
                m[obj] = v
        return m

    first = next(iter(state))
    runs = {
        "list": variant("m_list", [1, 2, 3]),
        "no_net": variant("m_no_net", edit(net=None)),
        "no_data": variant("m_no_data", edit(data=None)),
        "neg_shape": variant("m_neg_shape", edit(data__shape=[-2])),
        "str_shape": variant("m_str_shape", edit(data__shape="2")),
        "str_classes": variant("m_str_classes", edit(data__num_classes="3")),
        "str_sigma": variant("m_str_sigma", edit(sigma_max="80")),
        "sigma_order": variant("m_sigma_order", edit(sigma_min=90.0)),
        "newer": variant("m_newer", edit(format="fewstep-model-7")),
        "no_process": variant("m_no_process", edit(process=None)),
        "bad_net_kind": variant("m_bad_net_field", edit(net={"kind": "mlp", "dim": "two"})),
        "nan_w": variant("w_nan", tensors={**state, first: state[first].clone().fill_(math.nan)}),
        "inf_w": variant("w_inf", tensors={**state, first: state[first].clone().fill_(math.inf)}),
        "f64_w": variant("w_f64", tensors={k: v.double() for k, v in state.items()}),
        "shape_w": variant("w_shape", meta_obj=edit(net={**meta["net"], "hidden": 24})),
        "missing_w": variant("w_missing", tensors={k: v for k, v in state.items() if k != first}),
    }

    def npz(name, **arrays):
        p = root / f"{name}.npz"
        np.savez(p, **arrays)
        return str(p)

    w, mu, S = np.ones(2), np.array([[0.0, 0.0], [1.0, 1.0]]), np.stack([np.eye(2)] * 2)
    gmms = {
        "nan_means": npz("g_nan_means", weights=w, means=np.array([[0, math.nan], [1, 1.0]]), covs=S),
        "inf_weights": npz("g_inf_w", weights=np.array([1, math.inf]), means=mu, covs=S),
        "nan_covs": npz("g_nan_covs", weights=w, means=mu, covs=np.stack([np.eye(2), np.full((2, 2), math.nan)])),
        "shapes": npz("g_shapes", weights=w, means=np.zeros((2, 3)), covs=S),
        "labels_len": npz("g_labels_len", weights=w, means=mu, covs=S, labels=np.array([0, 1, 1])),
        "labels_float": npz("g_labels_float", weights=w, means=mu, covs=S, labels=np.array([0.0, 1.0])),
        "asym": npz("g_asym", weights=w, means=mu, covs=np.array([[[1, 0.5], [0, 1]], np.eye(2)])),
    }
    huge = root / "g_huge.npz"
    with zipfile.ZipFile(huge, "w") as z:
        z.writestr("weights.npy", _forged_npy((2_000_000_000_000,)))
    gmms["huge"] = str(huge)
    cond = root / "cond.npz"
    GMM.labelled_ring().save(cond)

    arrays = {"huge_npy": root / "a_huge.npy", "huge_npz": root / "a_huge.npz", "cut_npy": root / "a_cut.npy"}
    arrays["huge_npy"].write_bytes(_forged_npy((2_000_000_000_000,)))
    with zipfile.ZipFile(arrays["huge_npz"], "w") as z:
        z.writestr("x.npy", _forged_npy((1_000_000, 2_000_000)))
    np.save(arrays["cut_npy"], np.zeros((100, 2)))
    arrays["cut_npy"].write_bytes(arrays["cut_npy"].read_bytes()[:-800])

    grids = {}
    for name, obj in {"strings": {"a": "b", "c": "d"}, "str_sigmas": {"sigmas": ["80", "1", "0"]},
                      "nan": {"sigmas": [80.0, math.nan, 0.0]}, "rising": [1.0, 5.0, 0.0], "number": 3.5,
                      "one": [1.0], "negative": [2.0, 1.0, -1.0],
                      "eval_strings": {"sigmas": [80.0, 1.0, 0.0], "eval_sigmas": ["x", "y"]}}.items():
        p = root / f"grid_{name}.json"
        p.write_text(json.dumps(obj))  # json writes NaN as NaN, which Python's json reads back
        grids[name] = str(p)

    return types.SimpleNamespace(root=root, run=str(run), runs=runs, gmms=gmms, cond=f"gmm:{cond}", arrays=arrays,
                                 grids=grids, model=fewstep.load(str(run), device="cpu"),
                                 cmodel=fewstep.load(f"gmm:{cond}"), ring=GMM.ring(4))


def _x(n=4):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


def _sample(c, **kw):
    args = dict(sampler="euler", nfe=4, sigma_min=0.002, sigma_max=80.0)
    args.update(kw)
    x = args.pop("x", _x())
    return fewstep.sample(c.ring, x, **args)


S2 = torch.stack([EYE, EYE])
M2 = torch.zeros(2, 2, dtype=torch.float64)

# (id, call(ctx), a word the message must contain)
GMM_CASES = [
    ("weights_inf", lambda c: GMM([1.0, math.inf], M2, S2), "weights"),
    ("weights_nan", lambda c: GMM([1.0, math.nan], M2, S2), "weights"),
    ("weights_negative", lambda c: GMM([1.0, -1.0], M2, S2), "weights"),
    ("weights_zero", lambda c: GMM([1.0, 0.0], M2, S2), "weights"),
    ("weights_strings", lambda c: GMM(["a", "b"], M2, S2), "weights"),
    ("means_nan", lambda c: GMM([1.0, 1.0], [[0.0, math.nan], [0.0, 0.0]], S2), "means"),
    ("means_inf", lambda c: GMM([1.0, 1.0], [[0.0, -math.inf], [0.0, 0.0]], S2), "means"),
    ("covs_nan", lambda c: GMM([1.0], [[0.0, 0.0]], [[[1.0, math.nan], [math.nan, 1.0]]]), "covs"),
    ("covs_inf", lambda c: GMM([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, math.inf]]]), "covs"),
    ("covs_asymmetric", lambda c: GMM([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]]), "symmetric"),
    ("covs_indefinite", lambda c: GMM([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
    ("covs_zero", lambda c: GMM([1.0], [[0.0, 0.0]], [[[0.0, 0.0], [0.0, 0.0]]]), "positive definite"),
    ("empty_components", lambda c: GMM([], np.zeros((0, 2)), np.zeros((0, 2, 2))), "component"),
    ("empty_dimension", lambda c: GMM([1.0], np.zeros((1, 0)), np.zeros((1, 0, 0))), "dimension"),
    ("shapes_mismatch", lambda c: GMM(torch.ones(2), torch.zeros(2, 3), torch.eye(3)[None]), "covs"),
    ("labels_count", lambda c: GMM([1.0, 1.0], M2, S2, labels=[0]), "labels"),
    ("labels_empty_class", lambda c: GMM([1.0, 1.0], M2, S2, labels=[0, 2]), "labels"),
    ("ring_zero", lambda c: GMM.ring(0), "k"),
    ("ring_std_negative", lambda c: GMM.ring(4, std=-0.1), "std"),
    ("ring_dim_one", lambda c: GMM.ring(4, dim=1), "dim"),
    ("random_dim_zero", lambda c: GMM.random(dim=0), "dim"),
    ("random_k_float", lambda c: GMM.random(k=2.5), "k"),
    ("flow_sigma_nan", lambda c: c.ring.flow(torch.zeros(3, 2), math.nan, 0.0), "sigma_from"),
    ("flow_sigma_negative", lambda c: c.ring.flow(torch.zeros(3, 2), 1.0, -1.0), "sigma_to"),
    ("flow_rtol_zero", lambda c: c.ring.flow(torch.zeros(3, 2), 1.0, 0.0, rtol=0.0), "rtol"),
    ("sample_negative", lambda c: c.ring.sample(-5), "n"),
    ("sample_fraction", lambda c: c.ring.sample(2.5), "n"),
    ("sample_string", lambda c: c.ring.sample("3"), "n"),
]
GMM_FILE_CASES = [
    ("load_nan_means", lambda c: GMM.load(c.gmms["nan_means"]), "means"),
    ("load_inf_weights", lambda c: GMM.load(c.gmms["inf_weights"]), "weights"),
    ("load_nan_covs", lambda c: GMM.load(c.gmms["nan_covs"]), "covs"),
    ("load_wrong_shapes", lambda c: GMM.load(c.gmms["shapes"]), "g_shapes"),
    ("load_labels_do_not_fit", lambda c: GMM.load(c.gmms["labels_len"]), "labels"),
    ("load_labels_float", lambda c: GMM.load(c.gmms["labels_float"]), "labels"),
    ("load_asymmetric", lambda c: GMM.load(c.gmms["asym"]), "symmetric"),
    ("load_huge_header", lambda c: GMM.load(c.gmms["huge"]), "header"),
    ("spec_nan_means", lambda c: fewstep.load("gmm:" + c.gmms["nan_means"]), "g_nan_means"),
    ("spec_huge_header", lambda c: fewstep.load("gmm:" + c.gmms["huge"]), "g_huge"),
]
SAMPLE_CASES = [
    ("nfe_string", lambda c: _sample(c, nfe="10"), "nfe"),
    ("nfe_zero", lambda c: _sample(c, nfe=0), "nfe"),
    ("nfe_negative", lambda c: _sample(c, nfe=-3), "nfe"),
    ("nfe_fraction", lambda c: _sample(c, nfe=2.5), "nfe"),
    ("nfe_bool", lambda c: _sample(c, nfe=True), "nfe"),
    ("x_list", lambda c: _sample(c, x=[[0.0, 0.0]]), "x"),
    ("x_numpy", lambda c: _sample(c, x=np.zeros((2, 2))), "x"),
    ("unknown_option", lambda c: _sample(c, bogus=1), "bogus"),
    ("option_typo", lambda c: _sample(c, sampler="heun", extra_arg={}), "extra_arg"),
    ("sigma_max_inf", lambda c: _sample(c, sigma_max=math.inf), "sigma_max"),
    ("sigma_max_nan", lambda c: _sample(c, sigma_max=math.nan), "sigma_max"),
    ("sigma_max_string", lambda c: _sample(c, sigma_max="80"), "sigma_max"),
    ("sigma_min_zero", lambda c: _sample(c, sigma_min=0.0), "sigma_min"),
    ("sigma_min_negative", lambda c: _sample(c, sigma_min=-1.0), "sigma_min"),
    ("sigma_min_above_max", lambda c: _sample(c, sigma_min=90.0), "sigma_min"),
    ("grid_strings", lambda c: _sample(c, grid=["a", "b"]), "grid"),
    ("grid_rising", lambda c: _sample(c, grid=[1.0, 5.0, 0.0]), "level"),
    ("grid_options_unknown", lambda c: _sample(c, grid_options={"rh": 5}), "rh"),
    ("grid_options_not_dict", lambda c: _sample(c, grid_options=[("rho", 5)]), "grid_options"),
    ("unknown_sampler", lambda c: _sample(c, sampler="eulr"), "eulr"),
]
GRID_FILE_CASES = [
    ("grid_file_dict_of_strings", lambda c: _sample(c, grid=c.grids["strings"]), "grid_strings.json"),
    ("grid_file_string_sigmas", lambda c: _sample(c, grid=c.grids["str_sigmas"]), "grid_str_sigmas.json"),
    ("grid_file_nan", lambda c: _sample(c, grid=c.grids["nan"]), "grid_nan.json"),
    ("grid_file_rising", lambda c: _sample(c, grid=c.grids["rising"]), "grid_rising.json"),
    ("grid_file_number", lambda c: fewstep.grids.load(c.grids["number"]), "grid_number.json"),
    ("grid_file_one_level", lambda c: fewstep.grids.load(c.grids["one"]), "grid_one.json"),
    ("grid_file_negative", lambda c: fewstep.grids.load(c.grids["negative"]), "grid_negative.json"),
    ("grid_file_eval_strings", lambda c: _sample(c, nfe=10, grid=c.grids["eval_strings"]), "eval_sigmas"),
]
MODEL_CASES = [
    ("device_tpu", lambda c: fewstep.load(c.run, device="tpu"), "tpu"),
    ("device_cuda_99", lambda c: fewstep.load(c.run, device="cuda:99"), "cuda:99"),
    ("device_bogus", lambda c: fewstep.load(c.run, device="gpu-fast"), "gpu-fast"),
    ("model_json_list", lambda c: fewstep.load(c.runs["list"]), "model.json"),
    ("model_json_no_net", lambda c: fewstep.load(c.runs["no_net"]), "net"),
    ("model_json_no_data", lambda c: fewstep.load(c.runs["no_data"]), "data"),
    ("model_json_negative_shape", lambda c: fewstep.load(c.runs["neg_shape"]), "data.shape"),
    ("model_json_string_shape", lambda c: fewstep.load(c.runs["str_shape"]), "data.shape"),
    ("model_json_string_classes", lambda c: fewstep.load(c.runs["str_classes"]), "num_classes"),
    ("model_json_string_sigma", lambda c: fewstep.load(c.runs["str_sigma"]), "sigma_max"),
    ("model_json_sigma_order", lambda c: fewstep.load(c.runs["sigma_order"]), "sigma_min"),
    ("model_json_newer_format", lambda c: fewstep.load(c.runs["newer"]), "newer"),
    ("model_json_no_process", lambda c: fewstep.load(c.runs["no_process"]), "process"),
    ("model_json_net_field_type", lambda c: fewstep.load(c.runs["bad_net_kind"]), "model.json"),
    ("run_weights_nan", lambda c: fewstep.load(c.runs["nan_w"]), "re-train or re-export"),
    ("run_weights_inf", lambda c: fewstep.load(c.runs["inf_w"]), "NaN or infinite"),
    ("run_weights_wrong_dtype", lambda c: fewstep.load(c.runs["f64_w"]), "float64"),
    ("run_weights_wrong_shape", lambda c: fewstep.load(c.runs["shape_w"]), "shape"),
    ("run_weights_missing_tensor", lambda c: fewstep.load(c.runs["missing_w"]), "lacks"),
    ("model_sample_zero", lambda c: c.model.sample(0, 4), "n"),
    ("model_sample_negative", lambda c: c.model.sample(-1, 4), "n"),
    ("model_nfe_string", lambda c: c.model.sample(4, "4"), "nfe"),
    ("model_seed_string", lambda c: c.model.sample(4, 4, seed="abc"), "seed"),
    ("model_seed_huge", lambda c: c.model.sample(4, 4, seed=2**70), "seed"),
    ("model_x_list", lambda c: c.model.sample(2, 4, x=[[0.0, 0.0]] * 2), "x"),
    ("model_unknown_option", lambda c: c.model.sample(4, 4, bogus=1), "bogus"),
    ("labels_unconditional", lambda c: c.model.sample(4, 4, labels=torch.zeros(4, dtype=torch.long)), "label"),
    ("guidance_unconditional", lambda c: c.model.sample(4, 4, guidance=2.0), "guidance"),
    ("guidance_nan", lambda c: c.cmodel.sample(4, 4, labels=torch.zeros(4, dtype=torch.long), guidance=math.nan),
     "guidance"),
    ("guidance_string", lambda c: c.cmodel.sample(4, 4, guidance="strong"), "guidance"),
    ("label_out_of_range", lambda c: c.cmodel.sample(4, 4, labels=torch.full((4,), 7)), "label"),
    ("labels_float", lambda c: c.cmodel.sample(4, 4, labels=torch.zeros(4)), "labels"),
    ("labels_string", lambda c: c.cmodel.sample(4, 4, labels="cat"), "labels"),
    ("labels_wrong_length", lambda c: c.cmodel.sample(4, 4, labels=torch.zeros(3, dtype=torch.long)), "labels"),
]
ARRAY_CASES = [
    ("npy_header_2e12", lambda c: read_array_file(c.arrays["huge_npy"]), "a_huge.npy"),
    ("npz_member_header_2e12", lambda c: read_array_file(c.arrays["huge_npz"]), "header"),
    ("npy_truncated", lambda c: read_array_file(c.arrays["cut_npy"]), "truncated"),
]
KINDS = {"GaussianMixture": GMM_CASES, "gmm files": GMM_FILE_CASES, "fewstep.sample": SAMPLE_CASES,
         "grid files": GRID_FILE_CASES, "load / Model": MODEL_CASES, "array files": ARRAY_CASES}
CASES = [case for cases in KINDS.values() for case in cases]


def test_case_counts():
    """The table covers every kind; the counts are what the issue's report quotes."""
    counts = {kind: len(cases) for kind, cases in KINDS.items()}
    assert len({c[0] for c in CASES}) == len(CASES) == sum(counts.values()) >= 45
    assert all(n >= 3 for n in counts.values()), counts


@pytest.mark.parametrize("name,call,word", CASES, ids=[c[0] for c in CASES])
def test_bad_call_is_one_user_error_line(ctx, name, call, word):
    before = _tree(ctx.root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError) as err:
            call(ctx)
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert word in msg, msg
    assert _tree(ctx.root) == before  # nothing written, nothing changed


# ------------------------------------------------------------------------- valid inputs still work
def test_valid_mixture_round_trips(tmp_path):
    g = GMM.labelled_ring()
    g.save(tmp_path / "g.npz")
    back = GMM.load(tmp_path / "g.npz")
    for a, b in ((g.weights, back.weights), (g.means, back.means), (g.covs, back.covs), (g.labels, back.labels)):
        assert torch.equal(a, b)
    assert torch.equal(g.lam, back.lam) and torch.equal(g.U, back.U)


def test_float32_round_off_asymmetry_is_still_accepted():
    """A covariance computed in float32 (asymmetric at round-off level) is taken, symmetrised
    as before; the refusal is for asymmetry far above round-off."""
    A = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    S = (A @ A.transpose(1, 2) / 8 + 0.1 * torch.eye(8)).to(torch.float32)
    S[:, 0, 1] *= 1 + 1e-7
    g = GMM(torch.ones(3), torch.zeros(3, 8), S)
    S64 = S.double()
    assert torch.equal(g.covs, 0.5 * (S64 + S64.transpose(1, 2)))


def test_valid_sample_call_is_the_sampler_itself(ctx):
    """fewstep.sample's checks change nothing: it equals the registered sampler on the same grid."""
    from fewstep import grids, samplers

    x = 80.0 * _x(16).double()
    got = fewstep.sample(ctx.ring, x, sampler="heun", nfe=9, grid="karras", sigma_min=0.002, sigma_max=80.0)
    want = samplers.get("heun")(ctx.ring, x, grids.karras(5, 0.002, 80.0))
    assert torch.equal(got, want)
    # a grid file gives the same as its tensor; numpy ints and whole floats still count as nfe
    path = ctx.root.parent / "valid_grid.json"
    grids.save(path, grids.karras(5, 0.002, 80.0))
    assert torch.equal(fewstep.sample(ctx.ring, x, sampler="heun", nfe=np.int64(9), grid=str(path)), want)
    assert torch.equal(fewstep.sample(ctx.ring, x, sampler="heun", nfe=9.0, grid="karras", sigma_min=0.002, sigma_max=80.0), want)


def test_valid_model_calls(ctx):
    a, _ = ctx.model.sample(8, 4, seed=3)
    b, _ = fewstep.load(ctx.run, device="cpu").sample(8, 4, seed=3)
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    one, lab1 = ctx.cmodel.sample(6, 4, seed=1, labels=2)
    full, lab2 = ctx.cmodel.sample(6, 4, seed=1, labels=torch.full((6,), 2))
    assert torch.equal(one, full) and torch.equal(lab1, lab2)


def test_huge_nfe_warns_with_the_cost():
    from fewstep.samplers import HUGE_NFE

    x = torch.zeros(3, 2)
    with pytest.warns(UserWarning, match=r"very large.*denoiser evaluations"):
        fewstep.sample(lambda y, s, **kw: torch.zeros_like(y), x, sampler="euler", nfe=HUGE_NFE + 1,
                       sigma_min=0.002, sigma_max=80.0)
