"""Energy-based models trained by maximum likelihood with MCMC (survey sec. 1.2, eq. 6-13).

The model is an unnormalised density ``p_theta(x) = exp(-E_theta(x) / T) / Z_theta``. The
survey writes the potential with the other sign (``p = e^{E} / int e^{E}``, eq. 6); here
``E`` is an *energy* (low on data), as in Du & Mordatch 2019 ("Implicit generation and
generalization in energy-based models"). The gradient of the negative log-likelihood is
eq. 13 with that sign,

    grad_theta NLL = E_data[grad_theta E(x)] - E_model[grad_theta E(x)],

whose second expectation is estimated with samples of the model drawn by short-run
Langevin MCMC from persistent chains kept in a replay buffer (Du & Mordatch):

* each step takes ``batch_size`` chains from distinct buffer rows; a share ``ebm_reinit``
  (their 5%) starts afresh from noise N(0, s^2 I), s the training data's RMS about 0 (Du &
  Mordatch draw uniform noise over the pixel box; a Gaussian of the data's scale is the
  start :meth:`fewstep.model.Model.noise` draws as well, so the own sampling rule starts
  chains exactly where training does, and it needs no box for unbounded points);
* ``ebm_steps`` steps ``x <- x - a clip(grad_x E(x)) + b z`` with the step size ``a =
  ebm_step_size`` and the noise ``b = ebm_noise`` decoupled as Du & Mordatch do; the
  chain ends go back to their rows;
* the per-sample loss is ``E(x_data) - E(x_chain) + alpha (E(x_data)^2 + E(x_chain)^2)``
  (Du & Mordatch's energy-magnitude regulariser; ``x_chain`` carries no gradient),
  whose parameter gradient at alpha = 0 is exactly the eq. 13 estimator.

Temperature. The chain is ULA (survey eq. 14 with dt = 2 eps) for exp(-E / T) with
``T = b^2 / (2 a)``: ``x - a grad E + b z = x + eps grad(-E / T) + sqrt(2 eps) z`` with
``eps = b^2 / 2``. So the density the chains sample, and the one maximum likelihood fits,
is ``exp(-E / T)``: the model's score is ``-grad E / T`` and its log-density ``-E / T``.
The defaults are coupled (a = 0.005, b = 0.1, T = 1); Du & Mordatch's own (a = 10, b =
0.005 on [0, 1] images) are T ~ 1e-6, a nearly noiseless descent. The alpha term is in
energy units: in nats (U = E / T) it weighs alpha T, which is why their alpha = 1 (their
code adds mean(E+^2) + mean(E-^2) with weight 1) is, at their T, a tiny pull, while at
T = 1 it would flatten the learned density (it penalises the spread of E over the data);
the default here is 0.1 (see ``HELP``).

The energy network (:class:`EnergyNet`) is a net of :mod:`fewstep.nets` (an MLP for
points, the UNet for images; SiLU, LayerNorm/GroupNorm: smooth, so Langevin gradients are
well behaved) whose output, shaped like ``x``, is summed to one scalar per sample: for the
MLP that is a scalar linear head on its last features, for the UNet a global sum pool, as
Du & Mordatch's ResNet ends. A weak Gaussian tail ``|x|^2 / (2 (ebm_tail s)^2)`` is added so
``exp(-E)`` is integrable for any weights (the net grows at most linearly).

Sampling. :func:`as_model` gives a :class:`fewstep.model.Model` whose denoiser is
``ScoreDenoiser(score = -grad E / T, log_prob = -E / T)``, so every sampler that needs only
a score at one level (``langevin``) or a log-density (``mala``) runs on it. The own rule
(``model.json``'s ``sampling``) is the registered ``langevin`` sampler with step
``eps = ebm_noise^2 / 2``, i.e. exactly the training chain (without the optional clip),
from N(0, s^2 I) (``sigma_max = s``) for ``ebm_sample_steps`` steps (``default_nfe``): this is
what ``fewstep sample RUN`` does. The model's level ``sigma_min`` is ``ebm_data_noise``
(the training data are smoothed by that noise, so ``D(x, sigma_min) = x + sigma_min^2 s``
is Tweedie's denoiser of the law the EBM fits), 0.01 when that is 0 (then it is nominal:
the energy does not depend on it). The first ``ebm_keep`` rows of the final buffer (a
uniform subset: rows are drawn at random) are kept in the module (buffer ``bank``, in
``model.safetensors``): :func:`buffer_samples` returns them, and
``model.sample(n, nfe, x=buffer_samples(model, n))`` continues those persistent chains.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import UserError
from . import Objective, ScoreDenoiser, option_number

DEFAULTS = {
    "ebm_buffer": 10000,
    "ebm_reinit": 0.05,
    "ebm_steps": 20,
    "ebm_step_size": 0.005,
    "ebm_noise": 0.1,
    "ebm_alpha": 0.1,
    "ebm_data_noise": 0.01,
    "ebm_clip": 0.0,
    "ebm_tail": 10.0,
    "ebm_keep": None,
    "ebm_sample_steps": 200,
}

HELP = {
    "ebm_buffer": "replay-buffer size: persistent Langevin chains (Du & Mordatch 2019: 10000); at least the batch size",
    "ebm_reinit": "share of chains restarted from noise N(0, s^2) each step, s = the data RMS (Du & Mordatch: 0.05)",
    "ebm_steps": "Langevin steps per training step on each chain (short-run MCMC)",
    "ebm_step_size": "Langevin step a in x <- x - a grad E + b z (the temperature is T = b^2 / (2 a))",
    "ebm_noise": "Langevin noise b in x <- x - a grad E + b z (default coupled with the step: T = 1)",
    "ebm_alpha": "weight of the energy-magnitude regulariser alpha (E(x+)^2 + E(x-)^2); Du & Mordatch's 1 is at "
                 "T ~ 1e-6, at T = 1 it flattens the density, so 0.1",
    "ebm_data_noise": "std of Gaussian noise added to the data (smooths the density the EBM fits; the model's level)",
    "ebm_clip": "clip each coordinate of grad E in the chains to [-c, c] (Du & Mordatch's proj_norm); 0: no clip",
    "ebm_tail": "width, in data RMS units, of the Gaussian tail |x|^2 / (2 (tail s)^2) added to E so exp(-E) is "
                "integrable; 0: none",
    "ebm_keep": "final buffer rows kept in model.safetensors (fewstep.families.energy.buffer_samples); "
                "null: min(2000, --ebm-buffer)",
    "ebm_sample_steps": "Langevin steps of the own sampling rule from noise (the model's default NFE)",
}

KEEP = 2000  # buffer rows kept in model.safetensors when --ebm-keep is not given (at most the buffer)
LEVEL_FLOOR = 0.01  # the model's nominal level when ebm_data_noise is 0
_INTS = ("ebm_buffer", "ebm_steps", "ebm_keep", "ebm_sample_steps")


# ----------------------------------------------------------------------------- options
def _option(cfg: dict, key: str, what: str, low: float = 0.0, above: bool = False, high: Optional[float] = None):
    """``cfg[key]`` (its default where absent or null), checked by :func:`option_number`."""
    v = cfg.get(key)
    return option_number({key: DEFAULTS[key] if v is None else v}, key, low, strict=above, high=high,
                         integer=key in _INTS, what=what)


def options(cfg: dict) -> dict:
    """The family's options of ``cfg`` (defaults where absent), each checked: one line per bad value."""
    o = {
        "buffer": _option(cfg, "ebm_buffer", "a whole number of at least 1", 1),
        "reinit": _option(cfg, "ebm_reinit", "a share in [0, 1]", 0.0, high=1.0),
        "steps": _option(cfg, "ebm_steps", "a whole number of Langevin steps of at least 1", 1),
        "step_size": _option(cfg, "ebm_step_size", "a positive finite step", 0.0, above=True),
        "noise": _option(cfg, "ebm_noise", "a positive finite noise std (0 would be T = 0: no density)", 0.0,
                         above=True),
        "alpha": _option(cfg, "ebm_alpha", "a finite weight of at least 0", 0.0),
        "data_noise": _option(cfg, "ebm_data_noise", "a finite std of at least 0", 0.0),
        "clip": _option(cfg, "ebm_clip", "a finite clip of at least 0 (0: none)", 0.0),
        "tail": _option(cfg, "ebm_tail", "a finite width of at least 0 (0: none)", 0.0),
        "keep": KEEP if cfg.get("ebm_keep") is None else _option(cfg, "ebm_keep", "a whole number of at least 1", 1),
        "sample_steps": _option(cfg, "ebm_sample_steps", "a whole number of at least 1", 1),
    }
    B = cfg.get("batch_size")
    if B is not None and o["buffer"] < int(B):
        raise UserError(f"--ebm-buffer {o['buffer']} is smaller than --batch-size {B}: each step takes "
                        f"{B} distinct chains from the buffer; raise --ebm-buffer")
    if cfg.get("ebm_keep") is None:
        o["keep"] = min(KEEP, o["buffer"])
    if o["keep"] > o["buffer"]:
        raise UserError(f"--ebm-keep {o['keep']} is larger than --ebm-buffer {o['buffer']}; keep at most the buffer")
    o["temperature"] = o["noise"] ** 2 / (2.0 * o["step_size"])
    return o


def check(cfg: dict, data) -> None:
    """Refuse what cannot work: point clouds, class-conditional training, a net with
    dropout (a random energy), bad option values."""
    if data.kind == "clouds":
        raise UserError("--family ebm does not model point clouds (sets of points); train clouds with the "
                        "diffusion teacher (no --family)")
    if cfg.get("conditional"):
        raise UserError("--family ebm trains an unconditional energy; drop --conditional")
    net = cfg.get("net")
    if isinstance(net, dict) and float(net.get("dropout", 0.0) or 0.0) > 0:
        raise UserError(f"--net: dropout {net['dropout']} makes the energy random, so its Langevin gradients "
                        f"are noise; set dropout 0 for --family ebm")
    options(cfg)


# ---------------------------------------------------------------------------- networks
class EnergyNet(nn.Module):
    """``E(x) = sum_j F(x, 0)_j + |x|^2 / (2 (tail s)^2)``, one scalar per sample.

    ``F`` is a net of :mod:`fewstep.nets` (config ``net_config``) evaluated at the constant
    noise input 0 (a single-level model); its output, shaped like ``x``, is summed: for an
    MLP this is a scalar linear head on its last features, for the UNet a global sum
    pool. The zero-initialised output layer of those nets starts E at the tail alone. The
    buffer ``bank`` holds ``keep`` persistent-chain samples (:func:`buffer_samples`)."""

    def __init__(self, net_config: dict, shape, start_std: float, tail: float = 10.0, keep: int = 1):
        super().__init__()
        from ..nets import build_net

        self.net = build_net(net_config)
        self.shape, self.start_std, self.tail = tuple(int(s) for s in shape), float(start_std), float(tail)
        self.register_buffer("bank", torch.zeros((int(keep),) + self.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.zeros(x.shape[0], device=x.device)
        e = self.net(x, c).reshape(x.shape[0], -1).sum(1)
        if self.tail > 0:
            e = e + x.reshape(x.shape[0], -1).square().sum(1) / (2.0 * (self.tail * self.start_std) ** 2)
        return e


class ReplayBuffer(nn.Module):
    """The persistent chains (Du & Mordatch 2019's replay buffer): ``x`` ``[size, *shape]``, a
    registered buffer, so the loop checkpoints it with the run (``Objective.extra``)."""

    def __init__(self, size: int, shape, start_std: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(_buffer_seed(seed))
        self.register_buffer("x", float(start_std) * torch.randn((int(size),) + tuple(shape), generator=g))

    @torch.no_grad()
    def write(self, slot: torch.Tensor, x: torch.Tensor) -> None:
        """Chain ends ``x`` into rows ``slot`` (distinct); with several processes every
        process's slice is gathered first, so all copies of the buffer stay the one
        buffer a single process would have."""
        slot, x = _gather(slot.to(self.x.device)), _gather(x.detach().to(self.x))
        self.x.index_copy_(0, slot, x)


def _buffer_seed(seed: int) -> int:
    return (int(seed) * 1_000_003 + 424_242) % (2**63 - 1)


def _gather(t: torch.Tensor) -> torch.Tensor:
    """All processes' ``t`` (equal shapes) concatenated in rank order (accelerate's gather;
    ``t`` itself in a single process)."""
    from accelerate.utils import gather

    return gather(t.contiguous())


def energy_grad(energy: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E(x), grad_x E(x))`` (both detached): autograd w.r.t. ``x`` only, no graph kept,
    so no parameter gradient accumulates (also under ``torch.no_grad``)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        e = energy(x)
        (g,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), g


def langevin_chain(energy: nn.Module, x: torch.Tensor, z: torch.Tensor, step_size: float, noise: float,
                   clip: float = 0.0) -> torch.Tensor:
    """``z.shape[1]`` steps ``x <- x - a clip(grad E(x)) + b z[:, k]`` (Du & Mordatch's
    Langevin with decoupled step a and noise b; ULA for exp(-E / T), T = b^2 / (2 a)), in
    float32 (autocast off). Returns the detached chain ends."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        for k in range(z.shape[1]):
            _, g = energy_grad(energy, x)
            if clip > 0:
                g = g.clamp(-clip, clip)
            x = x - step_size * g + noise * z[:, k].to(x)
    return x.detach()


def _start_std(x: torch.Tensor, data_noise: float) -> float:
    """RMS about 0 of the (noised) training data: sqrt(mean x^2 + data_noise^2)."""
    return math.sqrt(float(x.double().square().mean()) + data_noise**2)


def _net_config(cfg: dict, data) -> dict:
    from ..nets import net_config_defaults

    if cfg.get("net"):
        return dict(cfg["net"])
    net = net_config_defaults(data.kind, data.shape)
    if "dropout" in net:
        net["dropout"] = 0.0  # a deterministic energy: its gradient drives the chains
    return net


# --------------------------------------------------------------------------- objective
def objective(cfg: dict, data) -> Objective:
    """The module :class:`EnergyNet`, the replay buffer (``extra["buffer"]``) and the loss.

    ``draw(gen, step)`` draws everything random of a step: data indices and data noise,
    the buffer rows ``slot`` (distinct), the restart mask and restart values, and the
    Langevin noise ``z`` ``[B, ebm_steps, *shape]``. ``loss(model, b)`` runs this slice's
    chains from its rows, writes their ends back, and returns the per-sample
    ``E(x+) - E(x-) + alpha (E(x+)^2 + E(x-)^2)``."""
    check(cfg, data)
    o = options(cfg)
    x_all, shape = data.x.float(), tuple(data.shape)
    B, dn = int(cfg.get("batch_size", 256)), o["data_noise"]
    s = _start_std(x_all, dn)
    seed = int(cfg.get("seed", 0))
    module = EnergyNet(_net_config(cfg, data), shape, s, o["tail"], o["keep"])
    replay = ReplayBuffer(o["buffer"], shape, s, seed)
    view = (-1,) + (1,) * len(shape)

    def draw(gen, step):
        batch = {"x0": x_all[torch.randint(0, len(x_all), (B,), generator=gen)]}
        if dn > 0:
            batch["data_noise"] = torch.randn((B,) + shape, generator=gen)
        batch["slot"] = torch.randperm(o["buffer"], generator=gen)[:B]
        batch["reinit"] = torch.rand(B, generator=gen) < o["reinit"]
        batch["init"] = s * torch.randn((B,) + shape, generator=gen)
        batch["z"] = torch.randn((B, o["steps"]) + shape, generator=gen)
        return batch

    def loss(model, b):
        net = getattr(model, "module", model)  # the chains run on the bare module (no DDP forward)
        start = torch.where(b["reinit"].view(view), b["init"], replay.x[b["slot"]])
        neg = langevin_chain(net, start, b["z"], o["step_size"], o["noise"], o["clip"])
        replay.write(b["slot"], neg)
        with torch.no_grad():
            net.bank.copy_(replay.x[: net.bank.shape[0]])
        pos = b["x0"] + dn * b["data_noise"] if dn > 0 else b["x0"]
        e = model(torch.cat([pos, neg.to(pos)]))
        e_pos, e_neg = e[: len(pos)], e[len(pos):]
        return e_pos - e_neg + o["alpha"] * (e_pos.square() + e_neg.square())

    return Objective(module=module, draw=draw, loss=loss, extra={"buffer": replay})


# ------------------------------------------------------------------------ model.json
def meta(cfg: dict, module: EnergyNet, data) -> dict:
    """The family's fields of ``model.json``: options, temperature, the net, the level
    range and the own sampling rule (ULA at step ebm_noise^2 / 2 = the training chain)."""
    from ..process import EDM

    o = options(cfg)
    lo = o["data_noise"] if o["data_noise"] > 0 else LEVEL_FLOOR
    hi = max(module.start_std, lo)
    eps = o["noise"] ** 2 / 2.0
    return {
        "family": "ebm",
        "ebm": {**{k: o[k] for k in ("buffer", "reinit", "steps", "step_size", "noise", "alpha", "data_noise",
                                     "clip", "tail", "keep", "sample_steps", "temperature")},
                "start_std": module.start_std, "shape": list(module.shape)},
        "net": module.net.config,
        "process": EDM(lo, hi).config(),
        "sigma_min": lo,
        "sigma_max": hi,
        "default_sampler": "langevin",
        "default_nfe": o["sample_steps"],
        "sampling": {"sampler": "langevin", "options": {"step_size": eps}},
    }


def build(meta: dict) -> EnergyNet:
    """A fresh :class:`EnergyNet` of ``model.json`` (the caller loads the weights)."""
    e = meta["ebm"]
    return EnergyNet(meta["net"], e["shape"], e["start_std"], e["tail"], e["keep"])


def as_model(module: EnergyNet, meta: dict, name: str = "", device="cpu"):
    """A :class:`fewstep.model.Model`: ``ScoreDenoiser(score = -grad E / T, log_prob = -E / T)``
    at the level range of ``model.json``, sampled by default with its own rule (ULA)."""
    from ..model import Model
    from ..process import EDM

    T = float(meta["ebm"]["temperature"])
    module = module.to(device).eval()

    def score_fn(x, sigma, **cond):
        return -energy_grad(module, x.float())[1].to(x.dtype) / T

    def log_prob_fn(x, sigma):
        return -module(x.float()) / T

    D = ScoreDenoiser(module, score_fn, log_prob_fn)
    lo, hi = float(meta["sigma_min"]), float(meta["sigma_max"])
    data = meta.get("data") or {}
    return Model(D, EDM(lo, hi), meta["ebm"]["shape"], lo, hi, num_classes=0, default_sampler="langevin",
                 kind=data.get("kind", "image" if len(meta["ebm"]["shape"]) == 3 else "points"), name=name,
                 meta=meta, device=device)


def buffer_samples(model, n: Optional[int] = None) -> torch.Tensor:
    """The first ``n`` (all: None) of the persistent-chain samples kept in the model
    (``ebm_keep`` of the final replay buffer): starts for ``model.sample(n, nfe, x=...)``."""
    module = getattr(getattr(model, "denoiser", None), "module", model)
    bank = getattr(module, "bank", None)
    if bank is None:
        raise UserError(f"{getattr(model, 'name', '') or 'the model'} is not an energy-based model (no buffer)")
    if n is not None and not 1 <= int(n) <= bank.shape[0]:
        raise UserError(f"the model keeps {bank.shape[0]} buffer samples; ask for 1..{bank.shape[0]}, not {n} "
                        f"(or train with a larger --ebm-keep)")
    return bank[: bank.shape[0] if n is None else int(n)].clone()


# -------------------------------------------------------------------------- evaluate
EVAL_IMAGES = 256  # images per set for the energy distances


def evaluate(model, data, cfg: dict) -> dict:
    """The family's numbers for ``eval.json``: energy distances (Szekely & Rizzo) to
    ``reference_n`` held-out samples of samples by the own rule (ULA, ``eval_nfe`` steps,
    else ``default_nfe``), by MALA at the same step (with its acceptance rate) and of the
    kept buffer, beside the null level (two held-out sets of that size), and the mean
    energies of data and of the own rule's samples."""
    from ..data.registry import held_out
    from ..metrics import energy_distance

    seed = int(cfg.get("seed", 0))
    limit = int(cfg.get("eval_samples", 2000))
    n = min(limit, EVAL_IMAGES) if data.kind == "image" else limit
    refs, source = held_out(cfg["data"], 2 * n, seed + 7919, cfg.get("n_data"), seed)
    n = min(n, len(refs) // 2)
    if n < 2:
        raise UserError(f"dataset '{cfg['data']}' has too few held-out samples to evaluate the EBM")
    ref, other = refs.x[:n].float(), refs.x[n:2 * n].float()
    e = model.meta["ebm"]
    K = int(cfg["eval_nfe"] if cfg.get("eval_nfe") is not None else model.meta.get("default_nfe", e["sample_steps"]))
    eps = float(e["noise"]) ** 2 / 2.0
    energy = model.denoiser.module

    def mean_energy(x):
        with torch.no_grad():
            return float(energy(x.to(model.device)).mean())

    out = {"reference_n": n, "reference": source, "temperature": float(e["temperature"]),
           "null_energy_distance": energy_distance(ref, other), "energy_data": mean_energy(ref)}
    x, _ = model.sample(n, K, seed=seed + 1)
    x = x.float().cpu()
    out["langevin"] = {"nfe": K, "step_size": eps, **_distance(x, ref, energy_distance)}
    if bool(torch.isfinite(x).all()):
        out["energy_samples"] = mean_energy(x)
    rates = []
    xm, _ = model.sample(n, K + 1, sampler="mala", seed=seed + 2, step_size=eps,
                         callback=lambda info: rates.append(info["accept_rate"]))
    out["mala"] = {"nfe": K + 1, "step_size": eps, "acceptance": sum(rates) / max(len(rates), 1),
                   **_distance(xm.float().cpu(), ref, energy_distance)}
    bank = buffer_samples(model, min(n, model.denoiser.module.bank.shape[0])).float().cpu()
    if len(bank) >= 2:
        out["buffer"] = {"n": len(bank), **_distance(bank, ref[: len(bank)], energy_distance)}
    return out


def _distance(x: torch.Tensor, ref: torch.Tensor, fn) -> dict:
    if not bool(torch.isfinite(x).all()):
        return {"energy_distance": None, "diverged": True}
    return {"energy_distance": fn(x, ref)}
