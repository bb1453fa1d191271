"""Speech data (fewstep.data.speech): espeak-ng utterances with the synthesiser's own
phoneme alignment, log-mels, variance targets, padded batches and the length regulator.

Truths checked: the durations tile the mel exactly; the boundaries sit where the sound
changes (the fricative-vs-vowel contrast of the frame labels peaks at zero shift); the
library's audio is the binary's ``espeak-ng -w`` output sample for sample; a sine's mel
peaks in the filter that holds its frequency; expand repeats rows by their durations.
Tests that synthesise are skipped without espeak-ng (.ci/run installs it)."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fewstep.data import speech as S
from fewstep.errors import UserError

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng; "
                            ".ci/run does)")
FEW = ("The cat sat on the warm mat.", "Snow covered the quiet village.", "Please put the books on the shelf.")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test caches into one temporary folder (never the user's ~/.cache)."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.getbasetemp() / "speech_cache"))


@pytest.fixture(scope="module")
def utts(tmp_path_factory):
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng is not installed")
    old = os.environ.get("FEWSTEP_CACHE")
    os.environ["FEWSTEP_CACHE"] = str(tmp_path_factory.getbasetemp() / "speech_cache")
    try:
        return [S.synthesize(text, voice=voice, speed=speed)
                for text, voice, speed in zip(FEW, ("en-us", "en-us+f2", "en-us+m7"), (140, 170, 200))]
    finally:
        os.environ.pop("FEWSTEP_CACHE") if old is None else os.environ.__setitem__("FEWSTEP_CACHE", old)


def test_missing_binary_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    for call in (S.espeak_binary, lambda: S.synthesize("Hello there."), lambda: S.load_speech("speech:2")):
        with pytest.raises(UserError) as err:
            call()
        msg = str(err.value)
        assert "apt-get install espeak-ng" in msg and "\n" not in msg
        assert err.value.exit_code == 2


@espeak
def test_durations_tile_the_mel_exactly(utts):
    for u in utts:
        assert u.mel.shape == (u.frames, S.N_MELS) and u.mel.dtype == np.float32
        assert len(u.wav) == u.frames * S.HOP and u.wav.dtype == np.float32
        assert u.durations.dtype == np.int64 and int(u.durations.sum()) == u.frames
        assert (u.durations >= 0).all() and (u.durations > 0).mean() > 0.95
        assert len(u.phonemes) == len(u.phoneme_ids) == len(u.durations) == len(u.pitch) == len(u.energy)
        assert (u.phoneme_ids > S.UNK).all()  # every English phoneme is in the inventory; 0 is padding
        assert u.phonemes[-1] == "_:"         # the end pause (espeakENDPAUSE)
        assert len(u.f0) == len(u.frame_energy) == u.frames
        assert 1.0 < u.seconds < 3.5


@espeak
def test_boundaries_sit_where_the_sound_changes(utts):
    """Frame labels from the durations: fricatives are bright (high-band minus low-band
    log-mel), vowels dark; the contrast is largest with the labels unshifted, so the
    synthesiser's sample positions are neither early nor late by a frame or more."""
    fric, vowel = {"s", "S", "f", "z", "T", "tS"}, {"a", "E", "I", "i:", "aI", "eI", "oU", "O:", "u:", "V", "aa",
                                                    "3:", "A@", "0", "@", "@2", "i", "I2", "O@"}
    more = utts + [S.synthesize(t, voice="en-us", speed=170) for t in S.train_sentences()[:5]]

    def contrast(shift):
        out = []
        for u in more:
            bright = u.mel[:, 60:].mean(1) - u.mel[:, 5:30].mean(1)
            names = np.array(u.phonemes)[np.roll(np.repeat(np.arange(len(u.durations)), u.durations), shift)]
            f, v = np.isin(names, list(fric)), np.isin(names, list(vowel))
            if f.any() and v.any():
                out.append(bright[f].mean() - bright[v].mean())
        return float(np.mean(out))

    scores = {s: contrast(s) for s in range(-3, 4)}
    assert max(scores, key=scores.get) == 0, scores
    assert scores[0] > 2.0 and scores[0] > scores[3] + 0.5 and scores[0] > scores[-3] + 0.5


@espeak
def test_library_audio_is_the_binarys_and_silence_is_silent(tmp_path, utts):
    u = utts[0]
    out = tmp_path / "b.wav"
    subprocess.run([S.espeak_binary(), "-v", u.voice, "-s", str(u.speed), "-p", str(u.voice_pitch), "-w", str(out),
                    u.text], check=True, capture_output=True)
    import soundfile

    pcm, rate = soundfile.read(str(out), dtype="int16")
    assert rate == S.SAMPLE_RATE
    mine = np.round(u.wav * 32768).astype(np.int64)
    assert len(pcm) <= len(mine) < len(pcm) + S.HOP
    assert np.array_equal(mine[:len(pcm)], pcm.astype(np.int64)) and not mine[len(pcm):].any()
    # the end pause is near-silent and voiceless; the vowels are loud and voiced
    end = u.frames - int(u.durations[-1])
    assert u.frame_energy[end + 2:].max() < 0.05 * u.frame_energy.max() and not u.f0[end + 2:].any()
    vowels = [i for i, p in enumerate(u.phonemes) if p in ("a", "O@")]
    assert vowels and all(u.pitch[i] > np.log(60) for i in vowels)


@espeak
def test_wav_is_speech_like(utts):
    for u in utts:
        rms = float(np.sqrt(np.mean(u.wav ** 2)))
        assert rms > 0.03 and np.abs(u.wav).max() <= 1.0
        power = np.abs(np.fft.rfft(u.wav)) ** 2
        freq = np.fft.rfftfreq(len(u.wav), 1 / S.SAMPLE_RATE)
        assert power[(freq >= 100) & (freq <= 4000)].sum() > 0.9 * power.sum()
        voiced = u.pitch[u.pitch > 0]
        assert len(voiced) > len(u.pitch) / 3 and 70 < np.exp(voiced.mean()) < 300  # a speaking voice's f0


@pytest.mark.parametrize("freq", [150.0, 440.0, 1000.0, 2500.0])
def test_mel_of_a_sine_peaks_in_its_bin(freq):
    import librosa

    t = np.arange(S.HOP * 40) / S.SAMPLE_RATE
    feats = S.features((0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), pitch=False)
    assert feats["mel"].shape == (40, S.N_MELS)
    peak = int(np.argmax(feats["mel"][5:-5].mean(0)))
    centres = librosa.mel_frequencies(S.N_MELS + 2, fmin=S.FMIN, fmax=S.FMAX)
    assert centres[peak] < freq < centres[peak + 2]  # inside filter ``peak``'s triangle
    assert peak == int(np.argmin(np.abs(centres[1:-1] - freq)))  # and the filter centred nearest
    # energy is FastSpeech 2's ||STFT||_2; by Parseval, over the one-sided bins a sine of
    # amplitude a under the window w gives a / 2 * sqrt(N_FFT * sum(w^2))
    w = np.hanning(S.WIN + 1)[:-1]
    assert np.allclose(feats["energy"][5:-5], 0.5 / 2 * np.sqrt(S.N_FFT * (w ** 2).sum()), rtol=0.02)


def test_expand_repeats_rows_by_their_durations():
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    dur = torch.tensor([[2, 0, 3, 1, 0], [1, 1, 1, 0, 0], [0, 4, 2, 2, 1]])  # trailing zeros: padding
    frames, mask = S.expand(enc, dur)
    assert frames.shape == (3, 9, 4) and mask.shape == (3, 9)
    for b in range(3):
        want = torch.repeat_interleave(enc[b], dur[b], dim=0)
        n = int(dur[b].sum())
        assert torch.equal(frames[b, :n], want) and mask[b, :n].all() and not mask[b, n:].any()
        assert not frames[b, n:].any()
    frames.sum().backward()
    assert torch.equal(enc.grad[..., 0], dur.float())  # each row is used once per frame it owns
    cut, cmask = S.expand(enc.detach(), dur, max_frames=4)
    assert cut.shape == (3, 4, 4) and cmask.sum(1).tolist() == [4, 3, 4]


@espeak
def test_batch_pads_and_masks(utts):
    ds = S.SpeechSet(utts)
    b = ds.batch([2, 0, 1])
    order = [utts[2], utts[0], utts[1]]
    P, F = max(len(u.durations) for u in order), max(u.frames for u in order)
    assert b["phoneme_ids"].shape == (3, P) and b["phoneme_ids"].dtype == torch.long
    assert b["mel"].shape == (3, F, S.N_MELS) and b["mel_mask"].shape == (3, F)
    for i, u in enumerate(order):
        p, f = len(u.durations), u.frames
        assert b["phoneme_mask"][i].sum() == p and b["phoneme_mask"][i, :p].all()
        assert b["mel_mask"][i].sum() == f and b["mel_mask"][i, :f].all()
        assert torch.equal(b["mel"][i, :f], torch.from_numpy(u.mel)) and not b["mel"][i, f:].any()
        assert torch.equal(b["durations"][i, :p], torch.from_numpy(u.durations)) and not b["durations"][i, p:].any()
        assert not b["phoneme_ids"][i, p:].any() and not b["pitch"][i, p:].any() and not b["energy"][i, p:].any()
        assert int(b["durations"][i].sum()) == int(b["mel_lengths"][i]) == f
    assert b["speaker"].tolist() == [S.VOICES.index(u.voice) for u in order]
    _, mask = S.expand(torch.zeros(3, P, 1), b["durations"])
    assert torch.equal(mask, b["mel_mask"])  # the length regulator makes the batch's frame mask
    with pytest.raises(UserError):
        ds.batch([])


@espeak
def test_sets_are_deterministic_and_held_out_sentences_stay_out():
    a = S.load_speech("speech:3", seed=5)
    b = S.load_speech("speech:3", seed=5)
    c = S.load_speech("speech", n=3, seed=6)
    assert len(a) == 3 and [(u.text, u.voice, u.speed) for u in a] == [(u.text, u.voice, u.speed) for u in b]
    assert [(u.text, u.voice, u.speed) for u in a] != [(u.text, u.voice, u.speed) for u in c]
    assert S._draws(S.train_sentences(), 3, 5, S.VOICES, S.SPEEDS, "x") == \
        S._draws(S.train_sentences(), 50, 5, S.VOICES, S.SPEEDS, "x")[:3] == [(u.text, u.voice, u.speed) for u in a]
    assert S._cache_path(a[0].text, a[0].voice, a[0].speed, 50).is_file()
    fresh = S.synthesize(a[0].text, voice=a[0].voice, speed=a[0].speed, cache=False)
    for key in ("wav", "mel", "durations", "pitch", "energy", "f0", "frame_energy", "phoneme_ids"):
        assert np.array_equal(getattr(fresh, key), getattr(a[0], key)), key  # synthesis is deterministic
        assert np.array_equal(getattr(fresh, key), getattr(b[0], key)), key  # b came from the cache
    assert fresh.phonemes == b[0].phonemes
    assert set(a.texts) <= set(S.train_sentences())
    test = S.held_out_speech("speech:3", 2, seed=0)
    assert len(test) == 2 and set(test.texts) <= set(S.test_sentences())
    assert not set(S.train_sentences()) & set(S.test_sentences()) and len(S.sentences()) >= 300
    train, held = S.SpeechSet(list(a) + list(test)).split(0.3, seed=1)
    assert len(train) + len(held) == 5 and len(held) and not set(train.texts) & set(held.texts)


def test_bad_specs_and_settings_are_one_line():
    for spec in ("speech:abc:def", "speech:0x"):
        with pytest.raises(UserError):
            S.load_speech(spec)
    with pytest.raises(UserError, match="at most"):
        S.load_speech("speech:100000")
    for kwargs in ({"speed": 20}, {"pitch": 120}, {"speed": 1.5}):
        with pytest.raises(UserError):
            S.synthesize("Hello.", **kwargs)
    with pytest.raises(UserError):
        S.synthesize("   ")
    if HAVE_ESPEAK:
        with pytest.raises(UserError, match="no voice"):
            S.synthesize("Hello.", voice="xx-nonesuch")


@espeak
def test_user_folder_is_aligned_by_dtw(tmp_path, utts):
    """espeak-ng audio of another voice and speed, resampled to 44.1 kHz with 0.4 s of
    silence in front, read back as speech:DIR: DTW against the en-us reference puts the
    phoneme boundaries within two frames of the synthesiser's true ones."""
    import librosa
    import soundfile

    (tmp_path / "wavs").mkdir()
    lines = []
    for i, u in enumerate(utts):
        audio = np.concatenate([np.zeros(int(0.4 * S.SAMPLE_RATE), np.float32), u.wav])
        soundfile.write(str(tmp_path / "wavs" / f"u{i}.wav"),
                        librosa.resample(audio, orig_sr=S.SAMPLE_RATE, target_sr=44100), 44100)
        lines.append(f"u{i}|{u.text}")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    ds = S.load_speech(f"speech:{tmp_path}")
    assert len(ds) == 3
    lead = int(0.4 * S.SAMPLE_RATE)
    errors = []
    for i, (got, truth) in enumerate(zip(ds, utts)):
        assert int(got.durations.sum()) == got.frames and got.voice == "user" and got.name == f"u{i}"
        assert got.phonemes == truth.phonemes  # the same en-us phonemes for the same text
        # where the trimmed audio starts in the file: about the 0.4 s of silence were cut
        back = S._read_wav(tmp_path / "wavs" / f"u{i}.wav")
        cut = next(o for o in range(0, len(back)) if np.array_equal(back[o:o + 2000], got.wav[:2000]))
        assert lead - 3 * S.HOP <= cut <= lead + 3 * S.HOP
        true_bounds = (np.cumsum(truth.durations)[:-1] * S.HOP + lead - cut) / S.HOP  # in the user's frames
        errors.append(np.abs(np.cumsum(got.durations)[:-1] - true_bounds))
    errors = np.concatenate(errors)
    assert np.mean(errors <= 2) > 0.9 and np.median(errors) <= 1, errors
    with pytest.raises(UserError, match="metadata.csv"):
        S.load_speech(f"speech:{tmp_path / 'wavs'}")


@espeak
def test_griffin_lim_round_trip_is_close(utts):
    u = utts[1]
    wav = S.mel_to_wav(u.mel, n_iter=16)
    assert wav.shape == u.wav.shape and wav.dtype == np.float32
    back = S.features(wav, pitch=False)["mel"]
    assert np.abs(back - u.mel).mean() < 0.4  # measured 0.16 at 32 iterations; silence is ~6 away
