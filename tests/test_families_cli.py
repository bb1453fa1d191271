"""``fewstep train --family arm|ebm|sm|ncsn``: each family trains through the shared loop into
a run folder that ``fewstep sample`` and ``fewstep bench`` take like any teacher, resumes
exactly, and refuses options that do not fit in one line (exit 2, nothing written)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.data.gmm import GaussianMixture
from fewstep.model import load

FAMILIES = ("arm", "ebm", "sm", "ncsn")
# tiny budgets: the point here is the plumbing; each family's learning is tested in its own file
SMALL = {"arm": ["--arm-hidden", "32"], "ebm": ["--ebm-buffer", "256", "--ebm-steps", "5"],
         "sm": [], "ncsn": ["--ncsn-levels", "4", "--ncsn-steps-per-level", "3"]}


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    GaussianMixture.ring(4, radius=2.0, std=0.3).save(root / "ring4.npz")
    # a small evaluation: Langevin's 1000 steps on 2000 samples would dominate the test's time
    (root / "small_eval.json").write_text(json.dumps({"eval_samples": 128}))
    return f"gmm:{root / 'ring4.npz'}"


def _train(out, family, data, *extra, steps=20):
    config = data[4:].replace("ring4.npz", "small_eval.json")
    return main(["train", "--family", family, "--data", data, "--n-data", "2000", "--steps", str(steps),
                 "--batch-size", "64", "--checkpoint-every", "10", "--device", "cpu", "--seed", "1",
                 "--config", config, "--out", str(out), "--quiet", *SMALL[family], *extra])


@pytest.fixture(scope="module")
def runs(mix, tmp_path_factory):
    root = tmp_path_factory.mktemp("famruns")
    out = {}
    for fam in FAMILIES:
        assert _train(root / fam, fam, mix) == 0
        out[fam] = root / fam
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_run_folder_samples_and_evaluates(runs, family, tmp_path, capsys):
    run = runs[family]
    meta = json.loads((run / "model.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    assert meta["family"] == family and meta["role"] == "teacher" and meta["data"]["shape"] == [2]
    assert ev["family"] == family and ev["nfe"] == meta["default_nfe"] and ev["sampler"]
    assert "sliced_w2" in ev and ev["sliced_w2"] == ev["sliced_w2"]  # finite, not NaN
    m = load(str(run), device="cpu")
    x, labels = m.sample(32, nfe=int(meta["default_nfe"]), seed=0)
    assert x.shape == (32, 2) and torch.isfinite(x).all() and labels is None
    x2, _ = m.sample(32, nfe=int(meta["default_nfe"]), seed=0)
    assert torch.equal(x, x2)  # the seed fixes the samples
    f = tmp_path / "s.npz"
    assert main(["sample", str(run), "--nfe", str(meta["default_nfe"]), "--n", "16", "--out", str(f)]) == 0
    assert f.exists()
    if family == "arm":
        assert meta["default_nfe"] == 2  # one evaluation per coordinate
        assert "nll_nats_per_dim" in ev
        code = main(["sample", str(run), "--nfe", "1", "--n", "4", "--out", str(tmp_path / "t.npz")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and "--nfe 2" in err


@pytest.mark.parametrize("family", ["arm", "ncsn"])
def test_family_bench(runs, family, tmp_path):
    from fewstep.report.bench import run_bench

    res, path = run_bench(str(runs[family]), samplers="none" if family == "arm" else ["euler"], students="none",
                          nfe=[4], out=str(tmp_path / "b"), n=200, nll_n=20, progress=False)
    methods = {r["method"] for r in res.rows}
    own = [r for r in res.rows if r["method"].startswith(f"{family} (own rule")]
    assert own and own[0]["nfe_used"] == json.loads((runs[family] / "model.json").read_text())["default_nfe"]
    assert path.exists()
    if family == "arm":  # exact likelihood, no ODE reference
        assert res.meta["summary"]["nll_divergence"].startswith("exact")
        assert not any(r["kind"] == "reference" for r in res.rows)
    else:  # NCSN has scores over a range of levels: the diffusion samplers and the ODE reference run on it
        assert "euler" in methods and any(r["kind"] == "reference" for r in res.rows), res.skipped


def test_family_resume_is_exact(mix, tmp_path):
    """20 steps then --resume --steps 40 == 40 steps at once, the EBM's replay buffer included
    (it lives in the checkpoints beside the weights)."""
    assert _train(tmp_path / "full", "ebm", mix, steps=40) == 0
    assert _train(tmp_path / "cut", "ebm", mix, steps=20) == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "cut"), "--steps", "40", "--quiet"]) == 0
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args,needle", [
    (["--family", "arm", "--process", "vp"], "diffusion teacher"),
    (["--family", "arm", "--ebm-buffer", "100"], "--family ebm"),
    (["--family", "arm", "--arm-output", "softmax", "--data", "moons"], "--arm-range"),
    (["--family", "arm", "--arm-output", "banana"], "arm"),
    (["--family", "sm", "--data", "shapes16", "--sm-objective", "exact"], "sliced"),
    (["--family", "ebm", "--ebm-reinit", "1.5"], "reinit"),
    (["--family", "ncsn", "--ncsn-levels", "0"], "levels"),
    (["--family", "arm", "--conditional"], "diffusion teacher"),
    (["--family", "bogus"], "family"),
])
def test_family_bad_input_one_line_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "r"
    argv = ["train", "--out", str(out), "--steps", "2", "--quiet", *args]
    if "--data" not in args:
        argv += ["--data", "moons"]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal (choices, types): exit 2 too
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and needle in err, err
    assert len([ln for ln in err.strip().splitlines() if "error" in ln]) == 1, err
    assert not out.exists()
