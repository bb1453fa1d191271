"""Students' own parametrizations, beside :class:`~fewstep.denoiser.ModelDenoiser`: each keeps
the denoiser contract ``D(y, sigma, **cond) -> x0``, so every sampler and
:func:`fewstep.load` treat a student like any model.

    ConsistencyDenoiser   f(y, sigma) = c_skip y + c_out F(c_in y, ln(sigma)/4), exactly y at
                          sigma_min (Song et al. 2023, eq. 5 and App. C)
    Generator             x0 = G(z): a latent of its own dimension through a linear map and the
                          student net at a fixed level (Luhman & Luhman 2021's student as a
                          stochastic generator, survey section 3.2)
    TrigFlowDenoiser      f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise(t)) at x_t = cos(t) y,
                          t = arctan(sigma / sd): a TrigFlow consistency model (Lu & Song 2024, sCM),
                          exactly y at sigma = 0; with its learned loss weight w_phi(t)

``model.json['denoiser']`` names the kind (:func:`build_denoiser`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import unknown_name
from .process import EDM, _bcast

__all__ = ["ConsistencyDenoiser", "Generator", "TrigFlowDenoiser", "AdaptiveWeight", "build_denoiser",
           "consistency_precond", "TRIGFLOW_TIMES"]


def consistency_precond(sigma: Tensor, sigma_min: float, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) of a consistency model:
    c_skip = sd^2 / ((sigma - eps)^2 + sd^2), c_out = sd (sigma - eps) / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4. The constants are tensors of
    sigma's dtype, so at sigma = sigma_min the difference is an exact 0 and c_skip = 1,
    c_out = 0 bit for bit."""
    sd = torch.tensor(sigma_data, dtype=sigma.dtype, device=sigma.device)
    delta = sigma - torch.tensor(sigma_min, dtype=sigma.dtype, device=sigma.device)
    c_skip = sd * sd / (delta * delta + sd * sd)
    c_out = sd * delta / torch.sqrt(sigma * sigma + sd * sd)
    c_in = torch.rsqrt(sigma * sigma + sd * sd)
    return c_skip, c_out, c_in, 0.25 * torch.log(sigma)


class ConsistencyDenoiser(nn.Module):
    """f(y, sigma) = c_skip y + c_out F(c_in y, ln(sigma)/4), exactly y at sigma_min."""

    prediction = "consistency"

    def __init__(self, net: nn.Module, sigma_min: float = 0.002, sigma_data: float = 0.5, sigma_max: float = 80.0):
        super().__init__()
        self.net, self.sigma_min, self.sigma_data = net, float(sigma_min), float(sigma_data)
        self.process = EDM(self.sigma_min, float(sigma_max))

    def net_input(self, y: Tensor, sigma: Tensor):
        _, _, c_in, c_noise = consistency_precond(sigma.to(y.dtype), self.sigma_min, self.sigma_data)
        return _bcast(c_in, y) * y, c_noise, None

    def output_to_x0(self, out: Tensor, y: Tensor, sigma: Tensor, x_in: Tensor, c) -> Tensor:
        c_skip, c_out, _, _ = consistency_precond(sigma.to(y.dtype), self.sigma_min, self.sigma_data)
        return _bcast(c_skip, y) * y + _bcast(c_out, y) * out

    def forward(self, y: Tensor, sigma, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        sigma = sigma.expand(y.shape[0]) if sigma.ndim == 0 else sigma
        x_in, c_noise, _ = self.net_input(y, sigma)
        return self.output_to_x0(self.net(x_in, c_noise, **cond).to(y.dtype), y, sigma, x_in, None)


class Generator(nn.Module):
    """x0 = G(z): the latent z (dimension m, given at scale sigma_max as every model's noise)
    goes through a linear map to the data's shape, then the student net at a fixed level.

    Presents the denoiser contract D(x, sigma) (sigma is ignored) so the one-step sampling
    rule and ``fewstep.load`` treat it like any student."""

    prediction = "generator"

    def __init__(self, net: nn.Module, latent_dim: int, shape, sigma_max: float):
        super().__init__()
        self.net, self.latent_dim, self.shape = net, int(latent_dim), tuple(shape)
        d = math.prod(self.shape)
        self.inp = nn.Linear(self.latent_dim, d)
        with torch.no_grad():  # start as the coordinate embedding z -> (z, 0) / (z_1..d)
            self.inp.weight.copy_(torch.eye(d, self.latent_dim))
            self.inp.bias.zero_()
        self.sigma_max, self.sigma_data = float(sigma_max), 0.5
        self.process = EDM(0.002, self.sigma_max)

    def forward(self, x, sigma=None, **cond):
        z = x.reshape(x.shape[0], -1) / self.sigma_max
        h = self.inp(z).reshape((x.shape[0],) + self.shape)
        return self.net(h, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), **cond)


TRIGFLOW_TIMES = ("t", "edm")  # the net's time input: time_scale * t, or EDM's ln(sd tan t) / 4


class AdaptiveWeight(nn.Module):
    """w_phi(t): the learned log-weight of sCM's adaptive weighting (Lu & Song 2024, eq. 9), a
    small MLP on the Fourier features [cos(k t), sin(k t)], k = 1..K, of the TrigFlow time
    t in [0, pi/2]; its output layer starts at zero (w = 0: every time weighted 1)."""

    def __init__(self, harmonics: int = 8, hidden: int = 32):
        super().__init__()
        self.register_buffer("k", torch.arange(1, int(harmonics) + 1, dtype=torch.float32), persistent=False)
        self.fc1, self.fc2 = nn.Linear(2 * int(harmonics), int(hidden)), nn.Linear(int(hidden), 1)
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.zero_()

    def forward(self, t: Tensor) -> Tensor:
        a = t.reshape(-1, 1).to(self.fc1.weight.dtype) * self.k.to(self.fc1.weight.dtype)
        return self.fc2(torch.nn.functional.silu(self.fc1(torch.cat([a.cos(), a.sin()], 1)))).reshape(-1)


class TrigFlowDenoiser(nn.Module):
    """A TrigFlow consistency model (sCM, Lu & Song 2024) as the sigma-space denoiser D(y, sigma).

    TrigFlow: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2], i.e. x_t = cos(t) y
    with y = x0 + sigma eps and sigma = sd tan(t). The consistency function

        f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise(t)),  F = sign * net

    is x_t itself at t = 0 (f(x, 0) = x), and D(y, sigma) = f(cos(t) y, t): every sampler and
    ``fewstep.load`` see an ordinary denoiser (at sigma = 0 it returns y exactly). c_noise(t) is
    ``time_scale * t`` (``time="t"``, the paper's identity time input with time_scale 1) or
    EDM's ln(sd tan t) / 4 (``time="edm"``, with ``sign`` -1: an EDM-preconditioned net is
    exactly this parametrization, F = -F_edm, so an EDM teacher's weights start sCD).

    ``weight`` (an :class:`AdaptiveWeight`, or None) is the training loss's w_phi(t), saved with
    the student. ``forward(x_t, t, trigflow=True)`` returns (F(x_t / sd, c_noise(t)), w_phi(t))
    for training (through the module's own forward, so a wrapped (DDP) student syncs both)."""

    prediction = "trigflow"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 time: str = "t", time_scale: float = 1.0, sign: float = 1.0, weighting: bool = True):
        super().__init__()
        if time not in TRIGFLOW_TIMES:
            raise unknown_name("trigflow time input", time, TRIGFLOW_TIMES)
        self.net, self.sigma_data = net, float(sigma_data)
        self.time, self.time_scale, self.sign = time, float(time_scale), float(sign)
        self.weight = AdaptiveWeight() if weighting else None
        self.process = EDM(float(sigma_min), float(sigma_max))

    def spec(self) -> dict:
        """model.json's ``"denoiser"``."""
        return {"kind": "trigflow", "sigma_data": self.sigma_data, "sigma_min": float(self.process.sigma_min),
                "sigma_max": float(self.process.sigma_max), "time": self.time, "time_scale": self.time_scale,
                "sign": self.sign, "weighting": self.weight is not None}

    def c_noise(self, t: Tensor) -> Tensor:
        if self.time == "edm":
            return 0.25 * torch.log(self.sigma_data * torch.tan(t))
        return self.time_scale * t

    def F(self, x_in: Tensor, t: Tensor, **cond) -> Tensor:
        """F(x_in, c_noise(t)) = sign * net(x_in, c_noise(t)): x_in = x_t / sd, t per sample."""
        out = self.net(x_in, self.c_noise(t), **cond).to(x_in.dtype)
        return out if self.sign == 1.0 else self.sign * out

    def consistency(self, x_t: Tensor, t: Tensor, **cond) -> Tensor:
        """f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t) in TrigFlow coordinates."""
        c, s = _bcast(torch.cos(t), x_t), _bcast(torch.sin(t), x_t)
        return c * x_t - s * self.sigma_data * self.F(x_t / self.sigma_data, t, **cond)

    def forward(self, y: Tensor, sigma, trigflow: bool = False, **cond):
        if trigflow:  # training: y is x_t and sigma is t
            F = self.F(y / self.sigma_data, sigma, **cond)
            w = self.weight(sigma) if self.weight is not None else torch.zeros_like(sigma)
            return F, w.to(F.dtype)
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        sigma = sigma.expand(y.shape[0]) if sigma.ndim == 0 else sigma
        t = torch.atan(sigma / self.sigma_data)
        safe = torch.where(t > 0, t, torch.ones_like(t))  # no net call at t = 0 (EDM's time input is -inf)
        out = self.consistency(_bcast(torch.cos(safe), y) * y, safe, **cond)
        return torch.where((t > 0).reshape(t.shape + (1,) * (y.ndim - t.ndim)), out, y)


class LCMDenoiser(nn.Module):
    """A latent consistency model's consistency function (Luo et al. 2023, eq. 9 and the
    boundary scalings of their code, ``LCMScheduler``): the student keeps its teacher's
    parametrization ``inner`` (a :class:`~fewstep.denoiser.ModelDenoiser`: D(y, sigma, w) the
    x0 estimate of the net, which also takes the guidance w as its ``cond`` input), and

        f(y, sigma) = c_skip(tau) y + c_out(tau) D(y, sigma),
        c_skip = sd^2 / ((s tau)^2 + sd^2),  c_out = s tau / sqrt((s tau)^2 + sd^2),

    with tau the time of ``time_process`` (the process whose uniform time grid gave the DDIM
    levels) on LCM's scale of 1000 DDPM timesteps, measured from the boundary,
    tau = 1000 (t(sigma) - t(sigma_min)) / (t_max - t_min), and s = ``timestep_scaling``
    (LCM's 10). f(y, sigma_min) = y exactly; one level up f is the net's x0 estimate up to
    a c_skip of ~1e-5."""

    prediction = "lcm"

    def __init__(self, inner, sigma_min: float, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                 time_process=None):
        super().__init__()
        self.inner, self.sigma_min = inner, float(sigma_min)
        self.sigma_data, self.timestep_scaling = float(sigma_data), float(timestep_scaling)
        self.process = inner.process
        self.time_process = time_process if time_process is not None else inner.process

    @property
    def net(self):
        return self.inner.net

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) at levels ``sigma`` (float64 arithmetic)."""
        p = self.time_process
        s = sigma.double()
        # the boundary in sigma's own precision, so f(y, sigma_min) = y exactly in float32 too
        t0 = p.t_of_sigma(torch.tensor(self.sigma_min, dtype=sigma.dtype, device=s.device).double())
        tau = 1000.0 * (p.t_of_sigma(s) - t0).clamp_min(0) / (float(p.t_max) - float(p.t_min))
        st, sd2 = self.timestep_scaling * tau, self.sigma_data ** 2
        return sd2 / (st ** 2 + sd2), st / torch.sqrt(st ** 2 + sd2)

    def net_input(self, y: Tensor, sigma: Tensor):
        return self.inner.net_input(y, sigma)

    def output_to_x0(self, out: Tensor, y: Tensor, sigma: Tensor, x_in: Tensor, c) -> Tensor:
        c_skip, c_out = self.scalings(sigma)
        x0 = self.inner.output_to_x0(out, y, sigma, x_in, c)
        return _bcast(c_skip.to(y.dtype), y) * y + _bcast(c_out.to(y.dtype), y) * x0

    def forward(self, y: Tensor, sigma, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
        sigma = sigma.expand(y.shape[0]) if sigma.ndim == 0 else sigma
        x_in, c_noise, c = self.net_input(y, sigma)
        return self.output_to_x0(self.net(x_in, c_noise.to(y.dtype), **cond).to(y.dtype), y, sigma, x_in, c)


def build_denoiser(spec: dict, net, meta: dict):
    """A student's own parametrization from ``model.json['denoiser']`` (used by
    :func:`fewstep.load`): returns (denoiser, the module the weights load into)."""
    kind = spec.get("kind")
    if kind == "consistency":
        D = ConsistencyDenoiser(net, float(spec["sigma_min"]), float(spec["sigma_data"]), float(spec["sigma_max"]))
        return D, net
    if kind == "generator":
        D = Generator(net, int(spec["latent_dim"]), tuple(meta["data"]["shape"]), float(spec["sigma_max"]))
        return D, D
    if kind == "trigflow":
        D = TrigFlowDenoiser(net, float(spec["sigma_data"]), float(spec["sigma_min"]), float(spec["sigma_max"]),
                             str(spec.get("time", "t")), float(spec.get("time_scale", 1.0)),
                             float(spec.get("sign", 1.0)), bool(spec.get("weighting", True)))
        return D, D
    if kind == "lcm":
        from .denoiser import ModelDenoiser
        from .process import make_process

        inner = ModelDenoiser(net, make_process(**spec["process"]), str(spec["prediction"]),
                              float(spec.get("inner_sigma_data", 0.5)))
        return LCMDenoiser(inner, float(spec["sigma_min"]), float(spec["sigma_data"]),
                           float(spec.get("timestep_scaling", 10.0)),
                           make_process(**spec["time_process"]) if spec.get("time_process") else None), net
    raise unknown_name("student denoiser kind", kind, ["consistency", "generator", "trigflow", "lcm"])
