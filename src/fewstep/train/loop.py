"""The one training loop: teachers here, students through the same loop (methods/).

A *task* (:class:`Task`) supplies ``draw(generator, step) -> global batch``, ``loss(model,
batch) -> per-sample loss`` and the modules to train; the loop owns everything else:
accelerate (devices, processes, mixed precision), the per-process slice of each batch,
AdamW with linear warm-up, gradient clipping, EMA, progress, logging, checkpoints, resume.

Determinism: the global batch of step k is drawn from a generator seeded by (seed, k),
and each process takes its slice of it, so a resumed run, or N processes with the same
global batch, see exactly the samples an uninterrupted single process sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UserError
from .ema import EMA
from .runfolder import RunFolder


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """The generator that draws everything random in global step ``step``."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(step) * 7919) % (2**63 - 1))


def make_accelerator(device: Optional[str] = None, mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` for ``device`` ('cpu', 'cuda', 'cuda:1', None = auto)."""
    from accelerate import Accelerator

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if device not in (None, "cpu") and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device not in (None, "cpu") and not str(device).startswith("cuda"):
        raise UserError(f"--device {device}: use cpu, cuda or cuda:N")
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision if not cpu else "no")


@dataclass
class Task:
    """What a training job optimises.

    ``draw(generator, step) -> batch`` returns the *global* batch of step ``step`` (a dict
    whose tensors all have the global batch size as their first dimension: data, noise,
    labels, levels, ...), drawn only from ``generator``; the loop gives each process its
    slice (:func:`slice_batch`) on its device. ``loss(model, batch) -> [b]`` is the
    per-sample loss of the student ``model`` (the accelerate-wrapped ``student``, whose
    parameters are trained and EMA-averaged) on that slice. ``frozen`` modules (teacher,
    target) are moved to the device and never trained; ``extra`` modules are saved in
    (and restored from) the checkpoints beside the student (e.g. a consistency target);
    ``after_step(model, step)`` runs after each optimiser step (e.g. a target's EMA)."""

    student: nn.Module
    draw: Callable
    loss: Callable
    frozen: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    after_step: Optional[Callable] = None


def batch_slice(B: int, rank: int, world: int) -> slice:
    """This process's share of a global batch of B (the loop's determinism contract)."""
    if B % world:
        raise UserError(f"--batch-size {B} is not divisible by the {world} processes")
    return slice(rank * B // world, (rank + 1) * B // world)


def slice_batch(batch: dict, B: int, rank: int, world: int, device) -> dict:
    """Process ``rank``'s share of a global batch, on ``device``: every tensor is cut along
    its first dimension (which must be B); other values pass unchanged."""
    sl = batch_slice(B, rank, world)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            if v.shape[:1] != (B,):
                raise ValueError(f"batch entry '{k}' has shape {list(v.shape)}, not the global batch {B} first")
            v = v[sl].to(device)
        out[k] = v
    return out


def fit(task: Task, run: RunFolder, cfg: dict, accelerator=None, progress: bool = True) -> EMA:
    """Train ``task.student`` for ``cfg['steps']`` steps into ``run`` (resuming if it holds a
    checkpoint). Returns the EMA whose ``.module`` is the averaged student."""
    from tqdm.auto import tqdm

    acc = accelerator or make_accelerator(cfg.get("device"), cfg.get("mixed_precision", "no"))
    student = task.student
    opt = torch.optim.AdamW(student.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    ema = EMA(student, float(cfg["ema_decay"]))
    start = 0
    extra = run.load({"net": student, "ema": ema, **task.extra}, {"opt": opt})
    if extra is not None:
        start = int(extra["step"])
    warm, base_lr = max(1, int(cfg["warmup"])), float(cfg["lr"])
    model, opt = acc.prepare(student, opt)
    ema.module.to(acc.device)
    for m in list(task.frozen.values()) + list(task.extra.values()):
        m.to(acc.device)
    steps, B = int(cfg["steps"]), int(cfg["batch_size"])
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not (progress and acc.is_main_process),
               desc="train", dynamic_ncols=True, mininterval=1.0)
    running = None
    for step in bar:
        batch = slice_batch(task.draw(step_generator(cfg["seed"], step), step), B, acc.process_index,
                            acc.num_processes, acc.device)
        with acc.autocast():
            loss = task.loss(model, batch).mean()
        if not torch.isfinite(loss):
            raise UserError(f"training diverged at step {step}: loss is {float(loss.detach())}; lower --lr "
                            f"(now {cfg['lr']}) or --grad-clip, then start again or --resume from the last checkpoint")
        lr = base_lr * min(1.0, (step + 1) / warm)  # linear warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.get("grad_clip"):
            acc.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
        opt.step()
        ema.update()
        if task.after_step is not None:
            task.after_step(model, step)
        value = float(acc.reduce(loss.detach(), "mean"))
        running = value if running is None else 0.98 * running + 0.02 * value
        done = step + 1
        if acc.is_main_process:
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            if done % int(cfg["log_every"]) == 0 or done == steps:
                run.log(done, loss=running, lr=lr)
            if done % int(cfg["checkpoint_every"]) == 0 or done == steps:
                run.save(done, {"net": acc.unwrap_model(model), "ema": ema, **task.extra}, {"opt": opt},
                         keep=cfg.get("keep_checkpoints"))
        acc.wait_for_everyone()
    bar.close()
    return ema
