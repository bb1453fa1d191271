"""A small KL-regularised autoencoder, the first stage of latent diffusion (Rombach et al.
2022, "High-resolution image synthesis with latent diffusion models", sec. 3 and appendix G).

The encoder ``E`` maps an image ``x`` [B, C, H, W] to a diagonal Gaussian posterior
``q(z | x) = N(mu(x), diag(sigma^2(x)))`` over latents [B, c, H / f, W / f] (LDM's
"KL-reg." first stage, sec. 3.1); the decoder ``D`` maps a latent back to an image. Training
(:mod:`fewstep.train.autoencoder`) minimises a reconstruction loss plus a small weight times
``KL(q(z | x) || N(0, I))``, so the latent space stays close to a standard normal without
losing detail. A diffusion model is then trained on ``s * z`` with the scale factor
``s = 1 / std(z)`` measured on a batch of data (LDM's "rescaled" latents, appendix G), so its
inputs have unit variance.

Architecture (LDM's ``Encoder`` / ``Decoder``, at fewstep's size): a 3x3 convolution, then per
level ``i`` ``num_res_blocks`` residual blocks of ``base_channels * channel_mult[i]`` channels
and a stride-2 downsampling after every level but the last, a middle block (residual,
self-attention, residual), GroupNorm, SiLU and a 3x3 convolution to ``2 c`` channels (mean
and log-variance). The decoder mirrors it with ``num_res_blocks + 1`` blocks per level and
nearest-neighbour upsampling. The pieces are the UNet's (:mod:`fewstep.nets.unet`): its
GroupNorm rule, its residual block (here without the FiLM conditioning: scale = shift = 0),
its self-attention, down- and upsampling.

The downsampling factor is ``f = 2 ** (len(channel_mult) - 1)``. The default ``(1, 2, 2)`` is
f = 4: a 28x28 Fashion-MNIST image becomes a 4 x 7 x 7 latent, 196 numbers for 784 pixels
(LDM's "KL-f4"). ``(1, 2)`` (f = 2) keeps 14x14: with 4 channels that is no smaller than the
one-channel image, so it only suits tests and 8-px data.

:class:`LatentCodec` is what latent-space models use: ``encode(x) -> s * z``,
``decode(latents) -> x``; :func:`load_autoencoder` gives one for a ``fewstep
train-autoencoder`` run folder or a diffusers ``AutoencoderKL`` (``diffusers:PATH``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from .unet import Downsample, ResBlock, SelfAttention, Upsample, _norm

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp of the posterior log-variance
ROLE = "autoencoder"  # model.json "role" of a fewstep train-autoencoder run


class DiagonalGaussian:
    """The posterior ``N(mean, diag(exp(logvar)))`` with ``logvar`` clamped to [-30, 20]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """``mean + std * eps`` (the reparametrisation), ``eps`` = ``noise`` or drawn from ``generator``."""
        if noise is None:
            dev = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=dev, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """``KL(q || N(0, I))`` per sample [B]: ``0.5 * sum(mean^2 + var - 1 - logvar)``."""
        terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        return 0.5 * terms.flatten(1).sum(1)


class _NoFiLM(nn.Module):
    """In place of a :class:`~fewstep.nets.unet.ResBlock`'s FiLM layer: scale = shift = 0,
    which makes the block LDM's unconditioned ``ResnetBlock``."""

    def __init__(self, cout: int):
        super().__init__()
        self.cout = cout

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return emb.new_zeros(emb.shape[0], 2 * self.cout)


def _res(cin: int, cout: int) -> ResBlock:
    block = ResBlock(cin, cout, emb_dim=1)
    block.film = _NoFiLM(cout)
    return block


def _run(blocks: nn.ModuleList, h: torch.Tensor, up_to: Optional[list] = None) -> torch.Tensor:
    """Apply residual blocks, attention and down/upsampling in order (up: to twice the size)."""
    none = h.new_zeros(h.shape[0], 1)  # the blocks' (unused) embedding
    for m in blocks:
        if isinstance(m, ResBlock):
            h = m(h, none)
        elif isinstance(m, Upsample):
            h = m(h, (2 * h.shape[-2], 2 * h.shape[-1]))
        else:
            h = m(h)
    return h


class KLAutoencoder(nn.Module):
    """``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``, ``forward(x) -> (recon, posterior)``
    (see the module docstring); ``config`` rebuilds it through :data:`AUTOENCODERS`."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1):
        super().__init__()
        mults = [int(m) for m in channel_mult]
        if not mults or min(mults) < 1 or int(num_res_blocks) < 1 or min(int(in_channels), int(latent_channels),
                                                                             int(base_channels)) < 1:
            raise UserError(f"autoencoder: channel_mult must be a non-empty list of whole numbers >= 1 and "
                            f"in_channels, latent_channels, base_channels, num_res_blocks >= 1; got "
                            f"{list(channel_mult)}, {in_channels}, {latent_channels}, {base_channels}, "
                            f"{num_res_blocks}")
        self.config = dict(kind="kl", in_channels=int(in_channels), latent_channels=int(latent_channels),
                           base_channels=int(base_channels), channel_mult=mults, num_res_blocks=int(num_res_blocks))
        self.in_channels, self.latent_channels = int(in_channels), int(latent_channels)
        self.factor = 2 ** (len(mults) - 1)
        base, nrb = int(base_channels), int(num_res_blocks)
        widths = [base * m for m in mults]

        def middle(ch: int) -> list:
            return [_res(ch, ch), SelfAttention(ch), _res(ch, ch)]

        enc, ch = [nn.Conv2d(in_channels, base, 3, padding=1)], base
        for level, width in enumerate(widths):
            for _ in range(nrb):
                enc.append(_res(ch, width))
                ch = width
            if level < len(widths) - 1:
                enc.append(Downsample(ch))
        enc += middle(ch) + [_norm(ch), nn.SiLU(), nn.Conv2d(ch, 2 * self.latent_channels, 3, padding=1)]
        self.encoder = nn.ModuleList(enc)
        dec = [nn.Conv2d(self.latent_channels, ch, 3, padding=1)] + middle(ch)
        for level in reversed(range(len(widths))):
            for _ in range(nrb + 1):
                dec.append(_res(ch, widths[level]))
                ch = widths[level]
            if level > 0:
                dec.append(Upsample(ch))
        dec += [_norm(ch), nn.SiLU(), nn.Conv2d(ch, self.in_channels, 3, padding=1)]
        self.decoder = nn.ModuleList(dec)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple:
        """The latent shape ``(c, H / f, W / f)`` of images of ``image_shape`` ``(C, H, W)``;
        one line when H or W is not a multiple of f."""
        c, h, w = (int(s) for s in image_shape)
        if c != self.in_channels:
            raise UserError(f"the autoencoder takes {self.in_channels}-channel images, got {c} channels "
                            f"(shape {list(image_shape)}); train one on this data")
        if h % self.factor or w % self.factor:
            raise UserError(f"image size {h}x{w} is not a multiple of the autoencoder's downsampling factor "
                            f"{self.factor} (2 ** (len(channel_mult) - 1)); use a shorter channel_mult")
        return (self.latent_channels, h // self.factor, w // self.factor)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.ndim != 4:
            raise UserError(f"the autoencoder encodes images [B, C, H, W], got shape {tuple(x.shape)}")
        self.latent_shape(x.shape[1:])
        moments = _run(self.encoder, x)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise UserError(f"the autoencoder decodes latents [B, {self.latent_channels}, h, w], got shape "
                            f"{tuple(z.shape)}")
        return _run(self.decoder, z)

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None, sample: bool = True,
                generator: Optional[torch.Generator] = None):
        """(reconstruction, posterior): decoded from a posterior sample (``noise`` the
        reparametrisation's eps, else drawn from ``generator``) or, ``sample=False``, its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample else posterior.mode()
        return self.decode(z), posterior


AUTOENCODERS = {"kl": KLAutoencoder}


def build_autoencoder(config: dict) -> nn.Module:
    """The autoencoder of ``config = {"kind": "kl", **options}`` (fresh weights)."""
    from . import build_from

    return build_from(AUTOENCODERS, config, "autoencoder", refused=(TypeError, ValueError))


# ---------------------------------------------------------------------------------------- codec
class LatentCodec:
    """Images <-> scaled latents, for models in an autoencoder's latent space.

    ``encode(x) = s * (z - shift)`` with ``z`` the posterior mean (``sample=False``) or a
    posterior sample (``sample=True``, as LDM trains its diffusion model), ``decode(latents) =
    D(latents / s + shift)``; ``s`` is ``scale_factor`` (a fewstep run's measured ``1 / std(z)``,
    a diffusers model's ``config.scaling_factor``), ``shift`` 0 except for diffusers models
    with a ``shift_factor`` (SD3-style). ``image_shape`` / ``latent_shape`` are per sample.
    The module is frozen (eval mode, no gradients to its weights; gradients still flow to
    its inputs)."""

    def __init__(self, module: nn.Module, scale_factor: float, image_shape: Sequence[int],
                 latent_shape: Sequence[int], source: str, shift_factor: float = 0.0, meta: Optional[dict] = None):
        self.module = module.eval().requires_grad_(False)
        self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
        self.image_shape, self.latent_shape = tuple(int(s) for s in image_shape), tuple(int(s) for s in latent_shape)
        self.source = source
        self.meta = dict(meta or {})
        self.diffusers = source.startswith("diffusers:")

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device) -> "LatentCodec":
        self.module.to(device)
        return self

    def posterior(self, x: torch.Tensor):
        """``q(z | x)``: an object with ``mean``, ``sample(generator)`` and ``mode()``."""
        x = x.to(self.device, next(self.module.parameters()).dtype)
        return self.module.encode(x).latent_dist if self.diffusers else self.module.encode(x)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None
               ) -> torch.Tensor:
        post = self.posterior(x)
        z = post.sample(generator=generator) if sample else post.mode()
        return (z - self.shift_factor) * self.scale_factor

    def decode(self, latents: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """Images from scaled latents; ``clamp`` limits them to the data range [-1, 1]."""
        z = latents.to(self.device, next(self.module.parameters()).dtype) / self.scale_factor + self.shift_factor
        x = self.module.decode(z).sample if self.diffusers else self.module.decode(z)
        return x.clamp(-1.0, 1.0) if clamp else x

    def __repr__(self) -> str:
        return (f"LatentCodec({self.source}, image {list(self.image_shape)} -> latent {list(self.latent_shape)}, "
                f"scale_factor {self.scale_factor:.5g})")


@torch.no_grad()
def measure_scale_factor(encoder, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                         batch_size: int = 256) -> float:
    """LDM's scale factor ``1 / std(z)``: one standard deviation over every value of posterior
    samples ``z`` of the images ``x`` (``encoder``: a :class:`KLAutoencoder` or a
    :class:`LatentCodec`, whose own ``shift_factor`` does not change a standard deviation)."""
    zs = []
    for i in range(0, len(x), int(batch_size)):
        part = x[i:i + int(batch_size)]
        post = encoder.posterior(part) if isinstance(encoder, LatentCodec) else encoder.encode(
            part.to(next(encoder.parameters()).device))
        zs.append(post.sample(generator=generator).float().cpu())
    std = float(torch.cat(zs).flatten().std())
    if not (std > 0 and torch.isfinite(torch.tensor(std))):
        raise UserError(f"the latents' standard deviation is {std}, so no scale factor exists; the autoencoder "
                        "collapsed: train it again with a lower --lr")
    return 1.0 / std


def load_autoencoder(spec, device=None, scale_factor: Optional[float] = None) -> LatentCodec:
    """A :class:`LatentCodec` from ``spec``: a finished ``fewstep train-autoencoder`` run folder
    (``model.json`` with ``"role": "autoencoder"``), ``diffusers:PATH`` (an ``AutoencoderKL``
    folder written by ``save_pretrained``, or a pipeline folder with ``vae/``; local files only),
    or a codec (returned as is). ``scale_factor`` replaces the stored one (e.g. a factor
    measured on other data with :func:`measure_scale_factor`)."""
    from ..checks import resolve_device

    dev = torch.device(resolve_device(device, "device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(spec, LatentCodec):
        codec = spec
    elif isinstance(spec, str) and spec.startswith("diffusers:"):
        codec = _load_diffusers(spec[len("diffusers:"):])
    else:
        codec = _load_run(Path(str(spec)))
    if scale_factor is not None:
        if not (float(scale_factor) > 0 and torch.isfinite(torch.tensor(float(scale_factor)))):
            raise UserError(f"scale_factor must be a finite number above 0, got {scale_factor}")
        codec.scale_factor = float(scale_factor)
    return codec.to(dev)


def _load_run(path: Path) -> LatentCodec:
    from ..io import load_weights, read_json

    meta_path = path / "model.json"
    if not meta_path.is_file():
        hint = ("finish it with the same fewstep train-autoencoder command plus --resume" if (path / "config.json"
                ).is_file() else "give the --out folder of fewstep train-autoencoder or diffusers:PATH")
        raise UserError(f"{path} holds no finished autoencoder (no model.json); {hint}")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("role") != ROLE:
        got = meta.get("role", "a sampler model") if isinstance(meta, dict) else "not an object"
        raise UserError(f"{path} is not an autoencoder run (its role: {got}); make one with fewstep "
                        f"train-autoencoder --data D --out DIR")
    for key in ("net", "scale_factor", "image_shape", "latent_shape"):
        if key not in meta:
            raise UserError(f"{meta_path}: field \"{key}\" is missing; re-train the autoencoder")
    module = build_autoencoder(meta["net"])
    weights = path / "model.safetensors"
    state = load_weights(weights)
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{weights}: tensor '{bad[0]}' holds NaN or infinite values; re-train the autoencoder")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights} does not fit the autoencoder in model.json ({str(e).splitlines()[0]}); "
                        "re-train it") from None
    return LatentCodec(module, meta["scale_factor"], meta["image_shape"], meta["latent_shape"], str(path), meta=meta)


def _load_diffusers(where: str) -> LatentCodec:
    """A diffusers ``AutoencoderKL`` from a local folder (``config.json`` there or in ``vae/``)."""
    path = Path(where)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"diffusers:{where}: no config.json or vae/config.json there; give a folder written by "
                        "AutoencoderKL.save_pretrained (or a pipeline folder with vae/)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"diffusers:{where}: cannot read {cfg_file} ({' '.join(str(e).split())[:100]})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "AutoencoderKL":
        got = cfg.get("_class_name") if isinstance(cfg, dict) else None
        raise UserError(f"diffusers:{where}: {cfg_file} describes a {got or 'model of no class'}, not an "
                        "AutoencoderKL; give the folder of a diffusers AutoencoderKL")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("diffusers:PATH autoencoders need the diffusers package; pip install diffusers") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError...
        raise UserError(f"diffusers:{where}: cannot load the AutoencoderKL ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]})") from None
    c = vae.config
    if getattr(c, "latents_mean", None) is not None or getattr(c, "latents_std", None) is not None:
        raise UserError(f"diffusers:{where}: per-channel latents_mean / latents_std (SDXL-style) are not "
                        "supported; use an AutoencoderKL with a single scaling_factor")
    f = 2 ** (len(c.block_out_channels) - 1)
    size = int(c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0])
    image_shape = (int(c.in_channels), size, size)
    latent_shape = (int(c.latent_channels), size // f, size // f)
    return LatentCodec(vae, float(c.scaling_factor), image_shape, latent_shape, f"diffusers:{where}",
                       shift_factor=float(c.shift_factor or 0.0), meta={"factor": f})


__all__ = ["AUTOENCODERS", "DiagonalGaussian", "KLAutoencoder", "LatentCodec", "build_autoencoder",
           "load_autoencoder", "measure_scale_factor"]
