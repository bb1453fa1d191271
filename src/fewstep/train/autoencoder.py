"""``fewstep train-autoencoder``: the first stage of latent diffusion (Rombach et al. 2022,
sec. 3.1 and appendix G), a KL-regularised autoencoder (:mod:`fewstep.nets.autoencoder`)
trained on the project's one loop (:func:`fewstep.train.loop.fit`).

The objective per image ``x`` with ``D`` pixel values (LDM's first-stage loss, without its
perceptual and patch-GAN terms and with its learned output log-variance at its initial 0)::

    L(x) = (1 / D) * [ sum_pixels rho(x - D(z)) + kl_weight * KL(q(z | x) || N(0, I)) ],
    z = mu(x) + sigma(x) * eps,   rho = |.| (l1, LDM's) or (.)^2 (mse).

LDM sums both terms over the image and its latent; dividing by ``D`` keeps LDM's ratio of the
two (``kl_weight`` = 1e-6 as in its KL-f4 / f8 configs) while the logged loss reads as the
mean error per pixel, and the loop's gradient clipping acts at a size independent of the
image size. At the end, LDM's scale factor ``s = 1 / std(z)`` (one standard deviation over all
values of posterior samples ``z`` of up to ``scale_images`` training images, ``z.flatten().std()``
as LDM's ``scale_by_std``) is stored, so ``s * z`` has unit variance, with the reconstruction
error on held-out images (:func:`fewstep.data.registry.held_out`, posterior means).

The run folder holds ``config.json``, ``checkpoints/``, ``metrics.jsonl`` and at the end
``model.safetensors`` + ``model.json`` (``"role": "autoencoder"``: the net config,
``scale_factor``, the data, ``image_shape``, ``latent_shape``, ``reconstruction``) and
``reconstructions.png``. :func:`load_autoencoder` (from :mod:`fewstep.nets.autoencoder`,
re-exported here) reads it, or a diffusers ``AutoencoderKL`` given as ``diffusers:PATH``.

Deviations from LDM, for fewstep's scale: no LPIPS or patch discriminator (a grey 28-px set has
no pretrained perceptual net here, and an L1 autoencoder reconstructs it sharply enough at
f = 4); AdamW with (0.9, 0.999) instead of Adam (0.5, 0.9) (those betas serve the GAN); no
``quant_conv`` / ``post_quant_conv`` 1x1 layers (a linear map after the encoder's last
convolution adds nothing); no EMA by default (LDM's first stages use none: ``ema_decay`` 0).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.registry import Dataset, held_out, load_dataset
from ..errors import UserError
from ..io import save_checkpoint
from ..nets.autoencoder import ROLE, KLAutoencoder, LatentCodec, load_autoencoder, measure_scale_factor
from .loop import Task, fit, make_accelerator
from .options import LOOP_OPTIONS, Option, loop_defaults, table_defaults, validate

METHOD = "autoencoder"  # config.json's "method": names the run kind (fewstep.train.runfolder.run_kind)


def _mults(v) -> bool:
    return len(v) >= 1 and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in v)


AUTOENCODER_OPTIONS: tuple[Option, ...] = (
    Option("data", str, "fashion", "image dataset: fashion, digits, shapes16, shapes32, mnist:DIR, a .npy/.npz file "
           "or PNG folder"),
    Option("n_data", int, None, "number of training images", low=1, none="the dataset's default size"),
    Option("latent_channels", int, 4, "latent channels c (LDM's KL-f4: 3; 4 as Stable Diffusion's)", low=1),
    Option("base_channels", int, 32, "channels of the first level", low=1, cli=False),
    Option("channel_mult", list, [1, 2, 2], "channel multiplier per level; downsampling factor 2 ** (levels - 1)",
           test=_mults, must="a non-empty list of whole numbers >= 1, e.g. [1, 2, 2]", cli=False),
    Option("num_res_blocks", int, 1, "residual blocks per encoder level (the decoder has one more)", low=1,
           cli=False),
    Option("kl_weight", float, 1e-6, "weight of KL(q(z|x) || N(0, I)) against the summed reconstruction error "
           "(LDM's KL-f4/f8: 1e-6)", low=0.0),
    Option("reconstruction", str, "l1", "reconstruction loss: l1 (LDM's) or mse", choices=("l1", "mse")),
    Option("scale_images", int, 1024, "training images whose posterior samples give the scale factor", low=2,
           cli=False),
    Option("eval_images", int, 1024, "held-out images for the final reconstruction error", low=1, cli=False),
)

# an autoencoder trains with a smaller batch than a teacher and without EMA (LDM's first stages have none)
AUTOENCODER_LOOP_OVERRIDES: dict[str, Any] = {"batch_size": 64, "ema_decay": 0.0}

AUTOENCODER_DEFAULTS: dict[str, Any] = {**table_defaults(AUTOENCODER_OPTIONS),
                                        **loop_defaults(AUTOENCODER_LOOP_OVERRIDES)}


def resolve(overrides: Optional[dict] = None, file: Optional[str] = None) -> dict:
    """Defaults <- config file <- explicit overrides (None values ignored), validated: an
    unknown key or a value that cannot be meant is one UserError line, before anything is read
    or written."""
    from .config import read_config_file

    from_file = read_config_file(file) if file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = {**AUTOENCODER_DEFAULTS, **from_file, **given}
    unknown = sorted(set(cfg) - set(AUTOENCODER_DEFAULTS))
    if unknown:
        where = f"config file {file}: " if file and set(unknown) & set(from_file) else ""
        raise UserError(f"{where}unknown autoencoder option(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(AUTOENCODER_DEFAULTS)}")
    validate(cfg, AUTOENCODER_OPTIONS + LOOP_OPTIONS, file, set(from_file) - set(given))
    cfg["method"] = METHOD
    return cfg


def resume_config(overrides: Optional[dict], out: str | Path, file: Optional[str] = None) -> dict:
    """``--resume``: the stored config of ``out`` with the given options merged as ``fewstep
    train --resume`` does (:func:`fewstep.train.resume.merge`: ``--steps``, ``--lr`` etc. may
    change, the rest must repeat the stored values)."""
    from .lock import check_free
    from .resume import given_options, merge, stored_config

    given, from_file = given_options(overrides, file)
    fresh = resolve(given, file)
    stored = stored_config(out)
    if stored.get("method") != METHOD:
        from .runfolder import _kind_text, run_kind

        raise UserError(f"cannot --resume {out} with fewstep train-autoencoder: it holds a "
                        f"{_kind_text(run_kind(stored))}; choose another --out")
    check_free(out)
    keys = list(dict.fromkeys([*from_file, *given]))
    return merge(out, stored, fresh, keys, {**AUTOENCODER_DEFAULTS, "method": METHOD}, file,
                 set(from_file) - set(given))


def image_data(cfg: dict) -> Dataset:
    """The training images (``load_dataset``, values in [-1, 1]); one line for other data."""
    data = load_dataset(cfg["data"], n=cfg["n_data"], seed=int(cfg["seed"]))
    if data.kind != "image":
        raise UserError(f"--data {cfg['data']}: the autoencoder encodes images, '{data.name}' is {data.kind} data; "
                        "give an image set (fashion, digits, shapes16, mnist:DIR, an image file or folder)")
    if len(data) < 2:
        raise UserError(f"--data {cfg['data']}: {len(data)} image; an autoencoder needs at least 2")
    return data


def build_autoencoder_net(cfg: dict, data: Dataset) -> KLAutoencoder:
    """The untrained autoencoder for ``data`` (seeded by ``cfg['seed']``); one line when the image
    size is not a multiple of the downsampling factor."""
    torch.manual_seed(int(cfg["seed"]))
    net = KLAutoencoder(in_channels=int(data.shape[0]), latent_channels=int(cfg["latent_channels"]),
                        base_channels=int(cfg["base_channels"]), channel_mult=cfg["channel_mult"],
                        num_res_blocks=int(cfg["num_res_blocks"]))
    net.latent_shape(data.shape)
    return net


def reconstruction_error(x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample mean of ``|x - recon|`` (l1) or ``(x - recon)^2`` (mse) over its values."""
    d = (x - recon).flatten(1)
    return d.abs().mean(1) if kind == "l1" else d.pow(2).mean(1)


def autoencoder_task(net: KLAutoencoder, data: Dataset, cfg: dict) -> Task:
    """The loop's task: each step draws the global batch (image indices and the posterior's
    reparametrisation noise) from the step's generator; the per-sample loss is the module
    docstring's ``L(x)``."""
    x_all, B = data.x, int(cfg["batch_size"])
    latent = net.latent_shape(data.shape)
    kl_weight, kind = float(cfg["kl_weight"]), cfg["reconstruction"]
    pixels = float(data.dim)

    def draw(gen, step):
        idx = torch.randint(0, len(x_all), (B,), generator=gen)
        return {"x": x_all[idx], "eps": torch.randn((B,) + tuple(latent), generator=gen)}

    def loss(model, b):
        recon, posterior = model(b["x"], noise=b["eps"])
        return reconstruction_error(b["x"], recon, kind) + kl_weight * posterior.kl() / pixels

    return Task(student=net, draw=draw, loss=loss)


@torch.no_grad()
def evaluate_reconstruction(codec: LatentCodec, x: torch.Tensor, batch_size: int = 256) -> tuple[dict, torch.Tensor]:
    """({l1, mse, psnr}, the reconstructions) of images ``x`` through the posterior means."""
    recons = [codec.decode(codec.encode(x[i:i + batch_size])).float().cpu() for i in range(0, len(x), batch_size)]
    recon = torch.cat(recons)
    mse = float(reconstruction_error(x, recon, "mse").mean())
    psnr = float(10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))))  # peak-to-peak 2 for data in [-1, 1]
    return {"l1": float(reconstruction_error(x, recon, "l1").mean()), "mse": mse, "psnr": psnr}, recon


def autoencoder_meta(cfg: dict, net: KLAutoencoder, data: Dataset, scale: float) -> dict:
    return {
        "format": "fewstep-model-1",
        "role": ROLE,
        "net": net.config,
        "scale_factor": scale,
        "scale_images": min(int(cfg["scale_images"]), len(data)),
        "image_shape": list(data.shape),
        "latent_shape": list(net.latent_shape(data.shape)),
        "factor": net.factor,
        "data": {"name": data.name, "kind": data.kind, "shape": list(data.shape), "n": cfg["n_data"],
                 "seed": int(cfg["seed"])},  # the subset trained on: load_dataset(name, n, seed)
        "kl_weight": float(cfg["kl_weight"]),
        "loss": cfg["reconstruction"],
    }


def train_autoencoder(overrides: Optional[dict] = None, out: str = "runs/autoencoder", resume: bool = False,
                      progress: bool = True, config_file: Optional[str] = None) -> str:
    """``fewstep train-autoencoder``: returns the run folder path (see the module docstring).
    Every option, the data (images only) and the net's fit to the image size are checked
    before a folder is written."""
    if resume:
        cfg = resume_config(overrides, out, config_file)
    else:
        from .lock import check_free

        check_free(out)
        cfg = resolve(overrides, config_file)
    data = image_data(cfg)
    from .options import check_batch_memory

    check_batch_memory("--batch-size", int(cfg["batch_size"]), data.shape)
    net = build_autoencoder_net(cfg, data)
    task = autoencoder_task(net, data, cfg)
    from .lock import locked_run

    acc = make_accelerator(cfg["device"], cfg["mixed_precision"])
    with locked_run(acc, out, cfg, resume) as run:
        t0 = time.time()
        ema = fit(task, run, cfg, accelerator=acc, progress=progress)
        elapsed = time.time() - t0
        if acc.is_main_process:
            _finish(run.root, ema.module, data, cfg, elapsed, acc)
        acc.wait_for_everyone()
    return str(run.root)


def _finish(root: Path, module: KLAutoencoder, data: Dataset, cfg: dict, elapsed: float, acc) -> None:
    """Scale factor, held-out reconstruction error, model files and picture of a finished run."""
    from ..plots import save_samples_png

    seed = int(cfg["seed"])
    module = module.to(acc.device).eval()
    gen = torch.Generator().manual_seed(seed + 17)
    pick = torch.randperm(len(data), generator=gen)[:int(cfg["scale_images"])]
    scale = measure_scale_factor(module, data.x[pick].to(acc.device), gen)
    meta = autoencoder_meta(cfg, module, data, scale)
    codec = LatentCodec(module, scale, meta["image_shape"], meta["latent_shape"], str(root))
    ref, source = held_out(cfg["data"], int(cfg["eval_images"]), seed + 1, cfg["n_data"], seed)
    rec, recon = evaluate_reconstruction(codec, ref.x)
    mean_image = data.x.mean(0, keepdim=True)
    rec["l1_mean_image"] = float(reconstruction_error(ref.x, mean_image.expand_as(ref.x), "l1").mean())
    meta["reconstruction"] = {**rec, "images": len(ref), "reference": source}
    meta["train_seconds"] = elapsed
    meta["num_processes"] = acc.num_processes
    save_checkpoint(root, module.state_dict(), meta, name="model")
    k = min(32, len(ref))
    save_samples_png(torch.cat([ref.x[:k], recon[:k].clamp(-1, 1)]), root / "reconstructions.png",
                     title=f"{ref.name} ({source}): {k} images, then their reconstructions")


__all__ = ["AUTOENCODER_DEFAULTS", "AUTOENCODER_OPTIONS", "autoencoder_task", "evaluate_reconstruction",
           "load_autoencoder", "measure_scale_factor", "resolve", "train_autoencoder"]
