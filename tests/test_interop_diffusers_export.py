"""Students out to diffusers (``fewstep export --format diffusers``): the README's loop with
``FewstepUNet.from_pretrained`` and a stock ``EulerDiscreteScheduler`` reproduces
``fewstep.load(student).sample`` for the same noise (progressive, consistency and knowledge
students); the model call convention inverts exactly to the student's denoiser (MLP and UNet);
bad exports fail in one line and write nothing."""
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep.cli import main  # noqa: E402
from fewstep.data.gmm import GaussianMixture  # noqa: E402
from fewstep.interop.diffusers_export import FewstepUNet, export_diffusers  # noqa: E402
from fewstep.methods import distill  # noqa: E402
from fewstep.model import load  # noqa: E402

NET = {"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16}
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_loop() -> str:
    """The python block of the README's 'Use a student in diffusers' section."""
    text = README.read_text()
    section = text[text.index("## Use a student in diffusers"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def assert_same(a, b, x_T):
    """Equal to 1e-5, plus float32 rounding at the noise's scale: an Euler step that ends at 0
    from a large level, x + (x - D)(0 - s)/s, rounds at the scale of x (both loops do)."""
    tol = 1e-5 + 4 * torch.finfo(torch.float32).eps * float(x_T.abs().max())
    assert float((a - b).abs().max()) <= tol, (float((a - b).abs().max()), tol)


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    GaussianMixture.ring(4, radius=2.0, std=0.3).save(root / "ring.npz")
    c = {"teacher": f"gmm:{root / 'ring.npz'}", "net": NET, "batch_size": 32, "device": "cpu", "steps": 30,
         "warmup": 2}
    return {
        "pd": distill("progressive", {**c, "start_steps": 4, "end_steps": 1}, str(root / "pd"), progress=False),
        "cd": distill("consistency", {**c, "n": 8}, str(root / "cd"), progress=False),
        "kd": distill("knowledge", {**c, "pairs": 64, "pair_batch": 64, "pair_nfe": 8}, str(root / "kd"),
                      progress=False),
        "gen": distill("knowledge", {**c, "steps": 2, "pairs": 16, "pair_batch": 16, "pair_nfe": 2, "latent_dim": 1},
                       str(root / "gen"), progress=False),
        "gmm": c["teacher"],
    }


@pytest.mark.parametrize("name,nfe,rounds", [("pd", 1, None), ("pd", 2, 2), ("cd", 1, None), ("cd", 3, None),
                                             ("kd", 1, None)])
def test_readme_loop_equals_fewstep_sampling(students, tmp_path, name, nfe, rounds):
    out = export_diffusers(students[name], str(tmp_path / "exported"), nfe=rounds)
    code = re.sub(r'folder, nfe = .*\n', f'folder, nfe = {out!r}, "{nfe}"\n', readme_loop())
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # the README's loop, as a user runs it
    g = torch.Generator().manual_seed(0)  # the loop's noise: x_T, then (consistency) the re-noising
    x_T = ns["sigmas"][0] * torch.randn(16, 2, generator=g)
    model = load(students[name], device="cpu")
    opts = {} if name == "pd" else {"generator": g}  # consistency sampling re-noises from g
    ours, _ = model.sample(16, nfe, x=x_T, **opts)
    assert ns["x"].shape == ours.shape
    assert_same(ns["x"], ours, x_T)
    assert float(ours.std()) > 0.01  # samples, not a constant (the students are barely trained)
    rule = json.loads((tmp_path / "exported" / "fewstep_sampling.json").read_text())
    assert rule["sampler"] == ("euler" if name == "pd" else "consistency")
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "fewstep_sampling.json", "scheduler"]


def test_student_of_a_diffusers_teacher_round_trips(tmp_path):
    """diffusers in, diffusers out: a UNet2DModel teacher (diffusers:PATH), its progressive
    student (a fewstep UNet on 8x8 images), exported and run by the README loop."""
    import diffusers
    import numpy as np

    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                          block_out_channels=(16, 32), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                          up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "pipe" / "unet")
    diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False).save_pretrained(tmp_path / "pipe" / "scheduler")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(-1, 1, (32, 1, 8, 8)).astype(np.float32))
    net = {"kind": "unet", "in_channels": 1, "image_size": 8, "base_channels": 8, "channel_mult": [1, 2],
           "num_res_blocks": 1, "attn_resolutions": []}
    student = distill("progressive", {"teacher": f"diffusers:{tmp_path / 'pipe'}", "data": str(tmp_path / "x.npy"),
                                      "net": net, "start_steps": 2, "steps": 2, "batch_size": 4, "device": "cpu"},
                      str(tmp_path / "pd"), progress=False)
    out = export_diffusers(student, str(tmp_path / "pd-diffusers"), nfe=2)  # the 2-step round
    code = re.sub(r'folder, nfe = .*\n', f'folder, nfe = {out!r}, "2"\n', readme_loop())
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    g = torch.Generator().manual_seed(0)
    x_T = ns["sigmas"][0] * torch.randn(16, 1, 8, 8, generator=g)
    ours, _ = load(student, device="cpu").sample(16, 2, x=x_T)
    assert ns["x"].shape == (16, 1, 8, 8)
    assert_same(ns["x"], ours, x_T)


@pytest.mark.parametrize("net,shape", [
    (NET, [2]),
    ({"kind": "unet", "in_channels": 1, "image_size": 8, "base_channels": 8, "channel_mult": [1, 2],
      "num_res_blocks": 1, "attn_resolutions": []}, [1, 8, 8]),
])
@pytest.mark.parametrize("denoiser", ["model", "consistency"])
def test_call_convention_inverts_to_the_student_denoiser(tmp_path, net, shape, denoiser):
    """from_pretrained rebuilds the same D; the scheduler's x0 from the v output is D(y, sigma)."""
    meta = {"net": net, "process": {"kind": "vp_cosine"}, "prediction": "v", "sigma_data": 0.5}
    if denoiser == "consistency":
        meta["denoiser"] = {"kind": "consistency", "sigma_min": 0.002, "sigma_data": 0.5, "sigma_max": 80.0}
    torch.manual_seed(0)
    unet = FewstepUNet(meta, shape)
    unet.save_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.bin"))  # safetensors only
    back = FewstepUNet.from_pretrained(tmp_path / "m").eval()
    g = torch.Generator().manual_seed(1)
    for sigma in (80.0, 2.0, 0.05):
        y = torch.randn([4] + shape, generator=g) * (1 + sigma)
        s32 = torch.tensor(sigma, dtype=torch.float32)
        with torch.no_grad():
            d = unet.denoise(y, s32)
            t = 0.25 * s32.log()  # what EulerDiscreteScheduler (continuous timesteps) passes
            v = back(y / (s32**2 + 1) ** 0.5, t).sample
        x0 = v * (-s32 / (s32**2 + 1) ** 0.5) + y / (s32**2 + 1)  # diffusers' v_prediction step
        assert torch.allclose(x0, d, rtol=1e-4, atol=1e-5), (sigma, float((x0 - d).abs().max()))


def test_cli_export_and_mistakes(students, tmp_path, capsys):
    out = tmp_path / "cd-diffusers"
    assert main(["export", "--format", "diffusers", students["cd"], str(out)]) == 0
    rule = json.loads((out / "fewstep_sampling.json").read_text())
    assert rule["epsilon"] == 0.002 and [float(s) for s in rule["grids"]["1"]] == [80.0, 0.0]
    capsys.readouterr()
    for args in ([students["cd"], str(out)],                          # not empty
                 [students["gmm"], str(tmp_path / "a")],              # not a student
                 [students["gen"], str(tmp_path / "b")],              # generator student
                 [students["pd"], str(tmp_path / "c"), "--nfe", "3"],  # no such round
                 [str(tmp_path / "missing"), str(tmp_path / "d")]):
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("fewstep export: error:") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cd-diffusers"]  # nothing half-written
