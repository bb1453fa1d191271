"""The exact teacher: a Gaussian mixture, whose diffusion is known in closed form.

With p(x0) = sum_k w_k N(mu_k, S_k), the sigma-space marginal y = x0 + sigma * eps is
p(y; sigma) = sum_k w_k N(y; mu_k, S_k + sigma^2 I), and (Tweedie)

    score(y, sigma) = -sum_k r_k(y) (S_k + sigma^2 I)^-1 (y - mu_k)
    D(y, sigma)     = E[x0 | y] = y + sigma^2 score(y, sigma)
                    = sum_k r_k(y) [mu_k + S_k (S_k + sigma^2 I)^-1 (y - mu_k)]

with responsibilities r_k = softmax_k(log w_k + log N(y; mu_k, S_k + sigma^2 I)). With the
eigendecomposition S_k = U_k diag(l_k) U_k^T every inverse is diagonal in U_k's basis,
so one evaluation costs O(B K d^2). Everything runs in float64.

The probability-flow ODE dy/dsigma = (y - D(y, sigma)) / sigma = -sigma score(y, sigma)
(Karras et al. 2022, eq. 4 in sigma-space) is integrated by torchdiffeq's adaptive
Dormand-Prince 8(5,3) to the requested tolerance: ``flow`` is the ground truth every
sampler and student is measured against.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError

__all__ = ["GaussianMixture", "GMMModel"]


class GaussianMixture:
    """Mixture of full-covariance Gaussians with an exact denoiser and flow map.

    Args: weights [K] (normalised here), means [K, d], covs [K, d, d] (symmetric PSD).
    """

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        S = torch.as_tensor(covs, dtype=torch.float64)
        if mu.ndim != 2 or S.ndim != 3 or S.shape != (mu.shape[0], mu.shape[1], mu.shape[1]) or w.shape[0] != mu.shape[0]:
            raise UserError(f"GaussianMixture: want weights [K], means [K, d], covs [K, d, d]; got "
                            f"{list(w.shape)}, {list(mu.shape)}, {list(S.shape)}")
        if not bool((w > 0).all()):
            raise UserError("GaussianMixture: weights must be positive")
        S = 0.5 * (S + S.transpose(1, 2))
        lam, U = torch.linalg.eigh(S)
        if float(lam.min()) < -1e-10:
            raise UserError("GaussianMixture: covariances must be positive semi-definite")
        self.weights, self.means, self.covs = w / w.sum(), mu, S
        self.lam, self.U = lam.clamp_min(0.0), U
        self.K, self.dim = mu.shape

    # --- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "GaussianMixture":
        """Read ``.npz`` with arrays ``weights`` [K], ``means`` [K, d], ``covs`` [K, d, d]."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"gmm spec {path} not found; give a .npz with weights, means, covs")
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("weights", "means", "covs")}
        except KeyError as e:
            raise UserError(f"gmm spec {path} lacks array {e}; it needs weights [K], means [K, d], covs [K, d, d]") from None
        except Exception as e:
            raise UserError(f"gmm spec {path} is not a readable .npz ({type(e).__name__}); write it with numpy.savez") from None
        return cls(**arrays)

    def save(self, path) -> None:
        np.savez(path, weights=self.weights.numpy(), means=self.means.numpy(), covs=self.covs.numpy())

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.1, dim: int = 2) -> "GaussianMixture":
        """k equal isotropic modes on a circle in the first two coordinates."""
        ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        means = torch.zeros(k, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(ang), radius * torch.sin(ang)
        return cls(torch.ones(k), means, std**2 * torch.eye(dim, dtype=torch.float64).expand(k, dim, dim))

    @classmethod
    def random(cls, k: int = 4, dim: int = 16, seed: int = 0, spread: float = 1.0, scale: float = 0.3) -> "GaussianMixture":
        """Random weights, means and full covariances (A A^T / d + small ridge), seeded."""
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        means = spread * torch.randn(k, dim, generator=g, dtype=torch.float64)
        A = torch.randn(k, dim, dim, generator=g, dtype=torch.float64)
        covs = scale**2 * (A @ A.transpose(1, 2) / dim + 0.05 * torch.eye(dim, dtype=torch.float64))
        return cls(w, means, covs)

    # --- sampling -----------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False):
        """n samples of x0 (float64); with ``return_labels`` also the component indices."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nij,nj->ni", self.U[k], self.lam[k].sqrt() * z)
        return (x, k) if return_labels else x

    # --- exact quantities at level sigma --------------------------------------------------
    def _terms(self, y: Tensor, sigma):
        """Projections z_k = U_k^T (y - mu_k), variances l_k + sigma^2, log N per k, r_k."""
        y = y.to(torch.float64)
        B = y.shape[0]
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).reshape(-1)
        s2 = (s2.expand(B) if s2.numel() == 1 else s2) ** 2
        z = torch.einsum("kji,bkj->bki", self.U.to(y.device), y[:, None, :] - self.means.to(y.device))
        var = self.lam.to(y.device)[None] + s2[:, None, None]  # [B, K, d]
        logn = -0.5 * ((z**2 / var).sum(-1) + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))
        logp = torch.log(self.weights.to(y.device))[None] + logn
        return y, z, var, logp

    def _flat(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim and x[0].numel() != self.dim:
            raise UserError(f"GaussianMixture of dimension {self.dim} got samples of shape {list(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    def log_prob(self, y: Tensor, sigma) -> Tensor:
        """log p(y; sigma) of the sigma-space marginal, shape [B]."""
        _, _, _, logp = self._terms(self._flat(y), sigma)
        return torch.logsumexp(logp, dim=1)

    def score(self, y: Tensor, sigma) -> Tensor:
        """grad_y log p(y; sigma), float64, shaped like y."""
        yf, z, var, logp = self._terms(self._flat(y), sigma)
        r = torch.softmax(logp, dim=1)
        s = -torch.einsum("kij,bkj->bi", self.U.to(yf.device), r[..., None] * z / var)
        return s.reshape(y.shape)

    def denoise(self, y: Tensor, sigma) -> Tensor:
        """E[x0 | y] at level sigma (Tweedie), float64, shaped like y."""
        yf, z, var, logp = self._terms(self._flat(y), sigma)
        r = torch.softmax(logp, dim=1)
        shrink = self.lam.to(yf.device)[None] / var  # S_k (S_k + s^2)^-1 in the eigenbasis
        x0 = torch.einsum("bk,kd->bd", r, self.means.to(yf.device)) + torch.einsum(
            "kij,bkj->bi", self.U.to(yf.device), r[..., None] * shrink * z)
        return x0.reshape(y.shape)

    def __call__(self, y: Tensor, sigma, **cond) -> Tensor:
        """The sigma-space denoiser contract D(y, sigma) -> x0, in y's dtype."""
        return self.denoise(y, sigma).to(y.dtype)

    # --- the exact probability-flow map -------------------------------------------------
    def flow(self, y: Tensor, sigma_from: float, sigma_to: float, rtol: float = 1e-8,
             atol: Optional[float] = None, method: str = "dopri8") -> Tensor:
        """Solve dy/dsigma = -sigma score(y, sigma) from sigma_from to sigma_to (either way).

        Integrated in u = sqrt(sigma) (so the step near sigma = 0 stays smooth:
        dy/du = 2 u dy/dsigma), float64, adaptive Dormand-Prince. The solver's local
        tolerances are set 100x tighter than asked, so that the *global* error of the
        returned map is within ``rtol`` (relative) / ``atol`` (absolute; default rtol).
        """
        from torchdiffeq import odeint

        atol = rtol if atol is None else atol
        rtol, atol = 0.01 * rtol, 0.01 * atol
        shape, y0 = y.shape, self._flat(y).to(torch.float64)

        def f(u, yy):
            sig = u * u
            return -2.0 * u * sig * self.score(yy, sig)

        u = torch.tensor([float(sigma_from) ** 0.5, float(sigma_to) ** 0.5], dtype=torch.float64)
        if u[0] == u[1]:
            return y0.reshape(shape).clone()
        out = odeint(f, y0, u, rtol=rtol, atol=atol, method=method)[-1]
        return out.reshape(shape)

    def as_model(self, process, prediction: str) -> "GMMModel":
        """The exact teacher as a network ``(x_t, c_noise) -> prediction`` of ``process``."""
        return GMMModel(self, process, prediction)


class GMMModel(nn.Module):
    """A GaussianMixture presented as an eps/x0/v/score/flow/edm network of a process.

    ``ModelDenoiser(GMMModel(gmm, process, p), process, p)`` is again the exact denoiser:
    the round trip checks every converter against the closed form.
    """

    def __init__(self, gmm: GaussianMixture, process, prediction: str, sigma_data: float = 0.5):
        super().__init__()
        self.gmm, self.process, self.prediction, self.sigma_data = gmm, process, prediction, sigma_data

    def forward(self, x: Tensor, c_noise: Tensor, **cond) -> Tensor:
        from ..denoiser import Coefficients, edm_precond, from_x0

        x64, c_noise = x.to(torch.float64), c_noise.to(torch.float64)
        if self.prediction == "edm":
            sigma = torch.exp(4 * c_noise)
            c_skip, c_out, c_in, _ = (v.reshape(-1, *[1] * (x.ndim - 1)) for v in edm_precond(sigma, self.sigma_data))
            y = x64 / c_in
            return ((self.gmm.denoise(y, sigma) - c_skip * y) / c_out).to(x.dtype)
        t = self.process.t_of_c_noise(c_noise)
        c = Coefficients.at(self.process, t, x64, derivatives=self.prediction == "flow")
        y = x64 / c.alpha
        x0 = self.gmm.denoise(y, self.process.sigma(t))
        return from_x0(x0, x_t=x64, c=c, prediction=self.prediction).to(x.dtype)
