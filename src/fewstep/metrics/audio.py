"""Spectrogram and audio measures of speech models.

- :func:`mel_l1`: mean absolute difference of two log-mels (natural log) over their frames,
  the frames aligned one to one (same durations given);
- :func:`mel_cepstral_distortion`: MCD in dB (Kubichek 1993),
  ``(10 / ln 10) sqrt(2 sum_{d=1..D} (c_d - c'_d)^2)`` averaged over frames, with the mel
  cepstra ``c_d = (1/N) sum_k 2 log S_k cos(pi d (k + 1/2) / N)`` the cosine transform of the
  N-bin log-mel (the cepstrum of the log spectrum on the mel-warped axis), c_0 (loudness)
  left out, D = 24. Papers' MCD comes from SPTK's mel-cepstral analysis of WORLD spectra
  (alpha-warped, not mel filter banks); the numbers here rank models on the same data but are
  not comparable to published ones;
- :func:`read_wav` and :func:`audio_summary`: a 16-bit PCM wav's rate, length, loudness and
  the share of its energy in the speech band (80-4000 Hz), to check that a file is speech-like.
"""
from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

from ..errors import UserError

MCD_ORDER = 24
SPEECH_BAND = (80.0, 4000.0)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, np.float64)
    b = np.asarray(b.detach().cpu() if hasattr(b, "detach") else b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise UserError(f"spectrogram measures need two log-mels [frames, bins] of one shape, got {a.shape} and "
                        f"{b.shape}")
    return a, b


def mel_l1(a, b) -> float:
    """Mean |a - b| over all frames and bins of two aligned log-mels [F, bins]."""
    a, b = _pair(a, b)
    return float(np.abs(a - b).mean())


def mel_cepstra(log_mel, order: int = MCD_ORDER) -> np.ndarray:
    """c_1 .. c_order of each frame of a log-mel [F, N] (module docstring)."""
    x = np.asarray(log_mel, np.float64)
    N = x.shape[1]
    d = np.arange(1, order + 1)[:, None]
    basis = 2.0 / N * np.cos(math.pi * d * (np.arange(N)[None] + 0.5) / N)   # [order, N]
    return x @ basis.T


def mel_cepstral_distortion(a, b, order: int = MCD_ORDER) -> float:
    """MCD in dB between two aligned log-mels [F, bins] (module docstring)."""
    a, b = _pair(a, b)
    diff = mel_cepstra(a, order) - mel_cepstra(b, order)
    return float((10.0 / math.log(10.0) * np.sqrt(2.0 * (diff ** 2).sum(1))).mean())


def read_wav(path) -> tuple[np.ndarray, int]:
    """(float32 samples in [-1, 1], sample rate) of a mono or stereo 16-bit PCM wav (channels averaged)."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels, frames = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(frames)
    except (OSError, EOFError, wave.Error) as e:
        raise UserError(f"{path}: not a readable wav file ({e})") from None
    if width != 2:
        raise UserError(f"{path}: {8 * width}-bit samples; 16-bit PCM is read")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, channels).mean(1), rate


def audio_summary(wav, rate: int) -> dict:
    """``seconds``, ``rms_db`` (dB full scale), ``speech_band`` (share of the energy between
    80 and 4000 Hz) and ``peak`` of a signal."""
    x = np.asarray(wav, np.float64)
    if x.size == 0:
        return {"seconds": 0.0, "rms_db": -math.inf, "speech_band": 0.0, "peak": 0.0}
    power = np.abs(np.fft.rfft(x)) ** 2
    freq = np.fft.rfftfreq(len(x), 1.0 / rate)
    band = (freq >= SPEECH_BAND[0]) & (freq <= SPEECH_BAND[1])
    total = float(power.sum())
    rms = float(np.sqrt((x ** 2).mean()))
    return {"seconds": len(x) / rate, "rms_db": 20 * math.log10(max(rms, 1e-12)),
            "speech_band": float(power[band].sum() / total) if total > 0 else 0.0, "peak": float(np.abs(x).max())}
