"""LCM-LoRA of a diffusers text-conditional teacher (issue 23): a random-initialised tiny
``UNet2DConditionModel`` with its scheduler (``diffusers:PATH``, its prompts' encoder declared in
fewstep.json) is a teacher with guidance; ``fewstep distill lcm --lora-rank r`` trains adapters
on it, leaving its weights untouched; ``fewstep.interop.diffusers_teacher.export_lora`` writes
them so that diffusers' own ``load_lora_adapter`` on the teacher's UNet gives the student's
network output exactly; LCM's w embedding matches the diffusers LCM pipeline's."""
import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fewstep.methods import distill  # noqa: E402
from fewstep.model import load  # noqa: E402

ENC = {"kind": "hash", "dim": 64, "length": 32, "seed": 0}


def _teacher(root, time_cond: bool):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8,
                                time_cond_proj_dim=32 if time_cond else None)
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    (root / "fewstep.json").write_text(json.dumps({"text_encoder": ENC}))
    return f"diffusers:{root}"


def test_w_embedding_is_the_lcm_pipelines():
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline)

    from fewstep.interop.diffusers_teacher import guidance_embedding

    w = torch.tensor([0.0, 1.5, 7.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    # the angles reach 1000 w = 7000 rad, where one float32 rounding is 7000 * 2^-24 ~ 4e-4: a few
    # operations in another order differ by some 1e-3
    budget = 8 * 1000 * float(w.max()) * 2.0 ** -24  # ~8 roundings of the largest angle
    assert torch.allclose(guidance_embedding(w, 32), want, atol=budget)


def test_lora_adapters_load_in_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from fewstep.interop.diffusers_teacher import export_lora

    spec = _teacher(tmp_path / "pipe", time_cond=False)
    teacher = load(spec)
    assert teacher.meta["text_encoder"]["kind"] == "hash"
    ctx = teacher.prompt(["a bright class 2"] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, _ = teacher.sample(2, 4, labels=ctx, guidance=3.0, seed=0)
    assert x.shape == (2, 1, 8, 8) and bool(x.isfinite().all())
    before = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "s"
    with pytest.raises(Exception, match="w-min"):
        distill("lcm", {"teacher": spec, "data": "captions:digits,encoder=hash", "lora_rank": 4, "steps": 2,
                        "device": "cpu"}, str(tmp_path / "bad"), progress=False)
    distill("lcm", {"teacher": spec, "data": "captions:digits,encoder=hash", "lora_rank": 4, "w_min": 3.0,
                    "w_max": 3.0, "steps": 6, "batch_size": 8, "levels": 10, "lr": 1e-2, "ema_decay": 0.0,
                    "device": "cpu", "checkpoint_every": 1000}, str(out), progress=False)
    after = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((out / "model.json").read_text())
    assert meta["lora"]["diffusers"] and meta["guidance"] == 3.0 and "w_input" not in meta
    student = load(str(out))
    lora_dir = tmp_path / "lora"
    export_lora(str(out), str(lora_dir))
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "pipe" / "unet"))
    unet.load_lora_adapter(str(lora_dir), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    unet.eval()
    ours = student.denoiser.net.model.eval()
    g = torch.Generator().manual_seed(0)
    xin, states = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 32, 64, generator=g)
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        a = unet(xin, t, encoder_hidden_states=states).sample
        b = ours(xin, t, encoder_hidden_states=states).sample
        base = UNet2DConditionModel.from_pretrained(str(tmp_path / "pipe" / "unet")).eval()(
            xin, t, encoder_hidden_states=states).sample
    assert torch.allclose(a, b, atol=1e-5)
    assert float((a - base).abs().max()) > 1e-5  # the adapters moved: the loaded net is not the teacher
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, _ = student.sample(2, 2, labels=ctx, seed=0)
    assert y.shape == (2, 1, 8, 8) and bool(y.isfinite().all())


def test_a_w_embedding_unet_takes_w_as_the_students_input(tmp_path):
    spec = _teacher(tmp_path / "pipe", time_cond=True)
    out = tmp_path / "s"
    distill("lcm", {"teacher": spec, "data": "captions:digits,encoder=hash", "lora_rank": 2, "w_min": 1.0,
                    "w_max": 4.0, "steps": 3, "batch_size": 8, "levels": 10, "ema_decay": 0.0, "device": "cpu",
                    "checkpoint_every": 1000}, str(out), progress=False)
    student = load(str(out))
    assert student.meta["w_input"] == [1.0, 4.0]
    ctx = student.prompt(["a dark class 7"] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, _ = student.sample(2, 1, labels=ctx, guidance=1.0, seed=0)
        b, _ = student.sample(2, 1, labels=ctx, guidance=4.0, seed=0)
    assert float((a - b).abs().max()) > 0  # w reaches the UNet through time_cond_proj
