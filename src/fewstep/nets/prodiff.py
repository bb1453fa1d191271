"""ProDiff's text-to-spectrogram network (Huang et al. 2022, "ProDiff", sec. 3 and fig. 2):
a FastSpeech 2 phoneme encoder and variance adaptor (Ren et al. 2021) whose output
conditions a WaveNet-style spectrogram denoiser (DiffSinger's / ProDiff's ``DiffNet``),
one module called as every fewstep net is: ``net(x, c_noise, labels=context)``.

**The context** (``labels``) is one float tensor ``[B, P, 6]`` per batch, a row per
phoneme (:data:`CONTEXT`): phoneme id (0 = padding), duration in mel frames, pitch
(standardised mean log f0 of the phoneme's voiced frames, 0 when unvoiced), voiced flag,
energy (standardised log energy), speaker index (-1 for none). Durations fix the frame count
``F_b = sum_p d_bp`` and the frame mask (:func:`frame_mask`). A tensor (not a dict) so that
the samplers' ``extra_args``, the runner's batch slicing and ``labels[idx]`` carry it as
they carry class labels.

**The network** (sizes are options; the defaults are a CPU-sized ProDiff):

- encoder: phoneme embedding + sinusoidal positions, ``encoder_layers`` feed-forward
  Transformer blocks (FastSpeech's FFT block: self-attention with the padding masked, then a
  1-D conv FFN of kernel 9, post-norm), plus a speaker embedding (row ``num_speakers`` is
  "no speaker");
- variance adaptor (FastSpeech 2 sec. 2.3, the phoneme-level variant): duration, pitch and
  energy predictors (two conv-ReLU-LayerNorm-dropout layers and a linear head each; duration
  in the log domain ``log(1 + d)``, pitch with a voiced logit); pitch and energy enter the
  hidden states through a kernel-1 projection (FastPitch's form, not FastSpeech 2's
  quantised embeddings: the values here are standardised reals); in training the ground-truth
  values of the context are used (teacher forcing), at inference :meth:`ProDiffNet.predict`
  fills them in;
- length regulator (:func:`expand`): each phoneme state repeated ``d`` frames;
- denoiser (ProDiff's ``DiffNet``, after WaveNet): input 1x1 conv of the 80 mel bins to
  ``residual_channels``, ``residual_layers`` gated residual layers (dilated conv of the
  state plus the step embedding, plus a 1x1 conv of the condition; tanh x sigmoid gate;
  residual and skip outputs, skips summed / sqrt(L)), output convs, the last zero-initialised.
  Padded frames are zeroed at the input, after every layer and at the output, so padding
  never reaches a valid frame and the output there is exactly 0.

``net(x, c_noise, labels=ctx, variance_loss=True)`` also returns the adaptor's per-sample
loss (duration MSE in the log domain, pitch MSE over voiced phonemes + voiced BCE, energy
MSE, each averaged over the valid phonemes): the teacher's FastSpeech 2 terms.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .embed import ScalarEmbedding, per_sample

CONTEXT = ("phoneme", "duration", "pitch", "voiced", "energy", "speaker")
PHONEME, DURATION, PITCH, VOICED, ENERGY, SPEAKER = range(len(CONTEXT))


def frame_lengths(context: Tensor) -> Tensor:
    """Frames of each utterance, ``sum_p duration`` (long [B])."""
    return context[..., DURATION].round().long().clamp_min(0).sum(1)


def frame_mask(context: Tensor, frames: Optional[int] = None) -> Tensor:
    """bool [B, F]: frame f of utterance b is real (``f < sum_p d_bp``); F defaults to the longest."""
    n = frame_lengths(context)
    frames = int(n.max()) if frames is None and len(n) else int(frames or 0)
    return torch.arange(frames, device=context.device)[None] < n[:, None]


def expand(encoded: Tensor, durations: Tensor, max_frames: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """FastSpeech's length regulator: phoneme states ``encoded`` [B, P, D] repeated by
    their integer ``durations`` [B, P] (padding phonemes have duration 0) into frames
    [B, F, D] and the frame mask [B, F]; ``F = max_b sum_p durations[b, p]`` unless
    ``max_frames`` is given (longer rows are cut). Padding frames are 0. Differentiable in
    ``encoded`` (a gather)."""
    if encoded.ndim != 3 or durations.shape != encoded.shape[:2]:
        raise ValueError(f"expand: encoded [B, P, D] and durations [B, P], got {tuple(encoded.shape)} "
                         f"and {tuple(durations.shape)}")
    durations = durations.long().clamp_min(0)
    ends = durations.cumsum(dim=1)                                   # [B, P]
    total = ends[:, -1] if ends.shape[1] else torch.zeros(len(ends), dtype=torch.long, device=ends.device)
    frames = int(total.max()) if max_frames is None and len(total) else int(max_frames or 0)
    pos = torch.arange(frames, device=encoded.device).expand(len(encoded), frames).contiguous()
    index = torch.searchsorted(ends, pos, right=True).clamp_max(max(encoded.shape[1] - 1, 0))
    mask = pos < total[:, None]
    out = torch.gather(encoded, 1, index[..., None].expand(-1, -1, encoded.shape[2]))
    return out * mask[..., None].to(out.dtype), mask


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-sample mean of ``values`` [B, N, ...] over the positions where ``mask`` [B, N] is true."""
    m = mask.to(values.dtype).reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    count = (m.expand_as(values).flatten(1).sum(1)).clamp_min(1.0)
    return (values * m).flatten(1).sum(1) / count


def _positions(n: int, dim: int, device, dtype) -> Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out.to(dtype)


class FFTBlock(nn.Module):
    """FastSpeech's feed-forward Transformer block: post-norm self-attention, then a conv FFN."""

    def __init__(self, dim: int, heads: int, kernel: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.conv1 = nn.Conv1d(dim, 4 * dim, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(4 * dim, dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        keep = mask[..., None].to(h.dtype)
        a, _ = self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)
        h = self.norm1(h + self.drop(a)) * keep
        f = self.conv2(F.relu(self.conv1(h.transpose(1, 2)))).transpose(1, 2)
        return self.norm2(h + self.drop(f)) * keep


class VariancePredictor(nn.Module):
    """FastSpeech 2's predictor: [conv k3, ReLU, LayerNorm, dropout] x 2, linear head."""

    def __init__(self, dim: int, hidden: int, out: int, dropout: float):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(dim, hidden, 3, padding=1), nn.Conv1d(hidden, hidden, 3, padding=1)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        keep = mask[..., None].to(h.dtype)
        h = self.drop(self.norm1(F.relu(self.conv1(h.transpose(1, 2))).transpose(1, 2))) * keep
        h = self.drop(self.norm2(F.relu(self.conv2(h.transpose(1, 2))).transpose(1, 2))) * keep
        return self.head(h) * keep


class ResidualLayer(nn.Module):
    """One gated residual layer of ProDiff's DiffNet (WaveNet): returns (residual out, skip)."""

    def __init__(self, channels: int, cond_dim: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)
        self.step = nn.Linear(channels, channels)
        self.cond = nn.Conv1d(cond_dim, 2 * channels, 1)
        self.out = nn.Conv1d(channels, 2 * channels, 1)

    def forward(self, x: Tensor, cond: Tensor, step: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        y = self.conv((x + self.step(step)[..., None]) * keep) + self.cond(cond)
        gate, filt = y.chunk(2, dim=1)
        residual, skip = self.out(torch.sigmoid(gate) * torch.tanh(filt)).chunk(2, dim=1)
        return (x + residual) / math.sqrt(2.0) * keep, skip


class ProDiffNet(nn.Module):
    """``net(x [B, F, mel_bins], c_noise [B], labels=context [B, P, 6]) -> [B, F, mel_bins]``
    (module docstring); ``variance_loss=True`` returns ``(out, loss [B])``."""

    takes_context = True

    def __init__(self, mel_bins: int = 80, num_phonemes: int = 110, num_speakers: int = 0, hidden: int = 128,
                 encoder_layers: int = 3, heads: int = 2, ffn_kernel: int = 9, predictor_hidden: int = 128,
                 residual_layers: int = 12, residual_channels: int = 128, dilation_cycle: int = 1,
                 dropout: float = 0.1, max_phonemes: int = 512):
        super().__init__()
        for name, v in (("mel_bins", mel_bins), ("num_phonemes", num_phonemes), ("hidden", hidden),
                        ("heads", heads), ("ffn_kernel", ffn_kernel), ("predictor_hidden", predictor_hidden),
                        ("residual_layers", residual_layers), ("residual_channels", residual_channels),
                        ("dilation_cycle", dilation_cycle), ("max_phonemes", max_phonemes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive whole number, got {v!r}")
        if isinstance(encoder_layers, bool) or not isinstance(encoder_layers, int) or encoder_layers < 0:
            raise ValueError(f"encoder_layers must be a whole number >= 0, got {encoder_layers!r}")
        if isinstance(num_speakers, bool) or not isinstance(num_speakers, int) or num_speakers < 0:
            raise ValueError(f"num_speakers must be a whole number >= 0, got {num_speakers!r}")
        if hidden % heads or hidden % 2:
            raise ValueError(f"hidden {hidden} must be even and a multiple of heads {heads}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.config = dict(kind="prodiff", mel_bins=mel_bins, num_phonemes=num_phonemes, num_speakers=num_speakers,
                           hidden=hidden, encoder_layers=encoder_layers, heads=heads, ffn_kernel=ffn_kernel,
                           predictor_hidden=predictor_hidden, residual_layers=residual_layers,
                           residual_channels=residual_channels, dilation_cycle=dilation_cycle,
                           dropout=float(dropout), max_phonemes=max_phonemes)
        self.mel_bins, self.num_phonemes, self.num_speakers, self.max_phonemes = \
            mel_bins, num_phonemes, num_speakers, max_phonemes
        self.embed = nn.Embedding(num_phonemes, hidden, padding_idx=0)
        self.speaker = nn.Embedding(num_speakers + 1, hidden)  # the last row: no speaker
        self.encoder = nn.ModuleList(FFTBlock(hidden, heads, ffn_kernel, dropout) for _ in range(encoder_layers))
        self.duration = VariancePredictor(hidden, predictor_hidden, 1, dropout)
        self.pitch = VariancePredictor(hidden, predictor_hidden, 2, dropout)   # value, voiced logit
        self.energy = VariancePredictor(hidden, predictor_hidden, 1, dropout)
        self.pitch_proj = nn.Conv1d(2, hidden, 1)     # value and voiced flag
        self.energy_proj = nn.Conv1d(1, hidden, 1)
        C = residual_channels
        self.inp = nn.Conv1d(mel_bins, C, 1)
        self.step_embed = ScalarEmbedding(C)
        self.layers = nn.ModuleList(ResidualLayer(C, hidden, 2 ** (i % dilation_cycle))
                                    for i in range(residual_layers))
        self.skip = nn.Conv1d(C, C, 1)
        self.out = nn.Conv1d(C, mel_bins, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self._memo: Optional[tuple] = None

    def freeze_context(self) -> None:
        """Stop training the text side (phoneme embedding, encoder, speaker embedding, variance
        predictors and their projections): ProDiff's distillation trains the student's
        denoiser only (its student's FastSpeech 2 is frozen)."""
        self._frozen = True
        for part in self._context_parts():
            part.requires_grad_(False).eval()  # no dropout either: the condition is the teacher's

    def _context_parts(self) -> tuple:
        return (self.embed, self.speaker, self.encoder, self.duration, self.pitch, self.energy, self.pitch_proj,
                self.energy_proj)

    # ------------------------------------------------------------------ the context
    def _check(self, context) -> Tensor:
        if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[-1] != len(CONTEXT):
            got = list(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise UserError(f"the prodiff net needs its context as labels [batch, phonemes, {len(CONTEXT)}] "
                            f"({', '.join(CONTEXT)}), got {got}; speech models sample from text "
                            f"(fewstep sample RUN --text ...)")
        if context.shape[1] > self.max_phonemes:
            raise UserError(f"an utterance of {context.shape[1]} phonemes is longer than this net's "
                            f"max_phonemes {self.max_phonemes}; give shorter sentences")
        ids = context[..., PHONEME].round().long()
        if bool(((ids < 0) | (ids >= self.num_phonemes)).any()):
            raise UserError(f"phoneme ids must lie in 0..{self.num_phonemes - 1}, got "
                            f"{int(ids.min())}..{int(ids.max())}")
        return ids

    def _speakers(self, context: Tensor) -> Tensor:
        spk = context[:, 0, SPEAKER].round().long() if context.shape[1] else \
            torch.full((len(context),), -1, dtype=torch.long, device=context.device)
        return torch.where((spk < 0) | (spk >= self.num_speakers), torch.full_like(spk, self.num_speakers), spk)

    def encode(self, ids: Tensor, speakers: Tensor) -> tuple[Tensor, Tensor]:
        """Phoneme states [B, P, hidden] (speaker added) and the phoneme mask [B, P]."""
        mask = ids > 0
        h = self.embed(ids) + _positions(ids.shape[1], self.embed.embedding_dim, ids.device, self.embed.weight.dtype)
        h = h * mask[..., None].to(h.dtype)
        for block in self.encoder:
            h = block(h, mask)
        return (h + self.speaker(speakers)[:, None]) * mask[..., None].to(h.dtype), mask

    def condition(self, context: Tensor, frames: int, ids: Optional[Tensor] = None):
        """(frame condition [B, hidden, F], frame mask [B, F], phoneme states, phoneme mask):
        the encoder, the adaptor with the context's durations, pitch and energy, the length regulator."""
        ids = self._check(context) if ids is None else ids
        h, pmask = self.encode(ids, self._speakers(context))
        dt = h.dtype
        pv = torch.stack([context[..., PITCH], context[..., VOICED]], 1).to(dt)  # [B, 2, P]
        h_var = h + (self.pitch_proj(pv) + self.energy_proj(context[..., ENERGY][:, None].to(dt))).transpose(1, 2)
        h_var = h_var * pmask[..., None].to(dt)
        cond, fmask = expand(h_var, context[..., DURATION].round().long() * pmask, max_frames=frames)
        return cond.transpose(1, 2), fmask, h, pmask

    def variance_outputs(self, h: Tensor, pmask: Tensor) -> dict:
        """The predictors' outputs on phoneme states ``h``: ``log_duration`` (log(1 + d)),
        ``pitch``, ``voiced_logit``, ``energy`` [B, P]."""
        p = self.pitch(h, pmask)
        return {"log_duration": self.duration(h, pmask)[..., 0], "pitch": p[..., 0], "voiced_logit": p[..., 1],
                "energy": self.energy(h, pmask)[..., 0]}

    def variance_loss(self, h: Tensor, pmask: Tensor, context: Tensor) -> Tensor:
        """Per-sample FastSpeech 2 variance loss (module docstring)."""
        out = self.variance_outputs(h, pmask)
        d = torch.log1p(context[..., DURATION].clamp_min(0).to(h.dtype))
        voiced = context[..., VOICED].to(h.dtype)
        loss = masked_mean((out["log_duration"] - d) ** 2, pmask)
        loss = loss + masked_mean((out["pitch"] - context[..., PITCH].to(h.dtype)) ** 2, pmask & (voiced > 0.5))
        loss = loss + masked_mean(F.binary_cross_entropy_with_logits(out["voiced_logit"], voiced, reduction="none"),
                                  pmask)
        return loss + masked_mean((out["energy"] - context[..., ENERGY].to(h.dtype)) ** 2, pmask)

    @torch.no_grad()
    def predict(self, ids: Tensor, speakers: Optional[Tensor] = None, pace: float = 1.0) -> Tensor:
        """The context of phoneme ids [B, P] (0 = padding) from the adaptor's own predictions:
        durations ``round(exp(log_d) - 1) / pace`` (>= 0), pitch, voiced (logit > 0), energy."""
        ids = torch.as_tensor(ids).long()
        B, P = ids.shape
        spk = torch.full((B,), -1, dtype=torch.long, device=ids.device) if speakers is None else \
            torch.as_tensor(speakers, device=ids.device).long().reshape(-1).expand(B)
        ctx = torch.zeros(B, P, len(CONTEXT), device=ids.device)
        ctx[..., PHONEME], ctx[..., SPEAKER] = ids.float(), spk[:, None].float()
        self._check(ctx)
        h, pmask = self.encode(ids, self._speakers(ctx))
        out = self.variance_outputs(h, pmask)
        keep = pmask.float()
        ctx[..., DURATION] = (torch.expm1(out["log_duration"].float()).clamp_min(0) / float(pace)).round() * keep
        ctx[..., PITCH] = out["pitch"].float() * keep
        voiced = (out["voiced_logit"] > 0).float() * keep
        ctx[..., VOICED] = voiced
        ctx[..., PITCH] *= voiced
        ctx[..., ENERGY] = out["energy"].float() * keep
        return ctx

    # ------------------------------------------------------------------ the denoiser
    def forward(self, x: Tensor, c_noise, labels=None, cond=None, variance_loss: bool = False):
        if cond is not None:
            raise UserError("the prodiff net takes no 'cond' input")
        if x.ndim != 3 or x.shape[-1] != self.mel_bins:
            raise UserError(f"the prodiff net denoises mel spectrograms [batch, frames, {self.mel_bins}], got "
                            f"{list(x.shape)}")
        if labels is None:
            raise UserError("the prodiff net needs the utterances' context (labels); speech models sample from "
                            "text: fewstep sample RUN --text ...")
        B, frames = x.shape[0], x.shape[1]
        if labels.shape[0] != B:
            raise UserError(f"the prodiff net got {labels.shape[0]} contexts for a batch of {B}")
        key = (id(labels), labels._version, frames, x.device, x.dtype)
        if (not variance_loss and not self.training and not torch.is_grad_enabled() and self._memo is not None
                and self._memo[0] == key and self._memo[1] is labels):
            c, fmask = self._memo[2]  # a sampler's repeated calls with one context: the encoder once
        else:
            c, fmask, h, pmask = self.condition(labels, frames)
            c = c.to(x.dtype)
            if variance_loss:
                vloss = self.variance_loss(h, pmask, labels)
            elif not self.training and not torch.is_grad_enabled():
                self._memo = (key, labels, (c, fmask))
        keep = fmask[:, None].to(x.dtype)                                 # [B, 1, F]
        step = self.step_embed(per_sample(c_noise, B, x)).to(x.dtype)
        h = self.inp(x.transpose(1, 2) * keep) * keep
        skips = 0
        for layer in self.layers:
            h, s = layer(h, c, step, keep)
            skips = skips + s
        h = F.relu(self.skip(skips / math.sqrt(len(self.layers))))
        out = (self.out(h) * keep).transpose(1, 2)
        return (out, vloss) if variance_loss else out

    def load_state_dict(self, *args, **kwargs):
        self._memo = None
        return super().load_state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        self._memo = None
        super().train(mode)
        if getattr(self, "_frozen", False):
            for part in self._context_parts():
                part.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        self._memo = None
        return super()._apply(fn, *args, **kwargs)
