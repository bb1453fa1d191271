"""Students' own parametrizations, beside :class:`~fewstep.denoiser.ModelDenoiser`: each keeps
the denoiser contract ``D(y, sigma, **cond) -> x0``, so every sampler and
:func:`fewstep.load` treat a student like any model.

    ConsistencyDenoiser   f(y, sigma) = c_skip y + c_out F(c_in y, ln(sigma)/4), exactly y at
                          sigma_min (Song et al. 2023, eq. 5 and App. C)
    Generator             x0 = G(z): a latent of its own dimension through a linear map and the
                          student net at a fixed level (Luhman & Luhman 2021's student as a
                          stochastic generator, survey section 3.2)

``model.json['denoiser']`` names the kind (:func:`build_denoiser`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import unknown_name
from .process import EDM, _bcast

__all__ = ["ConsistencyDenoiser", "Generator", "build_denoiser", "consistency_precond"]


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
    raise unknown_name("student denoiser kind", kind, ["consistency", "generator"])
