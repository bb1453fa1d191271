"""A diffusers UNet2DModel saved with save_pretrained is a fewstep teacher, and our samplers
on it agree with diffusers' own scheduler loops for the same noise (same sigma grid)."""
import math

import pytest
import torch

import fewstep
from fewstep.errors import UserError

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    root = tmp_path_factory.mktemp("pipe")
    unet.save_pretrained(root / "unet")
    diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True).save_pretrained(root / "scheduler")
    return root, unet.eval()


def _vp_loop(scheduler, unet, x, steps):
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def test_load_maps_the_schedule(saved):
    root, _ = saved
    m = fewstep.load(f"diffusers:{root}", device="cpu")
    abar = diffusers.DDIMScheduler(beta_schedule="linear").alphas_cumprod.double()
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(m.process.scale(t) ** 2, abar, rtol=1e-6)
    assert m.shape == (1, 8, 8) and m.denoiser.prediction == "eps"


def test_ddim_matches_diffusers_loop(saved):
    root, unet = saved
    m = fewstep.load(f"diffusers:{root}", device="cpu")
    s = diffusers.DDIMScheduler.from_pretrained(root / "scheduler")
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _vp_loop(s, unet, x_T.clone(), 10)
    abar = s.alphas_cumprod.double()
    sig = ((1 - abar[s.timesteps]) / abar[s.timesteps]).sqrt()
    sigmas = torch.cat([sig, sig.new_zeros(1)])
    y = fewstep.samplers.get("euler")(m.denoiser, x_T.double() * math.sqrt(1 + sigmas[0] ** 2),
                                      sigmas)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-4


def test_dpmpp_2m_matches_diffusers_loop(saved):
    root, unet = saved
    m = fewstep.load(f"diffusers:{root}", device="cpu")
    s = diffusers.DPMSolverMultistepScheduler.from_pretrained(root / "scheduler")
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _vp_loop(s, unet, x_T.clone(), 8)
    sigmas = s.sigmas.double()
    y = fewstep.samplers.get("dpmpp_2m")(m.denoiser, x_T.double() * math.sqrt(1 + sigmas[0] ** 2), sigmas)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-4


def test_cli_samples_a_diffusers_teacher(saved, tmp_path):
    from fewstep.cli import main

    root, _ = saved
    assert main(["sample", f"diffusers:{root}", "--nfe", "4", "--n", "4", "--out", str(tmp_path / "s.npz")]) == 0


def test_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="save_pretrained"):
        fewstep.load(f"diffusers:{tmp_path}")
