"""Text to speech with a speech model (a ``--net prodiff`` teacher or any of its students):
text -> espeak-ng's phonemes -> the model's variance adaptor (durations, pitch, energy) ->
a sampler on the model's spectrogram denoiser -> log-mel -> Griffin-Lim -> wav.

:func:`context_of` builds the contexts ``[n, P, 6]`` (:data:`fewstep.nets.prodiff.CONTEXT`)
either predicted by the model (inference from text) or taken from real utterances
(``given``: the ground-truth durations, pitch and energy, as ProDiff's validation does, so
the frames align with the real spectrogram); :func:`speak` samples them;
:func:`write_wav` writes 16-bit PCM at 22050 Hz.
"""
from __future__ import annotations

import wave
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import UserError

__all__ = ["speech_net", "context_of", "speak", "write_wav", "voice_index"]


def speech_net(model):
    """The :class:`~fewstep.nets.prodiff.ProDiffNet` inside a speech model's denoiser."""
    from .nets.prodiff import ProDiffNet

    D = model.denoiser
    seen = 0
    while not isinstance(getattr(D, "net", None), ProDiffNet) and seen < 8:
        D = getattr(D, "inner", None) or getattr(D, "denoiser", None)
        seen += 1
        if D is None:
            break
    if model.kind != "speech" or D is None or not isinstance(getattr(D, "net", None), ProDiffNet):
        raise UserError(f"{model.name or 'the model'} models {model.kind}, not speech; --text needs a model trained "
                        f"with fewstep train --data speech:N --net prodiff (or one of its students)")
    return D.net


def voice_index(voice: str) -> int:
    """The speaker index of an espeak-ng voice (:data:`fewstep.data.speech.VOICES`), -1 for another."""
    from .data.speech import VOICES

    return VOICES.index(voice) if voice in VOICES else -1


def context_of(model, texts: Optional[Sequence[str]] = None, voice: str = "en-us", pace: float = 1.0,
               given=None) -> tuple[torch.Tensor, list]:
    """(contexts [n, P, 6], the espeak-ng utterances they come from). ``texts``: phonemes
    from espeak-ng (``voice``), durations / pitch / energy predicted by the model's adaptor
    (durations divided by ``pace``; > 1 speaks faster); ``given``: a list of
    :class:`~fewstep.data.speech.Utterance` whose own phonemes, durations, pitch, energy and
    voice are used (teacher forcing)."""
    from .data import speech

    if (texts is None) == (given is None):
        raise UserError("speak: give texts or given utterances (one of them)")
    if not (isinstance(pace, (int, float)) and not isinstance(pace, bool) and 0.25 <= float(pace) <= 4.0):
        raise UserError(f"--pace must be a number in [0.25, 4] (1 = the model's own speed), got {pace!r}")
    net = speech_net(model)
    if given is not None:
        return speech.context(list(given)).to(model.device), list(given)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise UserError("--text: give at least one sentence")
    utts = [speech.phonemize(t, voice=voice) for t in texts]
    P = max(len(u.phoneme_ids) for u in utts)
    ids = torch.zeros(len(utts), P, dtype=torch.long)
    for b, u in enumerate(utts):
        ids[b, :len(u.phoneme_ids)] = torch.as_tensor(u.phoneme_ids)
    spk = torch.full((len(utts),), voice_index(voice), dtype=torch.long)
    was = net.training
    net.eval()
    ctx = net.predict(ids.to(model.device), spk.to(model.device), pace=float(pace))
    net.train(was)
    from .nets.prodiff import frame_lengths

    frames = frame_lengths(ctx)
    for t, n in zip(texts, frames.tolist()):
        if n < 1 or n > speech.MAX_FRAMES:
            raise UserError(f"--text '{t[:40]}': {model.name or 'the model'}'s duration predictor gives {n} frames "
                            f"(1 to {speech.MAX_FRAMES} are spoken); is the model trained? a --pace changes it")
    return ctx, utts


def speak(model, context: torch.Tensor, nfe: Optional[int] = None, sampler: Optional[str] = None, grid=None,
          seed: int = 0, vocoder: bool = True, griffin_lim_iters: int = 32) -> list[dict]:
    """Sample spectrograms for ``context`` (:func:`context_of`) with the model's own rule
    (a student's) or ``sampler`` / ``grid`` at ``nfe`` evaluations; returns per utterance
    ``{"mel": log-mel [F, 80] (natural log), "wav": float32 audio or None}`` cut to its own
    frames (Griffin-Lim with ``griffin_lim_iters`` iterations when ``vocoder``)."""
    from .data import speech
    from .nets.prodiff import frame_lengths

    if nfe is None:
        raise UserError("speak: give nfe, the number of network evaluations")
    x = None
    if isinstance(grid, torch.Tensor):  # noise at the grid's first level
        F = int(frame_lengths(context).max())
        g = torch.Generator().manual_seed(int(seed))
        x = float(grid[0]) * torch.randn((len(context), F) + tuple(model.shape[1:]), generator=g)
    with torch.no_grad():
        out, _ = model.sample(len(context), nfe=int(nfe), sampler=sampler, seed=seed, labels=context, grid=grid, x=x)
    lengths = frame_lengths(context).tolist()
    result = []
    for b, n in enumerate(lengths):
        mel = speech.denormalize_mel(out[b, :n].float().cpu()).numpy()
        wav = speech.mel_to_wav(mel, n_iter=griffin_lim_iters, seed=seed) if vocoder and n else None
        result.append({"mel": mel, "wav": wav})
    return result


def write_wav(path, wav: np.ndarray, sample_rate: Optional[int] = None) -> Path:
    """``wav`` (float in [-1, 1]) as 16-bit mono PCM at ``sample_rate`` (default 22050 Hz),
    written atomically (a temporary file renamed)."""
    from .data.speech import SAMPLE_RATE

    path = Path(path)
    rate = int(sample_rate or SAMPLE_RATE)
    pcm = np.clip(np.round(np.asarray(wav, np.float64) * 32767), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    tmp.replace(path)
    return path
