"""Model families before diffusion (survey sec. 1, eq. 1-19), beside the diffusion teacher.

``fewstep train --family arm|ebm|sm|ncsn|diffusion`` (diffusion, the default, is
:mod:`fewstep.train.teacher`'s denoising score matching). Each other family is one module
named after its concept:

============  ==========================  ====================================================
family        module                      idea
============  ==========================  ====================================================
``arm``       :mod:`.autoregressive`      exact likelihood, one coordinate at a time (eq. 1-5)
``ebm``       :mod:`.energy`              unnormalised density, MCMC maximum likelihood (6-13)
``sm``        :mod:`.score_matching`      one score network by (sliced / denoising) SM (15-19)
``ncsn``      :mod:`.ncsn`                scores at a geometric ladder of levels, annealed
                                          Langevin dynamics (Song & Ermon 2019)
============  ==========================  ====================================================

A family module holds the model's idea only; the loop, devices, EMA, checkpoints, resume and
the run folder are the shared runner's (``fewstep.train``), exactly as for the distillation
methods. The contract a family module meets (``train/teacher.py`` and ``model.py`` use
nothing else):

``DEFAULTS: dict``
    The family's own options with their defaults, every key prefixed by the family name
    (``arm_output``, ``ebm_buffer``, ...): they join the training config (and the command
    line, as ``--arm-output`` etc.) only when that family is chosen.
``HELP: dict``
    One help line per key of ``DEFAULTS``.
``check(cfg, data) -> None``
    Refuse (``UserError``, one line naming the option to use instead) a configuration that
    cannot work on ``data`` (a :class:`fewstep.data.registry.Dataset`), before anything is
    written: e.g. a softmax ARM on continuous toys without a value range.
``objective(cfg, data) -> Objective``
    The module to train and its loss; the caller has seeded torch with ``cfg["seed"]``.
``meta(cfg, module, data) -> dict``
    The family's fields of ``model.json``: at least ``"family"``, and all :func:`build`
    needs. The shared fields (``format``, ``role``, ``data``) are added by the caller.
``build(meta) -> nn.Module``
    A fresh module from ``model.json`` (the caller loads the weights).
``as_model(module, meta, name, device) -> Model``
    A sampleable model (:class:`fewstep.model.Model` for families with a score, i.e. a
    denoiser ``D(x, sigma) = x + sigma^2 s(x, sigma)`` that every sampler can use; a
    :class:`FamilyModel` for the ARM, which has none). ``model.sample(n, nfe, sampler=None)``
    follows the family's own rule.
``evaluate(model, data, cfg) -> dict``
    The family's own numbers for ``eval.json`` (exact NLL for the ARM, ...), beside the
    generic ones (samples by the own rule, sliced-W2 for points).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UserError, unknown_name

# family name -> module (diffusion is fewstep.train.teacher's, not a module here)
FAMILIES = {"diffusion": None, "arm": "autoregressive", "ebm": "energy", "sm": "score_matching", "ncsn": "ncsn"}


@dataclass
class Objective:
    """What a family trains: ``module`` (EMA-averaged, saved as ``model.safetensors``),
    ``draw(generator, step) -> global batch`` (everything random of step k from the
    generator, as :class:`fewstep.train.loop.Task`), ``loss(model, batch) -> [b]`` on this
    process's slice, ``extra`` modules checkpointed beside it (the EBM's replay buffer) and
    ``after_step(model, step)``."""

    module: nn.Module
    draw: Callable
    loss: Callable
    extra: dict = field(default_factory=dict)
    after_step: Optional[Callable] = None


def option_number(cfg: dict, key: str, low: float = 0.0, *, strict: Optional[bool] = None,
                  high: Optional[float] = None, integer: bool = False, none_ok: bool = False,
                  what: Optional[str] = None):
    """A family option ``cfg[key]`` as a finite number (an int with ``integer``): at least
    ``low`` (above it when ``strict``, the default for non-integers), at most ``high``; None
    passes when ``none_ok``. Anything else is one :class:`UserError` line naming the flag."""
    import math
    import numbers

    v, flag = cfg.get(key), "--" + key.replace("_", "-")
    if v is None and none_ok:
        return None
    strict = (not integer) if strict is None else strict
    if what is None:
        kind = "a whole number" if integer else "a finite number"
        what = f"{kind} {'above' if strict else 'of at least'} {low:g}" + (f" and at most {high:g}" if high is not None
                                                                            else "")
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
    if ok and integer:
        ok = float(v) == int(v)
    if ok:
        x = float(v)
        ok = (x > low if strict else x >= low) and (high is None or x <= high)
    if not ok:
        raise UserError(f"{flag} must be {what}, got {v!r}")
    return int(v) if integer else float(v)


def option_flag(cfg: dict, key: str) -> bool:
    """A family option ``cfg[key]`` as a bool (true/false, 1/0, yes/no), else one UserError line."""
    v = cfg.get(key)
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    raise UserError(f"--{key.replace('_', '-')} must be true or false, got {v!r}")


def get(name: str) -> ModuleType:
    """The module of family ``name`` (not ``diffusion``)."""
    if name not in FAMILIES:
        raise unknown_name("family", name, list(FAMILIES))
    if FAMILIES[name] is None:
        raise UserError(f"family '{name}' is the diffusion teacher of fewstep.train.teacher, not a family module")
    return importlib.import_module(f"{__name__}.{FAMILIES[name]}")


def all_defaults() -> dict:
    """{family: its DEFAULTS} for every family module (the command line's options)."""
    return {f: get(f).DEFAULTS for f, mod in FAMILIES.items() if mod}


class ScoreDenoiser(nn.Module):
    """A score model ``score(x, sigma) -> grad_x log p_sigma(x)`` as the sigma-space denoiser
    every sampler takes, by Tweedie's formula: ``D(x, sigma) = x + sigma^2 s(x, sigma)``.

    ``score_fn(x, sigma [b], **cond)``; ``log_prob_fn(x, sigma)`` (optional, up to a constant:
    the negative energy) is what MALA needs. A single-level model ignores sigma; its
    denoiser is then only meaningful at its own level."""

    def __init__(self, module: nn.Module, score_fn: Callable, log_prob_fn: Optional[Callable] = None):
        super().__init__()
        self.module, self._score, self._log_prob = module, score_fn, log_prob_fn

    def score(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self._score(x, _as_batch(sigma, x), **cond)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        s = _as_batch(sigma, x)
        return x + (s ** 2).view(-1, *([1] * (x.dim() - 1))) * self._score(x, s, **cond)

    @property
    def has_log_prob(self) -> bool:
        return self._log_prob is not None

    def log_prob(self, x: torch.Tensor, sigma=None) -> torch.Tensor:
        """log p(x) up to a constant (the negative energy), per sample."""
        if self._log_prob is None:
            raise UserError("this model has no energy: MALA needs an energy model (--family ebm) or gmm:FILE.npz")
        return self._log_prob(x, _as_batch(0.0 if sigma is None else sigma, x))


def _as_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])


class FamilyModel:
    """A sampleable model without a denoiser (the ARM): the attributes of
    :class:`fewstep.model.Model` that the commands and the bench read, its own sampling
    rule ``sample_fn(n, generator) -> x`` at ``cost`` network evaluations per sample, and
    ``log_prob(x) -> [n]`` (nats) where the family has an exact likelihood."""

    denoiser = None
    process = None
    sigma_min = sigma_max = None
    num_classes = 0

    def __init__(self, module: nn.Module, shape, sample_fn: Callable, cost: int, kind: str = "points",
                 name: str = "", meta: Optional[dict] = None, device="cpu", log_prob_fn: Optional[Callable] = None,
                 sampler: str = "autoregressive"):
        self.module, self.shape, self._sample, self.cost = module, tuple(shape), sample_fn, int(cost)
        self.kind, self.name, self.meta, self.device = kind, name, meta or {}, torch.device(device)
        self.dtype, self._log_prob, self.default_sampler = torch.float32, log_prob_fn, sampler
        self.latent_shape = self.shape

    def rule_nfes(self) -> list:
        return [self.cost]

    def check_conditioning(self, labels, guidance) -> None:
        name = self.name or "the model"
        if labels is not None:
            raise UserError(f"{name} is unconditional: it takes no --label")
        if guidance is not None:
            raise UserError(f"{name} is unconditional: --guidance needs a class-conditional model")

    def noise(self, n: int, seed: Optional[int] = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return torch.randn((n,) + self.shape, generator=g).to(self.device)

    @torch.no_grad()
    def sample(self, n: int, nfe: Optional[int] = None, sampler: Optional[str] = None, seed: Optional[int] = None,
               labels=None, grid=None, x=None, guidance: Optional[float] = None, **options):
        """``(samples, None)`` by the family's own rule, which spends ``cost`` evaluations
        (one per coordinate for the ARM); ``nfe`` below that is refused."""
        name = self.name or "the model"
        if sampler not in (None, self.default_sampler):
            raise UserError(f"{name} has no denoiser: it samples only with its own rule "
                            f"('{self.default_sampler}'); give no --sampler")
        if options:
            raise UserError(f"sampler '{self.default_sampler}' takes no options ({', '.join(sorted(options))})")
        if grid is not None:
            raise UserError(f"{name} samples one coordinate at a time: it takes no --grid")
        self.check_conditioning(labels, guidance)
        if nfe is not None and int(nfe) < self.cost:
            raise UserError(f"{name} spends {self.cost} network evaluations per sample (one per coordinate); "
                            f"give --nfe {self.cost}")
        g = torch.Generator(device=self.device).manual_seed(int(seed) if seed is not None else 0)
        return self._sample(int(n), g), None

    @property
    def has_log_prob(self) -> bool:
        return self._log_prob is not None

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-likelihood per sample, in nats."""
        if self._log_prob is None:
            raise UserError(f"{self.name or 'the model'} has no exact likelihood")
        return self._log_prob(x.to(self.device))

    def __repr__(self) -> str:
        return f"FamilyModel({self.name!r}, family={self.meta.get('family')!r}, shape={self.shape})"


def load_family(meta: dict, state: dict, name: str, device) -> object:
    """The sampleable model of a family run folder (``model.json`` with ``"family"``)."""
    fam = get(meta["family"])
    module = fam.build(meta)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{name}/model.safetensors does not fit the {meta['family']} model in model.json "
                        f"({str(e).splitlines()[0]})") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(dev).eval()
    return fam.as_model(module, meta, name, dev)
