"""``fewstep.load(RUN_OR_SPEC)``: the same model the command line uses.

RUN_OR_SPEC is a run folder (written by ``fewstep train`` or ``fewstep distill``) or
``gmm:FILE.npz`` (an exact Gaussian-mixture teacher). The result has ``.process``,
``.denoiser`` (the sigma-space callable ``D(x, sigma)``), ``.sigma_min``, ``.sigma_max``
and ``.sample(n, nfe, sampler=None, seed=None)``.

A distilled student's ``model.json`` may carry its own sampling rule (``"sampling"``):
``sampler``, fixed sigma ``grids`` per NFE, sampler ``options`` and ``variants`` (other
run folders, relative to this one, for other NFE: the rounds of progressive
distillation). ``sample(..., sampler=None)`` follows it; naming a sampler bypasses it.
``"denoiser"`` names a student's own parametrization (see ``fewstep.methods``) and
``"latent_shape"`` a generator's latent. Teachers have none of these. ``"grid"`` names
the grid the own rule samples on (NCSN's geometric ladder: ``logsnr``).

A run folder of a family before diffusion (``"family"`` in model.json: ``arm``, ``ebm``,
``sm``, ``ncsn``) is loaded by :func:`fewstep.families.load_family`: a ``Model`` whose
denoiser is its score (``x + sigma^2 s``), or for the ARM a ``FamilyModel`` without one.

A guided student (``fewstep distill guided``, Meng et al. 2022) takes the guidance w as an
input: its ``"w_input": [w_min, w_max]`` (and ``"w_default"``) make ``sample(guidance=w)``
pass w as the net's ``cond`` rather than wrap classifier-free guidance; its rounds also
carry the paper's N-step stochastic rule (``sampling.stochastic``), which
``sample(..., sampler="guided_stochastic")`` runs (:func:`guided_stochastic`).

A MeanFlow student (``fewstep distill meanflow``, Geng et al. 2025; ``"denoiser": {"kind":
"meanflow"}``, :class:`MeanFlowDenoiser`) is a flow model whose net also takes the interval:
``sampling.sampler == "meanflow"`` makes ``sample(n, k)`` run its own k-step rule on the uniform
t grid (:func:`meanflow_sample`); a named sampler samples its flow (r = t).

A shortcut model (``fewstep distill shortcut``, Frans et al. 2024) is a flow model whose net also
takes the step size d: ``sampling.sampler == "shortcut"`` makes ``sample(n, k)`` take k Euler steps
of d = 1/k with that d as its input (:func:`shortcut_sample`); a named sampler samples its flow (d = 0).

A CTM student (``fewstep distill ctm``, Kim et al. 2023) is an EDM-preconditioned denoiser whose net also
takes the end s of its jump G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s) through ``cond`` (:func:`ctm_cond`;
s = 0 is cond 0, so the plain denoiser is g(x, t, 0) = G(x, t, 0)): ``sampling.sampler == "ctm"`` makes
``sample(n, k)`` run gamma-sampling (:func:`ctm_sample`, ``gamma=`` or the stored default) on the Karras grid
of k jumps from sigma_max (:func:`ctm_grid`); a named sampler samples its denoiser g(x, t, 0).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional

import torch

from .checks import resolve_device, whole
from .data.gmm import GaussianMixture
from .errors import UserError

GMM_SIGMA_MIN, GMM_SIGMA_MAX = 0.002, 80.0
MODEL_FORMAT = "fewstep-model-1"  # the "format" of the model.json files this version writes and reads
SEED_RANGE = (-2**63, 2**63 - 3)  # torch's manual_seed range, less the offsets the samplers add
STOCHASTIC = "guided_stochastic"  # a guided student's own stochastic rule (no registered sampler)
MEANFLOW = "meanflow"  # a MeanFlow student's own rule (no registered sampler)
SHORTCUT = "shortcut"  # a shortcut model's own rule (no registered sampler)
CTM = "ctm"  # a CTM student's own gamma-sampling rule (no registered sampler)


@torch.no_grad()
def guided_stochastic(denoiser, x: torch.Tensor, sigmas, extra_args=None, generator=None) -> torch.Tensor:
    """The N-step stochastic sampler of Meng et al. 2022 (their "N-step deterministic and
    stochastic sampling": one deterministic step of twice the step length, then one stochastic
    step back up of the original length, after Karras et al. 2022) on levels sigmas[0..N]
    (decreasing, sigmas[N] = 0), one evaluation per level but the last: from level i a
    deterministic DDIM step of twice the grid's step, to level min(i + 2, N), then fresh
    noise back up to level i + 1, the forward process q(z_{i+1} | z_{i+2}); the evaluation at
    level N - 1 steps to 0 without noise. In sigma-space (y = z / alpha):

        x^  = D(y_i, s_i),   y' = x^ + (s_k / s_i) (y_i - x^),   k = min(i + 2, N)
        y_{i+1} = y' + sqrt(s_{i+1}^2 - s_k^2) eps            (i + 1 < N)

    A guided round's grid is its teacher's (2N levels for its N steps), so each jump is one
    of the student's own steps."""
    from .samplers._common import denoise, noise_like

    sig = [float(v) for v in torch.as_tensor(sigmas).tolist()]
    N = len(sig) - 1
    for i in range(N):
        den = denoise(denoiser, x, sig[i], extra_args)
        k = min(i + 2, N)
        x = den + (sig[k] / sig[i]) * (x - den) if sig[k] > 0 else den
        if i + 1 < N:
            x = x + (sig[i + 1] ** 2 - sig[k] ** 2) ** 0.5 * noise_like(x, generator)
    return x


def mean_velocity(net, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, time_scale: float = 1.0,
                  **cond) -> torch.Tensor:
    """The average velocity u(z, r, t) of a MeanFlow net (Geng et al. 2025) on the linear flow
    z_t = (1 - t) x + t eps: the net's level input is s t and its scalar ``cond`` input
    s (t - r), s = ``time_scale`` (1: t and t - r in [0, 1], as the paper's code); r = t
    (cond 0) is the instantaneous velocity v(z, t)."""
    s = float(time_scale)
    return net(z, s * t, cond=s * (t - r), **cond)


class MeanFlowDenoiser(torch.nn.Module):
    """A MeanFlow student (``model.json["denoiser"]``: ``{"kind": "meanflow", "time_scale": s}``)
    as a sigma-space denoiser of the linear flow: at r = t its net is the flow velocity, so
    D(y, sigma) = z_t - t v(z_t, t) with t = sigma / (1 + sigma), z_t = (1 - t) y (the flow
    prediction), which every sampler can use; :meth:`u` is the average velocity."""

    prediction = "meanflow"

    def __init__(self, net, sigma_data: float = 0.5, time_scale: float = 1.0):
        super().__init__()
        from .process import LinearFlow

        self.net, self.sigma_data, self.time_scale = net, float(sigma_data), float(time_scale)
        self.process = LinearFlow()

    def u(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return mean_velocity(self.net, z, r, t, self.time_scale, **cond)

    def forward(self, y: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        t = (sigma.expand(y.shape[0]) if sigma.ndim == 0 else sigma) / (1 + sigma)
        tb = t.reshape((-1,) + (1,) * (y.ndim - 1))
        z = (1 - tb) * y
        return z - tb * self.u(z, t, t, **cond).to(y.dtype)


@torch.no_grad()
def meanflow_sample(denoiser: MeanFlowDenoiser, z: torch.Tensor, times, extra_args=None,
                    guidance: float = 1.0) -> torch.Tensor:
    """MeanFlow's few-step rule on decreasing times t_0 > t_1 > ... > t_k of the linear flow
    (t = 1 noise, t = 0 data), one evaluation per step:

        z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z_{t_i}, t_{i+1}, t_i)

    (one step from t = 1: z_0 = z_1 - u(z_1, 0, 1)); ``z`` is at t_0 in x-space. ``guidance`` w != 1
    (a conditional student with a null branch) guides u at each step (:func:`guided_field`); a
    student distilled with guidance has it built in and is sampled at w = 1."""
    ts = [float(v) for v in torch.as_tensor(times, dtype=torch.float64).tolist()]
    u = guided_field(lambda z_, t_, r=None, **c: denoiser.u(z_, r, t_, **c), guidance)
    for t, r in zip(ts[:-1], ts[1:]):
        tt = torch.full((z.shape[0],), t, dtype=z.dtype, device=z.device)
        z = z - (t - r) * u(z, tt, r=torch.full_like(tt, r), **(extra_args or {})).to(z.dtype)
    return z


def guided_field(field, guidance: float = 1.0):
    """A student's velocity field f(x, t, labels=, **per-sample inputs) with classifier-free guidance
    at sampling, f_null + w (f_c - f_null), both halves from one batched call (as
    :class:`~fewstep.denoiser.CFGDenoiser` on a denoiser; the flow denoiser is affine in the velocity, so
    guiding one guides the other); ``field`` itself when w = 1 or unconditional (no labels)."""
    w = float(guidance)

    def guided(x, t, labels=None, **cond):
        if labels is None or w == 1.0:
            return field(x, t, labels=labels, **cond) if labels is not None else field(x, t, **cond)
        from .denoiser import cfg_halves

        f_c, f_u = cfg_halves(field, x, t, labels, **cond)
        return f_u + w * (f_c - f_u)

    return guided


def shortcut_velocity(net, process, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, base: int,
                      **cond) -> torch.Tensor:
    """s(x_t, t, d) of a shortcut net (Frans et al. 2024) on the linear flow x_t = (1 - t) x0 + t eps:
    the net's level input is c_noise(t) (1000 t), its scalar ``cond`` input the step size as
    c_noise(d) (1000 d), except that a step of at most 1/base (the finest, which the paper takes as
    d = 0) is cond 0: the flow velocity v(x_t, t), what the flow denoiser of the same net returns."""
    d = torch.where(d <= 1.0 / int(base), torch.zeros_like(d), d)
    return net(x, process.c_noise(t), cond=process.c_noise(d), **cond).to(x.dtype)


@torch.no_grad()
def shortcut_sample(denoiser, x: torch.Tensor, steps: int, base: int, extra_args=None,
                    guidance: float = 1.0) -> torch.Tensor:
    """A shortcut model's k-step rule: k Euler steps of d = 1/k from t = 1 (``x``, the noise eps in
    x-space) to t = 0, each asking the net for the step it takes: x_{t - d} = x_t - d s(x_t, t, d).
    ``denoiser`` is the student's flow ``ModelDenoiser`` (its ``net`` takes ``cond``); ``guidance``
    w != 1 guides s at each step (:func:`guided_field`, the paper's inference CFG)."""
    k = int(steps)
    d = torch.full((x.shape[0],), 1.0 / k, dtype=x.dtype, device=x.device)
    net, process = denoiser.net, denoiser.process
    s = guided_field(lambda x_, t_, d=None, **c: shortcut_velocity(net, process, x_, t_, d, base, **c), guidance)
    for i in range(k):
        t = torch.full_like(d, (k - i) / k)
        x = x - (1.0 / k) * s(x, t, d=d, **(extra_args or {}))
    return x


def ctm_cond(s: torch.Tensor, s_floor: float) -> torch.Tensor:
    """The net's ``cond`` input for a CTM jump that ends at s (Kim et al. 2023): the paper's code embeds s as it
    embeds t, c_noise(s) = ln(s) / 4 here; shifted so that its end point s_floor (the grid's sigma_min, the
    paper's code's stand-in for 0) is 0: cond = ln(max(s, s_floor) / s_floor) / 4, exactly 0 for s <= s_floor
    (s = 0), so a net called without cond is g(x, t, 0)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return 0.25 * torch.log(torch.clamp(s, min=float(s_floor)) / float(s_floor))


def ctm_g(D, s_floor: float):
    """g(x, t, s) of a CTM student: its EDM-preconditioned denoiser ``D`` (a ``ModelDenoiser``, or a wrapper that
    passes ``cond`` on, e.g. classifier-free guidance) at level t with the jump's end s as the net's cond input."""
    def g(x, t, s, **extra):
        return D(x, t, cond=ctm_cond(s, s_floor).to(device=x.device, dtype=torch.float32), **extra).to(x.dtype)
    return g


def ctm_jump(g, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, **extra) -> torch.Tensor:
    """CTM's anytime-to-anytime jump G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s) (per-sample t > 0, s <= t):
    exactly x at s = t, exactly g at s = 0."""
    r = (s / t).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return r * x + (1 - r) * g(x, t, s, **extra)


def ctm_grid(k: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The k-jump grid t_0 = sigma_max > ... > t_k = 0: the k + 1 Karras levels down to sigma_min (the paper's
    code's ``get_sigmas_karras(steps + 1)``), the last one, its stand-in for 0, made 0."""
    from .grids import karras

    sig = karras(int(k), float(sigma_min), float(sigma_max), rho=float(rho), final_zero=False)
    sig[-1] = 0.0
    return sig


@torch.no_grad()
def ctm_sample(D, x: torch.Tensor, sigmas, gamma: float, s_floor: float, generator=None,
               extra_args=None) -> torch.Tensor:
    """gamma-sampling (Kim et al. 2023) on decreasing t_0 > t_1 > ... > t_k = 0, one evaluation per jump:
    x <- G(x, t_n, sqrt(1 - gamma^2) t_{n+1}), then x <- x + gamma t_{n+1} z (no noise into t_k = 0).
    gamma = 0: deterministic jumps along the ODE; gamma = 1: G(x, t_n, 0) and fresh noise up to t_{n+1}, the
    consistency model's multistep rule. ``x`` is at t_0 in sigma-space."""
    from .samplers._common import noise_like

    g, extra = ctm_g(D, s_floor), extra_args or {}
    sig = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).tolist()]
    keep = math.sqrt(max(0.0, 1.0 - float(gamma) ** 2))
    for t, t_next in zip(sig[:-1], sig[1:]):
        tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        x = ctm_jump(g, x, tt, torch.full_like(tt, keep * t_next), **extra)
        if t_next > 0 and gamma > 0:
            x = x + (float(gamma) * t_next) * noise_like(x, generator)
    return x


def _cfg_scale(D) -> float:
    """The classifier-free guidance w that :meth:`Model._conditioned` wrapped around a denoiser (1: none),
    for a student's own rule that calls its net directly."""
    from .denoiser import CFGDenoiser

    found = _unwrap(D, lambda d: isinstance(d, CFGDenoiser))
    return float(found.scale) if isinstance(found, CFGDenoiser) else 1.0


def _unwrap(D, found):
    """The denoiser inside wrappers such as an evaluation counter (``.inner``) that ``found`` accepts."""
    while not found(D) and hasattr(D, "inner"):
        D = D.inner
    return D


OWN_RULE_GRID = "karras"  # the grid of a student's own sampling rule when it names none


class Model:
    """A sampleable model: a sigma-space denoiser plus what sampling it needs."""

    def __init__(self, denoiser, process, shape, sigma_min: float, sigma_max: float, num_classes: int = 0,
                 default_sampler: Optional[str] = None, kind: str = "points", name: str = "", meta: Optional[dict] = None,
                 device="cpu", dtype=torch.float32, latent_shape=None):
        self.denoiser, self.process, self.shape = denoiser, process, tuple(shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.num_classes, self.default_sampler, self.kind, self.name = num_classes, default_sampler, kind, name
        self.meta, self.device, self.dtype = meta or {}, torch.device(device), dtype
        self.latent_shape = tuple(latent_shape) if latent_shape else self.shape
        self._variants = {}

    @property
    def sampling(self) -> dict:
        """The model's own sampling rule (students; empty for teachers)."""
        return self.meta.get("sampling") or {}

    def with_discriminator(self, spec, weight: Optional[float] = None) -> "Model":
        """This model with discriminator guidance (Kim et al. 2022): a copy whose denoiser is
        :class:`fewstep.denoiser.DiscriminatorGuided` around this one, with the discriminator of
        the ``fewstep distill discriminator`` run ``spec`` and ``weight`` (default: the run's
        ``dg_weight``), so every sampler uses it unchanged, at one discriminator gradient per
        evaluation."""
        import copy

        from .denoiser import DiscriminatorGuided

        aux = load_auxiliary(spec, "discriminator", device=str(self.device))
        if list(aux.meta["data"]["shape"]) != list(self.shape):
            raise UserError(f"--discriminator {spec} was trained on samples of shape {aux.meta['data']['shape']}, the "
                            f"model's are {list(self.shape)}; give a discriminator of this teacher")
        if self.denoiser is None:
            raise UserError(f"{self.name} has no denoiser to guide (its family samples by its own rule)")
        w = float(aux.meta.get("dg_weight", 1.0) if weight is None else weight)
        out = copy.copy(self)
        out.denoiser = DiscriminatorGuided(self.denoiser, aux, w)
        return out

    def rule_nfes(self) -> list:
        """The NFE values the own rule has a fixed grid or another round for ([] = any)."""
        rule = self.sampling
        return sorted({int(k) for k in rule.get("grids", {})} | {int(k) for k in rule.get("variants", {})})

    def variant(self, nfe: int) -> "Model":
        """The run folder the own rule names for ``nfe`` (e.g. a progressive round), loaded once."""
        if nfe not in self._variants:
            rel = self.sampling["variants"][str(nfe)]
            self._variants[nfe] = load(str(Path(self.name) / rel), device=str(self.device))
        return self._variants[nfe]

    def _own_rule(self, nfe: int, grid, options: dict):
        """(sampler, grid, options, nfe, variant) of the own rule for ``nfe``."""
        rule = self.sampling
        nfes = self.rule_nfes()
        if nfes and nfe not in nfes:
            below = [k for k in nfes if k <= nfe]
            if not below:
                raise UserError(f"{self.name} samples with {', '.join(map(str, nfes))} evaluations (its own rule); "
                                f"raise --nfe or name a --sampler")
            warnings.warn(f"{self.name} has a rule for {', '.join(map(str, nfes))} evaluations: "
                          f"using {below[-1]}, not {nfe}", stacklevel=3)
            nfe = below[-1]
        if str(nfe) in rule.get("variants", {}):
            return None, grid, options, nfe, self.variant(nfe)
        fixed = rule.get("grids", {}).get(str(nfe))
        if fixed is not None and grid is None:
            grid = torch.tensor(fixed, dtype=torch.float64)
        elif rule.get("grid") and grid is None:  # a named grid (NCSN: logsnr)
            grid = rule["grid"]
        elif grid is None:  # a student's rule samples on the grid it was distilled for, not the teachers' defaults
            grid = OWN_RULE_GRID
        return rule.get("sampler", self.default_sampler), grid, {**rule.get("options", {}), **options}, nfe, None

    @torch.no_grad()
    def sample(self, n: int, nfe: int, sampler: Optional[str] = None, seed: Optional[int] = None,
               labels=None, grid=None, x=None, guidance: Optional[float] = None, **options):
        """Draw n samples with ``sampler`` (default: the model's own rule, else its default
        sampler, else the configuration measured best for ``nfe``) at ``nfe`` evaluations, on
        ``grid`` (default: that sampler's measured best grid; :func:`fewstep.samplers.recommend`).
        The samples tensor's ``choice`` attribute says what ran.

        Returns ``(samples, labels)``; labels is None for an unconditional model.
        """
        from .samplers import info, sample

        n, nfe, seed = whole(n, "n"), whole(nfe, "nfe"), _seed(seed)
        if x is not None and not isinstance(x, torch.Tensor):
            raise UserError(f"x must be a torch.Tensor of starting points, got {type(x).__name__}; "
                            f"convert it with torch.as_tensor(x)")
        if sampler == STOCHASTIC:
            return self._sample_stochastic(n, int(nfe), seed, labels, x, guidance, **options)
        if sampler == MEANFLOW or (sampler is None and self.sampling.get("sampler") == MEANFLOW):
            return self._sample_meanflow(n, int(nfe), seed, labels, x, guidance, grid, options)
        if sampler == SHORTCUT or (sampler is None and self.sampling.get("sampler") == SHORTCUT):
            return self._sample_shortcut(n, int(nfe), seed, labels, x, guidance, grid, options)
        if sampler == CTM or (sampler is None and self.sampling.get("sampler") == CTM):
            return self._sample_ctm(n, int(nfe), seed, labels, x, guidance, grid, options)
        if sampler is None and self.sampling:
            sampler, grid, options, nfe, other = self._own_rule(int(nfe), grid, options)
            if other is not None:
                return other.sample(n, nfe, None, seed, labels, grid, x, guidance, **options)
        from .samplers import AUTO

        sampler = None if sampler == AUTO else sampler or self.default_sampler
        if sampler is not None:
            info(sampler)  # unknown names fail before any work
        x, D, extra, labels = self._start(n, seed, x, labels, guidance)
        if sampler not in ("rk45", None) and "generator" not in options:
            from .samplers import info as _info

            if _info(sampler).stochastic:
                options["generator"] = torch.Generator(device=self.device).manual_seed((seed or 0) + 2)
        out = sample(D, x, sampler=sampler, nfe=nfe, grid=grid, sigma_min=self.sigma_min,
                     sigma_max=self.sigma_max, process=self.process, extra_args=extra, **options)
        return out, labels

    def _check_context(self, labels, guidance) -> None:
        """A speech model's labels: its utterances' contexts [n, P, 6] (phonemes, durations,
        pitch, energy, speaker: :func:`fewstep.tts.context_of`), always given; no guidance."""
        from .nets.prodiff import CONTEXT

        name = self.name or "the model"
        if labels is None:
            raise UserError(f"{name} is a speech model: it speaks given text; use fewstep sample RUN --text "
                            f"\"...\" --out x.wav (in Python: fewstep.tts.speak)")
        if not isinstance(labels, torch.Tensor) or labels.ndim != 3 or labels.shape[-1] != len(CONTEXT):
            raise UserError(f"labels for the speech model {name} are contexts [n, phonemes, {len(CONTEXT)}] "
                            f"({', '.join(CONTEXT)}); build them with fewstep.tts.context_of")
        if guidance is not None:
            raise UserError(f"{name} is a speech model without classes: --guidance does not apply")

    def _check_text(self, labels, guidance) -> None:
        """A text-conditional model's labels: text contexts [n, L, D + 1] (:meth:`prompt`),
        or None for the null prompt; guidance a finite number >= 0."""
        name = self.name or "the model"
        if labels is not None:
            inner = getattr(_unwrap(self.denoiser, lambda d: hasattr(d, "net")), "net", None)
            null = getattr(inner, "null_context", None)  # [L, D + 1] of a text UNet (ours or diffusers')
            net = self.meta.get("net") or {}
            want = tuple(null.shape) if null is not None else \
                (int(net.get("context_length", 0)), int(net.get("context_dim", 0)) + 1)
            if not isinstance(labels, torch.Tensor) or labels.ndim != 3 or tuple(labels.shape[1:]) != want:
                raise UserError(f"labels for the text model {name} are text contexts [n, {want[0]}, {want[1]}]; "
                                f"give --prompt \"...\" (in Python: model.prompt(texts))")
        if guidance is not None and (isinstance(guidance, (str, bytes, bool)) or
                                     not math.isfinite(_float_or_nan(guidance)) or float(guidance) < 0):
            raise UserError(f"--guidance must be a finite number >= 0, got {guidance!r}")

    @property
    def autoencoder(self) -> Optional[str]:
        """The autoencoder of a latent model (its data is ``latents:AE,DATA``), else None."""
        name = str(self.meta.get("data", {}).get("name") or "")
        return name[len("latents:"):].partition(",")[0] if name.startswith("latents:") else None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as the data's images: a latent model's latents through its autoencoder's
        decoder (clamped to [-1, 1]); any other model's samples as they are."""
        if self.autoencoder is None:
            return x
        if getattr(self, "_codec", None) is None:
            from .nets.autoencoder import load_autoencoder

            self._codec = load_autoencoder(self.autoencoder, device=self.device)
        with torch.no_grad():
            return self._codec.decode(x.to(self.device), clamp=True)

    def prompt(self, texts) -> torch.Tensor:
        """Text contexts [n, L, D + 1] of prompts for a text-conditional model, by the text
        encoder its model.json names (:func:`fewstep.nets.text.build_text_encoder`)."""
        from .nets.text import build_text_encoder
        from .nets.unet import text_context

        spec = self.meta.get("text_encoder")
        if not spec:
            raise UserError(f"{self.name or 'the model'} is not text-conditional: it takes no --prompt")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("--prompt: give one or more sentences")
        if getattr(self, "_text_encoder", None) is None:
            self._text_encoder = build_text_encoder(spec)
        with torch.no_grad():
            e = self._text_encoder.encode(texts)
        return text_context(e.states.cpu(), e.mask.cpu()).to(self.device)

    def noise(self, n: int, seed: Optional[int] = None, labels=None) -> torch.Tensor:
        """Starting points at sigma_max in sigma-space: sigma_max * eps (a speech model's: as
        many frames as the contexts' longest utterance)."""
        shape = self.latent_shape
        if self.kind == "speech" and labels is not None:
            from .nets.prodiff import frame_lengths

            shape = (int(frame_lengths(labels).max()),) + tuple(self.latent_shape[1:])
        n, seed = whole(n, "n"), _seed(seed)
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return self.sigma_max * torch.randn((n,) + shape, generator=g, dtype=self.dtype).to(self.device)

    def _start(self, n: int, seed, x, labels, guidance) -> tuple:
        """(x_T, the denoiser with its conditioning, its extra arguments, the labels) of a draw:
        labels and guidance checked, the noise drawn from ``seed`` unless ``x`` is given."""
        self.check_conditioning(labels, guidance)
        if self.kind == "speech":
            if len(labels) != n:
                raise UserError(f"the speech model got {len(labels)} contexts for n = {n}; give one per sample")
            labels = labels.to(self.device)
            x = self.noise(n, seed, labels) if x is None else x.to(self.device, self.dtype)
            return x, self.denoiser, {"labels": labels}, labels
        x = self.noise(n, seed) if x is None else x.to(self.device, self.dtype)
        return (x, *self._conditioned(n, seed, labels, guidance))

    def _conditioned(self, n: int, seed, labels, guidance):
        """(denoiser, extra_args, labels) of a sampler call: the labels (drawn from the seed
        when not given), guidance as classifier-free guidance around the denoiser, or, for a
        guided student, as its net's input w (:meth:`w_value`)."""
        from .denoiser import CFGDenoiser

        D, extra = self.denoiser, {}
        if self.meta.get("text_encoder"):  # text contexts as labels (None: the null prompt); CFG as for classes
            if labels is not None:
                labels = labels.to(self.device)
                if len(labels) == 1 and n > 1:
                    labels = labels.expand(n, *labels.shape[1:])
                if len(labels) != n:
                    raise UserError(f"{len(labels)} text contexts for n = {n}; give one, or one per sample")
                extra = {"labels": labels}
            if self.meta.get("w_input"):
                w = torch.full((n,), self.w_value(guidance), dtype=torch.float32, device=self.device)
                return D, {**extra, "cond": w}, labels
            if guidance is not None and float(guidance) != 1.0 and labels is not None:
                D = CFGDenoiser(D, guidance)
            return D, extra, labels
        if self.num_classes:
            if labels is None:
                g = torch.Generator().manual_seed(int(seed) + 1 if seed is not None else 0)
                labels = torch.randint(0, self.num_classes, (n,), generator=g)
            labels = torch.as_tensor(labels).to(self.device)
            if labels.ndim == 0:  # one label for all samples
                labels = labels.expand(n)
            if labels.shape != (n,):
                raise UserError(f"labels for {self.name or 'the model'}: give one label, or one per sample "
                                f"(shape [{n}]), got shape {list(labels.shape)}")
            if self.meta.get("w_input"):  # a guided student: w is its input, not CFG
                w = torch.full((len(labels),), self.w_value(guidance), dtype=torch.float32, device=self.device)
                return D, {"labels": labels, "cond": w}, labels
            if guidance is not None and self.meta.get("guidance") is None:  # a student's guidance is built in
                D = CFGDenoiser(D, guidance)
            elif guidance is not None and float(self.meta.get("guidance")) == 1.0 and guidance != 1.0:
                D = CFGDenoiser(D, guidance)  # a student with a null branch (checked above)
            extra = {"labels": labels}
        else:
            labels = None
        return D, extra, labels

    def w_value(self, guidance: Optional[float]) -> float:
        """The w a guided student (``w_input`` in model.json) is sampled at: ``guidance``, with
        a note where it lies outside the range the student learned; None: its ``w_default``,
        with a note saying so."""
        lo, hi = (float(v) for v in self.meta["w_input"])
        name = self.name or "the model"
        if guidance is None:
            w = float(self.meta.get("w_default", (lo + hi) / 2))
            warnings.warn(f"{name} takes the guidance w as an input (it learned w in [{lo:g}, {hi:g}]); "
                          f"no --guidance given: sampling at its default w = {w:g}", stacklevel=4)
            return w
        w = float(guidance)
        if not lo <= w <= hi:
            warnings.warn(f"--guidance {w:g} lies outside [{lo:g}, {hi:g}], the w range {name} was distilled "
                          f"for: its samples there are an extrapolation", stacklevel=4)
        return w

    def _sample_stochastic(self, n: int, nfe: int, seed, labels, x, guidance, generator=None, **options):
        """``sample(..., sampler="guided_stochastic")``: a guided round's stochastic rule at its
        2N evaluations; a folder of rounds hands ``nfe`` to its round of nfe / 2 steps."""
        name = self.name or "the model"
        rule = self.sampling
        if options:
            raise UserError(f"sampler '{STOCHASTIC}' takes no options ({', '.join(sorted(options))})")
        if "stochastic" not in rule and rule.get("variants"):
            have = sorted(2 * int(k) for k in rule["variants"])
            if nfe % 2 or str(nfe // 2) not in rule["variants"]:
                raise UserError(f"sampler '{STOCHASTIC}' on {name} spends twice a round's steps: --nfe "
                                f"{' or '.join(map(str, have))}, not {nfe}")
            return self.variant(nfe // 2).sample(n, nfe, STOCHASTIC, seed, labels, x=x, guidance=guidance,
                                                 **({"generator": generator} if generator is not None else {}))
        st = rule.get("stochastic")
        if not st:
            raise UserError(f"{name} has no stochastic rule: sampler '{STOCHASTIC}' samples the students of "
                            f"'fewstep distill guided'; name another --sampler")
        if int(st["nfe"]) != nfe:
            raise UserError(f"sampler '{STOCHASTIC}' on {name} spends {st['nfe']} evaluations, not {nfe}; "
                            f"give --nfe {st['nfe']} (or sample the top folder, which picks the round)")
        x, D, extra, labels = self._start(n, seed, x, labels, guidance)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed((seed or 0) + 2)
        grid = torch.tensor(st["grid"], dtype=torch.float64)
        return guided_stochastic(D, x, grid, extra, generator), labels

    def _check_own_rule(self, rule: str, title: str, method: str, steps: str, grid, options, ok: bool = True):
        """A student's own rule (MeanFlow, shortcut) asked by name: the model must have it, and it
        takes no grid or sampler options; else one UserError."""
        name = self.name or "the model"
        if self.sampling.get("sampler") != rule or not ok:
            raise UserError(f"{name} has no {title} rule: sampler '{rule}' samples the students of "
                            f"'fewstep distill {method}'; name another --sampler")
        if grid is not None or options:
            given = "grid" if grid is not None else f"option(s) {', '.join(sorted(options))}"
            raise UserError(f"{name} samples with its own {title} rule ({steps}), which takes no {given}; name a "
                            f"--sampler (e.g. euler) to sample its flow on a grid")

    def _sample_meanflow(self, n: int, nfe: int, seed, labels, x, guidance, grid, options):
        """A MeanFlow student's own rule: ``nfe`` steps uniform in t from t = 1 (z_1 = x / sigma_max,
        the model's noise eps) to 0 (:func:`meanflow_sample`)."""
        D = _unwrap(self.denoiser, lambda d: isinstance(d, MeanFlowDenoiser))
        self._check_own_rule(MEANFLOW, "MeanFlow", "meanflow", f"{nfe} steps uniform in t", grid, options,
                             isinstance(D, MeanFlowDenoiser))
        x, outer, extra, labels = self._start(n, seed, x, labels, guidance)
        times = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
        return meanflow_sample(D, x / self.sigma_max, times, extra, _cfg_scale(outer)), labels

    def _sample_shortcut(self, n: int, nfe: int, seed, labels, x, guidance, grid, options):
        """A shortcut model's own rule (:func:`shortcut_sample`) from t = 1 (x / sigma_max, the noise
        eps): ``nfe`` steps when a power of two or at least its base steps M (all of them then the
        flow, d <= 1/M), else the largest power of two below, with a note."""
        name = self.name or "the model"
        self._check_own_rule(SHORTCUT, "shortcut", "shortcut", f"{nfe} steps of d = 1/{nfe}", grid, options)
        base, k = int(self.sampling["base_steps"]), nfe
        if k < base and k & (k - 1):
            k = 1 << (k.bit_length() - 1)
            warnings.warn(f"{name} learned steps of d = 1, 1/2, 1/4, ..., 1/{base}: using {k} steps, not {nfe}",
                          stacklevel=3)
        x, outer, extra, labels = self._start(n, seed, x, labels, guidance)
        D = _unwrap(outer, lambda d: hasattr(d, "net"))
        return shortcut_sample(D, x / self.sigma_max, k, base, extra, _cfg_scale(outer)), labels

    def _sample_ctm(self, n: int, nfe: int, seed, labels, x, guidance, grid, options):
        """A CTM student's gamma-sampling (:func:`ctm_sample`) with ``nfe`` jumps on :func:`ctm_grid`; ``gamma``
        (in [0, 1]) and ``generator`` may be given, else the stored gamma and a generator from the seed."""
        options = dict(options)
        rule = self.sampling
        gamma, generator = options.pop("gamma", rule.get("gamma", 0.0)), options.pop("generator", None)
        self._check_own_rule(CTM, "CTM", "ctm", f"gamma-sampling, {nfe} jumps on the Karras grid", grid, options)
        if isinstance(gamma, (bool, str)) or not 0.0 <= _float_or_nan(gamma) <= 1.0:
            raise UserError(f"gamma must be a number in [0, 1] (0: deterministic jumps, 1: consistency-model "
                            f"multistep), got {gamma!r}")
        x, D, extra, labels = self._start(n, seed, x, labels, guidance)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed((seed or 0) + 2)
        sig = ctm_grid(nfe, self.sigma_min, self.sigma_max, float(rule.get("rho", 7.0)))
        return ctm_sample(D, x, sig, float(gamma), float(rule.get("s_floor", self.sigma_min)), generator,
                          extra), labels

    def check_conditioning(self, labels, guidance) -> None:
        """Labels and guidance that this model can take, else one clear UserError: labels
        only for a class-conditional model and inside its classes (-1: no class); guidance a
        finite number and only for a conditional model, and for a student distilled at guidance w only w (it
        is built in) unless it was distilled at w = 1 with a null branch (--label-dropout); a
        guided student (``w_input``) takes any w as its input (a note outside its range)."""
        name = self.name or "the model"
        if self.kind == "speech":
            return self._check_context(labels, guidance)
        if self.meta.get("text_encoder"):
            return self._check_text(labels, guidance)
        if labels is not None:
            if not self.num_classes:
                raise UserError(f"{name} is unconditional: it takes no --label")
            try:
                lab = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError):
                raise UserError(f"labels for {name} must be integers (one, or one per sample), "
                                f"got {type(labels).__name__}") from None
            if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                raise UserError(f"labels for {name} must be integers, got {lab.dtype}")
            if lab.numel() and (int(lab.min()) < -1 or int(lab.max()) >= self.num_classes):
                raise UserError(f"--label {int(lab.max()) if int(lab.max()) >= self.num_classes else int(lab.min())}: "
                                f"{name} has classes 0..{self.num_classes - 1}")
        if guidance is None:
            return
        if isinstance(guidance, (str, bytes, bool)) or not math.isfinite(_float_or_nan(guidance)):
            raise UserError(f"--guidance must be a finite number, got {guidance!r}" if isinstance(guidance, str)
                            else f"--guidance must be a finite number, got {guidance}")
        if not self.num_classes:
            raise UserError(f"{name} is unconditional: --guidance needs a class-conditional model")
        if self.meta.get("w_input"):  # a guided student takes any w as its input (a note outside its range)
            return
        baked = self.meta.get("guidance")
        if baked is not None and float(guidance) != float(baked):
            if float(baked) != 1.0:
                raise UserError(f"{name} was distilled at guidance {baked} (built in); sample it without --guidance "
                                f"or distil again with --guidance {guidance}")
            if not float(self.meta.get("label_dropout", 0.0)) > 0:
                raise UserError(f"{name} was distilled without a null label (--label-dropout 0), so it has no "
                                f"unconditional branch for --guidance {guidance}; distil with --label-dropout 0.1")

    def __repr__(self) -> str:
        return f"Model({self.name!r}, shape={self.shape}, process={self.process!r})"


def _float_or_nan(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def _seed(seed) -> Optional[int]:
    """A sampling seed: None or a whole number torch's generators take."""
    if seed is None:
        return None
    try:
        return whole(seed, "seed", low=SEED_RANGE[0], high=SEED_RANGE[1])
    except UserError:
        shown = f"{seed!r} ({type(seed).__name__})" if not isinstance(seed, int) else str(seed)
        raise UserError(f"seed must be a whole number from -2**63 to 2**63 - 3 (e.g. seed=0), "
                        f"got {shown[:60]}") from None


def _positive_ints(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)


def check_model_meta(meta, path) -> dict:
    """``model.json`` (``path``) checked before anything is built from it: a JSON object of
    this format, with ``net`` (an object naming its kind), ``data`` (an object whose
    ``shape`` is a list of positive whole numbers, ``num_classes`` a whole number >= 0),
    and for a diffusion model ``sigma_min`` < ``sigma_max`` (positive, finite), ``process``
    and ``prediction`` (unless a student's own ``denoiser``). Anything else is one UserError
    line naming the file and the field."""
    fix = "re-train or re-export the model"
    if not isinstance(meta, dict):
        raise UserError(f"{path} must hold a JSON object (a fewstep model.json), got a {type(meta).__name__}; {fix}")
    fmt = meta.get("format", MODEL_FORMAT)
    if fmt != MODEL_FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith("fewstep-model-") and fmt[14:].isdigit() and int(fmt[14:]) > 1
        raise UserError(f"{path}: format {fmt!r} " + (f"was written by a newer fewstep; upgrade fewstep to load it"
                                                      if newer else f"is not {MODEL_FORMAT!r}; {fix}"))

    def bad(field: str, need: str):
        top, _, sub = field.partition(".")
        value = (meta.get(top) or {}).get(sub) if sub else meta.get(top)
        try:
            shown = json.dumps(value)
        except (TypeError, ValueError):
            shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(f"{path}: field \"{field}\" must be {need}, got {'nothing' if value is None else shown}; "
                         f"{fix}")

    family = meta.get("family", "diffusion")
    if not isinstance(family, str):
        raise bad("family", "a family name (diffusion, arm, ebm, sm, ncsn)")
    if not isinstance(meta.get("net"), dict) or not isinstance(meta["net"].get("kind", ""), str):
        raise bad("net", "an object describing the network (with its \"kind\")")
    data = meta.get("data")
    if not isinstance(data, dict):
        raise bad("data", "an object with the data's \"shape\" (and \"kind\", \"num_classes\")")
    if not _positive_ints(data.get("shape")):
        raise bad("data.shape", "a list of positive whole numbers, e.g. [2] or [1, 16, 16]")
    nc = data.get("num_classes", 0)
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 0:
        raise bad("data.num_classes", "a whole number >= 0")
    if not isinstance(data.get("kind", "points"), str):
        raise bad("data.kind", "a data kind (points, image, clouds)")
    if meta.get("latent_shape") is not None and not _positive_ints(meta["latent_shape"]):
        raise bad("latent_shape", "a list of positive whole numbers")
    if not isinstance(meta.get("default_sampler"), (str, type(None))):
        raise bad("default_sampler", "a sampler name")
    if meta.get("sampling") is not None and not isinstance(meta["sampling"], dict):
        raise bad("sampling", "an object (the model's own sampling rule)")
    if family != "diffusion" and "sigma_min" not in meta and "sigma_max" not in meta:
        return meta
    for field in ("sigma_min", "sigma_max"):
        v = meta.get(field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad(field, "a finite number >= 0")
    if meta["sigma_min"] > meta["sigma_max"] or meta["sigma_max"] <= 0:  # equal: a one-step student
        raise bad("sigma_min", f"at most sigma_max ({meta['sigma_max']}), which must be above 0")
    own = meta.get("role") in (*AUX_ROLES, GENERATOR_ROLE)  # no process of its own: a net beside a teacher
    if family == "diffusion" and not isinstance(meta.get("denoiser"), dict) and not own:
        if not isinstance(meta.get("process"), dict):
            raise bad("process", "an object describing the noise process (with its \"kind\")")
        if not isinstance(meta.get("prediction"), str):
            raise bad("prediction", "a prediction name (eps, x0, v, score, flow, edm)")
    return meta


def check_weights(state: dict, path, into=None) -> None:
    """The tensors of a weights file (``path``): finite, and where ``into`` (the module built
    from model.json) is given, exactly its names, shapes and dtypes; else one UserError line
    naming the file and the tensor, so broken weights are never sampled into NaN."""
    fix = "re-train or re-export the model"
    if into is not None:
        want = into.state_dict()
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        if missing or extra:
            what = (f"lacks {len(missing)} tensor(s) of the net ('{missing[0]}')" if missing
                    else f"has {len(extra)} tensor(s) the net does not ('{extra[0]}')")
            raise UserError(f"{path} does not fit the network in model.json: it {what}; {fix}")
        for key, t in state.items():
            w = want[key]
            if tuple(t.shape) != tuple(w.shape):
                raise UserError(f"{path} does not fit the network in model.json: tensor '{key}' has shape "
                                f"{list(t.shape)}, the net {list(w.shape)}; {fix}")
            if t.dtype != w.dtype:
                raise UserError(f"{path}: tensor '{key}' is {str(t.dtype)[6:]}, the network in model.json stores "
                                f"{str(w.dtype)[6:]}; {fix}")
    for key, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path}: tensor '{key}' holds NaN or infinite values (a diverged or damaged model); {fix}")


def _default_sampler(meta: dict) -> Optional[str]:
    """A run folder's default sampler; None (the measured default for each budget) for a
    teacher, including teachers written before the measured defaults, which named "heun"."""
    name = meta.get("default_sampler")
    if name == "heun" and not meta.get("sampling"):
        return None
    return name


def _load_gmm(path: str, device) -> Model:
    from .process import EDM

    gmm = GaussianMixture.load(path)
    return Model(gmm, EDM(GMM_SIGMA_MIN, GMM_SIGMA_MAX), (gmm.dim,), GMM_SIGMA_MIN, GMM_SIGMA_MAX,
                 num_classes=gmm.num_classes, kind="points", name=f"gmm:{path}", meta={"role": "exact"},
                 device="cpu", dtype=torch.float64)


def denoiser_from_meta(meta: dict):
    """(denoiser, the module its weights load into) of a ``model.json``, with fresh weights:
    a student's own parametrization (``"denoiser"``) or ``ModelDenoiser`` of its process."""
    from .denoiser import ModelDenoiser
    from .nets import build_net
    from .process import make_process

    if isinstance(meta.get("net"), dict) and meta["net"].get("kind") == "diffusers":  # a student of a diffusers teacher
        from .interop.diffusers_teacher import diffusers_student_net

        net = diffusers_student_net(meta["net"]["source"], meta.get("lora"))
    else:
        net = build_net(meta["net"])
    if isinstance(meta.get("lora"), dict) and not meta["lora"].get("diffusers"):  # adapters before the weights
        from .nets.lora import add_lora

        spec = meta["lora"]
        add_lora(net, int(spec["rank"]), float(spec["alpha"]), list(spec["targets"]), list(spec.get("train", [])))
    if isinstance(meta.get("denoiser"), dict) and meta["denoiser"].get("kind") == MEANFLOW:
        spec = meta["denoiser"]
        return MeanFlowDenoiser(net, float(spec.get("sigma_data", 0.5)), float(spec.get("time_scale", 1.0))), net
    if isinstance(meta.get("denoiser"), dict):  # a distilled student's own parametrization
        from .students import build_denoiser

        return build_denoiser(meta["denoiser"], net, meta)
    return ModelDenoiser(net, make_process(**meta["process"]), meta["prediction"], meta.get("sigma_data", 0.5)), net


def _load_run(path: Path, device) -> Model:
    from .io import load_weights, read_json

    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise UserError(f"{path} holds no finished model (no model.json); finish it with "
                        f"'fewstep train --resume --out {path}'" if (path / "config.json").is_file()
                        else f"{path} is not a fewstep run folder (no model.json); give a run folder or gmm:FILE.npz")
    raw = read_json(meta_path)
    if isinstance(raw, dict) and raw.get("role") == "autoencoder":
        raise UserError(f"{path} is an autoencoder (fewstep train-autoencoder), not a model to sample; use it as a "
                        f"latent space (fewstep.nets.autoencoder.load_autoencoder)")
    meta = check_model_meta(raw, meta_path)
    weights = path / "model.safetensors"
    if meta.get("role") in AUX_ROLES:
        flag = {"covariance": "fewstep sample TEACHER --covariance", "discriminator": "fewstep sample TEACHER "
                "--discriminator"}[meta["role"]]
        raise UserError(f"{path} is a {meta['role']} run trained beside the teacher {meta.get('teacher', '?')}, "
                        f"not a model to sample; use it as {flag} {path}")
    if meta.get("role") == GENERATOR_ROLE:
        raise UserError(f"{path} is a generator distilled by score distillation from {meta.get('teacher', '?')}, not "
                        f"a model to sample with a sampler; get its outputs with 'fewstep sample {path} --n N --out "
                        f"F.npz'")
    if meta.get("family", "diffusion") != "diffusion":  # a model before diffusion (fewstep.families)
        from .families import load_family

        state = load_weights(weights)
        check_weights(state, weights)
        with _fields_of(meta_path):
            return load_family(meta, state, str(path), device)
    with _fields_of(meta_path):
        D, into = denoiser_from_meta(meta)
    state = load_weights(weights)
    check_weights(state, weights, into)
    try:
        into.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights} does not fit the network in model.json ({str(e).splitlines()[0]})") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    D.to(dev).eval()
    data = meta["data"]
    return Model(D, D.process, data["shape"], meta["sigma_min"], meta["sigma_max"], data.get("num_classes", 0),
                 _default_sampler(meta), data.get("kind", "points"), str(path), meta, device=dev,
                 latent_shape=meta.get("latent_shape"))


AUX_ROLES = ("covariance", "discriminator")  # run folders of a net trained beside a teacher, not a sampler model
GENERATOR_ROLE = "generator"  # a generator x = g(phi) trained by score distillation (fewstep distill sds)


class GeneratorRun:
    """A finished ``fewstep distill sds`` run: ``module`` (a :mod:`fewstep.nets.generators`
    generator, frozen), ``meta`` (its model.json); :meth:`sample` gives its outputs."""

    def __init__(self, module, meta: dict, path: str = ""):
        self.module, self.meta, self.path = module, meta, str(path)
        self.kind = module.config["kind"]
        self.shape = tuple(meta["data"]["shape"])

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """The first ``n`` points / images (at most the run's ``count``: one line when more are
        asked), or ``n`` renders of the field from random views drawn with ``seed``."""
        count = self.module.config.get("count")
        if count is not None and int(n) > int(count):
            raise UserError(f"--n {n}: the {self.kind} generator {self.path} holds {count} outputs; ask for at most "
                            f"{count} (or distil with a larger --count)")
        return self.module.outputs(int(n), torch.Generator().manual_seed(int(seed)))


def _role_run(spec, roles: tuple, what: str, made: str, build, device):
    """A finished run folder of one of ``roles``: (path, its model.json, the module ``build(meta["net"])``
    with its checked weights, the device); one line when it is not one (``made``: how to make one)."""
    from .io import load_weights, read_json

    device = resolve_device(device)
    path = Path(str(spec))
    if not (path / "model.json").is_file():
        raise UserError(f"{spec} is not a finished run folder (no model.json); give {what}")
    meta = check_model_meta(read_json(path / "model.json"), path / "model.json")
    got = meta.get("role")
    if got not in roles:
        raise UserError(f"{spec} is not {what} (its role: {got or 'a sampler model'}); make one with {made}")
    with _fields_of(path / "model.json"):
        module = build(meta["net"])
    weights = path / "model.safetensors"
    state = load_weights(weights)
    check_weights(state, weights, module)
    module.load_state_dict(state)
    return path, meta, module, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_generator(spec, device: Optional[str] = None) -> GeneratorRun:
    """The :class:`GeneratorRun` of run folder ``spec`` (weights checked, frozen, on ``device``)."""
    from .nets.generators import build_generator

    path, meta, module, dev = _role_run(spec, (GENERATOR_ROLE,), "a generator run", "fewstep distill sds --teacher "
                                        "RUN", build_generator, device)
    return GeneratorRun(module.to(dev).eval().requires_grad_(False), meta, str(path))


class Auxiliary(torch.nn.Module):
    """A network trained beside a frozen teacher (``"role"`` in its model.json): the covariance
    head of ``fewstep distill covariance`` or the time-dependent discriminator of ``fewstep
    distill discriminator``. ``aux(y, sigma, labels=None)`` evaluates the net on the input a
    denoiser of the same net would see: with ``"input": {"process": ..., "prediction": ...}``
    in model.json the teacher's own convention (so a head that starts from the teacher's
    weights sees what they were trained on), else EDM scaling (c_in y, ln(sigma) / 4 with the
    run's ``sigma_data``), inputs of unit scale at every level. ``output`` says what comes
    back: ``"map"`` the net's output as is (shaped like the data), ``"logit"`` one number per
    sample (the mean of the net's output: a linear read-out, so any net of the project is a
    scalar head)."""

    def __init__(self, net, meta: dict, path: str = ""):
        super().__init__()
        from .denoiser import ModelDenoiser
        from .process import EDM, make_process

        self.meta, self.path = meta, str(path)
        self.role = meta["role"]
        sd = float(meta.get("sigma_data", 0.5))
        self.output = meta.get("output", "map")
        if self.output not in ("map", "logit"):
            raise UserError(f"{path}: field \"output\" must be map or logit, got {self.output!r}; re-train the run")
        inp = meta.get("input")
        if isinstance(inp, dict):
            self.inp = ModelDenoiser(net, make_process(**inp["process"]), inp["prediction"], sd)
        else:
            self.inp = ModelDenoiser(net, EDM(1e-3, 1e3), "edm", sd)  # edm inputs ignore the process's range

    @property
    def net(self):
        return self.inp.net

    def forward(self, y, sigma, labels=None):
        s = sigma if torch.is_tensor(sigma) else torch.tensor(float(sigma), dtype=y.dtype, device=y.device)
        s = s.to(device=y.device, dtype=y.dtype).reshape(-1)
        s = s.expand(y.shape[0]) if s.numel() == 1 else s
        if not (self.meta.get("data") or {}).get("num_classes"):
            labels = None  # an unconditional head beside a conditional teacher: it takes no labels
        x_in, c_noise, _ = self.inp.net_input(y, s)
        dt = self.inp._net_dtype(y)  # the net runs in its own dtype, the answer comes back in y's
        x_in, c_noise = x_in.to(dt), c_noise.to(dt)
        out = (self.net(x_in, c_noise) if labels is None else self.net(x_in, c_noise, labels=labels)).to(y.dtype)
        return out.flatten(1).mean(1) if self.output == "logit" else out


def load_auxiliary(spec, role: Optional[str] = None, device: Optional[str] = None) -> Auxiliary:
    """The :class:`Auxiliary` of run folder ``spec`` (frozen, eval mode, on ``device``);
    ``role`` (covariance, discriminator) is checked when given: one line when it differs."""
    from .nets import build_net

    what = f"a {role} run" if role else "an auxiliary run (" + ", ".join(AUX_ROLES) + ")"
    made = f"fewstep distill {role} --teacher RUN" if role else "fewstep distill covariance|discriminator"
    path, meta, net, dev = _role_run(spec, (role,) if role else AUX_ROLES, what, made, build_net, device)
    with _fields_of(path / "model.json"):
        aux = Auxiliary(net, meta, str(path))
    return aux.to(dev).eval().requires_grad_(False)


COVARIANCE_FORMS = ("sn", "npr")


def npr_unit(sigma, sigma_data: float):
    """c^2 = s^2 sd^2 / (s^2 + sd^2), the unit of an NPR covariance head's output
    (:mod:`fewstep.methods.covariance`)."""
    return sigma**2 * sigma_data**2 / (sigma**2 + sigma_data**2)


class CovarianceHead:
    """diag Cov[x0 | y] from a covariance run (Bao et al. 2022a, eq. 8-11), the ``covariance=``
    of the DDPM / DDIM / Analytic-DPM samplers: ``head(y, sigma, D, **cond)``. The run's net h
    predicts, SN-DPM: E[eps^2 | y], so Cov = s^2 h - (y - D)^2 (= s^2 (h - eps_hat^2));
    NPR-DPM: E[(x0 - D)^2 | y] / c^2 of the teacher's own residual (:func:`npr_unit`), so
    Cov = c^2 h. Negative values are left to the sampler's clip."""

    def __init__(self, aux: Auxiliary):
        self.aux, self.form = aux, aux.meta.get("form")
        if self.form not in COVARIANCE_FORMS:
            raise UserError(f"{aux.path}: field \"form\" must be sn or npr, got {self.form!r}; re-train the run")
        self.sigma_data = float(aux.meta.get("sigma_data", 0.5))

    def __call__(self, y, sigma, denoised, labels=None, **cond):
        s = torch.as_tensor(sigma, dtype=y.dtype, device=y.device).reshape(-1, *([1] * (y.ndim - 1)))
        h = self.aux(y, sigma, labels).to(y.dtype)
        if self.form == "sn":
            return s**2 * h - (y - denoised) ** 2
        return npr_unit(s, self.sigma_data) * h


def load_covariance(spec, device: Optional[str] = None) -> CovarianceHead:
    """The :class:`CovarianceHead` of a ``fewstep distill covariance`` run folder."""
    return CovarianceHead(load_auxiliary(spec, "covariance", device))


class _fields_of:
    """``with _fields_of(model_json):`` turns a KeyError / TypeError / ValueError of building a
    model from its fields (a field missing or of the wrong type, deeper than
    :func:`check_model_meta` looks) into one UserError line naming the file."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and issubclass(kind, (KeyError, TypeError, ValueError, AttributeError, IndexError)):
            what = f"field {err}" if kind is KeyError else " ".join(str(err).split())[:120]
            raise UserError(f"{self.path}: cannot build the model ({kind.__name__}: {what}); "
                            f"re-train or re-export the model") from None
        return False


def load(spec: str, device: Optional[str] = None) -> Model:
    """Load a run folder, ``gmm:FILE.npz`` or ``diffusers:PATH`` as a :class:`Model`; a
    ``device`` that does not exist here is one line naming the available ones."""
    device = resolve_device(device)
    spec = str(spec)
    if spec.startswith("gmm:"):
        return _load_gmm(spec[4:], device)
    if spec.startswith("diffusers:"):
        from .interop.diffusers_teacher import load_diffusers_teacher

        return load_diffusers_teacher(spec[len("diffusers:"):], device)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"model '{spec}' not found: give a run folder or gmm:FILE.npz")
    return _load_run(path, device)
