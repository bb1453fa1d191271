"""The one training loop: teachers here, students through the same loop (methods/).

A *task* supplies ``loss(batch, step) -> per-sample loss`` and the modules to train; the
loop owns everything else: accelerate (devices, processes, mixed precision), AdamW with
linear warm-up, gradient clipping, EMA, progress, logging, checkpoints and resume.

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
    """What a training job optimises: ``loss(step, generator, rank, world) -> [b] losses``
    on ``modules['student']`` (its parameters are trained, and EMA-averaged)."""

    student: nn.Module
    loss: Callable
    frozen: dict = field(default_factory=dict)


def fit(task: Task, run: RunFolder, cfg: dict, accelerator=None, progress: bool = True, on_end=None) -> EMA:
    """Train ``task.student`` for ``cfg['steps']`` steps into ``run`` (resuming if it holds a
    checkpoint). Returns the EMA whose ``.module`` is the averaged student."""
    from tqdm.auto import tqdm

    acc = accelerator or make_accelerator(cfg.get("device"), cfg.get("mixed_precision", "no"))
    student = task.student
    opt = torch.optim.AdamW(student.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    ema = EMA(student, float(cfg["ema_decay"]))
    start = 0
    extra = run.load({"net": student, "ema": ema}, {"opt": opt})
    if extra is not None:
        start = int(extra["step"])
    warm, base_lr = max(1, int(cfg["warmup"])), float(cfg["lr"])
    model, opt = acc.prepare(student, opt)
    ema.module.to(acc.device)
    for m in task.frozen.values():
        m.to(acc.device)
    steps = int(cfg["steps"])
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not (progress and acc.is_main_process),
               desc="train", dynamic_ncols=True, mininterval=1.0)
    running = None
    for step in bar:
        gen = step_generator(cfg["seed"], step)
        with acc.autocast():
            loss = task.loss(model, gen, acc.process_index, acc.num_processes, acc.device).mean()
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
        value = float(acc.reduce(loss.detach(), "mean"))
        running = value if running is None else 0.98 * running + 0.02 * value
        done = step + 1
        if acc.is_main_process:
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            if done % int(cfg["log_every"]) == 0 or done == steps:
                run.log(done, loss=running, lr=lr)
            if done % int(cfg["checkpoint_every"]) == 0 or done == steps:
                run.save(done, {"net": acc.unwrap_model(model), "ema": ema}, {"opt": opt},
                         keep=cfg.get("keep_checkpoints"))
        acc.wait_for_everyone()
    bar.close()
    return ema
