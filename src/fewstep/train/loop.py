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

from ..checks import resolve_device
from ..errors import UserError
from .ema import EMA
from .checkpoint import checkpoint_steps, drop_from, prune
from .runfolder import METRICS, RunFolder


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """The generator that draws everything random in global step ``step``."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(step) * 7919) % (2**63 - 1))


def make_accelerator(device: Optional[str] = None, mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` for ``device`` ('cpu', 'cuda', 'cuda:1', None = auto)."""
    from accelerate import Accelerator

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if device not in (None, "cpu") and not str(device).startswith("cuda"):
        raise UserError(f"--device {device}: use cpu, cuda or cuda:N")
    resolve_device(device, "--device")  # one line naming the available devices (fewstep.checks)
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
    ``after_step(model, step)`` runs after each optimiser step (e.g. a target's EMA); a
    ``critic`` (:class:`Critic`) is a second network trained alternately with the student."""

    student: nn.Module
    draw: Callable
    loss: Callable
    frozen: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    after_step: Optional[Callable] = None
    critic: Optional["Critic"] = None
    betas: tuple = (0.9, 0.999)  # the student's AdamW betas (SiD: beta1 = 0)


@dataclass
class Critic:
    """A second network trained beside the student, alternately with it (the "fake" score of
    DMD2 and SiD, a GAN discriminator head): ``loss(critic_model, student_model, batch) -> [b]``
    is its per-sample loss on this process's slice of the step's batch (the student's output
    inside it is the method's to detach), minimised by its own AdamW (``lr``, ``betas``; the
    run's ``--lr`` / ``--weight-decay`` when None) with the run's warm-up and clipping. The
    critic is updated every step; the student on steps ``student_from + k * student_every``
    only (two time-scale updates: DMD2's update ratio; a critic-only start), ``critic_first``
    says which goes first within a step. While the student's loss runs, the critic's weights
    take no gradient (its inputs still do: SiD differentiates through it); the student's loss
    reaches it through the method's own reference to ``module``. The critic and its optimizer
    are saved in the same checkpoints, so a run resumes bit for bit."""

    module: nn.Module
    loss: Callable
    lr: Optional[float] = None
    betas: tuple = (0.9, 0.999)
    weight_decay: Optional[float] = None
    student_every: int = 1
    student_from: int = 0
    critic_first: bool = True

    def student_turn(self, step: int) -> bool:
        return step >= self.student_from and (step - self.student_from) % self.student_every == 0


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
    student, critic = task.student, task.critic
    opt = torch.optim.AdamW(student.parameters(), lr=float(cfg["lr"]), betas=tuple(task.betas),
                            weight_decay=float(cfg["weight_decay"]))
    ema = EMA(student, float(cfg["ema_decay"]))
    modules, opts = {"net": student, "ema": ema, **task.extra}, {"opt": opt}
    copt = None
    if critic is not None:
        copt = torch.optim.AdamW(critic.module.parameters(), lr=float(critic.lr or cfg["lr"]), betas=critic.betas,
                                 weight_decay=float(cfg["weight_decay"] if critic.weight_decay is None
                                                    else critic.weight_decay))
        modules["critic"], opts["critic_opt"] = critic.module, copt
    start, running, running_critic = 0, None, None
    extra = run.load(modules, opts)
    if extra is not None:
        start = int(extra["step"])
        running = extra.get("running_loss")  # the logged running loss goes on as if never stopped
        running_critic = extra.get("running_critic_loss")
    elif acc.is_main_process and (run.root / METRICS).is_file():
        run._truncate_metrics(0)  # resumed without a checkpoint: every row is logged again
    if start > int(cfg["steps"]):
        raise UserError(f"--steps {cfg['steps']} is below step {start} of the latest checkpoint in {run.root}; "
                        f"give --steps {start} or more")
    keep = cfg.get("keep_checkpoints")
    prune_due = extra is not None  # older checkpoints go once a step from the newest gave a finite loss
    warm, base_lr = max(1, int(cfg["warmup"])), float(cfg["lr"])
    if critic is None:
        model, opt = acc.prepare(student, opt)
        cmodel = None
    else:
        model, opt, cmodel, copt = acc.prepare(student, opt, critic.module, copt)
        critic_lr = float(critic.lr or cfg["lr"])
    ema.module.to(acc.device)
    for m in list(task.frozen.values()) + list(task.extra.values()):
        m.to(acc.device)
    steps, B = int(cfg["steps"]), int(cfg["batch_size"])
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not (progress and acc.is_main_process),
               desc="train", dynamic_ncols=True, mininterval=1.0)

    def update(o, params, value, lr, step):
        """One optimiser step of ``value`` (a finite scalar) on ``o`` at ``lr`` (after warm-up)."""
        for group in o.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm)  # linear warm-up
        o.zero_grad(set_to_none=True)
        acc.backward(value)
        if cfg.get("grad_clip"):
            acc.clip_grad_norm_(params, float(cfg["grad_clip"]))
        o.step()

    def critic_step(step):
        with acc.autocast():
            closs = task.critic.loss(cmodel, model, batch).mean()
        if not torch.isfinite(closs):
            raise diverged(run, acc, step + 1, step, f"the critic's loss is {float(closs.detach())}", cfg)
        update(copt, cmodel.parameters(), closs, critic_lr, step)
        return float(acc.reduce(closs.detach(), "mean"))

    for step in bar:
        batch = slice_batch(task.draw(step_generator(cfg["seed"], step), step), B, acc.process_index,
                            acc.num_processes, acc.device)
        cvalue = None
        if critic is not None and critic.critic_first:
            cvalue = critic_step(step)
        turn = critic is None or critic.student_turn(step)
        value = None
        if turn:
            if critic is not None:
                critic.module.requires_grad_(False)  # the student's loss may pass through the critic, not train it
            with acc.autocast():
                loss = task.loss(model, batch).mean()
            if not torch.isfinite(loss):  # the weights after `step` steps gave it: checkpoint `step` is not good
                raise diverged(run, acc, step + 1, step, f"loss is {float(loss.detach())}", cfg)
            update(opt, model.parameters(), loss, base_lr, step)
            if critic is not None:
                critic.module.requires_grad_(True)
            ema.update()
            if task.after_step is not None:
                task.after_step(model, step)
            value = float(acc.reduce(loss.detach(), "mean"))
        if critic is not None and not critic.critic_first:
            cvalue = critic_step(step)
        if prune_due and acc.is_main_process:
            prune(run.root, keep)
        prune_due = False
        lr = base_lr * min(1.0, (step + 1) / warm)
        if value is not None:
            running = value if running is None else 0.98 * running + 0.02 * value
        if cvalue is not None:
            running_critic = cvalue if running_critic is None else 0.98 * running_critic + 0.02 * cvalue
        done = step + 1
        if acc.is_main_process:
            post = {"loss": f"{running:.4f}"} if running is not None else {}
            if running_critic is not None:
                post["critic"] = f"{running_critic:.4f}"
            bar.set_postfix(post, refresh=False)
            if done % int(cfg["log_every"]) == 0 or done == steps:
                row = {"loss": running} if running is not None else {}
                if running_critic is not None:
                    row["critic_loss"] = running_critic
                run.log(done, **row, lr=lr)
            if done % int(cfg["checkpoint_every"]) == 0 or done == steps:
                parts = {**modules, "net": acc.unwrap_model(model)}
                if critic is not None:
                    parts["critic"] = acc.unwrap_model(cmodel)
                if not finite_state(parts, opt) or (copt is not None and not finite_state({}, copt)):
                    raise diverged(run, acc, done, done, "the weights hold NaN or inf", cfg)
                # pruned only after the next step's loss is finite (above): a checkpoint whose weights
                # then give NaN is dropped, and the good one before it must still be there
                run.save(done, parts, {"opt": opt, **({"critic_opt": copt} if copt is not None else {})},
                         extra={"running_loss": running, "running_critic_loss": running_critic}, keep=None)
                prune_due = True
        acc.wait_for_everyone()
    bar.close()
    if acc.is_main_process:
        prune(run.root, keep)
    return ema


def finite_state(modules: dict, opt) -> bool:
    """True when every floating tensor of ``modules`` (EMA shadows included) and of the
    optimizer's state is finite: a checkpoint is only written of a state that can go on."""
    tensors = []
    for m in modules.values():
        tensors += list((m.module if isinstance(m, EMA) else m).state_dict().values())
    for state in getattr(opt, "optimizer", opt).state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack([f.to("cpu") for f in flags]).all()) if flags else True


def diverged(run: RunFolder, acc, at: int, bad_from: int, why: str, cfg: dict) -> UserError:
    """The one line for a diverging run, after dropping the checkpoints from step ``bad_from`` on
    (their weights gave a NaN or inf loss): the newest one kept is the last good one."""
    if acc.is_main_process:
        good = drop_from(run.root, bad_from)
    else:
        good = max([s for s in checkpoint_steps(run.root) if s < bad_from], default=None)
    lower = f"lower --lr (now {cfg['lr']}) or --grad-clip (now {cfg.get('grad_clip')})"
    if good is not None:
        then = (f"the last good checkpoint, step {good}, is kept in {run.root}; {lower} and continue from it: "
                "the same command plus --resume and the lower --lr")
    elif run.committed:
        then = (f"no checkpoint before it was good; {lower}, then the same command plus --resume and the lower "
                f"--lr starts {run.root} again from step 0")
    else:
        then = f"nothing was kept; {lower} and start again"
    return UserError(f"training diverged at step {at} of {cfg['steps']}: {why}; {then}")
