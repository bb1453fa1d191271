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

Class-conditional: an optional integer ``labels`` [K] puts component k in class
labels[k]. Then p(x | c) is the mixture of class c's components with their weights
renormalised within the class, and p(x) is still the whole mixture. Every exact quantity
takes per-sample ``labels`` [B] (label -1: unconditional, the null label of
classifier-free guidance); it masks the log-responsibilities of the components outside a
sample's class with -inf before the softmax / logsumexp, which renormalises the weights
within the class exactly. ``flow(..., labels, guidance=w)`` is the exact flow of the
guided denoiser D_w = D(null) + w (D(c) - D(null)) that ``CFGDenoiser`` gives.
"""
from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import finite, whole
from ..errors import UserError

__all__ = ["GaussianMixture", "GMMModel"]


class GaussianMixture:
    """Mixture of full-covariance Gaussians with an exact denoiser and flow map.

    Args: weights [K] (positive, finite; normalised here), means [K, d] (finite), covs
    [K, d, d] (finite, symmetric to round-off, positive definite), labels [K] (optional):
    the class of each component, integers 0..C-1, every class owning at least one
    component. ``num_classes`` is C (0 when unconditional). Anything else is one UserError
    line starting with ``where`` (a file's name when :meth:`load` reads one); a covariance
    is never symmetrised beyond round-off (:data:`SYMMETRY_RTOL`).
    """

    def __init__(self, weights, means, covs, labels=None, *, where: str = "GaussianMixture"):
        w = _as_array(weights, f"{where}: weights").flatten()
        mu = _as_array(means, f"{where}: means")
        S = _as_array(covs, f"{where}: covs")
        if mu.ndim != 2 or S.ndim != 3 or S.shape != (mu.shape[0], mu.shape[1], mu.shape[1]) or w.shape[0] != mu.shape[0]:
            raise UserError(f"{where}: want weights [K], means [K, d], covs [K, d, d]; got "
                            f"{list(w.shape)}, {list(mu.shape)}, {list(S.shape)}")
        if mu.shape[0] == 0 or mu.shape[1] == 0:
            raise UserError(f"{where}: needs at least one component and one dimension, got K={mu.shape[0]}, "
                            f"d={mu.shape[1]}")
        _check_values(w, mu, S, where)
        S = 0.5 * (S + S.transpose(1, 2))
        lam, U = torch.linalg.eigh(S)
        _check_definite(S, lam, where)
        self.weights, self.means, self.covs = w / w.sum(), mu, S
        self.lam, self.U = lam.clamp_min(0.0), U
        self.K, self.dim = mu.shape
        self.labels: Optional[Tensor] = None if labels is None else _check_labels(labels, self.K, f"{where}: labels")
        self.num_classes = 0 if self.labels is None or not self.K else int(self.labels.max()) + 1
        # class prior pi_c = sum of the class's weights (None when unconditional)
        self.class_weights: Optional[Tensor] = None if self.labels is None else torch.zeros(
            self.num_classes, dtype=torch.float64).index_add_(0, self.labels, self.weights)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "GaussianMixture":
        """Read ``.npz`` with arrays ``weights`` [K], ``means`` [K, d], ``covs`` [K, d, d] and,
        for a class-conditional mixture, integer ``labels`` [K]."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"gmm spec {path} not found; give a .npz with weights, means, covs")
        from .images import check_array_headers

        check_array_headers(path, f"gmm spec {path}")  # absurd or truncated shapes, before any allocation
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("weights", "means", "covs")}
                labels = f["labels"] if "labels" in f.files else None
        except KeyError as e:
            raise UserError(f"gmm spec {path} lacks array {e}; it needs weights [K], means [K, d], covs [K, d, d]") from None
        except Exception as e:
            raise UserError(f"gmm spec {path} is not a readable .npz ({type(e).__name__}); write it with numpy.savez") from None
        if labels is not None:
            labels = _check_labels(labels, int(np.asarray(arrays["weights"]).size), f"labels in {path}")
        return cls(**arrays, labels=labels, where=f"gmm spec {path}")

    def save(self, path) -> None:
        """Write the ``.npz`` that :meth:`load` reads (with ``labels`` when conditional)."""
        arrays = dict(weights=self.weights.numpy(), means=self.means.numpy(), covs=self.covs.numpy())
        if self.labels is not None:
            arrays["labels"] = self.labels.numpy()
        np.savez(path, **arrays)

    def conditional(self, c: int) -> "GaussianMixture":
        """The (unconditional) mixture p(x | c) of class c alone, weights renormalised."""
        if self.labels is None:
            raise UserError("GaussianMixture.conditional: this mixture has no classes (no labels)")
        try:
            c = operator.index(c)  # ints, numpy integers, one-element integer tensors
        except TypeError:
            raise UserError(f"GaussianMixture.conditional: want a class number 0..{self.num_classes - 1}, "
                            f"got {c!r}") from None
        if not 0 <= c < self.num_classes:
            raise UserError(f"GaussianMixture.conditional: class {c} is not in 0..{self.num_classes - 1}")
        idx = (self.labels == c).nonzero().flatten()
        sub = GaussianMixture(self.weights[idx], self.means[idx], self.covs[idx])
        sub.lam, sub.U = self.lam[idx].clone(), self.U[idx].clone()  # the very same eigenbasis
        return sub

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.1, dim: int = 2) -> "GaussianMixture":
        """k equal isotropic modes on a circle in the first two coordinates."""
        k, dim = whole(k, "GaussianMixture.ring: k"), whole(dim, "GaussianMixture.ring: dim", low=2)
        radius = finite(radius, "GaussianMixture.ring: radius")
        std = finite(std, "GaussianMixture.ring: std", low=0.0, above=True)
        ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        means = torch.zeros(k, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(ang), radius * torch.sin(ang)
        return cls(torch.ones(k), means, std**2 * torch.eye(dim, dtype=torch.float64).expand(k, dim, dim))

    @classmethod
    def labelled_ring(cls) -> "GaussianMixture":
        """d = 2, a class-conditional mixture: 8 separated anisotropic modes on a circle of
        radius 3, unequal weights, 3 classes owning 3, 2 and 3 neighbouring components."""
        k = 8
        ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        means = 3.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        rot = torch.stack([torch.stack([torch.cos(ang), -torch.sin(ang)], 1),
                           torch.stack([torch.sin(ang), torch.cos(ang)], 1)], 1)  # [k, 2, 2]
        covs = rot @ torch.diag(torch.tensor([0.3, 0.15], dtype=torch.float64) ** 2) @ rot.transpose(1, 2)
        weights = torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5, 1.0, 2.0, 0.5], dtype=torch.float64)
        return cls(weights, means, covs, labels=[0, 0, 0, 1, 1, 2, 2, 2])

    @classmethod
    def random(cls, k: int = 4, dim: int = 16, seed: int = 0, spread: float = 1.0, scale: float = 0.3) -> "GaussianMixture":
        """Random weights, means and full covariances (A A^T / d + small ridge), seeded."""
        k, dim = whole(k, "GaussianMixture.random: k"), whole(dim, "GaussianMixture.random: dim")
        seed = whole(seed, "GaussianMixture.random: seed", low=-2**63, high=2**64 - 1)
        spread = finite(spread, "GaussianMixture.random: spread")
        scale = finite(scale, "GaussianMixture.random: scale", low=0.0, above=True)
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        means = spread * torch.randn(k, dim, generator=g, dtype=torch.float64)
        A = torch.randn(k, dim, dim, generator=g, dtype=torch.float64)
        covs = scale**2 * (A @ A.transpose(1, 2) / dim + 0.05 * torch.eye(dim, dtype=torch.float64))
        return cls(w, means, covs)

    # --- sampling -----------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False,
               labels=None):
        """n samples of x0 (float64); with ``return_labels`` also the component indices k
        (their classes are ``self.labels[k]``).

        ``labels`` ([n] integers, or one int for all; -1 = unconditional) draws
        x0 ~ p(x | c) per sample. Without it the random draws are those of an
        unconditional mixture, unchanged.
        """
        n = whole(n, "GaussianMixture.sample: n")
        if labels is None:
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            lab = self._class_labels(labels, n, torch.device("cpu"))
            w = self.weights[None].expand(n, self.K).masked_fill(~self._member(lab), 0.0)
            k = torch.multinomial(w, 1, generator=generator).flatten()
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nij,nj->ni", self.U[k], self.lam[k].sqrt() * z)
        return (x, k) if return_labels else x

    def sample_labels(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n class labels (LongTensor) drawn with the class prior (each class's total weight)."""
        if self.labels is None:
            raise UserError("GaussianMixture.sample_labels: this mixture has no classes (no labels)")
        n = whole(n, "GaussianMixture.sample_labels: n")
        return torch.multinomial(self.class_weights, n, replacement=True, generator=generator)

    # --- per-sample class conditioning ---------------------------------------------------
    def _class_labels(self, labels, B: int, device) -> Optional[Tensor]:
        """Checked per-sample labels: None, or a LongTensor [B] of -1 (null) or 0..C-1."""
        if labels is None:
            return None
        if self.labels is None:
            raise UserError("this GaussianMixture is unconditional (its file has no labels): call it without labels")
        t = torch.as_tensor(labels)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise UserError(f"GaussianMixture labels must be integers (-1 or 0..{self.num_classes - 1}), "
                            f"got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise UserError(f"GaussianMixture labels must be one per sample, shape [{B}], got {list(t.shape)}")
        t = t.to(device=device, dtype=torch.long)
        bad = (t < -1) | (t >= self.num_classes)
        if bool(bad.any()):
            raise UserError(f"GaussianMixture label {int(t[bad][0])} is not a class: want 0..{self.num_classes - 1} "
                            f"or -1 (unconditional)")
        return t

    def _member(self, lab: Tensor) -> Tensor:
        """[B, K]: component k is in sample b's class (all of them for label -1)."""
        return (lab[:, None] == self.labels.to(lab.device)[None]) | (lab[:, None] == -1)

    # --- exact quantities at level sigma --------------------------------------------------
    def _terms(self, y: Tensor, sigma, lab: Optional[Tensor] = None):
        """Projections z_k = U_k^T (y - mu_k), variances l_k + sigma^2, and log(w_k N_k) per
        k, -inf for components outside the sample's class (``lab``: checked labels)."""
        y = y.to(torch.float64)
        B = y.shape[0]
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=y.device).reshape(-1)
        s2 = (s2.expand(B) if s2.numel() == 1 else s2) ** 2
        z = torch.einsum("kji,bkj->bki", self.U.to(y.device), y[:, None, :] - self.means.to(y.device))
        var = self.lam.to(y.device)[None] + s2[:, None, None]  # [B, K, d]
        logn = -0.5 * ((z**2 / var).sum(-1) + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))
        logp = torch.log(self.weights.to(y.device))[None] + logn
        if lab is not None:
            logp = logp.masked_fill(~self._member(lab), -math.inf)
        return y, z, var, logp

    def _flat(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim and x[0].numel() != self.dim:
            raise UserError(f"GaussianMixture of dimension {self.dim} got samples of shape {list(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    def log_prob(self, y: Tensor, sigma, labels=None) -> Tensor:
        """log p(y; sigma) of the sigma-space marginal, shape [B]; with ``labels`` the
        normalised log p_sigma(y | c) per sample (-1: unconditional)."""
        yf = self._flat(y)
        lab = self._class_labels(labels, yf.shape[0], yf.device)
        _, _, _, logp = self._terms(yf, sigma, lab)
        out = torch.logsumexp(logp, dim=1)
        if lab is not None:  # minus log pi_c: the weights renormalised within the class
            logpi = torch.log(self.class_weights.to(yf.device))[lab.clamp_min(0)]
            out = out - torch.where(lab >= 0, logpi, torch.zeros_like(logpi))
        return out

    def _score(self, yf: Tensor, sigma, lab: Optional[Tensor]) -> Tensor:
        yf, z, var, logp = self._terms(yf, sigma, lab)
        r = torch.softmax(logp, dim=1)
        return -torch.einsum("kij,bkj->bi", self.U.to(yf.device), r[..., None] * z / var)

    def score(self, y: Tensor, sigma, labels=None) -> Tensor:
        """grad_y log p(y; sigma) (given each sample's class with ``labels``), float64, shaped like y."""
        yf = self._flat(y)
        return self._score(yf, sigma, self._class_labels(labels, yf.shape[0], yf.device)).reshape(y.shape)

    def denoise(self, y: Tensor, sigma, labels=None) -> Tensor:
        """E[x0 | y] (given each sample's class with ``labels``) at level sigma (Tweedie),
        float64, shaped like y."""
        yf = self._flat(y)
        lab = self._class_labels(labels, yf.shape[0], yf.device)
        yf, z, var, logp = self._terms(yf, sigma, lab)
        r = torch.softmax(logp, dim=1)
        shrink = self.lam.to(yf.device)[None] / var  # S_k (S_k + s^2)^-1 in the eigenbasis
        x0 = torch.einsum("bk,kd->bd", r, self.means.to(yf.device)) + torch.einsum(
            "kij,bkj->bi", self.U.to(yf.device), r[..., None] * shrink * z)
        return x0.reshape(y.shape)

    def posterior_variance(self, y: Tensor, sigma, labels=None) -> Tensor:
        """The diagonal of Cov[x0 | y] at level sigma (given each sample's class with
        ``labels``), float64, shaped like y: the mixture of the components' Gaussian posteriors,
        sum_k r_k (diag C_k + (m_k - m)^2), m = sum_k r_k m_k, with m_k = mu_k + S_k (S_k + s^2)^-1
        (y - mu_k) and C_k = s^2 S_k (S_k + s^2)^-1 (the optimal per-dimension covariance that
        Bao et al. 2022a's SN-/NPR-DPM heads estimate, exact here)."""
        yf = self._flat(y)
        lab = self._class_labels(labels, yf.shape[0], yf.device)
        yf, z, var, logp = self._terms(yf, sigma, lab)
        r = torch.softmax(logp, dim=1)
        U, lam = self.U.to(yf.device), self.lam.to(yf.device)[None]
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=yf.device).reshape(-1)
        s2 = (s2.expand(yf.shape[0]) if s2.numel() == 1 else s2)[:, None, None] ** 2
        m = self.means.to(yf.device)[None] + torch.einsum("kij,bkj->bki", U, lam / var * z)
        diag_c = torch.einsum("kij,bkj->bki", U**2, lam * s2 / var)
        mean = torch.einsum("bk,bki->bi", r, m)
        return torch.einsum("bk,bki->bi", r, diag_c + (m - mean[:, None]) ** 2).reshape(y.shape)

    def __call__(self, y: Tensor, sigma, labels=None, **cond) -> Tensor:
        """The sigma-space denoiser contract D(y, sigma, labels=...) -> x0, in y's dtype."""
        return self.denoise(y, sigma, labels).to(y.dtype)

    # --- the exact probability-flow map -------------------------------------------------
    def flow(self, y: Tensor, sigma_from: float, sigma_to: float, rtol: float = 1e-8,
             atol: Optional[float] = None, method: str = "dopri8", labels=None,
             guidance: Optional[float] = None) -> Tensor:
        """Solve dy/dsigma = -sigma score(y, sigma) from sigma_from to sigma_to (either way).

        With ``labels`` ([B], -1 = unconditional) the flow of p(. | c) per sample; with
        ``guidance=w`` as well, the flow of the guided denoiser D_w = D(null) + w (D(c) -
        D(null)), i.e. score_w = score_null + w (score_c - score_null), which is what
        ``CFGDenoiser(gmm, w)`` gives (w = 1: conditional; w = 0: unconditional). Without
        labels ``guidance`` changes nothing (as in ``CFGDenoiser``).

        Integrated in u = sqrt(sigma) (so the step near sigma = 0 stays smooth:
        dy/du = 2 u dy/dsigma), float64, adaptive Dormand-Prince. The solver's local
        tolerances are set 100x tighter than asked, so that the *global* error of the
        returned map is within ``rtol`` (relative) / ``atol`` (absolute; default rtol).
        """
        from torchdiffeq import odeint

        sigma_from = finite(sigma_from, "GaussianMixture.flow: sigma_from", low=0.0)
        sigma_to = finite(sigma_to, "GaussianMixture.flow: sigma_to", low=0.0)
        rtol = finite(rtol, "GaussianMixture.flow: rtol", low=0.0, above=True)
        atol = rtol if atol is None else finite(atol, "GaussianMixture.flow: atol", low=0.0)
        if guidance is not None:
            guidance = finite(guidance, "GaussianMixture.flow: guidance")
        rtol, atol = 0.01 * rtol, 0.01 * atol
        shape, y0 = y.shape, self._flat(y).to(torch.float64)
        lab = self._class_labels(labels, y0.shape[0], y0.device)
        w = None if lab is None or guidance is None or float(guidance) == 1.0 else float(guidance)

        def f(u, yy):
            sig = u * u
            if w is None:
                s = self._score(yy, sig, lab)
            else:
                s_null = self._score(yy, sig, None)
                s = s_null + w * (self._score(yy, sig, lab) - s_null)
            return -2.0 * u * sig * s

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
    the round trip checks every converter against the closed form. ``labels=`` in the
    call's conditioning reaches ``gmm.denoise`` (class-conditional mixtures).
    """

    def __init__(self, gmm: GaussianMixture, process, prediction: str, sigma_data: float = 0.5):
        super().__init__()
        self.gmm, self.process, self.prediction, self.sigma_data = gmm, process, prediction, sigma_data

    def forward(self, x: Tensor, c_noise: Tensor, **cond) -> Tensor:
        from ..denoiser import Coefficients, edm_precond, from_x0

        x64, c_noise = x.to(torch.float64), c_noise.to(torch.float64)
        labels = cond.get("labels")
        if self.prediction == "edm":
            sigma = torch.exp(4 * c_noise)
            c_skip, c_out, c_in, _ = (v.reshape(-1, *[1] * (x.ndim - 1)) for v in edm_precond(sigma, self.sigma_data))
            y = x64 / c_in
            return ((self.gmm.denoise(y, sigma, labels) - c_skip * y) / c_out).to(x.dtype)
        t = self.process.t_of_c_noise(c_noise)
        c = Coefficients.at(self.process, t, x64, derivatives=self.prediction == "flow")
        y = x64 / c.alpha
        x0 = self.gmm.denoise(y, self.process.sigma(t), labels)
        return from_x0(x0, x_t=x64, c=c, prediction=self.prediction).to(x.dtype)


SYMMETRY_RTOL = 1e-6  # |S - S^T| allowed, relative to max |S|: float32 round-off, not a typo'd matrix
DEFINITE_RTOL = 1e-12  # the smallest eigenvalue must exceed this times max |S|


def _as_array(value, where: str) -> Tensor:
    """``value`` (array, tensor or nested list of real numbers) as a float64 tensor, else one
    UserError line (strings, objects, complex numbers, ragged lists)."""
    kind = value.dtype.kind if isinstance(value, np.ndarray) else None
    if isinstance(value, Tensor) and (value.is_complex() or value.dtype == torch.bool):
        kind = "c"
    if kind is not None and kind not in "iuf":
        raise UserError(f"{where} must be real numbers, got an array of dtype {value.dtype}")
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{where} must be an array of real numbers ({' '.join(str(e).split())[:80]})") from None


def _check_values(w: Tensor, mu: Tensor, S: Tensor, where: str) -> None:
    """Weights positive and finite, means and covariances finite, covariances symmetric
    within :data:`SYMMETRY_RTOL` of their scale (never symmetrised silently)."""
    bad = ~(torch.isfinite(w) & (w > 0))
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise UserError(f"{where}: weights must be positive and finite, weight {k} is {float(w[k])}")
    for name, a in (("means", mu), ("covs", S)):
        if not bool(torch.isfinite(a).all()):
            k = int((~torch.isfinite(a)).reshape(a.shape[0], -1).any(1).nonzero()[0])
            raise UserError(f"{where}: {name} must be finite, component {k} has NaN or infinite entries")
    scale = S.abs().amax(dim=(1, 2))
    asym = (S - S.transpose(1, 2)).abs().amax(dim=(1, 2))
    bad = asym > SYMMETRY_RTOL * scale
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise UserError(f"{where}: covs[{k}] is not symmetric (|S - S^T| up to {float(asym[k]):.3g} at scale "
                        f"{float(scale[k]):.3g}); give symmetric covariances, e.g. (S + S^T) / 2")


def _check_definite(S: Tensor, lam: Tensor, where: str) -> None:
    """Every covariance positive definite: its smallest eigenvalue above
    :data:`DEFINITE_RTOL` times its scale."""
    scale = S.abs().amax(dim=(1, 2))
    bad = lam.amin(dim=1) <= DEFINITE_RTOL * scale
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise UserError(f"{where}: covs[{k}] is not positive definite (smallest eigenvalue {float(lam[k].min()):.3g}); "
                        f"give each component a positive variance in every direction (e.g. add 1e-6 I)")


def _check_labels(labels, K: int, where: str) -> Tensor:
    """``labels`` as a LongTensor [K] of classes 0..C-1, each class owning a component;
    else a one-line UserError that starts with ``where`` (e.g. "labels in FILE")."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != K or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{where} must be one integer per component (K={K}), got a {arr.dtype} array "
                        f"of shape {list(arr.shape)}")
    if K and int(arr.min()) < 0:
        raise UserError(f"{where} must be class numbers >= 0, got {int(arr.min())}")
    top = int(arr.max()) if K else -1
    if top >= K:  # more classes than components: some class owns none
        raise UserError(f"{where} name class {top} but there are only K={K} components, so some class has none; "
                        f"number the classes 0..C-1 with at least one component each")
    empty = sorted(set(range(top + 1)) - set(arr.tolist()))
    if empty:
        raise UserError(f"{where} leave class{'es' if len(empty) > 1 else ''} {', '.join(map(str, empty))} "
                        f"with no component; number the classes 0..C-1 with at least one component each")
    return torch.as_tensor(arr.astype(np.int64))
