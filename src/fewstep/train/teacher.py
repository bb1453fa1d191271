"""Teacher training: a dataset, a process, a parametrization and a net -> a run folder.

The run folder holds ``config.json`` (the resolved config), ``checkpoints/``,
``metrics.jsonl``, and at the end ``model.safetensors`` + ``model.json`` (EMA weights and
everything :func:`fewstep.load` needs), ``samples.png`` and ``eval.json``.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data.registry import Dataset, load_dataset
from ..denoiser import ModelDenoiser
from ..errors import UserError
from ..io import save_checkpoint, write_json
from ..nets import build_net, net_config_defaults
from ..process import process_from_config  # methods/progressive.py imports it from here too
from .config import resolve
from .loop import Task, fit, make_accelerator
from .losses import DenoisingLoss
from .runfolder import RunFolder


def denoising_task(D: ModelDenoiser, data: Dataset, cfg: dict) -> Task:
    """The DSM objective on ``data``: each step draws the global batch from the step's
    generator (indices, t, eps, label dropout); the loop gives each process its slice."""
    loss_fn = DenoisingLoss(cfg["weighting"], sigma_data=float(cfg["sigma_data"]))
    if data.context:
        return _context_task(D, data, cfg, loss_fn)
    x_all, labels_all = data.x, data.labels if cfg["conditional"] else None
    B = int(cfg["batch_size"])
    p_null = float(cfg["label_dropout"])

    def draw(gen, step):
        idx = torch.randint(0, len(x_all), (B,), generator=gen)
        t = D.process.sample_t(B, generator=gen)
        eps = torch.randn((B,) + tuple(x_all.shape[1:]), generator=gen)
        drop = torch.rand(B, generator=gen) < p_null
        batch = {"x0": x_all[idx], "t": t, "eps": eps}
        if labels_all is not None:
            lab = labels_all[idx].clone()
            lab[drop] = -1
            batch["labels"] = lab
        return batch

    def loss(model, b):
        cond = {"labels": b["labels"]} if "labels" in b else {}
        return loss_fn(D, b["x0"], b["t"], b["eps"], net=model, **cond)

    return Task(student=D.net, draw=draw, loss=loss)


def _context_task(D: ModelDenoiser, data: Dataset, cfg: dict, loss_fn: DenoisingLoss) -> Task:
    """The DSM objective on data whose labels are each sample's context (speech): batches
    cut to their longest sample with the frame mask, the loss a mean over real frames
    only, plus the net's own auxiliary loss (ProDiff's variance adaptor: FastSpeech 2's
    duration, pitch and energy terms) on the same batch."""
    B = int(cfg["batch_size"])
    speech = data.kind == "speech"
    p_null = 0.0 if speech else float(cfg["label_dropout"])  # text: the null prompt for classifier-free guidance
    from ..nets.unet import drop_to_null

    def draw(gen, step):
        idx = torch.randint(0, len(data), (B,), generator=gen)
        x0, ctx, mask = data.take(idx)
        t = D.process.sample_t(B, generator=gen)
        batch = {"x0": x0, "t": t, "eps": torch.randn(x0.shape, generator=gen), "labels": ctx}
        if p_null > 0:
            drop = torch.rand(B, generator=gen) < p_null
            batch["labels"] = drop_to_null(ctx, drop)
        if mask is not None:
            batch["mask"] = mask
        return batch

    def loss(model, b):
        return loss_fn(D, b["x0"], b["t"], b["eps"], net=model, mask=b.get("mask"), auxiliary=speech,
                       labels=b["labels"])

    return Task(student=D.net, draw=draw, loss=loss)


def speech_net_config(net: dict | None) -> dict:
    """The speech teacher's net: ProDiff's (:class:`fewstep.nets.prodiff.ProDiffNet`) with the
    phoneme inventory and voices of :mod:`fewstep.data.speech`, updated by ``net``."""
    from ..data import speech

    base = {"kind": "prodiff", "mel_bins": speech.N_MELS, "num_phonemes": len(speech.PHONEMES),
            "num_speakers": len(speech.VOICES)}
    if net and net.get("kind") != "prodiff":
        raise UserError(f"speech data needs --net prodiff (a spectrogram denoiser with a phoneme encoder), not "
                        f"'{net.get('kind')}'")
    return {**base, **(net or {})}


def build_teacher(cfg: dict, data: Dataset) -> ModelDenoiser:
    process = process_from_config(cfg["process"])
    if data.context and data.kind != "speech":  # captioned images: a UNet with cross-attention to the text
        if cfg["conditional"]:
            raise UserError(f"--conditional: '{data.name}' is conditioned on its captions (text), not on class "
                            f"labels; leave --conditional out")
        L, width = int(data.table.shape[1]), int(data.table.shape[2]) - 1
        net_cfg = {**net_config_defaults(data.kind, data.shape, 0), **(cfg["net"] or {}),
                   "context_dim": width, "context_length": L}
        if net_cfg.get("kind") != "unet" or net_cfg.get("num_classes"):
            raise UserError(f"captioned images need a UNet without num_classes (it attends to the text); got "
                            f"{net_cfg.get('kind')}")
    elif data.context:
        if cfg["conditional"]:
            raise UserError(f"--conditional: '{data.name}' is speech, conditioned on its text (phonemes), not on "
                            f"class labels; leave --conditional out")
        cfg["label_dropout"] = 0.0
        net_cfg = speech_net_config(cfg["net"])
    elif cfg["net"] and cfg["net"].get("kind") == "prodiff":
        raise UserError(f"--net prodiff denoises speech (mel spectrograms with phonemes); '{data.name}' is "
                        f"{data.kind} data; give --data speech:N or another net")
    else:
        net_cfg = cfg["net"] or net_config_defaults(data.kind, data.shape,
                                                    data.num_classes if cfg["conditional"] else 0)
    if cfg["conditional"] and data.num_classes == 0:
        raise UserError(f"--conditional: dataset '{data.name}' has no labels")
    if cfg["conditional"] and cfg["net"] and int(net_cfg.get("num_classes", 0) or 0) != data.num_classes:
        raise UserError(f"--conditional: the net config has num_classes {net_cfg.get('num_classes', 0)}, the data "
                        f"'{data.name}' {data.num_classes} classes; set \"num_classes\": {data.num_classes} in \"net\"")
    if not cfg["conditional"] and int(net_cfg.get("num_classes", 0) or 0):
        raise UserError(f"the net config has num_classes {net_cfg['num_classes']} but the teacher is unconditional; "
                        f"add --conditional or drop num_classes from \"net\"")
    torch.manual_seed(int(cfg["seed"]))
    net = build_net(net_cfg)
    if getattr(data, "null_context", None) is not None:
        with torch.no_grad():
            net.null_context.copy_(data.null_context)
    cfg["net"] = getattr(net, "config", net_cfg)
    return ModelDenoiser(net, process, cfg["prediction"], sigma_data=float(cfg["sigma_data"]))


def model_meta(cfg: dict, D: ModelDenoiser, data: Dataset) -> dict:
    """What :func:`fewstep.load` needs to rebuild the trained denoiser."""
    return {
        "format": "fewstep-model-1",
        "role": "teacher",
        "net": cfg["net"],
        "process": D.process.config(),
        "prediction": D.prediction,
        "sigma_data": D.sigma_data,
        "data": {"name": data.name, "kind": data.kind, "shape": list(data.shape),
                 "num_classes": data.num_classes if cfg["conditional"] else 0,
                 "n": cfg["n_data"], "seed": int(cfg["seed"])},  # the subset trained on: load_dataset(name, n, seed)
        "sigma_min": D.process.sigma_min,
        "sigma_max": D.process.sigma_max,
        "default_sampler": None,  # the measured default for each budget (fewstep.samplers.recommend)
        **({"text_encoder": data.text_encoder} if getattr(data, "text_encoder", None) else {}),
    }


def train_teacher(overrides: dict | None = None, out: str = "runs/teacher", config_file: str | None = None,
                  resume: bool = False, progress: bool = True, evaluate: bool = True) -> str:
    """``fewstep train``: returns the run folder path.

    With ``resume`` the stored config of ``out`` is used: the options given may repeat it (the
    same command plus ``--resume``); those that differ must be ones that may change on resume
    (``--steps``, ``--lr``, ...: :mod:`fewstep.train.resume`), others are refused."""
    if resume:
        from .resume import train_config

        cfg = train_config(overrides, out, config_file)
    else:
        from .lock import check_free

        check_free(out)  # a folder another process writes: that first, not "exists and is not empty"
        cfg = resolve(overrides, config_file)
    data = load_dataset(cfg["data"], n=cfg["n_data"], seed=int(cfg["seed"]))
    from .options import check_batch_memory

    check_batch_memory("--batch-size", int(cfg["batch_size"]), data.shape)  # a batch beyond this machine: refused
    if evaluate and cfg.get("eval_samples") is not None:
        check_batch_memory('"eval_samples"', int(cfg["eval_samples"]), data.shape, copies=4)
    family = cfg.get("family", "diffusion")
    if family == "diffusion":
        D = build_teacher(cfg, data)
        task = denoising_task(D, data, cfg)
        describe = lambda module: model_meta(cfg, D, data)  # noqa: E731
    else:
        task, describe = family_task(cfg, data)
    from .lock import locked_run

    acc = make_accelerator(cfg["device"], cfg["mixed_precision"])
    with locked_run(acc, out, cfg, resume) as run:  # one writer per run folder (main process)
        t0 = time.time()
        ema = fit(task, run, cfg, accelerator=acc, progress=progress)
        elapsed = time.time() - t0
        if acc.is_main_process:
            meta = describe(ema.module)
            meta["train_seconds"] = elapsed
            meta["num_processes"] = acc.num_processes
            save_checkpoint(run.root, ema.module.state_dict(), meta, name="model")
            if evaluate:
                _evaluate(run, data, cfg, progress)
        acc.wait_for_everyone()
    return str(run.root)


def family_task(cfg: dict, data: Dataset):
    """(Task, describe(module) -> model.json) of a family before diffusion
    (:mod:`fewstep.families`): its ``check`` runs here, before anything is written."""
    from ..families import get

    fam = get(cfg["family"])
    if data.kind == "clouds":
        raise UserError(f"--family {cfg['family']} models points and images, not point clouds "
                        f"('{data.name}'); train --family diffusion for clouds")
    fam.check(cfg, data)
    torch.manual_seed(int(cfg["seed"]))
    obj = fam.objective(cfg, data)
    task = Task(student=obj.module, draw=obj.draw, loss=obj.loss, extra=obj.extra, after_step=obj.after_step)

    def describe(module) -> dict:
        meta = {"format": "fewstep-model-1", "role": "teacher", **fam.meta(cfg, module, data),
                "family": cfg["family"],
                "data": {"name": data.name, "kind": data.kind, "shape": list(data.shape), "num_classes": 0,
                         "n": cfg["n_data"], "seed": int(cfg["seed"])}}
        return meta

    return task, describe


EVAL_CLOUDS = 64  # clouds per set for the cloud metrics (each pair of clouds costs N^2 distances)


def _evaluate(run: RunFolder, data: Dataset, cfg: dict, progress: bool) -> None:
    """Final quality: samples with an ``eval_nfe``-step Euler ODE and a plot; for points
    sliced-W2 to the data, for point clouds MMD-CD, COV-CD and 1-NNA-CD (see
    :mod:`fewstep.metrics.pointcloud`) of ``EVAL_CLOUDS`` samples against as many reference
    clouds (:func:`~fewstep.data.registry.held_out`: a fresh draw of a generated set, the
    clouds left out of training of a file) and renders of both."""
    from ..model import load
    from ..plots import save_samples_png

    model = load(str(run.root), device=cfg["device"])
    if data.kind == "speech":
        return _evaluate_speech(run, model, cfg)
    limit = {"points": int(cfg["eval_samples"]), "clouds": EVAL_CLOUDS}.get(data.kind, 256)
    n = min(limit, int(cfg["eval_samples"]))
    family = cfg.get("family", "diffusion")
    # a family samples by its own rule (ARM: a coordinate at a time; Langevin), at its own cost
    sampler = "euler" if family == "diffusion" else None
    nfe = int(cfg["eval_nfe"]) if cfg.get("eval_nfe") is not None else int(model.meta["default_nfe"])
    t0 = time.time()
    x, labels = model.sample(n, nfe=nfe, sampler=sampler, seed=int(cfg["seed"]) + 1)
    shown = sampler or (model.sampling.get("sampler") if hasattr(model, "sampling") else model.default_sampler)
    result = {"sampler": shown, "nfe": nfe, "n": n}
    if family != "diffusion":
        from ..families import get

        result.update(family=family, sample_seconds=time.time() - t0, **get(family).evaluate(model, data, cfg))
    title = f"{data.name}: {shown}, {result['nfe']} NFE"
    if data.kind == "points":
        from ..metrics import sliced_w2

        ref = data.x[torch.randperm(len(data.x), generator=torch.Generator().manual_seed(1))[:n]]
        result["sliced_w2"] = sliced_w2(x, ref)
    if data.kind == "clouds":
        from ..plots import save_clouds_png

        metrics, ref = cloud_metrics(x.float().cpu(), cfg)
        result.update(metrics)
        write_json(run.root / "eval.json", result)
        save_clouds_png({f"data ({metrics['reference']})": ref, title: x}, run.root / "samples.png")
        return
    write_json(run.root / "eval.json", result)
    images = model.decode(x) if hasattr(model, "decode") else x  # a latent model's samples as images
    save_samples_png(images, run.root / "samples.png", labels=labels, title=title)


EVAL_UTTERANCES = 8  # held-out sentences of a speech teacher's final check


def _evaluate_speech(run: RunFolder, model, cfg: dict) -> None:
    """A speech teacher's final check: ``EVAL_UTTERANCES`` held-out sentences spoken with
    their real contexts (durations, pitch, energy; frames align) by an ``eval_nfe``-step
    Euler (DDIM) sampler: the mean absolute log-mel error over real frames (``mel_l1``)
    and that of the untrained guess "every frame the mean mel" (``mel_l1_mean_frame``), and
    ``samples.png`` (real above, sampled below)."""
    from ..data.registry import held_out
    from ..metrics.audio import mel_l1
    from ..plots import save_mels_png
    from ..tts import context_of, speak

    ref, _ = held_out(cfg["data"], EVAL_UTTERANCES, int(cfg["seed"]))
    utts = list(ref.utterances)
    ctx, _ = context_of(model, given=utts)
    nfe = int(cfg["eval_nfe"]) if cfg.get("eval_nfe") is not None else 64
    out = speak(model, ctx, nfe=nfe, sampler="euler", seed=int(cfg["seed"]) + 1, vocoder=False)
    real = [u.mel for u in utts]
    mean_frame = np.concatenate(real).mean(0, keepdims=True)
    result = {"sampler": "euler", "nfe": nfe, "utterances": len(utts),
              "mel_l1": float(np.mean([mel_l1(o["mel"], r) for o, r in zip(out, real)])),
              "mel_l1_mean_frame": float(np.mean([mel_l1(np.repeat(mean_frame, len(r), 0), r) for r in real]))}
    write_json(run.root / "eval.json", result)
    save_mels_png({"real": real, f"euler, {nfe} NFE": [o["mel"] for o in out]}, run.root / "samples.png")


def cloud_metrics(x: torch.Tensor, cfg: dict) -> tuple[dict, torch.Tensor]:
    """MMD-CD, COV-CD, 1-NNA-CD of clouds ``x`` against as many reference clouds of
    ``cfg['data']`` (none when ``x`` holds NaN/inf); returns (metrics, the reference)."""
    from ..data.registry import held_out
    from ..metrics.pointcloud import cloud_set_metrics

    seed = int(cfg["seed"])
    ref, source = held_out(cfg["data"], len(x), seed + 7919, cfg["n_data"], seed)
    out = {"reference": source, "reference_clouds": len(ref), "reference_seed": seed + 7919}
    if bool(torch.isfinite(x).all()) and len(x) >= 2:
        out.update(cloud_set_metrics(x, ref.x))
    return out, ref.x
