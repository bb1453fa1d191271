"""The stage runner: every distillation job is a list of stages, each one run folder.

A method module (:mod:`fewstep.methods`) holds the paper's idea and declares its stages in
``stages(job)``, as ordinary code, each stage's result feeding the next::

    def stages(job):
        prev = job.teacher_model(...)
        for r, N in enumerate(rounds):
            prev = job.stage(f"rounds/steps_{N:04d}", lambda st: Plan(task, describe), seed=...)
        return Top("rounds/steps_0001", describe=lambda: {...})

The runner owns everything around the idea: the accelerator, the top run folder and the
stage folders (:func:`~fewstep.train.runfolder.open_run`), skip-if-done on resume (a stage
whose folder holds ``model.json`` is loaded, not trained), the loop
(:func:`~fewstep.train.loop.fit`), writing the stage's student on the main process (its
EMA weights and the ``model.json`` the plan describes), the barrier, reloading the
finished stage (frozen) as the next stage's teacher, keeping a failed run that holds work
worth resuming (checkpoints, couplings) and the top folder's ``model.json``.

A stage named ``""`` is the top folder itself (one-stage methods: knowledge, consistency).
Another method's stages run inside a sub-folder with :meth:`Job.nested` (reflow's
one-step student is knowledge distillation of its last round), on the same accelerator.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ..io import save_checkpoint, write_json
from .loop import Critic, Task, fit, make_accelerator  # noqa: F401 (Critic, Task: what methods build)
from .options import LOOP_NAMES
from .runfolder import RunFolder, open_run


def loop_config(cfg: dict) -> dict:
    """The loop's options out of a method's config."""
    return {k: cfg[k] for k in LOOP_NAMES}


@dataclass
class Plan:
    """What one stage trains: the loop's :class:`~fewstep.train.loop.Task` and
    ``describe(module) -> model.json`` of the finished stage, given its EMA module (called on
    the main process only; it may write the stage's other files, e.g. ``round.json``)."""

    task: Task
    describe: Callable[[nn.Module], dict]


@dataclass
class Top:
    """The top folder's model: the weights of stage ``source`` and ``describe() -> model.json``
    (main process; it may write other files into the top folder, e.g. ``eval.json``)."""

    source: str
    describe: Callable[[], dict]


class Stage:
    """What a plan is built with: the stage's run folder, the process layout, a timer."""

    def __init__(self, job: "Job", folder: Path, run: RunFolder, config: dict):
        self.job, self.folder, self.run, self.config = job, Path(folder), run, config
        self._t0 = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self._t0

    @property
    def rank(self) -> int:
        return self.job.acc.process_index

    @property
    def world(self) -> int:
        return self.job.acc.num_processes

    @property
    def main(self) -> bool:
        return self.job.acc.is_main_process

    @property
    def progress(self) -> bool:
        return self.job.progress and self.main

    def barrier(self) -> None:
        self.job.acc.wait_for_everyone()

    def commit(self) -> None:
        """Keep the stage folder on failure from now on (e.g. couplings written)."""
        self.run.commit()


class Job:
    """One job: its config, accelerator and top run folder; runs stages into it."""

    def __init__(self, cfg: dict, acc, top: RunFolder, progress: bool = True):
        self.cfg, self.acc, self.top, self.progress = cfg, acc, top, progress
        self.root = Path(top.root)

    @property
    def device(self):
        return self.acc.device

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def with_config(self, cfg: dict) -> "Job":
        """This job (accelerator, top folder) seen with another method's config: a method
        composed of another's stages runs them on its own folders (PSF: reflow's)."""
        return Job(cfg, self.acc, self.top, self.progress)

    def load(self, path, frozen: bool = True):
        """A finished run folder (or spec) as a Model on this job's device, frozen for use as a teacher."""
        from ..model import AUX_ROLES, GENERATOR_ROLE, load, load_auxiliary, load_generator

        role = role_of(path)
        if role in AUX_ROLES:  # a net trained beside the teacher (covariance head, discriminator)
            return load_auxiliary(str(path), role, device=str(self.device))
        if role == GENERATOR_ROLE:  # a score-distilled generator (points, image, field)
            return load_generator(str(path), device=str(self.device))
        model = load(str(path), device=str(self.device))
        if frozen and isinstance(model.denoiser, nn.Module):
            model.denoiser.eval().requires_grad_(False)
        return model

    def stage(self, name: str, plan: Callable[[Stage], Plan], **config):
        """Run stage ``name`` (a folder under the top folder; ``""`` is the top folder) unless
        it is finished, then return its model. ``config`` is recorded in the stage's
        ``config.json`` on top of the loop's options (e.g. its own ``seed`` or ``steps``) and
        given to the loop."""
        folder = self.root / name if name else self.root
        if (folder / "model.json").is_file():
            return self.load(folder)
        scfg = {**loop_config(self.cfg), **config}
        if name:
            with open_run(self.acc, folder, scfg, (folder / "config.json").is_file()) as rf:
                self._train(Stage(self, folder, rf, scfg), plan)
        else:
            self._train(Stage(self, folder, self.top, scfg), plan)
        return self.load(folder)

    def _train(self, st: Stage, plan: Callable[[Stage], Plan]) -> None:
        p = plan(st)
        ema = fit(p.task, st.run, st.config, accelerator=self.acc, progress=self.progress)
        if self.main:
            meta = p.describe(ema.module)
            save_checkpoint(st.folder, ema.module.state_dict(), meta, name="model")
        self.acc.wait_for_everyone()

    def nested(self, module, cfg: dict, name: str):
        """Run another method's stages (``module.stages``) with config ``cfg`` into the
        sub-folder ``name`` on this job's accelerator; return its model."""
        folder = self.root / name
        if (folder / "model.json").is_file():
            return self.load(folder)
        with open_run(self.acc, folder, cfg, (folder / "config.json").is_file()) as sub:
            _run_stages(module, Job(cfg, self.acc, sub, self.progress))
        return self.load(folder)

    def publish(self, top: Top) -> None:
        """The top folder's model.*: stage ``top.source``'s weights and ``top.describe()``."""
        if self.main:
            meta = top.describe()
            src = self.root / top.source / "model.safetensors"
            tmp = self.root / ".model.safetensors.tmp"
            shutil.copyfile(src, tmp)
            tmp.replace(self.root / "model.safetensors")
            write_json(self.root / "model.json", meta)
        self.acc.wait_for_everyone()


def role_of(path) -> Optional[str]:
    """The ``"role"`` of a finished run folder's model.json (None for a spec or a sampler model)."""
    from ..errors import UserError
    from ..io import read_json

    f = Path(str(path)) / "model.json"
    try:
        meta = read_json(f) if f.is_file() else {}
    except (OSError, UserError):
        return None
    return meta.get("role") if isinstance(meta, dict) else None


def worth_resuming(root: Path) -> bool:
    """A failed run keeps its folder when any stage holds checkpoints or couplings."""
    return any(root.rglob("checkpoints")) or any(root.rglob("pairs/chunk_*.json"))


def _run_stages(module, job: Job) -> None:
    try:
        top = module.stages(job)
        if top is not None:
            job.publish(top)
    except BaseException:
        if worth_resuming(job.root):
            job.top.commit()
        raise


def run_job(module, cfg: dict, out: str, resume: bool = False, progress: bool = True) -> str:
    """``fewstep distill``: run ``module.stages`` as a job into the run folder ``out``."""
    from .lock import locked_run

    acc = make_accelerator(cfg["device"], cfg["mixed_precision"])
    with locked_run(acc, out, cfg, resume) as top:  # one writer per run folder (main process)
        _run_stages(module, Job(cfg, acc, top, progress))
    return str(top.root)
