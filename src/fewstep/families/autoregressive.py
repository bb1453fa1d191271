"""Autoregressive models (ARMs): exact likelihood one coordinate at a time (survey sec. 1,
eq. 1-5).

The model factorises ``log p(x) = sum_i f(x_i | x_1..x_{i-1})`` (eq. 1) in a fixed order,
each conditional's parameters the outputs of a masked network whose output i sees only
the coordinates before i (:mod:`fewstep.nets.masked`: MADE for points, PixelCNN for
images, raster order with a pixel's channels in order). It is trained by maximum
likelihood (eq. 4-5): the loss is the negative log-likelihood per sample, in nats summed
over the coordinates. The conditionals (``--arm-output``):

``gaussian``  ``N(x_i; mu_i, sigma_i^2)`` (eq. 2, one Gaussian per coordinate);
``mixture``   ``sum_k pi_ik N(x_i; mu_ik, sigma_ik^2)`` with K components (a mixture
              density network, Bishop 1994): the remedy for eq. 2's unimodality that the
              survey points out before EBMs (sec. 1.2);
``softmax``   a categorical over ``--arm-bins`` bins (eq. 3; PixelCNN's 256-way softmax,
              van den Oord et al. 2016).

The bins: ``--arm-range [lo, hi]`` are the centres of the first and the last of B bins,
``c_k = lo + k w``, ``w = (hi - lo) / (B - 1)``; bin k is ``[c_k - w/2, c_k + w/2]``, so the
model's support is ``[lo - w/2, hi + w/2]``. Images default to ``[-1, 1]``: fewstep's images
are 8-bit pixels ``v / 127.5 - 1`` (:mod:`fewstep.data.images`), so 256 bins are exactly the
pixel values.

Likelihoods, so that numbers are comparable across outputs:

- points, ``gaussian`` / ``mixture``: the density (``log_prob``), in nats;
- points, ``softmax``: the discretised likelihood ``log P(bin)`` is trained; as a density
  (``log_prob``, ``nll_nats_per_dim``) it is the piecewise-constant density
  ``log P(bin) - log w`` per coordinate, comparable to the continuous ones up to the
  discretisation error; samples are drawn from that density (a bin, then uniform in it);
- images, every output: a discrete model over the bins, the one the usual bits/dim
  measures: ``softmax`` is categorical; ``gaussian`` / ``mixture`` are *discretised*
  (PixelCNN++'s construction, Salimans et al. 2017, with Gaussians for their logistics):
  ``P(bin k) = F(c_k + w/2) - F(c_k - w/2)`` with the edge bins extended to -inf / +inf,
  ``F`` the conditional's CDF, and trained on that discrete likelihood (no
  dequantisation needed); samples are bin centres. ``bits_per_dim = -log P / (d ln 2)``,
  and ``log_prob`` is the density ``log P - d log w`` of the same model (so
  ``bits_per_dim = (nll_nats_per_dim - log w) / ln 2``, the usual 8-bit convention).

Point inputs are standardised (per coordinate, from the training data: buffers ``shift``,
``scale``) for the network, and the Gaussian conditionals of points live in those
standardised units (the density carries the Jacobian ``- sum log scale``). Log-scales are
clamped to ``[-7, 7]`` in those units (a floor against the degenerate zero-width
Gaussians of a continuous density on repeated values).

Sampling is the strict sequential rule the survey names (sec. 1.1): coordinate i is drawn
after a network evaluation on coordinates < i, so one sample costs d evaluations (batched
over the n samples).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import UserError, unknown_name

OUTPUTS = ("gaussian", "mixture", "softmax")
NET_KINDS = ("auto", "made", "pixelcnn")
IMAGE_RANGE = [-1.0, 1.0]
LOG_STD_MIN, LOG_STD_MAX = -7.0, 7.0
EVAL_POINTS, EVAL_IMAGES = 5000, 1000
EVAL_BATCH = 512
_LOG_2PI = math.log(2 * math.pi)
_LN2 = math.log(2.0)

DEFAULTS = {
    "arm_output": "auto",
    "arm_components": 5,
    "arm_bins": 256,
    "arm_range": None,
    "arm_hidden": None,
    "arm_layers": None,
    "arm_net": "auto",
}

HELP = {
    "arm_output": "conditional of each coordinate: gaussian (eq. 2), mixture (K Gaussians), softmax (eq. 3, "
                  "bins); auto = mixture for points, softmax for images",
    "arm_components": "K, the Gaussians of each conditional of --arm-output mixture (integer >= 1)",
    "arm_bins": "number of bins of --arm-output softmax, and of the discrete likelihood of images "
                "(integer >= 2; 256 = 8-bit pixels)",
    "arm_range": "[lo, hi]: the centres of the first and last bin (softmax on points needs it; images "
                 "default to [-1, 1], the 8-bit pixel values); not used by gaussian/mixture on points",
    "arm_hidden": "width: MADE hidden units (points, default 256) or PixelCNN feature maps (images, default 64)",
    "arm_layers": "depth: MADE hidden layers (default 2) or PixelCNN residual blocks (default 4)",
    "arm_net": "masked network: auto (made for points, pixelcnn for images), made, pixelcnn",
}

_MODULE_KEYS = ("output", "shape", "kind", "components", "bins", "range")


# ----------------------------------------------------------------------------- options
def _count(cfg: dict, key: str, minimum: int, default=None) -> int:
    value = cfg.get(key, DEFAULTS[key])
    if value is None:
        value = default
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or int(value) < minimum:
        raise UserError(f"{flag} {value!r}: give an integer >= {minimum}")
    return int(value)


def _value_range(value) -> list:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"--arm-range {value!r}: give two numbers [lo, hi], lo < hi") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UserError(f"--arm-range {value!r}: give two finite numbers [lo, hi] with lo < hi")
    return [lo, hi]


def options(cfg: dict, data) -> dict:
    """The resolved ARM options for ``data`` (autos filled in), checked; see :data:`HELP`."""
    kind = data.kind
    if kind == "clouds":
        raise UserError(f"--family arm: '{data.name}' holds point clouds, sets of points with no order of "
                        f"coordinates; train them with --family diffusion (the PointNet teacher)")
    if kind not in ("points", "image"):
        raise unknown_name("data kind", kind, ["points", "image"])
    if cfg.get("conditional"):
        raise UserError("--family arm trains an unconditional model; drop --conditional")
    image = kind == "image"
    output = cfg.get("arm_output", DEFAULTS["arm_output"])
    if output == "auto":
        output = "softmax" if image else "mixture"
    if output not in OUTPUTS:
        raise unknown_name("--arm-output", output, ["auto", *OUTPUTS])
    components = _count(cfg, "arm_components", 1)
    bins = _count(cfg, "arm_bins", 2)
    given = cfg.get("arm_range", DEFAULTS["arm_range"])
    value_range = None if given is None else _value_range(given)
    if not image:
        if output == "softmax" and value_range is None:
            raise UserError(f"--arm-output softmax on the continuous points of '{data.name}' needs the value range "
                            f"its bins cover: give --arm-range LO,HI (e.g. the data's min and max), or use "
                            f"--arm-output mixture")
        if output != "softmax" and value_range is not None:
            raise UserError(f"--arm-range is the range of the softmax bins; --arm-output {output} on points has "
                            f"no bins: drop --arm-range")
    elif value_range is None:
        value_range = list(IMAGE_RANGE)
    net = cfg.get("arm_net", DEFAULTS["arm_net"])
    if net not in NET_KINDS:
        raise unknown_name("--arm-net", net, NET_KINDS)
    if net == "auto":
        net = "pixelcnn" if image else "made"
    if net == "pixelcnn" and not image:
        raise UserError(f"--arm-net pixelcnn is for images [C, H, W]; '{data.name}' holds points: use --arm-net made")
    channels = int(data.shape[0]) if image else 1
    hidden = _count(cfg, "arm_hidden", channels if net == "pixelcnn" else 1, 256 if net == "made" else 64)
    layers = _count(cfg, "arm_layers", 1, 2 if net == "made" else 4)
    return dict(output=output, components=components, bins=bins, range=value_range, net=net,
                hidden=hidden, layers=layers, kind=kind, shape=[int(s) for s in data.shape])


def num_params(output: str, components: int, bins: int) -> int:
    """Network outputs per coordinate: 2 (mean, log-std), 3K (logits, means, log-stds) or B."""
    return {"gaussian": 2, "mixture": 3 * int(components), "softmax": int(bins)}[output]


def _make_net(opts: dict) -> nn.Module:
    from ..nets.masked import MADE, PixelCNN

    P = num_params(opts["output"], opts["components"], opts["bins"])
    d = math.prod(opts["shape"])
    if opts["net"] == "made":
        return MADE(d, P, hidden=opts["hidden"], depth=opts["layers"])
    return PixelCNN(opts["shape"][0], P, hidden=opts["hidden"], blocks=opts["layers"])


# ----------------------------------------------------------------------------- the model
def _log1mexp(u: torch.Tensor) -> torch.Tensor:
    """log(1 - e^u) for u < 0 (Maechler 2012's two branches, each fed only its own
    range so that neither branch's gradient is 0 * inf)."""
    near = u > -_LN2
    a = torch.log(-torch.expm1(u.clamp(min=-_LN2)))
    b = torch.log1p(-torch.exp(u.clamp(max=-_LN2)))
    return torch.where(near, a, b)


def log_normal_bin(lo_edge: torch.Tensor, hi_edge: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """log P(lo_edge < X < hi_edge) for X ~ N(mean, std^2), float64, the first bin's lower
    edge at -inf and the last bin's upper edge at +inf (masks ``first`` / ``last``).

    Inner bins: ``log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - Phi(a) / Phi(b))`` on the side
    of the mean where the CDFs are small (``Phi(b) - Phi(a) = Phi(-a) - Phi(-b)``), so
    neither cancels."""
    alpha = ((lo_edge - mean) / std).clamp(-1e6, 1e6)
    beta = ((hi_edge - mean) / std).clamp(-1e6, 1e6)
    flip = alpha > 0
    small, big = torch.where(flip, -beta, alpha), torch.where(flip, -alpha, beta)
    l_big, l_small = torch.special.log_ndtr(big), torch.special.log_ndtr(small)
    inner = l_big + _log1mexp((l_small - l_big).clamp(max=-1e-30))
    out = torch.where(first, torch.special.log_ndtr(beta), inner)
    return torch.where(last, torch.special.log_ndtr(-alpha), out)


class AutoregressiveModel(nn.Module):
    """``p(x) = prod_i p(x_i | x_<i)`` with a masked ``net`` (survey eq. 1).

    ``forward(x, mode)``: ``'nll'`` (default) the training loss per sample (the negative
    discrete log-likelihood for softmax and images, the negative log-density otherwise),
    ``'density'`` the log-density per sample, ``'discrete'`` the log-probability of the
    bins (softmax and images only), ``'params'`` the conditionals' parameters
    ``[B, d, P]``. Coordinates are in the net's order: a point's, or an image's pixels in
    raster order with their channels innermost. :meth:`sample` draws one coordinate per
    network evaluation."""

    def __init__(self, net: nn.Module, output: str, shape, kind: str = "points", components: int = 5,
                 bins: int = 256, range: Optional[list] = None):
        super().__init__()
        if output not in OUTPUTS:
            raise unknown_name("ARM output", output, OUTPUTS)
        self.net, self.output, self.kind = net, output, kind
        self.shape = tuple(int(s) for s in shape)
        self.dim = math.prod(self.shape)
        self.components, self.bins = int(components), int(bins)
        self.P = num_params(output, self.components, self.bins)
        self.image = kind == "image"
        self.pixel = net.config.get("kind") == "pixelcnn"
        if net.config.get("params") != self.P:
            raise UserError(f"ARM: the net outputs {net.config.get('params')} parameters per coordinate, "
                            f"--arm-output {output} needs {self.P}")
        self.discrete = output == "softmax" or self.image
        if self.discrete and range is None:
            raise UserError(f"ARM: --arm-output {output} on {kind} needs --arm-range")
        self.range = None if range is None else [float(v) for v in range]
        self.width = None if range is None else (self.range[1] - self.range[0]) / (self.bins - 1)
        self.config = dict(output=output, shape=list(self.shape), kind=kind, components=self.components,
                           bins=self.bins, range=self.range)
        self.register_buffer("shift", torch.zeros(self.dim))
        self.register_buffer("scale", torch.ones(self.dim))
        self._init_head()

    @torch.no_grad()
    def _init_head(self) -> None:
        """Start each conditional near the standardised data: N(0, 1); mixture means
        spread over [-1, 1] with std 1/2 (distinct, so the components do not move as
        one); a uniform softmax."""
        bias = self.net.output_bias()
        bias.zero_()
        if self.output == "mixture":
            K = self.components
            bias[:, K:2 * K] = torch.linspace(-1.0, 1.0, K) if K > 1 else 0.0
            bias[:, 2 * K:] = math.log(0.5)

    # --- coordinates ----------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise UserError(f"ARM built for samples of shape {list(self.shape)} got {list(x.shape)}")
        if self.image:
            x = x.permute(0, 2, 3, 1)  # [B, H, W, C]: raster order, channels innermost
        return x.reshape(x.shape[0], self.dim)

    def _unflat(self, flat: torch.Tensor) -> torch.Tensor:
        if self.image:
            C, H, W = self.shape
            return flat.view(-1, H, W, C).permute(0, 3, 1, 2).contiguous()
        return flat.view(-1, *self.shape)

    def params(self, flat: torch.Tensor) -> torch.Tensor:
        """One network evaluation: the conditionals' parameters ``[B, d, P]`` (float32)."""
        u = (flat - self.shift) / self.scale
        if self.pixel:
            out = self.net(self._unflat(u))              # [B, C, H, W, P]
            out = out.permute(0, 2, 3, 1, 4).reshape(flat.shape[0], self.dim, self.P)
        else:
            out = self.net(u)
        return out.float()

    # --- conditionals -----------------------------------------------------------------------
    def _mixture(self, prm: torch.Tensor):
        """(log-weights, means, log-stds), each ``[..., K]`` (K = 1 for gaussian)."""
        if self.output == "gaussian":
            mean, log_std = prm[..., :1], prm[..., 1:2]
            log_w = torch.zeros_like(mean)
        else:
            K = self.components
            log_w = torch.log_softmax(prm[..., :K], dim=-1)
            mean, log_std = prm[..., K:2 * K], prm[..., 2 * K:]
        return log_w, mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def _log_density(self, y: torch.Tensor, prm: torch.Tensor) -> torch.Tensor:
        """Per-coordinate log-density ``[B, d]`` of a Gaussian / mixture conditional (eq. 2)."""
        log_w, mean, log_std = self._mixture(prm)
        z = (y[..., None] - mean) * torch.exp(-log_std)
        return torch.logsumexp(log_w - 0.5 * z ** 2 - log_std - 0.5 * _LOG_2PI, dim=-1)

    def _bin_index(self, y: torch.Tensor) -> torch.Tensor:
        return torch.round((y - self.range[0]) / self.width).clamp(0, self.bins - 1).long()

    def _log_bins(self, y: torch.Tensor, prm: torch.Tensor) -> torch.Tensor:
        """Per-coordinate log P(bin of y) ``[B, d]``: softmax (eq. 3), or a discretised
        Gaussian / mixture (edge bins open)."""
        k = self._bin_index(y)
        if self.output == "softmax":
            return torch.log_softmax(prm, dim=-1).gather(-1, k[..., None])[..., 0]
        log_w, mean, log_std = (t.double() for t in self._mixture(prm))
        c = (self.range[0] + k.double() * self.width)[..., None]
        lp = log_normal_bin(c - self.width / 2, c + self.width / 2, mean, torch.exp(log_std),
                            (k == 0)[..., None], (k == self.bins - 1)[..., None])
        return torch.logsumexp(log_w + lp, dim=-1).to(prm.dtype)

    def forward(self, x: torch.Tensor, mode: str = "nll") -> torch.Tensor:
        flat = self._flat(x).float()
        prm = self.params(flat)
        if mode == "params":
            return prm
        if self.discrete:
            log_p = self._log_bins(flat, prm).sum(1)
            if mode == "nll":
                return -log_p
            if mode == "discrete":
                return log_p
            if mode == "density":
                dens = log_p - self.dim * math.log(self.width)
                if not self.image:  # points outside the support [lo - w/2, hi + w/2] have density 0
                    half = self.width / 2
                    out = ((flat < self.range[0] - half) | (flat > self.range[1] + half)).any(1)
                    dens = dens.masked_fill(out, -math.inf)
                return dens
        else:
            u = (flat - self.shift) / self.scale
            log_p = self._log_density(u, prm).sum(1) - torch.log(self.scale).sum()
            if mode == "nll":
                return -log_p
            if mode == "density":
                return log_p
            if mode == "discrete":
                raise UserError(f"ARM: --arm-output {self.output} on points is a density; it has no discrete "
                                f"likelihood (use 'density')")
        raise unknown_name("ARM forward mode", mode, ["nll", "density", "discrete", "params"])

    # --- sampling ---------------------------------------------------------------------------
    def _draw(self, prm: torch.Tensor, i: int, gen: torch.Generator) -> torch.Tensor:
        """Coordinate i of every sample from its conditional ``prm [n, P]``."""
        n, dev = prm.shape[0], prm.device
        if self.output == "softmax":
            k = torch.multinomial(torch.softmax(prm, -1), 1, generator=gen)[:, 0]
            y = self.range[0] + k.float() * self.width
            if not self.image:  # a point: uniform within its bin (the piecewise-constant density)
                y = y + self.width * (torch.rand(n, generator=gen, device=dev) - 0.5)
            return y
        log_w, mean, log_std = self._mixture(prm)
        if self.output == "mixture":
            k = torch.multinomial(torch.exp(log_w), 1, generator=gen)
            mean, log_std = mean.gather(1, k), log_std.gather(1, k)
        y = mean[:, 0] + torch.exp(log_std[:, 0]) * torch.randn(n, generator=gen, device=dev)
        if self.image:  # the discretised model: the bin of y, edge bins open
            return self.range[0] + self._bin_index(y).float() * self.width
        return self.shift[i] + self.scale[i] * y

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples ``[n, *shape]``, one coordinate per network evaluation (d in all)."""
        flat = torch.zeros(int(n), self.dim, device=self.shift.device)
        for i in range(self.dim):
            flat[:, i] = self._draw(self.params(flat)[:, i], i, generator)
        return self._unflat(flat)


# ----------------------------------------------------------------------------- the contract
def check(cfg: dict, data) -> None:
    """Refuse options that cannot work on ``data`` (see :func:`options`), non-finite data,
    and data outside the bins' support ``[lo - w/2, hi + w/2]``."""
    opts = options(cfg, data)
    x = data.x
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"--family arm: '{data.name}' holds NaN or infinite values; clean the data")
    if opts["range"] is not None:
        lo, hi = opts["range"]
        half = (hi - lo) / (opts["bins"] - 1) / 2
        xmin, xmax = float(x.min()), float(x.max())
        if xmin < lo - half or xmax > hi + half:
            raise UserError(f"--arm-range [{lo:g}, {hi:g}] ({opts['bins']} bins, support [{lo - half:g}, "
                            f"{hi + half:g}]): '{data.name}' has values in [{xmin:g}, {xmax:g}]; give an "
                            f"--arm-range that covers them")


def objective(cfg: dict, data):
    """The ARM and its maximum-likelihood loss (eq. 5): a batch of ``cfg['batch_size']``
    training samples per step, loss = -log p(x) per sample (nats)."""
    from . import Objective

    check(cfg, data)
    opts = options(cfg, data)
    module = AutoregressiveModel(_make_net(opts), **{k: opts[k] for k in _MODULE_KEYS})
    x_all = data.x.float()
    if data.kind == "points":
        flat = x_all.reshape(len(x_all), -1)
        module.shift.copy_(flat.mean(0))
        module.scale.copy_(flat.std(0).clamp_min(1e-6) if len(flat) > 1 else torch.ones(flat.shape[1]))
    B = int(cfg["batch_size"])
    if B < 1:
        raise UserError(f"--batch-size {B}: give a positive batch size")

    def draw(gen, step):
        return {"x": x_all[torch.randint(0, len(x_all), (B,), generator=gen)]}

    def loss(model, b):
        return model(b["x"])

    return Objective(module=module, draw=draw, loss=loss)


def meta(cfg: dict, module: AutoregressiveModel, data) -> dict:
    """``model.json``'s family fields: the resolved options and the masked net's config."""
    opts = options(cfg, data)
    return {"family": "arm", "arm": {**opts, **module.config}, "net": dict(module.net.config),
            "default_nfe": module.dim, "sampling": {"sampler": "autoregressive"}}


def build(meta: dict) -> AutoregressiveModel:
    """A fresh ARM from ``model.json`` (the caller loads the weights, shift/scale included)."""
    from ..nets.masked import build_masked

    try:
        arm, net = meta["arm"], meta["net"]
        kw = {k: arm[k] for k in _MODULE_KEYS}
    except (KeyError, TypeError) as e:
        raise UserError(f"model.json of an ARM lacks {e}; it is not a fewstep arm run (train one with "
                        f"--family arm)") from None
    return AutoregressiveModel(build_masked(net), **kw)


def as_model(module: AutoregressiveModel, meta: dict, name: str, device):
    """A :class:`~fewstep.families.FamilyModel`: d network evaluations per sample, exact
    ``log_prob`` (nats; a density, see the module docstring)."""
    from . import FamilyModel

    module = module.to(device)
    return FamilyModel(module, module.shape, module.sample, cost=module.dim, kind=module.kind, name=name,
                       meta=meta, device=device, log_prob_fn=lambda x: module(x, mode="density"))


@torch.no_grad()
def evaluate(model, data, cfg: dict) -> dict:
    """Exact NLL on reference data (:func:`fewstep.data.registry.held_out`: a fresh draw of
    a generated set, samples left out of training of a file): ``nll_nats_per_dim`` of the
    density (see the module docstring), and for images ``bits_per_dim`` of the discrete
    model, ``-log P / (d ln 2)``."""
    from ..data.registry import held_out
    from ..metrics import bits_per_dim

    module = model.module
    seed = int(cfg.get("seed", 0))
    limit = EVAL_IMAGES if module.image else EVAL_POINTS
    n = max(1, min(limit, int(cfg.get("eval_samples", limit) or limit)))
    ref, source = held_out(cfg["data"], n, seed + 7919, cfg.get("n_data"), seed)
    dev = next(module.parameters()).device
    dens, disc = [], []
    for xb in ref.x.float().split(EVAL_BATCH):
        xb = xb.to(dev)
        dens.append(module(xb, mode="density").double().cpu())
        if module.discrete:
            disc.append(module(xb, mode="discrete").double().cpu())
    dens = torch.cat(dens)
    d = module.dim
    outside = int((~torch.isfinite(dens)).sum())
    nll = -float(dens.mean()) if not outside else None
    out = {"nll_nats_per_dim": None if nll is None else nll / d, "nll_nats_per_sample": nll,
           "nll_samples": len(dens), "nll_reference": source, "nfe_per_sample": d,
           "nll_kind": ("log P(bin) - log(bin width) per coordinate" if module.discrete else "density")}
    if outside:
        out["nll_outside_support"] = outside
    if module.image:
        out["bits_per_dim"] = bits_per_dim(-torch.cat(disc), d)
    return out
