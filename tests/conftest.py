"""Test session set-up: one torch thread per worker (pytest -n 2 on 2 cores; tiny tensors
spin-wait badly with more), and float defaults left untouched."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def spec(tmp_path_factory):
    """The exact ring-of-8 teacher (tests/_exact.py ``gmm2``) saved as a ``gmm:FILE.npz`` spec."""
    from _exact import gmm2

    path = tmp_path_factory.mktemp("gmm") / "ring.npz"
    gmm2().save(path)
    return f"gmm:{path}"


@pytest.fixture(scope="session")
def gmm_spec(tmp_path_factory):
    """``GaussianMixture.ring(8)`` (std 0.1) saved as a ``gmm:FILE.npz`` spec (command-line tests)."""
    from fewstep.data.gmm import GaussianMixture

    p = tmp_path_factory.mktemp("g") / "g.npz"
    GaussianMixture.ring(8).save(p)
    return f"gmm:{p}"


@pytest.fixture(scope="session")
def cspec(tmp_path_factory):
    """The exact class-conditional mixture (tests/_exact.py ``gmm_cond``) as a ``gmm:FILE.npz`` spec."""
    from _exact import save_gmm_cond

    return "gmm:" + save_gmm_cond(tmp_path_factory.mktemp("gmmc") / "cond.npz")


@pytest.fixture(scope="session")
def class_unet_spec(tmp_path_factory):
    """A tiny diffusers UNet2DModel with 3 class embeddings (no null class) and a DDIM scheduler,
    saved with save_pretrained, as a ``diffusers:PATH`` spec."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8, num_class_embeds=3,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    root = tmp_path_factory.mktemp("class_unet") / "pipe"
    unet.save_pretrained(root / "unet")
    diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False).save_pretrained(root / "scheduler")
    return f"diffusers:{root}"


@pytest.fixture(scope="session")
def null_class_unet_specs(tmp_path_factory):
    """A tiny diffusers UNet2DModel with 11 class rows, saved twice: declared to have its null
    class in row 4 (fewstep.json; a teacher of the 10 digit classes: labels 0-3 -> rows 0-3,
    4-9 -> rows 5-10, -1 -> row 4) and without the declaration (11 classes, labels = rows)."""
    import shutil

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8, num_class_embeds=11,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    base = tmp_path_factory.mktemp("null_unet")
    plain = base / "plain"
    unet.save_pretrained(plain / "unet")
    diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False).save_pretrained(plain / "scheduler")
    shutil.copytree(plain, base / "null")
    (base / "null" / "unet" / "fewstep.json").write_text('{"null_class": 4}')
    return f"diffusers:{base / 'null'}", f"diffusers:{plain}"
