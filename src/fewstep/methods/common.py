"""What every distillation method shares (one place for each): roles, data, students.

Roles (DESIGN.md, lesson 6): the ``teacher`` is a frozen :class:`fewstep.model.Model` (a run
folder or an exact ``gmm:FILE.npz``); the ``student`` is the network being trained (through
the stage runner, :mod:`fewstep.train.job`); a ``target`` (EMA of the student, e.g. for
consistency models) is kept in the same checkpoints as a task's ``extra`` module.

The teacher's ODE steps go through the registered samplers (:func:`solve_rows`): a batch
whose samples sit at different levels is grouped by level, each group one sampler call.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..train.options import Option, check_batch_memory, loop_defaults, power_of_two

# progressive distillation's options and student parametrizations: the method's own, and stage two
# of guided distillation (its rounds), so they are declared once
STUDENT_PREDICTIONS = ("x0", "v", "edm")
PD_OPTIONS = (
    Option("start_steps", int, 64, "DDIM steps of the first teacher, a power of two (default 64)", test=power_of_two,
           must="a power of two (1, 2, 4, ...)"),
    Option("end_steps", int, 1, "steps of the last student, a power of two (default 1)", test=power_of_two,
           must="a power of two (1, 2, 4, ...)"),
    Option("process", (str, dict), "vp_cosine", "process whose uniform time grid gives the levels: vp_cosine "
           "(default), vp, edm, flow, ...", must="a process name (vp_cosine, vp, edm, flow, ...) or a process config "
           "object"),
    Option("prediction", str, None, "student parametrization: x0, v or edm (default: the teacher's if one of these, "
           "else v)", choices=STUDENT_PREDICTIONS, none="the teacher's if x0, v or edm, else v", example="v"),
    Option("weighting", str, "truncated_snr", "loss weight on the x0 error: truncated_snr (max(SNR,1), default), "
           "v (SNR+1), x0, snr"),
    Option("level_groups", int, 8, "distinct levels per batch (teacher calls are grouped by level; >= batch: one "
           "per sample)", low=1),
)


# options every method takes (the teacher, the student's net, the data, conditioning; and the
# loop's, declared once in fewstep.train.options and shared with fewstep train); methods add theirs
# a method that trains on --data: how many samples of it (one declaration for every such method)
N_DATA = Option("n_data", int, None, "training samples drawn from --data (default: the data set's own size)", low=1,
                none="the data set's own size", example=2000)

# the data-free generators (DMD2, SiD): a generator and an online fake score, both shaped like the teacher
FAKE_SCORE_OPTIONS = (
    Option("fake_lr", float, None, "learning rate of the fake score (default: --lr)", low=0.0, above=True,
           none="--lr", example=1e-3),
    Option("fake_warmup", int, None, "steps in which only the fake score trains, before the generator's first "
           "update", low=0, none="0 when the fake score starts from the teacher's weights, else steps // 10",
           example=200),
    Option("init", str, "auto", "generator and fake-score start: auto, teacher (its weights) or random",
           choices=("auto", "teacher", "random")),
)

# a teacher's couplings made once as resumable pair chunks (fewstep.methods.pairs): shortcut and flow matching
COUPLING_PAIR_OPTIONS = (
    Option("pairs", int, 20000, "teacher couplings made once (default 20000)", low=1),
    Option("pair_batch", int, 1000, "couplings made per batch, one resumable chunk each (default 1000)", low=1),
    Option("pair_sampler", str, None, "the teacher's sampler for its couplings (default: its own)",
           none="the teacher's own", example="heun"),
    Option("pair_nfe", int, 64, "teacher evaluations per coupling (default 64)", low=1),
    Option("pair_grid", str, None, "sigma grid of the teacher's sampler (default karras; time-trailing for a flow "
           "teacher)", none="karras; time-trailing for a flow teacher", example="karras"),
)

COMMON_OPTIONS = (
    Option("teacher", str, None, "teacher: a run folder or gmm:FILE.npz (an exact Gaussian mixture)",
           none="none (methods that train from data)"),
    Option("data", str, None, "training data where the method needs it: a dataset or gmm:FILE.npz",
           none="the teacher's"),
    Option("net", (dict, str), None, "student network as JSON or a .json file", none="the teacher's; an MLP for gmm",
           must="a JSON net config object (or its text, or a .json file)"),
    Option("guidance", float, None, "conditional teachers: classifier-free guidance w of the teacher's targets, "
           "D(null) + w (D(c) - D(null)); 1 = plain conditional (default)", low=0.0, none="1, plain conditional",
           example=2.0),
    Option("label_dropout", float, 0.0, "conditional teachers: probability of a null label in a batch, so the "
           "student also learns the unconditional model and takes --guidance when sampled (default 0)",
           low=0.0, high=1.0),
)
COMMON_DEFAULTS = {
    **{o.name: o.default for o in COMMON_OPTIONS},
    **loop_defaults(),       # steps (per round for progressive), batch_size, lr, ...
}
COMMON_HELP = {o.name: o.help for o in COMMON_OPTIONS if o.name in ("guidance", "label_dropout")}

# the kinds of data every method takes unless its module says otherwise (KINDS)
KINDS = ("points", "image", "clouds")


# ----------------------------------------------------------------------------- teacher
def load_teacher(spec: Optional[str], device=None, required: bool = True, cfg: Optional[dict] = None,
                 kinds: tuple = KINDS, method: str = "this method"):
    """The frozen teacher Model (``fewstep.load``), or None when not given and not required.

    Refused in one line: a few-step student (trained only at its own levels; a reflow round or
    a flow-matching model, a flow over all levels, is a teacher), a teacher whose data is not of the method's
    ``kinds``, and (with the run's ``cfg``) a ``--batch-size`` whose batch alone exceeds
    this machine's memory."""
    if not spec:
        if required:
            raise UserError("--teacher is required: give a run folder or gmm:FILE.npz")
        return None
    from ..model import load

    teacher = load(spec, device=device)
    meta = teacher.meta
    if meta.get("role") == "student" and meta.get("w_input"):
        raise UserError(f"teacher {spec} is a guided student already (w is its input); give the guided teacher it "
                        f"was distilled from ({meta.get('teacher')})")
    if meta.get("role") == "student" and not ((meta.get("method") == "reflow" and "round" in meta)
                                               or meta.get("method") == "flow_matching"):
        raise UserError(f"teacher {spec} is a {meta.get('method')} student (a few-step model, trained only at its own "
                        f"levels), not a teacher; give the teacher it was distilled from ({meta.get('teacher')}) or "
                        f"a reflow round")
    if teacher.kind not in kinds:
        others = {"clouds": "fewstep distill pointcloud, knowledge or reflow"}.get(teacher.kind, "another method")
        raise UserError(f"teacher {spec} models {teacher.kind}, but {method} distillation takes "
                        f"{' or '.join(kinds)} teachers; use {others}")
    if cfg is not None:
        check_batch_memory("--batch-size", int(cfg["batch_size"]), teacher.shape)
    if isinstance(teacher.denoiser, nn.Module):
        teacher.denoiser.eval().requires_grad_(False)
    return teacher


def is_exact(teacher) -> bool:
    """True for an exact Gaussian-mixture teacher (no network, no weights)."""
    from ..data.gmm import GaussianMixture

    return isinstance(getattr(teacher, "denoiser", None), GaussianMixture)


# ------------------------------------------------------------------------ conditioning
@dataclass
class Conditioning:
    """Class labels through a method (unconditional when ``num_classes`` is 0).

    Labels are drawn with ``prior`` (the exact mixture's class weights, else uniform), a
    share ``label_dropout`` of them replaced by the null label -1; the teacher's targets
    are those of the guided teacher D_w = D(null) + w (D(c) - D(null)) (:meth:`teacher`)."""

    num_classes: int = 0
    guidance: float = 1.0
    label_dropout: float = 0.0
    prior: Optional[Tensor] = None
    context: bool = False  # labels are each sample's context (speech: its phonemes), drawn with the data

    @property
    def on(self) -> bool:
        return self.num_classes > 0 or self.context

    def draw(self, n: int, gen: torch.Generator) -> Optional[Tensor]:
        """n labels (None when unconditional; a context comes with its data, never drawn alone)."""
        if self.context:
            raise UserError("a speech teacher's conditioning (its utterances' phonemes) comes with its data; this "
                            "method draws labels without data and cannot distil it")
        if not self.on:
            return None
        p = self.prior if self.prior is not None else torch.ones(self.num_classes, dtype=torch.float64)
        labels = torch.multinomial(p, n, replacement=True, generator=gen)
        return self.drop(labels, gen)

    def drop(self, labels: Optional[Tensor], gen: torch.Generator) -> Optional[Tensor]:
        """``labels`` with a share ``label_dropout`` replaced by -1 (no draw when 0)."""
        if labels is None or self.label_dropout <= 0:
            return labels
        if self.context:  # a dropped context is a row of -1: the null prompt of a text net
            drop = torch.rand(len(labels), generator=gen) < self.label_dropout
            from ..nets.unet import drop_to_null

            return drop_to_null(labels, drop)
        labels = labels.clone()
        labels[torch.rand(len(labels), generator=gen) < self.label_dropout] = -1
        return labels

    def teacher(self, D):
        """The teacher's denoiser as the targets see it: guided when w != 1."""
        if not self.on or self.guidance == 1.0:
            return D
        from ..denoiser import CFGDenoiser

        return CFGDenoiser(D, self.guidance)

    def meta(self) -> dict:
        text = self.context and (self.guidance != 1.0 or self.label_dropout > 0)
        return {"guidance": self.guidance, "label_dropout": self.label_dropout} if self.num_classes or text else {}


def conditioning(cfg: dict, teacher, data=None) -> Conditioning:
    """The run's :class:`Conditioning`: the teacher's classes (without a teacher: the data's,
    when the student ``--net`` asks for them with ``num_classes``), ``--guidance`` and
    ``--label-dropout``, checked (a guidance or dropout without classes is refused)."""
    if teacher is not None and teacher.meta.get("text_encoder"):  # text contexts: CFG through the null prompt
        w, p = cfg.get("guidance"), cfg.get("label_dropout") or 0.0
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0):
            raise UserError(f"--guidance must be a finite number >= 0, got {w!r}")
        if not 0.0 <= float(p) < 1.0:
            raise UserError(f"--label-dropout must lie in [0, 1), got {p}")
        return Conditioning(0, 1.0 if w is None else float(w), float(p), context=True)
    if teacher is not None and getattr(teacher, "kind", None) == "speech":
        for key in ("guidance", "label_dropout"):
            if cfg.get(key) not in (None, 0, 0.0) and not (key == "guidance" and cfg.get(key) == 1):
                raise UserError(f"--{key.replace('_', '-')} {cfg[key]}: the teacher {teacher.name} is a speech model, "
                                f"conditioned on its text, not on classes; leave it out")
        return Conditioning(context=True)
    if teacher is not None:
        C = int(getattr(teacher, "num_classes", 0) or 0)
    else:  # no teacher (training from data): conditional when the student net asks for the data's classes
        C = int(net_config(cfg.get("net"), None, data.shape, data.kind).get("num_classes", 0) or 0) if data else 0
        if C and C != int(getattr(data, "num_classes", 0) or 0):
            raise UserError(f"--net has num_classes {C}, but the data {data.name} has "
                            f"{int(getattr(data, 'num_classes', 0) or 0)} classes")
    w, p = cfg.get("guidance"), cfg.get("label_dropout") or 0.0
    for key, v in (("guidance", w), ("label_dropout", p)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise UserError(f"--{key.replace('_', '-')} must be a finite number, got {v!r}")
    if not C:
        what = "the teacher is unconditional" if teacher is not None else \
            "this run is unconditional (no teacher; --net without num_classes)"
        if w is not None and float(w) != 1.0:
            raise UserError(f"--guidance {w}: {what}; guidance needs a class-conditional teacher")
        if float(p) != 0.0:
            raise UserError(f"--label-dropout {p}: {what}; leave it out")
        return Conditioning()
    if not 0.0 <= float(p) < 1.0:
        raise UserError(f"--label-dropout must lie in [0, 1), got {p}")
    if w is not None and float(w) < 0:
        raise UserError(f"--guidance must be 0 (unconditional) or more, got {w}")
    needs_null = (w is not None and float(w) != 1.0) or float(p) > 0
    if (needs_null and teacher is not None and teacher.meta.get("role") == "diffusers-teacher"
            and teacher.meta.get("null_class") is None):
        from fewstep.interop.diffusers_teacher import NO_NULL

        raise UserError(f"{teacher.name} {NO_NULL}")
    prior = None
    if teacher is not None and is_exact(teacher):
        prior = teacher.denoiser.class_weights
    return Conditioning(C, 1.0 if w is None else float(w), float(p), prior)


def check_student_net(net, cond: Conditioning, where: str = "--net") -> None:
    """A conditional run needs a student net with the teacher's classes (it would ignore labels);
    a speech run one that takes the context."""
    if cond.context:
        if not (getattr(net, "takes_context", False) or getattr(net, "config", {}).get("context_dim")):
            raise UserError(f"{where}: the student net does not take the speech context (phonemes, durations); "
                            f"give a prodiff net")
        return
    have = int(getattr(net, "config", {}).get("num_classes", 0) or 0) if hasattr(net, "config") else None
    if have is not None and have != cond.num_classes:
        raise UserError(f"{where}: the student net has num_classes {have}, the teacher {cond.num_classes}; "
                        f"give a net config with num_classes {cond.num_classes}")


# -------------------------------------------------------------------------------- data
@dataclass
class DataSource:
    """Training data x0 for the methods that need it: ``draw(n, generator) -> [n, *shape]``."""

    draw: Callable[[int, torch.Generator], Tensor]
    shape: tuple
    kind: str
    name: str
    sigma_data: float
    num_classes: int = 0
    draw_labelled: Optional[Callable] = None  # (n, generator) -> (x0, labels); labels None when unconditional
    mask_of: Optional[Callable] = None  # labels -> the mask [n, N] of real positions of padded samples (speech)

    def labelled(self, n: int, gen: torch.Generator):
        """(x0, labels) of n samples; labels None for unlabelled data (the draws of ``draw``)."""
        if self.draw_labelled is None:
            return self.draw(n, gen), None
        return self.draw_labelled(n, gen)


def training_data(cfg: dict, teacher) -> "DataSource":
    """``--data`` (else the teacher's) for a method that trains on data, with ``--n-data``: its
    samples must have the teacher's shape; without a teacher the batch is checked against
    this machine's memory (a teacher's is checked when it loads)."""
    data = data_source(cfg["data"], teacher, int(cfg["seed"]), cfg["n_data"])
    if teacher is not None and tuple(teacher.shape) != tuple(data.shape):
        raise UserError(f"--data {data.name} has samples of shape {list(data.shape)}, the teacher "
                        f"{list(teacher.shape)}")
    if teacher is None:
        check_batch_memory("--batch-size", int(cfg["batch_size"]), data.shape)
    return data


def gmm_sigma_data(gmm) -> float:
    """RMS per-coordinate standard deviation of a mixture: sqrt(E|x - E x|^2 / d), exact."""
    w, mu = gmm.weights, gmm.means
    mean = (w[:, None] * mu).sum(0)
    second = (w * ((mu**2).sum(1) + gmm.covs.diagonal(dim1=1, dim2=2).sum(1))).sum()
    return float(((second - (mean**2).sum()) / gmm.dim).sqrt())


def data_spec(spec: Optional[str], teacher=None) -> Optional[str]:
    """``spec``, else the data set a run-folder teacher names (a dataset spec or gmm:FILE.npz,
    e.g. a reflow round trained on a mixture); None when neither says."""
    if spec is None and teacher is not None and not is_exact(teacher):
        return teacher.meta.get("data", {}).get("name") or None
    return spec


def check_text_encoder(ds, teacher, spec) -> None:
    """Captions encoded by another text encoder than the teacher's are refused: its cross-attention
    would read states of another model (or another length) as if they were its own."""
    want = (teacher.meta or {}).get("text_encoder") if teacher is not None else None
    have = getattr(ds, "text_encoder", None)
    if not want and not have:
        return
    if want and not have:
        raise UserError(f"--data {spec} has no captions, but the teacher {teacher.name} is text-conditional; give "
                        f"captioned data (captions:SOURCE or latents:AE,captions:SOURCE)")
    if have and not want:
        if teacher is not None:
            raise UserError(f"--data {spec} holds captions, but the teacher {teacher.name} is not text-conditional; "
                            f"give its own data")
        return
    diff = [k for k in set(want) | set(have) if want.get(k) is not None and have.get(k) is not None
            and want.get(k) != have.get(k)]
    if diff:
        raise UserError(f"--data {spec} encodes its captions with {have}, the teacher {teacher.name} with {want} "
                        f"(they differ in {', '.join(sorted(diff))}); add encoder=/length= to the captions spec to "
                        f"match the teacher")


def data_source(spec: Optional[str], teacher=None, seed: int = 0, n: Optional[int] = None) -> DataSource:
    """``spec`` (a dataset spec or gmm:FILE.npz) or, when None, the teacher's own data: its
    mixture for an exact teacher, its training set (by name, :func:`data_spec`) for a run folder:
    the very subset it trained on where it was given ``--n-data`` (its ``n`` and ``seed``), so a
    student never trains on the samples held out from its teacher."""
    from ..data.gmm import GaussianMixture

    if spec is None and n is None and teacher is not None and not is_exact(teacher):
        told = teacher.meta.get("data", {})  # the subset the teacher was trained on (its --n-data, --seed)
        if isinstance(told.get("n"), int) and told["n"] >= 1:
            n, seed = int(told["n"]), int(told.get("seed", seed))
    spec = data_spec(spec, teacher)
    if spec is None and teacher is not None and is_exact(teacher):
        gmm, name = teacher.denoiser, teacher.name
    elif spec is not None and str(spec).startswith("gmm:"):
        gmm, name = GaussianMixture.load(str(spec)[4:]), str(spec)
    else:
        gmm = None
    if gmm is not None:
        labelled = None
        if gmm.num_classes:
            def labelled(n, g):  # the same draws as gmm.sample: component k, then x0 ~ N_k; class = labels[k]
                x, k = gmm.sample(n, generator=g, return_labels=True)
                return x.float(), gmm.labels[k]
        return DataSource(lambda n, g: gmm.sample(n, generator=g).float(), (gmm.dim,), "points", name,
                          gmm_sigma_data(gmm), gmm.num_classes, labelled)
    if spec is None:
        if teacher is None:
            raise UserError("give --data (a dataset or gmm:FILE.npz) or --teacher")
        raise UserError(f"teacher {teacher.name} does not name its data set; give --data")
    from ..data.registry import load_dataset

    try:
        ds = load_dataset(spec, n=n, seed=seed)
    except UserError as e:
        raise UserError(f"training data '{spec}': {e}; give --data") from None
    x = ds.x.float()
    if teacher is not None and tuple(ds.shape) != tuple(teacher.shape):
        raise UserError(f"--data {spec} has samples of shape {list(ds.shape)}, the teacher {list(teacher.shape)}")
    check_text_encoder(ds, teacher, spec)
    k = int(ds.num_classes or 0)
    if teacher is not None and k and teacher.num_classes and k != teacher.num_classes:
        raise UserError(f"--data {spec} has {k} classes, the teacher {teacher.num_classes}: its labels would ask "
                        f"the teacher for classes it does not have; give the teacher's labelled data")

    if getattr(ds, "context", False):  # speech: batches cut to their longest utterance, with the frame mask
        from ..nets.prodiff import frame_mask

        def take(n, g):
            x0, ctx, _ = ds.take(torch.randint(0, len(ds), (n,), generator=g))
            return x0, ctx

        return DataSource(lambda n, g: take(n, g)[0], tuple(ds.shape), ds.kind, ds.name, float(x.std()), 0, take,
                          frame_mask if ds.kind == "speech" else None)

    def draw(n, g):
        return x[torch.randint(0, len(x), (n,), generator=g)]

    labelled = None
    if ds.num_classes and ds.labels is not None:
        y = ds.labels.long()

        def labelled(n, g):
            idx = torch.randint(0, len(x), (n,), generator=g)
            return x[idx], y[idx]

    return DataSource(draw, tuple(ds.shape), ds.kind, ds.name, float(x.std()), int(ds.num_classes or 0), labelled)


# ----------------------------------------------------------------------------- students
def net_config(cfg_net, teacher, shape, kind, num_classes: int = 0) -> dict:
    """The student's network: ``--net`` if given, else the teacher's, else the default for
    the data (an MLP for points)."""
    from ..nets import net_config_defaults

    if cfg_net:
        from ..train.options import read_net

        return read_net(cfg_net, "--net")
    if teacher is not None and not is_exact(teacher) and "net" in teacher.meta:
        return dict(teacher.meta["net"])
    return net_config_defaults(kind, shape, int(num_classes or getattr(teacher, "num_classes", 0) or 0))



def cond_net_config(cfg_net, teacher, shape, kind, takes: str) -> dict:
    """:func:`net_config` with the nets' scalar ``cond`` input on, for a student that ``takes``
    a second time-like input through it (a step size, an interval, a jump's end); a ``--net``
    that turns it off is refused in one line."""
    net_cfg = net_config(cfg_net, teacher, shape, kind)
    if cfg_net and net_cfg.get("use_cond") is False:
        raise UserError(f"--net has use_cond false, but {takes} through the net's cond input; drop use_cond or "
                        f"set it true")
    return {**net_cfg, "use_cond": True}

def teacher_net_state(teacher, net_cfg: dict) -> Optional[dict]:
    """The teacher's network weights when the student's net has the teacher's architecture."""
    from ..denoiser import ModelDenoiser

    D = getattr(teacher, "denoiser", None)
    if isinstance(D, ModelDenoiser) and dict(teacher.meta.get("net", {})) == dict(net_cfg):
        return {k: v.detach().cpu().clone() for k, v in D.net.state_dict().items()}
    return None


def call_denoiser(D, net, y: Tensor, sigma: Tensor, labels: Optional[Tensor] = None,
                  cond: Optional[Tensor] = None) -> Tensor:
    """D(y, sigma, labels, cond) with ``net`` (e.g. the accelerate-wrapped student) in place of
    D.net; D supplies the parametrization (``net_input`` / ``output_to_x0``). ``cond`` is the
    net's per-sample scalar input (a guided student's w), passed only when given."""
    x_in, c_noise, c = D.net_input(y, sigma)
    if cond is not None:
        out = net(x_in, c_noise.to(y.dtype), labels=labels, cond=cond)
    else:
        out = net(x_in, c_noise.to(y.dtype)) if labels is None else net(x_in, c_noise.to(y.dtype), labels=labels)
    return D.output_to_x0(out.to(y.dtype), y, sigma, x_in, c)


def log_uniform(n: int, sigma_min: float, sigma_max: float, gen: torch.Generator) -> torch.Tensor:
    """n levels with log sigma uniform on [log sigma_min, log sigma_max] (the official code's
    importance-sampled VP time, written in sigma)."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return torch.exp(lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).float()


def path_velocity(D, process, x_t: Tensor, t: Tensor) -> Tensor:
    """v(x_t, t) = alpha' D + std' (y - D) / sigma of any sigma-space denoiser on ``process``, at
    y = x_t / alpha (the flow prediction's inverse; reflow's ``velocity`` on the linear flow)."""
    sigma = process.sigma(t).to(x_t.dtype)
    y = x_t / bcast(process.scale(t).to(x_t.dtype), x_t)
    den = D(y, sigma)
    eps = (y - den) / bcast(sigma, y)
    return bcast(process.dscale_dt(t).to(x_t.dtype), y) * den + bcast(process.dstd_dt(t).to(x_t.dtype), y) * eps


@torch.no_grad()
def flow_straightness(D, process, z: Tensor, steps: int = 64) -> float:
    """Liu et al.'s S(Z) = int E || (Z_1 - Z_0) - v(Z_t, t) ||^2 dt on the flow's Euler path from
    sigma_max z (``steps`` uniform in t), velocities in x-space and t: the t-weighted mean of
    || chord - v_i ||^2, chord = sum_i dt_i v_i / sum_i dt_i (reflow's, on any process)."""
    from ..grids import time_uniform
    from ..samplers import get

    sigmas = time_uniform(process, steps, "trailing").to(z.device)
    vs = []

    def grab(s):
        sig = torch.as_tensor(float(s["sigma"]), dtype=torch.float64)
        t = process.t_of_sigma(sig)
        y, den = s["x"], s["denoised"]
        eps = (y - den) / float(sig)
        vs.append(float(process.dscale_dt(t)) * den + float(process.dstd_dt(t)) * eps)

    get("euler")(D, float(sigmas[0]) * z, sigmas, callback=grab)
    t = process.t_of_sigma(sigmas.double().cpu()).to(z.dtype).to(z.device)
    dt = bcast(t[:-1] - t[1:], vs[0][None])  # [steps, 1, ...]
    V = torch.stack(vs)
    chord = (dt * V).sum(0) / dt.sum()
    return float((dt * (V - chord).pow(2)).sum(0).flatten(1).sum(1).mean() / dt.sum())


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample [B] tensor shaped to broadcast against ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).to(like.dtype)


def group_levels(n_levels: int, B: int, groups: int, gen: torch.Generator, low: int = 0) -> Tensor:
    """Level indices for a batch of B in [low, n_levels): ``groups`` independent uniform
    draws, each shared by a contiguous B/groups of the batch (groups >= B: one per sample).
    Fewer distinct levels per batch mean fewer teacher calls (:func:`solve_rows`)."""
    g = max(1, min(int(groups), B))
    draws = torch.randint(low, n_levels, (g,), generator=gen)
    return draws[torch.arange(B) * g // B]


# ------------------------------------------------------------------- teacher ODE steps
def level_grid(process, n: int, sigma_max: float) -> torch.Tensor:
    """sigma(t_i), t_i = t_hi - i (t_hi - t_lo)/n for i < n, then 0 (float64, decreasing);
    t_hi = min(t_max, t(sigma_max)), t_lo = the process's t_min."""
    hi = min(float(process.t_max), float(process.t_of_sigma(torch.tensor(float(sigma_max), dtype=torch.float64))))
    lo = float(process.t_min)
    t = hi - torch.arange(n, dtype=torch.float64) * (hi - lo) / n
    return torch.cat([process.sigma(t).to(torch.float64), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def solve_rows(sampler: str, denoiser, x: Tensor, rows: Tensor, labels: Optional[Tensor] = None,
               cond: Optional[Tensor] = None, **options) -> Tensor:
    """Move each sample ``x[b]`` along its own decreasing grid ``rows[b]`` with the
    registered ``sampler`` (e.g. euler = DDIM, heun, dpm_solver_2), conditioned on its own
    ``labels[b]`` (and its own scalar input ``cond[b]``, a guided student's w) when given:
    samples sharing a row are one sampler call on that row."""
    from ..samplers import get

    fn = get(sampler)
    out = torch.empty_like(x)
    uniq, inv = torch.unique(rows, dim=0, return_inverse=True)
    for j in range(len(uniq)):
        idx = (inv == j).nonzero().squeeze(1)
        extra = {"extra_args": {"labels": labels[idx]}} if labels is not None else {}
        if cond is not None:
            extra.setdefault("extra_args", {})["cond"] = cond[idx]
        out[idx] = fn(denoiser, x[idx], uniq[j].to(x.device), **extra, **options).to(x.dtype)
    return out


class EvalCounter:
    """Wraps a denoiser and counts sample-evaluations (batch rows passed through it)."""

    def __init__(self, denoiser):
        self.inner, self.evals = denoiser, 0

    def __call__(self, y, sigma, **cond):
        self.evals += y.shape[0]
        return self.inner(y, sigma, **cond)


def student_meta(method: str, D, net_cfg: dict, shape, kind: str, data_name: str, sigma_min: float,
                 sigma_max: float, sampling: dict, cfg: dict, denoiser: Optional[dict] = None,
                 cond: Optional[Conditioning] = None, **extra) -> dict:
    """``model.json`` of a student: what :func:`fewstep.load` needs, plus its own sampling
    rule (``sampling``: sampler, fixed grids per NFE, options, other rounds)."""
    meta = {
        "format": "fewstep-model-1",
        "role": "student",
        "method": method,
        "teacher": cfg.get("teacher"),
        "net": net_cfg,
        "process": D.process.config(),
        "prediction": D.prediction,
        "sigma_data": float(D.sigma_data),
        "data": {"name": data_name, "kind": kind, "shape": list(shape),
                 "num_classes": cond.num_classes if cond is not None else 0},
        "sigma_min": float(sigma_min),
        "sigma_max": float(sigma_max),
        "default_sampler": sampling["sampler"],
        "sampling": sampling,
    }
    if denoiser is not None:
        meta["denoiser"] = denoiser
    if cond is not None:
        meta.update(cond.meta())
    meta.update(extra)
    return meta


def fixed_grids(grids: dict) -> dict:
    """{nfe: sigmas} -> the JSON form of a sampling rule's fixed grids."""
    return {str(int(k)): [float(s) for s in v] for k, v in grids.items()}


def quiet_sample(*args, **kwargs):
    """``fewstep.samplers.sample`` without the 'spends fewer evaluations' note."""
    from ..samplers import sample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sample(*args, **kwargs)


def log2_int(n: int, what: str) -> int:
    k = int(round(math.log2(n))) if n > 0 else -1
    if n < 1 or 2**k != n:
        raise UserError(f"{what} must be a power of two (1, 2, 4, ...), got {n}")
    return k


# ------------------------------------------------------- students shaped like the teacher
def teacher_like_denoiser(teacher, net_cfg: dict, init: str = "auto"):
    """(denoiser, net) of a fresh ``net_cfg`` network: with the teacher's parametrization and
    weights when its net has this architecture and ``init`` is auto or teacher; else fresh
    weights under EDM preconditioning on the teacher's sigma range (an exact teacher has no
    net). ``init`` teacher without such a net is one line."""
    from ..denoiser import ModelDenoiser
    from ..nets import build_net
    from ..process import EDM

    net = build_net(net_cfg)
    state = None if init == "random" else teacher_net_state(teacher, dict(getattr(net, "config", net_cfg)))
    if init == "teacher" and state is None:
        raise UserError("--init teacher: the teacher has no network of the student's architecture; use --init random")
    if state is not None:
        net.load_state_dict(state)
        T = teacher.denoiser
        return ModelDenoiser(net, T.process, T.prediction, T.sigma_data), net
    sd = gmm_sigma_data(teacher.denoiser) if is_exact(teacher) else float(teacher.meta.get("sigma_data", 0.5))
    return ModelDenoiser(net, EDM(teacher.sigma_min, teacher.sigma_max), "edm", sd), net


def edm_dsm_loss(D, net, x0: Tensor, sigma: Tensor, eps: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """Per-sample denoising score matching of ``D`` (its net ``net``) on x0 at levels ``sigma``
    with the EDM weighting (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (Karras et al. 2022, eq. 8;
    = 1/sigma^2 + 1/sigma_d^2, DMD2's "snr + 1 / sigma_data^2"), means over coordinates."""
    from ..train.losses import x0_weight

    pred = call_denoiser(D, net, x0 + bcast(sigma, x0) * eps, sigma, labels)
    w = x0_weight("edm", sigma, D.process, float(D.sigma_data))
    return w * (pred - x0).pow(2).flatten(1).mean(1)


def evaluation_data(cfg: dict, teacher, required: bool = False) -> Optional[DataSource]:
    """The data of a data-free method (its evaluation's reference; its GAN's real samples):
    ``--data``, else the teacher's (an exact mixture's samples, a run's training set); None when
    the teacher names none and the method does not need it (``required``: one line then)."""
    try:
        return data_source(cfg["data"], teacher, int(cfg["seed"]))
    except UserError:
        if required or cfg["data"] is not None:
            raise
        return None


def reference_samples(teacher, data: Optional[DataSource], n: int, seed: int) -> tuple:
    """(n reference samples, what they are): draws of the data (exact samples of a mixture),
    else the teacher's own samples (its default sampler at 64 evaluations)."""
    g = torch.Generator().manual_seed(int(seed) + 77)
    if data is not None:
        return data.draw(n, g), "data"
    x, _ = teacher.sample(n, 64, seed=int(seed) + 77)
    return x.float().cpu(), "teacher samples (64 evaluations)"


@torch.no_grad()
def step_measures(sample_k: Callable[[int], Tensor], reference: Tensor, steps) -> dict:
    """Energy distance and sliced-W2 of ``sample_k(k)`` (samples of a k-step rule, fixed noise)
    to ``reference`` for each k in ``steps``."""
    from ..metrics import energy_distance, sliced_w2

    out = {"energy_distance": {}, "sliced_w2": {}, "eval_samples": int(len(reference))}
    for k in steps:
        x = sample_k(int(k)).to(reference.device, reference.dtype)
        out["energy_distance"][str(k)] = energy_distance(x.flatten(1), reference.flatten(1))
        out["sliced_w2"][str(k)] = sliced_w2(x, reference)
    return out


@torch.no_grad()
def consistency_rule_measures(D, grids: dict, shape, cond: "Conditioning", reference: Tensor, seed: int,
                              device) -> dict:
    """:func:`step_measures` of a student sampled by the consistency multistep rule (denoise,
    re-noise, denoise; the registered ``consistency`` sampler) on its fixed ``grids`` ({k:
    levels}), from fixed noise at each grid's first level; labels from the prior when
    conditional (the reference is then the unconditional mixture of the classes)."""
    from ..samplers import get

    n = len(reference)
    g = torch.Generator().manual_seed(int(seed) + 424242)
    z = torch.randn((n,) + tuple(shape), generator=g).to(device)
    extra = {"extra_args": {"labels": cond.draw(n, g).to(device)}} if cond.on else {}

    def sample_k(k):
        gk = torch.Generator(device=device).manual_seed(int(seed) + 5)
        grid = torch.tensor(grids[k], dtype=torch.float64)
        return get("consistency")(D, float(grid[0]) * z, grid, generator=gk, **extra).cpu()

    return step_measures(sample_k, reference.cpu(), sorted({k for k in (1, 2, 4, 8, max(grids)) if k in grids}))


def generator_and_fake_score(teacher, cfg: dict, cond: "Conditioning"):
    """DMD2's and SiD's two networks, both shaped like the teacher (:func:`teacher_like_denoiser`,
    its weights where its net has their architecture and ``--init`` allows): (generator denoiser,
    its net, fake-score denoiser, its net, the net config, the fake-score-only warm-up steps:
    ``--fake-warmup``, else 0 when the fake score starts as the teacher, a tenth of the steps
    when it starts fresh)."""
    net_cfg = net_config(cfg["net"], teacher, teacher.shape, teacher.kind)
    torch.manual_seed(int(cfg["seed"]))
    Dg, gen_net = teacher_like_denoiser(teacher, net_cfg, cfg["init"])
    Df, fake_net = teacher_like_denoiser(teacher, net_cfg, cfg["init"])
    if cond.on:
        check_student_net(gen_net, cond)
    net_cfg = dict(getattr(gen_net, "config", net_cfg))
    from_teacher = cfg["init"] != "random" and teacher_net_state(teacher, net_cfg) is not None
    steps = int(cfg["steps"])
    warm = int(cfg["fake_warmup"]) if cfg["fake_warmup"] is not None else (0 if from_teacher else steps // 10)
    if warm >= steps:
        raise UserError(f"--steps {steps} leaves no generator step after the fake score's {warm} warm-up steps; give "
                        f"more --steps or --fake-warmup 0")
    return Dg, gen_net, Df, fake_net, net_cfg, warm


def check_fake_warmup(cfg: dict) -> None:
    """A --fake-warmup that leaves no generator step is refused before anything is written."""
    if cfg["fake_warmup"] is not None and int(cfg["fake_warmup"]) >= int(cfg["steps"]):
        raise UserError(f"--fake-warmup {cfg['fake_warmup']} leaves no generator step of --steps {cfg['steps']}; "
                        f"give a smaller --fake-warmup or more --steps")


# the grids a fine-tuned fixed sampler may run on (mmd-ddm, sft)
GRID_NAMES = ("karras", "logsnr", "polyexponential", "vp-time", "time", "time-leading", "time-trailing")


def fixed_grid(name: str, steps: int, teacher, sigma_min: Optional[float] = None) -> list:
    """The T'-step grid (T' + 1 levels, ending at 0) of the teacher's sigma range or process, from
    ``sigma_min`` (default the teacher's) for the sigma-range grids."""
    from ..grids import make_grid

    lo = float(teacher.sigma_min if sigma_min is None else sigma_min)
    if lo >= float(teacher.sigma_max):
        raise UserError(f"--sigma-min {lo} must lie below the teacher's sigma_max {teacher.sigma_max}")
    g = make_grid(name, int(steps), lo, float(teacher.sigma_max), process=teacher.process)
    g = [float(s) for s in g.tolist()]
    if g[-1] != 0.0:
        g = g + [0.0]
    if len(g) != int(steps) + 1 or any(a <= b for a, b in zip(g[:-1], g[1:])):
        raise UserError(f"--grid {name} gives {len(g) - 1} steps, not the decreasing {steps} of --timesteps; "
                        f"give another --grid")
    return g


def fine_tuned_teacher(cfg: dict, device, kinds, method: str):
    """(teacher, its net config, its weights) for a method that fine-tunes the teacher's own
    network (mmd-ddm, sft): an exact mixture (no network), a class-conditional teacher (the
    papers' setting is unconditional) or another ``--net`` is one line each."""
    teacher = load_teacher(cfg["teacher"], device, cfg=cfg, kinds=kinds, method=method)
    if is_exact(teacher):
        raise UserError(f"teacher {teacher.name} is an exact mixture: it has no network to fine-tune; train a "
                        f"teacher on it first (fewstep train --data {teacher.name})")
    if conditioning(cfg, teacher).on:
        raise UserError(f"teacher {teacher.name} is class-conditional; {method} fine-tunes unconditional teachers "
                        f"(the paper's setting)")
    net_cfg = net_config(cfg["net"], teacher, teacher.shape, teacher.kind)
    state = teacher_net_state(teacher, net_cfg)
    if state is None:
        raise UserError(f"{method} fine-tunes the teacher's own network: leave out --net (or give the teacher's)")
    return teacher, net_cfg, state
