"""Noise processes in the EDM paper's notation (Karras et al. 2022, eq. 10-12).

Every Gaussian diffusion perturbs data as

    x_t = scale(t) * (x0 + sigma(t) * eps),      eps ~ N(0, I)

so ``scale(t)`` is the usual alpha_t and ``sigma(t) = std_t / alpha_t`` is the level in
*sigma-space* ``y = x / scale(t) = x0 + sigma * eps``, the one space all samplers use.
The forward SDE is ``dx = f(t) x dt + g(t) dw`` with (EDM eq. 28)

    f(t) = scale'(t) / scale(t),     g(t) = scale(t) * sqrt(2 * sigma(t) * sigma'(t)).

Each process is written once here; derivatives come from autograd on the closed forms,
so a new process needs only ``scale``, ``sigma`` and ``t_of_sigma``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import UserError, build_named, unknown_name

__all__ = ["Process", "VP", "VPDiscrete", "VE", "EDM", "LinearFlow", "make_process", "PROCESSES", "PROCESS_ALIASES",
           "process_from_config"]


def _as_tensor(t, like: Optional[Tensor] = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    return torch.as_tensor(t, dtype=dtype)


def _ddt(fn, t: Tensor) -> Tensor:
    """Elementwise derivative of ``fn`` at ``t`` by autograd."""
    with torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        out = fn(tt)
        if not out.requires_grad:  # constant in t (e.g. scale = 1)
            return torch.zeros_like(tt)
        (grad,) = torch.autograd.grad(out.sum(), tt)
    return grad


class Process:
    """Base class: x_t = scale(t) * (x0 + sigma(t) * eps) for t in [t_min, t_max]."""

    name = "process"
    t_min: float = 0.0
    t_max: float = 1.0

    # --- closed forms each process provides -------------------------------------------
    def scale(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def c_noise(self, t: Tensor) -> Tensor:
        """The noise-level input a network sees for this process (default: t)."""
        return t

    def t_of_c_noise(self, c: Tensor) -> Tensor:
        return c

    def config(self) -> dict:
        """JSON-serialisable description; ``make_process(**config)`` rebuilds it."""
        raise NotImplementedError

    # --- derived ------------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha_t^2 / std_t^2) = -2 log sigma(t)."""
        return -2.0 * torch.log(self.sigma(_as_tensor(t)))

    def scale_of_sigma(self, sigma: Tensor) -> Tensor:
        """alpha at the time where the level is sigma (closed forms override this)."""
        return self.scale(self.t_of_sigma(sigma))

    def std(self, t: Tensor) -> Tensor:
        """std_t = scale(t) * sigma(t), the x-space noise standard deviation."""
        t = _as_tensor(t)
        return self.scale(t) * self.sigma(t)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(t) x with f = d log scale / dt (forward SDE drift)."""
        t = _as_tensor(t, x)
        f = _ddt(lambda u: torch.log(self.scale(u)), t)
        return _bcast(f, x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        """g(t) = scale(t) * sqrt(d sigma(t)^2 / dt)."""
        t = _as_tensor(t)
        dsig2 = _ddt(lambda u: self.sigma(u) ** 2, t)
        return self.scale(t) * torch.sqrt(dsig2.clamp_min(0))

    def dscale_dt(self, t: Tensor) -> Tensor:
        return _ddt(self.scale, _as_tensor(t))

    def dstd_dt(self, t: Tensor) -> Tensor:
        return _ddt(self.std, _as_tensor(t))

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = scale(t) (x0 + sigma(t) eps), with t of shape [batch]."""
        return _bcast(self.scale(t), x0) * (x0 + _bcast(self.sigma(t), x0) * eps)

    def to_sigma_space(self, x: Tensor, t: Tensor) -> Tensor:
        return x / _bcast(self.scale(_as_tensor(t, x)), x)

    def from_sigma_space(self, y: Tensor, t: Tensor) -> Tensor:
        return y * _bcast(self.scale(_as_tensor(t, y)), y)

    def prior(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
              device=None, dtype=None) -> Tensor:
        """x_T ~ N(0, std(t_max)^2 I), the process's starting distribution (x-space)."""
        dtype = dtype or torch.get_default_dtype()
        eps = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return eps * float(self.std(torch.tensor(self.t_max, dtype=torch.float64)))

    def sample_t(self, n: int, generator=None, device=None) -> Tensor:
        """Training times: uniform in [t_min, t_max] unless a process says otherwise."""
        u = torch.rand(n, generator=generator, device=device)
        return self.t_min + (self.t_max - self.t_min) * u

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample [B] (or scalar) tensor to broadcast against ``like``."""
    v = v.to(like.dtype) if v.dtype != like.dtype and like.is_floating_point() else v
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


class VP(Process):
    """Variance-preserving process, continuous time t in [t_min, t_max] (Song et al. 2021).

    scale(t)^2 = alpha_bar(t), sigma(t) = sqrt(1 / alpha_bar(t) - 1). Schedules:
    ``linear``: log alpha_bar(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2);
    ``cosine``: alpha_bar(t) = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))
    (Nichol & Dhariwal 2021), t_max = 0.9946 as in DPM-Solver so sigma stays finite.
    The network sees c_noise = 1000 t (the ScoreSDE / diffusers convention).
    """

    name = "vp"

    def __init__(self, schedule: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0,
                 s: float = 0.008, t_min: float = 1e-3, t_max: Optional[float] = None):
        if schedule not in ("linear", "cosine"):
            raise unknown_name("VP schedule", schedule, ["linear", "cosine"])
        self.schedule, self.beta_min, self.beta_max, self.s = schedule, beta_min, beta_max, s
        self.t_min = t_min
        self.t_max = t_max if t_max is not None else (1.0 if schedule == "linear" else 0.9946)

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, **kw) -> "VP":
        return cls("linear", beta_min=beta_min, beta_max=beta_max, **kw)

    @classmethod
    def cosine(cls, s: float = 0.008, **kw) -> "VP":
        return cls("cosine", s=s, **kw)

    @staticmethod
    def from_betas(betas) -> "VPDiscrete":
        return VPDiscrete(betas)

    def _neg_log_abar(self, t: Tensor) -> Tensor:
        if self.schedule == "linear":
            return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2
        c0 = math.cos(0.5 * math.pi * self.s / (1 + self.s))
        return -2.0 * (torch.log(torch.cos(0.5 * math.pi * (t + self.s) / (1 + self.s))) - math.log(c0))

    def scale(self, t):
        return torch.exp(-0.5 * self._neg_log_abar(_as_tensor(t)))

    def sigma(self, t):
        return torch.sqrt(torch.expm1(self._neg_log_abar(_as_tensor(t))))

    def t_of_sigma(self, sigma):
        L = torch.log1p(_as_tensor(sigma) ** 2)  # = -log alpha_bar
        if self.schedule == "linear":
            d = self.beta_max - self.beta_min
            return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * L)) / d if d else L / self.beta_min
        c0 = math.cos(0.5 * math.pi * self.s / (1 + self.s))
        return torch.acos(torch.exp(-0.5 * L) * c0) * 2 * (1 + self.s) / math.pi - self.s

    def c_noise(self, t):
        return 1000.0 * t

    def t_of_c_noise(self, c):
        return c / 1000.0

    def scale_of_sigma(self, sigma):
        return torch.rsqrt(1 + _as_tensor(sigma) ** 2)  # alpha^2 + std^2 = 1

    def config(self):
        return dict(kind="vp", schedule=self.schedule, beta_min=self.beta_min, beta_max=self.beta_max,
                    s=self.s, t_min=self.t_min, t_max=self.t_max)


class VPDiscrete(Process):
    """Discrete DDPM schedule from betas: t is diffusers' timestep index in [0, N-1].

    scale(t)^2 = alphas_cumprod[t] = prod_{i<=t} (1 - beta_i) at integer t; between
    integers log sigma is interpolated linearly in t (k-diffusion's DiscreteSchedule), and
    ``t_of_sigma`` inverts that interpolation exactly.
    """

    name = "vp_discrete"

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError("VP.from_betas: betas must be a 1-D array of at least 2 values in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.log_sigmas = 0.5 * torch.log((1 - self.alphas_cumprod) / self.alphas_cumprod)
        self.t_min, self.t_max = 0.0, float(len(betas) - 1)

    @classmethod
    def diffusers(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, beta_schedule: str = "linear") -> "VPDiscrete":
        """The betas of diffusers' ``linear`` and ``scaled_linear`` schedules."""
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            i = torch.arange(num_train_timesteps, dtype=torch.float64)
            f = lambda u: torch.cos((u / num_train_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.clamp(1 - f(i + 1) / f(i), max=0.999)
        else:
            raise unknown_name("beta_schedule", beta_schedule, ["linear", "scaled_linear", "squaredcos_cap_v2"])
        return cls(betas)

    def _log_sigma(self, t: Tensor) -> Tensor:
        t = _as_tensor(t).clamp(self.t_min, self.t_max)
        ls = self.log_sigmas.to(device=t.device)
        lo = t.detach().floor().long().clamp(0, len(ls) - 2)
        w = (t - lo.to(t.dtype)).to(torch.float64 if t.dtype == torch.float64 else t.dtype)
        return (ls[lo] * (1 - w) + ls[lo + 1] * w).to(t.dtype)

    def sigma(self, t):
        return torch.exp(self._log_sigma(t))

    def scale(self, t):
        return torch.rsqrt(1 + self.sigma(t) ** 2)

    def scale_of_sigma(self, sigma):
        return torch.rsqrt(1 + _as_tensor(sigma) ** 2)

    def t_of_sigma(self, sigma):
        sigma = _as_tensor(sigma)
        ls = self.log_sigmas.to(device=sigma.device, dtype=sigma.dtype)
        lsig = torch.log(sigma).clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, lsig.detach().contiguous().flatten()).reshape(lsig.shape).clamp(1, len(ls) - 1)
        lo = hi - 1
        w = (lsig - ls[lo]) / (ls[hi] - ls[lo])
        return lo.to(sigma.dtype) + w

    def sample_t(self, n, generator=None, device=None):
        """Integer timesteps 0..N-1, as DDPM trains."""
        return torch.randint(0, len(self.betas), (n,), generator=generator, device=device).to(torch.get_default_dtype())

    def config(self):
        return dict(kind="vp_discrete", betas=self.betas.tolist())


class VE(Process):
    """Variance-exploding process (Song et al. 2021): scale = 1,
    sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [0, 1]; c_noise = log(sigma)/4."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise UserError(f"VE: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self._smin, self._smax = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = 0.0, 1.0

    def scale(self, t):
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t):
        t = _as_tensor(t)
        return self._smin * torch.exp(t * math.log(self._smax / self._smin))

    def t_of_sigma(self, sigma):
        return torch.log(_as_tensor(sigma) / self._smin) / math.log(self._smax / self._smin)

    def c_noise(self, t):
        return 0.25 * torch.log(self.sigma(t))

    def t_of_c_noise(self, c):
        return self.t_of_sigma(torch.exp(4 * c))

    def config(self):
        return dict(kind="ve", sigma_min=self._smin, sigma_max=self._smax)


class EDM(Process):
    """EDM (Karras et al. 2022): scale = 1, sigma(t) = t in [sigma_min, sigma_max].

    Training levels follow EDM's log-normal: ln sigma ~ N(P_mean, P_std^2);
    c_noise = log(sigma) / 4.
    """

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 p_mean: float = -1.2, p_std: float = 1.2):
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.p_mean, self.p_std = p_mean, p_std

    def scale(self, t):
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t):
        return _as_tensor(t).clone()

    def t_of_sigma(self, sigma):
        return _as_tensor(sigma).clone()

    def c_noise(self, t):
        return 0.25 * torch.log(_as_tensor(t))

    def t_of_c_noise(self, c):
        return torch.exp(4 * c)

    def sample_t(self, n, generator=None, device=None):
        z = torch.randn(n, generator=generator, device=device)
        return torch.exp(self.p_mean + self.p_std * z).clamp(self.t_min, self.t_max)

    def config(self):
        return dict(kind="edm", sigma_min=self.t_min, sigma_max=self.t_max, p_mean=self.p_mean, p_std=self.p_std)


class LinearFlow(Process):
    """Rectified-flow interpolation x_t = (1 - t) x0 + t eps (Liu et al. 2022).

    scale = 1 - t, sigma = t / (1 - t), t_of_sigma = sigma / (1 + sigma). t_max < 1 keeps
    sigma finite (sigma(0.999) = 999); c_noise = 1000 t.
    """

    name = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999):
        self.t_min, self.t_max = float(t_min), float(t_max)

    def scale(self, t):
        return 1 - _as_tensor(t)

    def sigma(self, t):
        t = _as_tensor(t)
        return t / (1 - t)

    def t_of_sigma(self, sigma):
        sigma = _as_tensor(sigma)
        return sigma / (1 + sigma)

    def c_noise(self, t):
        return 1000.0 * t

    def t_of_c_noise(self, c):
        return c / 1000.0

    def prior(self, shape, generator=None, device=None, dtype=None):
        """x_1 = eps: the flow starts from pure noise (the x0 share at t_max is neglected)."""
        dtype = dtype or torch.get_default_dtype()
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def config(self):
        return dict(kind="flow", t_min=self.t_min, t_max=self.t_max)


PROCESSES = {
    "vp": lambda **kw: VP(**kw),
    "vp_cosine": lambda **kw: VP.cosine(**kw),
    "vp_discrete": lambda betas=None, **kw: VPDiscrete(betas) if betas is not None else VPDiscrete.diffusers(**kw),
    "ve": lambda **kw: VE(**kw),
    "edm": lambda **kw: EDM(**kw),
    "flow": lambda **kw: LinearFlow(**kw),
}


def make_process(kind: str, **kwargs) -> Process:
    """Build a process by name (``vp``, ``vp_cosine``, ``vp_discrete``, ``ve``, ``edm``,
    ``flow``) or from a ``config()`` dict: ``make_process(**proc.config())``."""
    return build_named(PROCESSES, kind, "process", kwargs)


# the names a config may give for a process ("ddpm" is diffusers' discrete VP)
PROCESS_ALIASES = {"vp": "vp", "vp_cosine": "vp_cosine", "vp_discrete": "vp_discrete", "ddpm": "vp_discrete",
                   "ve": "ve", "edm": "edm", "flow": "flow"}


def process_from_config(spec):
    """'vp' / {'kind': 'vp', ...} -> a Process."""
    if isinstance(spec, dict):
        return make_process(**spec)
    if spec not in PROCESS_ALIASES:
        raise unknown_name("process", spec, PROCESS_ALIASES)
    return make_process(PROCESS_ALIASES[spec])
