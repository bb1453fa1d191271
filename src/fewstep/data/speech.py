"""Speech made on this machine: espeak-ng utterances as log-mel spectrograms with phonemes,
per-phoneme durations, pitch and energy -- the data of a FastSpeech 2 / ProDiff-style
text-to-spectrogram model (Ren et al. 2021, "FastSpeech 2"; Huang et al. 2022, "ProDiff").

Spec (``load_speech(spec, n, seed)``)::

    speech                  1000 utterances of the built-in training sentences
    speech:N                N utterances (sentence, voice, speed drawn with seed, no repeats)
    speech:N:test           N utterances of the held-out sentences (never in training)
    speech:DIR              the user's wav files: DIR/metadata.csv, lines ``name|text``
                            (or LJSpeech's ``name|text|normalised text``; the last field
                            is spoken), audio in DIR/wavs/name.wav or DIR/name.wav

``n`` (when given) overrides ``N``; for ``speech:DIR`` it keeps at most ``n`` files, a
random subset drawn with ``seed``.

**Synthesis and alignment.** :func:`synthesize` drives espeak-ng's C library
(``libespeak-ng.so.1``, Debian package ``espeak-ng``) through ``ctypes``, exactly as its
public header ``speak_lib.h`` (API revision 12+) declares: ``espeak_Initialize`` in
``AUDIO_OUTPUT_SYNCHRONOUS`` mode with ``espeakINITIALIZE_PHONEME_EVENTS``,
``espeak_SetSynthCallback``, ``espeak_SetVoiceByName``, ``espeak_SetParameter`` (rate,
pitch; volume, range, punctuation, capitals, word gap at their defaults) and
``espeak_Synth`` with ``espeakCHARS_UTF8 | espeakENDPAUSE``. The callback receives the
int16 audio and the event list; every ``espeakEVENT_PHONEME`` event names a phoneme
(espeak-ng's mnemonic, e.g. ``aI``, ``@2``, ``_:``) and carries ``sample``, the sample
index where the synthesiser starts that phoneme. The durations are therefore the
synthesiser's own alignment, not an estimate: phoneme ``i`` owns samples
``[s_i, s_{i+1})`` (the first starts at 0, the last ends at the end of the audio;
zero-length pause events are dropped). Each utterance is made in a fresh interpreter
(stdlib only, about 40 ms), because the library carries wave-generator state from one
``espeak_Synth`` to the next; so made, the audio is the binary's ``espeak-ng -w`` output
sample for sample (checked in the tests). The binary is required too
(:func:`espeak_binary`, one UserError line with the install hint when missing) and gives
the version in the cache key.

**Frames.** The wav is padded with zeros to ``F * HOP`` samples and the STFT (centred,
``N_FFT = 1024``, Hann window 1024, ``HOP = 256`` at 22050 Hz: 11.6 ms) keeps frames
``k = 0 .. F-1``, frame ``k`` centred on sample ``k * HOP``. Frame ``k`` belongs to the
phoneme whose samples contain ``k * HOP``, so phoneme ``i`` has
``ceil(s_{i+1} / HOP) - ceil(s_i / HOP)`` frames (possibly 0 for a phoneme shorter than
a hop, as FastSpeech 2's durations may be) and the durations sum to ``F`` exactly.

**Features** (the FastSpeech 2 / HiFi-GAN conventions): ``mel = log(max(M |STFT|, 1e-5))``
with ``M`` librosa's Slaney-normalised mel filter bank (80 bins, 0-8000 Hz), magnitudes
(power 1), natural log; frame energy ``||STFT_k||_2`` (FastSpeech 2's energy); frame f0
from librosa's pYIN (Mauch & Dixon 2014; 60-600 Hz), unvoiced where pYIN says so or
where the frame's energy is 30 dB below the utterance's loudest frame (espeak-ng's pauses
are near-silent noise that pYIN's Viterbi pass otherwise keeps voiced). Per phoneme
(FastSpeech 2's phoneme-level variance targets): ``pitch`` the mean ``log f0`` over the
phoneme's voiced frames (0 when none), ``energy`` the mean frame energy; a phoneme of 0
frames takes the frame at its start. librosa is used because it is the reference
implementation these recipes call (``librosa.filters.mel`` is the filter bank of
FastSpeech 2, HiFi-GAN and NATSpeech/ProDiff), and it also gives the Griffin-Lim inverse
(:func:`mel_to_wav`: ``librosa.feature.inverse.mel_to_stft`` + ``librosa.griffinlim``).

**User audio** (``speech:DIR``) has no synthesiser alignment. Each file is aligned by
synthesis-based alignment (Malfrere & Dutoit 1997; the method of the aeneas aligner): the
transcript is synthesised (en-us, speed matched to the file's length), both signals are
turned into cepstra (MFCC 1-19 of the log-mel above, mean-normalised per utterance), a
DTW path (``librosa.sequence.dtw``) maps the reference frames onto the user's, and each
reference phoneme boundary moves to the first user frame the path pairs with it. Leading
silence is cut to 23 ms and trailing silence to 0.3 s first (``librosa.effects.trim``,
40 dB), as espeak-ng's own audio starts at once and ends in a pause. Checked only on
espeak-ng audio of other voices, synthesisers (klatt, whisper) and speeds, where 97-100 %
of the boundaries land within two frames of the true ones (:func:`align_to_reference`);
on human recordings it can only be as good as espeak-ng's phonemes and timing fit the
speaker: expect it rougher, worst for accents and noisy audio. User files are read anew
on every load (only their espeak-ng references are cached).

**Held-out sentences.** Every tenth built-in sentence (index ``i % 10 == 9``) is
held out: ``speech:N`` never speaks it, ``speech:N:test`` speaks only those.
:meth:`SpeechSet.split` splits any set by sentence, so no text is on both sides.

**Cache.** Each utterance is stored in ``$FEWSTEP_CACHE/speech/`` (default
``~/.cache/fewstep``) as one ``.npz`` named by a hash of (text, voice, speed, pitch,
espeak-ng version, feature settings, librosa version); a cached utterance is what a fresh
synthesis gives (espeak-ng is deterministic).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import csv
import hashlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..io import atomic_write, cache_dir
from ..nets.prodiff import CONTEXT, DURATION, ENERGY, PHONEME, PITCH, SPEAKER, VOICED, expand  # noqa: F401

__all__ = ["SAMPLE_RATE", "HOP", "N_FFT", "WIN", "N_MELS", "FMIN", "FMAX", "MEL_FLOOR", "PHONEMES",
           "PAD", "UNK", "VOICES", "SPEEDS", "DEFAULT_N", "Utterance", "SpeechSet", "espeak_binary",
           "espeak_version", "synthesize", "phoneme_ids", "frame_durations", "features", "phoneme_means",
           "load_speech", "held_out_speech", "is_spec", "expand", "mel_to_wav", "sentences", "train_sentences",
           "test_sentences", "align_to_reference", "MAX_FRAMES", "normalize_mel", "denormalize_mel", "context",
           "tensors", "phonemize"]

SAMPLE_RATE = 22050
HOP = 256
N_FFT = 1024
WIN = 1024
N_MELS = 80
FMIN = 0.0
FMAX = 8000.0
MEL_FLOOR = 1e-5           # log(max(mel, MEL_FLOOR)); log(MEL_FLOOR) ~ -11.5 is silence
F0_MIN, F0_MAX = 60.0, 600.0
PYIN_RESOLUTION = 0.1      # librosa's default: 0.1 semitone pitch bins
VOICED_GATE_DB = 30.0      # frames this far below the loudest are unvoiced
LEAD_SAMPLES, TAIL_SAMPLES = 512, 6615  # user audio: silence kept before (23 ms) and after (0.3 s)
MAX_FRAMES = 1024          # the longest utterance a speech model takes (11.9 s)
# Fixed scalings of the model's inputs, the same for every speech set (so a student trained on
# other utterances than its teacher sees the same numbers): the log-mel's range [log MEL_FLOOR,
# MEL_HI] maps to [-1, 1] (ProDiff / DiffSinger scale by the training set's per-bin min and max;
# one fixed range instead keeps sets and models interchangeable); log f0 and log energy are
# standardised by the means and deviations of speech:1000 (seed 0), rounded.
MEL_LO, MEL_HI = math.log(MEL_FLOOR), 2.0  # speech:1000's loudest bin is 1.41
LOG_F0 = (4.9, 0.3)        # speech:1000: 4.88, 0.31
LOG_ENERGY = (3.0, 1.3)    # speech:1000: 2.99, 1.26
FEATURES_VERSION = 1       # bump when the features or the alignment rule change

VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-us+f4", "en-us+m7")
SPEEDS = (140, 170, 200)
DEFAULT_N = 1000
HOLD_OUT_EVERY = 10
INSTALL_HINT = "install it with 'apt-get install espeak-ng' (Debian/Ubuntu)"

# The phoneme inventory: padding, unknown, then espeak-ng's English mnemonics (the pauses,
# the consonants of its base tables and the vowels of ph_english / ph_english_us), in a
# fixed order so that ids are the same in every run and on every machine. A name not in
# the list (another language's voice) maps to UNK.
PAD, UNK = 0, 1
PHONEMES: tuple[str, ...] = (
    "<pad>", "<unk>",
    "_", "_:", "_!", "_|", "_^_", "_::", "||",
    "b", "d", "f", "g", "h", "j", ";", "k", "l", "m", "n", "N", "p", "r", "s", "S", "t", "v", "w",
    "z", "Z", "D", "T", "tS", "dZ", "x", "?", "n-", "m-", "l/", "l/2", "r-", "r/", "t#", "t2",
    "d#", "z#", "z/2", "w#", "@", "@2", "@5", "@L", "@#", "3", "3:", "a", "a2", "a#", "a#2",
    "aa", "A:", "A@", "A#", "A~", "E", "E2", "E#", "e@", "e:", "e#", "eI", "I", "I2", "I#",
    "I2#", "i", "i:", "i@", "i@3", "IR", "0", "0#", "02", "O", "O:", "O2", "O@", "O~", "o@",
    "o:", "OI", "oU", "oU#", "u:", "U", "U@", "V", "VR", "aI", "aI@", "aI3", "aU", "aU@",
)
_PHONEME_ID = {name: i for i, name in enumerate(PHONEMES)}


# ------------------------------------------------------------------ sentences
_SENTENCE_FILE = Path(__file__).with_name("sentences.txt")


def sentences() -> tuple[str, ...]:
    """The built-in sentences (self-written short English sentences, one a line)."""
    lines = _SENTENCE_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(s.strip() for s in lines if s.strip())


def train_sentences() -> tuple[str, ...]:
    """The built-in sentences ``speech:N`` speaks (all but every tenth)."""
    return tuple(s for i, s in enumerate(sentences()) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1)


def test_sentences() -> tuple[str, ...]:
    """The held-out built-in sentences (every tenth): ``speech:N:test`` speaks only these."""
    return tuple(s for i, s in enumerate(sentences()) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1)


# ------------------------------------------------------------------ espeak-ng
def espeak_binary() -> str:
    """The path of the ``espeak-ng`` program, or one UserError line saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise UserError(f"speech data: espeak-ng not found on PATH; {INSTALL_HINT}")
    return path


_VERSION: dict[str, str] = {}


def espeak_version() -> str:
    """espeak-ng's version (``espeak-ng --version``; the library's must agree)."""
    binary = espeak_binary()
    if binary not in _VERSION:
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as err:
            raise UserError(f"speech data: {binary} --version failed ({err}); reinstall espeak-ng") from None
        words = out.split()
        version = words[words.index("speech:") + 1] if "speech:" in words else out.strip()
        _VERSION[binary] = version
    return _VERSION[binary]


# One synthesis per fresh process: espeak-ng keeps synthesiser state (wave generator, pitch
# envelope) across espeak_Synth calls, so the second utterance of a process differs by a
# few samples from the same utterance made first, and espeak_Terminate + espeak_Initialize
# hangs. A new interpreter per utterance (stdlib only, ~30 ms) makes each utterance what
# ``espeak-ng -w`` makes, sample for sample. The script follows speak_lib.h: the
# espeak_EVENT layout below and espeakINITIALIZE_PHONEME_EVENTS, AUDIO_OUTPUT_SYNCHRONOUS,
# espeakCHARS_UTF8 | espeakENDPAUSE; it prints one JSON line (sample rate, library version,
# the (sample, phoneme) events) and then the int16 audio.
_WORKER = r"""
import ctypes, json, sys
class Id(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]
class Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", Id)]
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))
libname, voice, speed, pitch = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])
text = sys.stdin.buffer.read() + b"\0"
try:
    lib = ctypes.CDLL(libname)
except OSError as err:
    sys.stderr.write(str(err)); sys.exit(3)
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                             ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
lib.espeak_Info.restype = ctypes.c_char_p
lib.espeak_Info.argtypes = [ctypes.c_void_p]
rate = lib.espeak_Initialize(2, 0, None, 0x0001)   # AUDIO_OUTPUT_SYNCHRONOUS, PHONEME_EVENTS
if rate <= 0:
    sys.exit(4)
audio, events = [], []
def receive(wav, count, ev):
    if count > 0 and wav:
        audio.append(ctypes.string_at(wav, 2 * count))
    i = 0
    while ev[i].type != 0:                             # espeakEVENT_LIST_TERMINATED
        if ev[i].type == 7:                            # espeakEVENT_PHONEME
            events.append((ev[i].sample, ev[i].id.string.split(b"\0")[0].decode("utf-8", "replace")))
        i += 1
    return 0
callback = CALLBACK(receive)
lib.espeak_SetSynthCallback(callback)
if lib.espeak_SetVoiceByName(voice) != 0:
    sys.exit(5)
for param, value in ((1, speed), (3, pitch), (2, 100), (4, 50), (5, 0), (6, 0), (7, 0)):
    lib.espeak_SetParameter(param, value, 0)           # rate, pitch, volume, range, punctuation, capitals, wordgap
err = lib.espeak_Synth(text, len(text), 0, 1, 0, 0x1001, None, None)   # POS_CHARACTER, UTF8 | ENDPAUSE
if err != 0:
    sys.stderr.write(f"espeak_Synth returned {err}"); sys.exit(6)
info = {"rate": rate, "version": (lib.espeak_Info(None) or b"?").decode(), "events": events}
sys.stdout.buffer.write(json.dumps(info).encode() + b"\n" + b"".join(audio))
"""

_LIBRARY: list[str] = []


def _library_name() -> str:
    if not _LIBRARY:
        _LIBRARY.append(ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1")
    return _LIBRARY[0]


def _say(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, list[tuple[int, str]], str]:
    """int16 audio, the (start sample, phoneme) events and the library version of ``text``
    spoken by espeak-ng's library in a fresh interpreter."""
    espeak_binary()
    lib = _library_name()
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _WORKER, lib, voice, str(speed), str(pitch)],
                              input=text.encode("utf-8"), capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        raise UserError(f"speech data: espeak-ng did not run ({err}); reinstall espeak-ng") from None
    why = {3: f"the espeak-ng library ({lib}) did not load; {INSTALL_HINT}",
           4: "espeak-ng did not initialise (its data folder espeak-ng-data may be missing); reinstall espeak-ng",
           5: f"espeak-ng has no voice {voice!r}; list them with 'espeak-ng --voices=en' (variants: en-us+f2, "
              "en-us+m3, ...)",
           6: f"espeak-ng failed on {text[:40]!r} ({done.stderr.decode(errors='replace')[-80:]}); check the text"}
    if done.returncode != 0:
        raise UserError("speech data: " + why.get(done.returncode, f"espeak-ng exited with {done.returncode}: "
                                              f"{done.stderr.decode(errors='replace')[-120:]!r}"))
    head, _, pcm = done.stdout.partition(b"\n")
    info = json.loads(head)
    if info["rate"] != SAMPLE_RATE:
        raise UserError(f"speech data: espeak-ng speaks at {info['rate']} Hz, not {SAMPLE_RATE}; reinstall espeak-ng")
    return np.frombuffer(pcm, dtype="<i2").astype(np.int16), [(int(a), str(b)) for a, b in info["events"]], \
        info["version"]


def _segments(events: list[tuple[int, str]], total: int) -> tuple[list[str], np.ndarray]:
    """Phoneme names and their sample boundaries ``[P + 1]`` (0 ... total) from the events."""
    starts = np.maximum.accumulate(np.clip(np.array([s for s, _ in events], dtype=np.int64), 0, total))
    names = [name for _, name in events]
    ends = np.append(starts[1:], total)
    keep = [i for i in range(len(names)) if ends[i] > starts[i] or not names[i].startswith("_")]
    names = [names[i] for i in keep]
    bounds = np.append(starts[keep], total)
    if len(names):
        bounds[0] = 0  # the short gap before the first phoneme belongs to it
    return names, bounds


def phoneme_ids(phonemes: Sequence[str]) -> np.ndarray:
    """int64 ids of espeak-ng phoneme names in :data:`PHONEMES` (unknown names: :data:`UNK`)."""
    return np.array([_PHONEME_ID.get(p, UNK) for p in phonemes], dtype=np.int64)


# ------------------------------------------------------------------ features
def _frames_for(n_samples: int) -> int:
    return max(1, math.ceil(n_samples / HOP))


def frame_durations(bounds: np.ndarray, n_frames: int) -> np.ndarray:
    """Frames per phoneme from sample boundaries: frame ``k`` (centred on ``k * HOP``)
    belongs to the phoneme whose samples hold ``k * HOP``; the sum is ``n_frames``."""
    b = np.minimum(-(-np.asarray(bounds, dtype=np.int64) // HOP), n_frames)  # ceil division
    b[0], b[-1] = 0, n_frames
    return np.diff(b).astype(np.int64)


def _librosa():
    """librosa (the mel filter bank, pYIN, DTW, Griffin-Lim), or one UserError line."""
    try:
        import librosa
    except ImportError:
        raise UserError("speech data needs librosa; install it with pip install 'fewstep[speech]' (or pip install librosa)") from None
    return librosa


_MEL_BASIS: list[np.ndarray] = []


def _mel_basis() -> np.ndarray:
    if not _MEL_BASIS:
        librosa = _librosa()
        _MEL_BASIS.append(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
                          .astype(np.float32))
    return _MEL_BASIS[0]


def features(wav: np.ndarray, pitch: bool = True) -> dict[str, np.ndarray]:
    """Frame features of a float wav whose length is a multiple of :data:`HOP`:
    ``mel`` [F, 80] (log), ``energy`` [F] (``||STFT||_2``), ``f0`` [F] (Hz, 0 unvoiced;
    zeros when ``pitch`` is False), with ``F = len(wav) // HOP``."""
    librosa = _librosa()
    wav = np.asarray(wav, dtype=np.float32)
    frames = len(wav) // HOP
    spec = np.abs(librosa.stft(wav, n_fft=N_FFT, hop_length=HOP, win_length=WIN, window="hann", center=True,
                               pad_mode="constant"))[:, :frames]
    mel = np.log(np.maximum(_mel_basis() @ spec, MEL_FLOOR)).T.astype(np.float32)
    energy = np.linalg.norm(spec, axis=0).astype(np.float32)
    f0 = np.zeros(frames, np.float32)
    if pitch and frames:
        est, voiced, _ = librosa.pyin(wav, fmin=F0_MIN, fmax=F0_MAX, sr=SAMPLE_RATE, frame_length=WIN,
                                      hop_length=HOP, center=True, resolution=PYIN_RESOLUTION)
        est, voiced = est[:frames], voiced[:frames]
        loud = energy > energy.max() * 10 ** (-VOICED_GATE_DB / 20)
        ok = voiced & loud & np.isfinite(est)
        f0[ok] = est[ok]
    return {"mel": mel, "energy": energy, "f0": f0}


def phoneme_means(durations: np.ndarray, f0: np.ndarray, energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-phoneme mean log f0 over voiced frames (0 if none) and mean frame energy
    (FastSpeech 2's phoneme-level targets); a 0-frame phoneme takes the frame at its start."""
    ends = np.cumsum(durations)
    starts = ends - durations
    last = max(len(f0) - 1, 0)
    pitch = np.zeros(len(durations), np.float32)
    power = np.zeros(len(durations), np.float32)
    for i, (a, b) in enumerate(zip(starts, ends)):
        if b <= a:
            a, b = min(a, last), min(a, last) + 1
        seg = f0[a:b]
        voiced = seg[seg > 0]
        pitch[i] = np.log(voiced).mean() if len(voiced) else 0.0
        power[i] = energy[a:b].mean() if b > a else 0.0
    return pitch, power


# ------------------------------------------------------------------ utterances
@dataclass(eq=False)
class Utterance:
    """One utterance: audio, phonemes with frame durations, log-mel and variance targets.

    ``wav`` float32 [T] at :data:`SAMPLE_RATE` (``T = frames * HOP``); ``phonemes`` espeak-ng
    names, ``phoneme_ids`` int64 [P] (:data:`PHONEMES`), ``durations`` int64 [P] in mel
    frames (sum = ``frames``); ``mel`` float32 [frames, 80] (natural log of magnitudes);
    ``pitch`` float32 [P] (mean log f0 of the voiced frames, 0 if none), ``energy`` float32
    [P] (mean frame ``||STFT||_2``); ``f0`` / ``frame_energy`` float32 [frames] the frame
    values they come from; ``voice``/``speed``/``voice_pitch`` espeak-ng's settings
    (``voice`` is ``"user"`` for a user file); ``speaker`` the index of ``voice`` in
    :data:`VOICES` (-1 for others)."""

    text: str
    wav: np.ndarray
    phonemes: list[str]
    phoneme_ids: np.ndarray
    durations: np.ndarray
    mel: np.ndarray
    pitch: np.ndarray
    energy: np.ndarray
    voice: str
    speed: int
    voice_pitch: int = 50
    f0: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    frame_energy: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    name: str = ""

    @property
    def frames(self) -> int:
        """Number of mel frames."""
        return int(self.mel.shape[0])

    @property
    def seconds(self) -> float:
        """Length of the audio in seconds."""
        return len(self.wav) / SAMPLE_RATE

    @property
    def speaker(self) -> int:
        """Index of ``voice`` in :data:`VOICES`, -1 for another voice or a user file."""
        return VOICES.index(self.voice) if self.voice in VOICES else -1

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"wav": np.clip(np.round(self.wav * 32768), -32768, 32767).astype(np.int16),  # exact for espeak's int16
                "phonemes": np.array(self.phonemes, dtype=str), "durations": self.durations, "mel": self.mel,
                "pitch": self.pitch, "energy": self.energy, "f0": self.f0, "frame_energy": self.frame_energy}


def _cache_root() -> Path:
    """``$FEWSTEP_CACHE/speech`` (default ``~/.cache/fewstep``: :func:`fewstep.io.cache_dir`)."""
    return cache_dir() / "speech"


def _settings() -> dict:
    librosa = _librosa()

    return {"sr": SAMPLE_RATE, "hop": HOP, "n_fft": N_FFT, "win": WIN, "n_mels": N_MELS, "fmin": FMIN,
            "fmax": FMAX, "floor": MEL_FLOOR, "f0": [F0_MIN, F0_MAX, PYIN_RESOLUTION, VOICED_GATE_DB],
            "version": FEATURES_VERSION, "librosa": librosa.__version__}


def _cache_path(text: str, voice: str, speed: int, pitch: int) -> Path:
    key = json.dumps({"text": text, "voice": voice, "speed": speed, "pitch": pitch,
                      "espeak": espeak_version(), "features": _settings()}, sort_keys=True)
    return _cache_root() / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.npz"


def _from_arrays(arr, text: str, voice: str, speed: int, pitch: int, name: str = "") -> Utterance:
    phonemes = [str(p) for p in arr["phonemes"]]
    return Utterance(text=text, wav=arr["wav"].astype(np.float32) / 32768.0, phonemes=phonemes,
                     phoneme_ids=phoneme_ids(phonemes), durations=np.asarray(arr["durations"], np.int64),
                     mel=np.asarray(arr["mel"], np.float32), pitch=np.asarray(arr["pitch"], np.float32),
                     energy=np.asarray(arr["energy"], np.float32), voice=voice, speed=int(speed),
                     voice_pitch=int(pitch), f0=np.asarray(arr["f0"], np.float32),
                     frame_energy=np.asarray(arr["frame_energy"], np.float32), name=name)


def _check_settings(text, voice, speed, pitch) -> tuple[str, str, int, int]:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"speech: text must be a non-empty string, got {text!r}")
    if not isinstance(voice, str) or not voice or any(c.isspace() for c in voice):
        raise UserError(f"speech: voice must be an espeak-ng voice name such as 'en-us', got {voice!r}")
    for what, value, low, high in (("speed", speed, 80, 450), ("pitch", pitch, 0, 99)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise UserError(f"speech: {what} must be a whole number from {low} to {high} (espeak-ng's range), "
                            f"got {value!r}")
    return " ".join(text.split()), voice, int(speed), int(pitch)


def synthesize(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50, cache: bool = True) -> Utterance:
    """``text`` spoken by espeak-ng (``voice``, ``speed`` in words per minute, base ``pitch``
    0-99) as an :class:`Utterance` with the synthesiser's own phoneme alignment; cached
    under ``$FEWSTEP_CACHE/speech`` unless ``cache`` is False."""
    text, voice, speed, pitch = _check_settings(text, voice, speed, pitch)
    path = _cache_path(text, voice, speed, pitch)
    if cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as arr:
                return _from_arrays(arr, text, voice, speed, pitch)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is made again
    pcm, events, _ = _say(text, voice, speed, pitch)
    names, bounds = _segments(events, len(pcm))
    if not names:
        raise UserError(f"speech: espeak-ng made no phonemes of {text[:40]!r}; give words to speak")
    frames = _frames_for(len(pcm))
    wav = np.zeros(frames * HOP, np.float32)
    wav[:len(pcm)] = pcm.astype(np.float32) / 32768.0
    feats = features(wav)
    durations = frame_durations(bounds, frames)
    ph_pitch, ph_energy = phoneme_means(durations, feats["f0"], feats["energy"])
    utt = Utterance(text=text, wav=wav, phonemes=names, phoneme_ids=phoneme_ids(names), durations=durations,
                    mel=feats["mel"], pitch=ph_pitch, energy=ph_energy, voice=voice, speed=speed, voice_pitch=pitch,
                    f0=feats["f0"], frame_energy=feats["energy"])
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _save_npz(tmp, utt._arrays()))
    return utt


def _save_npz(tmp: Path, arrays: dict) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


# ------------------------------------------------------------------ sets and batches
def _pad(arrays: Sequence[np.ndarray], length: int, dtype) -> torch.Tensor:
    out = torch.zeros((len(arrays), length, *arrays[0].shape[1:]), dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = torch.as_tensor(np.asarray(a)).to(dtype)
    return out


class SpeechSet:
    """A list of :class:`Utterance` (``len``, indexing, iteration; a slice or a list of
    indices gives a SpeechSet) with padded batches and a split by sentence.

    ``kind`` is ``'speech'``; ``num_phonemes`` the vocabulary size (``len(PHONEMES)``, id
    0 is padding), ``num_speakers`` ``len(VOICES)``, ``mel_dim`` 80."""

    kind = "speech"
    num_phonemes = len(PHONEMES)
    num_speakers = len(VOICES)
    mel_dim = N_MELS

    def __init__(self, utterances: Iterable[Utterance], name: str = "speech"):
        self.utterances = list(utterances)
        self.name = name

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self):
        return iter(self.utterances)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return SpeechSet(self.utterances[index], self.name)
        if isinstance(index, (list, tuple, np.ndarray, torch.Tensor)):
            return SpeechSet([self.utterances[int(i)] for i in index], self.name)
        return self.utterances[int(index)]

    def __repr__(self) -> str:
        return f"SpeechSet({self.name!r}, {len(self)} utterances, {self.seconds:.1f} s)"

    @property
    def texts(self) -> list[str]:
        """The sentence of each utterance."""
        return [u.text for u in self.utterances]

    @property
    def seconds(self) -> float:
        """Total audio length in seconds."""
        return sum(u.seconds for u in self.utterances)

    def batch(self, indices: Optional[Sequence[int]] = None, device=None) -> dict[str, torch.Tensor]:
        """Padded tensors of the utterances at ``indices`` (default all), zeros in padding:
        ``phoneme_ids`` long [B, P], ``phoneme_mask`` bool [B, P], ``durations`` long
        [B, P], ``pitch`` / ``energy`` [B, P], ``mel`` [B, F, 80], ``mel_mask`` bool [B, F],
        ``f0`` / ``frame_energy`` [B, F], ``phoneme_lengths`` / ``mel_lengths`` long [B],
        ``speaker`` long [B] (-1: not a built-in voice), ``speed`` float [B] (words per
        minute); P and F the longest in the batch. ``durations[b].sum() == mel_lengths[b]``.
        A padded mel frame is 0, not silence (``log(MEL_FLOOR)``): use the masks."""
        picked = self.utterances if indices is None else [self.utterances[int(i)] for i in indices]
        if not picked:
            raise UserError("speech batch: no utterances chosen; give at least one index")
        plen = torch.tensor([len(u.phoneme_ids) for u in picked], dtype=torch.long)
        flen = torch.tensor([u.frames for u in picked], dtype=torch.long)
        p, f = int(plen.max()), int(flen.max())
        out = {
            "phoneme_ids": _pad([u.phoneme_ids for u in picked], p, torch.long),
            "phoneme_mask": torch.arange(p)[None] < plen[:, None],
            "durations": _pad([u.durations for u in picked], p, torch.long),
            "pitch": _pad([u.pitch for u in picked], p, torch.float32),
            "energy": _pad([u.energy for u in picked], p, torch.float32),
            "mel": _pad([u.mel for u in picked], f, torch.float32),
            "mel_mask": torch.arange(f)[None] < flen[:, None],
            "f0": _pad([u.f0 for u in picked], f, torch.float32),
            "frame_energy": _pad([u.frame_energy for u in picked], f, torch.float32),
            "phoneme_lengths": plen,
            "mel_lengths": flen,
            "speaker": torch.tensor([u.speaker for u in picked], dtype=torch.long),
            "speed": torch.tensor([float(u.speed) for u in picked], dtype=torch.float32),
        }
        return out if device is None else {k: v.to(device) for k, v in out.items()}

    def split(self, test_fraction: float = 0.1, seed: int = 0) -> tuple["SpeechSet", "SpeechSet"]:
        """(train, test): about ``test_fraction`` of the distinct sentences, drawn with
        ``seed``, and every utterance of them go to test; no sentence is on both sides."""
        if not 0 < float(test_fraction) < 1:
            raise UserError(f"speech split: test_fraction must be between 0 and 1, got {test_fraction}")
        texts = sorted(set(self.texts))
        if len(texts) < 2:
            raise UserError(f"speech split: {self.name} has {len(texts)} distinct sentence(s); need 2 or more")
        k = min(max(1, round(test_fraction * len(texts))), len(texts) - 1)
        order = np.random.default_rng(seed).permutation(len(texts))
        test = {texts[i] for i in order[:k]}
        return (SpeechSet([u for u in self if u.text not in test], self.name),
                SpeechSet([u for u in self if u.text in test], self.name + ":test"))

    def stats(self) -> dict[str, np.ndarray]:
        """Normalisation statistics over all valid frames / phonemes: ``mel_min``,
        ``mel_max``, ``mel_mean``, ``mel_std`` [80] (ProDiff scales mels to [-1, 1] by the
        per-bin min and max), ``pitch_mean`` / ``pitch_std`` (voiced phonemes), ``energy_mean``
        / ``energy_std``, ``log_duration_mean`` / ``log_duration_std`` (``log(1 + d)``)."""
        mel = np.concatenate([u.mel for u in self])
        pitch = np.concatenate([u.pitch for u in self])
        pitch = pitch[pitch > 0]
        energy = np.concatenate([u.energy for u in self])
        logd = np.log1p(np.concatenate([u.durations for u in self]).astype(np.float64))
        return {"mel_min": mel.min(0), "mel_max": mel.max(0), "mel_mean": mel.mean(0), "mel_std": mel.std(0),
                "pitch_mean": np.float32(pitch.mean() if len(pitch) else 0.0),
                "pitch_std": np.float32(pitch.std() if len(pitch) else 1.0),
                "energy_mean": np.float32(energy.mean()), "energy_std": np.float32(energy.std()),
                "log_duration_mean": np.float32(logd.mean()), "log_duration_std": np.float32(logd.std())}


def is_spec(spec) -> bool:
    """Whether ``spec`` names speech data (``speech``, ``speech:...``)."""
    return str(spec) == "speech" or str(spec).startswith("speech:")


def _draws(pool: Sequence[str], count: int, seed: int, voices: Sequence[str], speeds: Sequence[int],
           what: str) -> list[tuple[str, str, int]]:
    grid = len(pool) * len(voices) * len(speeds)
    if count > grid:
        raise UserError(f"--data {what}: at most {grid} different utterances ({len(pool)} sentences x "
                        f"{len(voices)} voices x {len(speeds)} speeds); ask for fewer")
    picks = np.random.default_rng(seed).permutation(grid)[:count]  # speech:M is a prefix of speech:N, M < N
    out = []
    for k in picks:
        s, rest = divmod(int(k), len(voices) * len(speeds))
        v, r = divmod(rest, len(speeds))
        out.append((pool[s], voices[v], int(speeds[r])))
    return out


def _parse(spec: str) -> tuple[str, Optional[int], str]:
    """('builtin', N or None, 'train'|'test') or ('dir', None, folder)."""
    rest = spec[len("speech:"):] if spec.startswith("speech:") else ""
    split = "train"
    if rest == "test" or rest.endswith(":test"):
        rest, split = rest[:-len("test")].rstrip(":"), "test"
    if rest == "":
        return "builtin", None, split
    if rest.isdigit():
        return "builtin", int(rest), split
    if split == "train" and (Path(rest).is_dir() or "/" in rest or Path(rest).exists()):
        return "dir", None, rest
    raise UserError(f"--data {spec}: give speech, speech:N (N utterances), speech:N:test (held-out "
                    "sentences) or speech:DIR (a folder with metadata.csv and wav files)")


def load_speech(spec: str = "speech", n: Optional[int] = None, seed: int = 0,
                voices: Sequence[str] = VOICES, speeds: Sequence[int] = SPEEDS, progress=None) -> SpeechSet:
    """The speech set named by ``spec`` (see the module docstring): built-in sentences drawn
    with ``seed`` over ``voices`` x ``speeds`` without repeats (the first ``M`` of ``N``
    draws are ``speech:M``'s), or a folder of the user's wav files. ``n`` overrides the
    spec's count. ``progress`` (optional) is called as ``progress(done, total)``."""
    spec = str(spec)
    if not is_spec(spec):
        raise UserError(f"--data {spec}: not a speech spec; give speech:N or speech:DIR")
    if n is not None and (isinstance(n, bool) or int(n) < 1):
        raise UserError(f"--data {spec}: n must be a positive count, got {n}")
    kind, count, where = _parse(spec)
    if kind == "dir":
        return _load_dir(Path(where), n, seed, progress)
    count = int(n) if n is not None else (count or DEFAULT_N)
    pool = test_sentences() if where == "test" else train_sentences()
    todo = _draws(pool, count, seed, tuple(voices), tuple(speeds), spec)
    espeak_binary()
    out = []
    for i, (text, voice, speed) in enumerate(todo):
        out.append(synthesize(text, voice=voice, speed=speed))
        if progress is not None:
            progress(i + 1, len(todo))
    return SpeechSet(out, spec)


def held_out_speech(spec: str, n: int, seed: int = 0) -> SpeechSet:
    """Evaluation utterances for a model trained on ``load_speech(spec, ...)``, whose
    sentences it never saw: ``speech[:N]`` -> ``n`` utterances of the held-out built-in
    sentences (``speech:n:test``); ``speech:DIR`` -> the test side of
    :meth:`SpeechSet.split` (10 % of its sentences, seed 0), at most ``n`` of them."""
    kind, _, where = _parse(str(spec))
    if kind == "dir":
        test = load_speech(spec, None, 0).split(0.1, seed=0)[1]
        return test[:int(n)]
    return load_speech("speech:test", n=int(n), seed=seed)


# ------------------------------------------------------------------ user audio
def _read_metadata(folder: Path) -> list[tuple[str, str]]:
    meta = folder / "metadata.csv"
    if not folder.is_dir():
        raise UserError(f"--data speech:{folder}: folder not found; give a folder with metadata.csv and wav files")
    if not meta.is_file():
        raise UserError(f"--data speech:{folder}: no metadata.csv; write one line 'name|text' per wav file")
    rows = []
    with open(meta, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2 or not row[0].strip() or not row[-1].strip():
                raise UserError(f"{meta}:{line_no}: expected 'name|text', got {'|'.join(row)[:60]!r}")
            rows.append((row[0].strip(), row[-1].strip()))
    if not rows:
        raise UserError(f"{meta}: no lines; write one line 'name|text' per wav file")
    return rows


def _read_wav(path: Path) -> np.ndarray:
    librosa = _librosa()
    import soundfile

    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise UserError(f"{path}: not a readable audio file ({err}); give wav files") from None
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = librosa.resample(audio, orig_sr=rate, target_sr=SAMPLE_RATE)
    return audio.astype(np.float32)


def _cepstra(mel: np.ndarray) -> np.ndarray:
    """MFCC 1-19 of a log-mel [F, 80] (DCT-II), mean-normalised over the utterance."""
    import scipy.fft

    c = scipy.fft.dct(mel, type=2, axis=1, norm="ortho")[:, 1:20]
    return c - c.mean(axis=0, keepdims=True)


def align_to_reference(user_mel: np.ndarray, ref: Utterance) -> np.ndarray:
    """Durations [P] (summing to ``len(user_mel)``) of ``ref``'s phonemes in the user's
    audio, by DTW between cepstra (synthesis-based alignment, Malfrere & Dutoit 1997):
    a reference phoneme starting at reference frame ``r`` starts at the first user frame
    the DTW path pairs with ``r``. On espeak-ng audio of another voice and speed the
    boundaries land within two frames of the true ones (tests/test_data_speech.py); human
    speech is not checked."""
    librosa = _librosa()

    a, b = _cepstra(ref.mel), _cepstra(np.asarray(user_mel, np.float32))
    _, path = librosa.sequence.dtw(X=a.T, Y=b.T, metric="euclidean")
    path = path[::-1]  # from (0, 0) to the end
    first = np.full(len(a), len(b), dtype=np.int64)
    for r, u in path:
        first[r] = min(first[r], u)
    starts = np.concatenate([[0], np.cumsum(ref.durations)[:-1]])
    bounds = np.append(first[np.minimum(starts, len(a) - 1)], len(b))
    bounds[0] = 0
    bounds = np.maximum.accumulate(np.minimum(bounds, len(b)))
    return np.diff(bounds).astype(np.int64)


def _load_dir(folder: Path, n: Optional[int], seed: int, progress=None) -> SpeechSet:
    rows = _read_metadata(folder)
    if n is not None and int(n) < len(rows):
        keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:int(n)])
        rows = [rows[i] for i in keep]
    out = []
    for i, (name, text) in enumerate(rows):
        path = next((p for p in (folder / "wavs" / f"{name}.wav", folder / f"{name}.wav", folder / name)
                     if p.is_file()), None)
        if path is None:
            raise UserError(f"{folder / 'metadata.csv'}: no audio for {name!r}; put {name}.wav in "
                            f"{folder / 'wavs'} or {folder}")
        out.append(_user_utterance(path, name, text))
        if progress is not None:
            progress(i + 1, len(rows))
    return SpeechSet(out, f"speech:{folder}")


def _user_utterance(path: Path, name: str, text: str) -> Utterance:
    librosa = _librosa()

    audio = _read_wav(path)
    if len(audio) < HOP or not np.any(audio):
        raise UserError(f"{path}: silent or shorter than {HOP} samples; give speech recordings")
    _, (a, b) = librosa.effects.trim(audio, top_db=40, frame_length=WIN, hop_length=HOP)
    audio = audio[max(0, a - LEAD_SAMPLES):min(len(audio), b + TAIL_SAMPLES)]
    frames = _frames_for(len(audio))
    wav = np.zeros(frames * HOP, np.float32)
    wav[:len(audio)] = audio
    feats = features(wav)
    ref = synthesize(text, voice="en-us", speed=160)
    speed = int(np.clip(round(160 * ref.seconds / (len(audio) / SAMPLE_RATE)), 80, 450))
    if speed != 160:
        ref = synthesize(text, voice="en-us", speed=speed)
    durations = align_to_reference(feats["mel"], ref)
    pitch, energy = phoneme_means(durations, feats["f0"], feats["energy"])
    return Utterance(text=ref.text, wav=wav, phonemes=list(ref.phonemes), phoneme_ids=ref.phoneme_ids.copy(),
                     durations=durations, mel=feats["mel"], pitch=pitch, energy=energy, voice="user", speed=speed,
                     f0=feats["f0"], frame_energy=feats["energy"], name=name)


# ------------------------------------------------------------------ model tensors
def normalize_mel(mel):
    """A log-mel (natural log) to the model's range: [log MEL_FLOOR, MEL_HI] -> [-1, 1]."""
    return (mel - MEL_LO) / (MEL_HI - MEL_LO) * 2.0 - 1.0


def denormalize_mel(x):
    """The inverse of :func:`normalize_mel`."""
    return (x + 1.0) / 2.0 * (MEL_HI - MEL_LO) + MEL_LO


def context(utterances: Sequence["Utterance"]) -> torch.Tensor:
    """The phoneme contexts [B, P, 6] (:data:`fewstep.nets.prodiff.CONTEXT`) of utterances,
    zero-padded: ids, durations, standardised log f0 (0 where unvoiced) and voiced flag,
    standardised log energy, speaker (:data:`VOICES` index, -1 for another voice)."""
    if not utterances:
        raise UserError("speech context: no utterances given")
    P = max(len(u.phoneme_ids) for u in utterances)
    out = torch.zeros(len(utterances), P, len(CONTEXT))
    for b, u in enumerate(utterances):
        n = len(u.phoneme_ids)
        pitch = np.asarray(u.pitch, np.float64)
        voiced = pitch > 0
        out[b, :n, PHONEME] = torch.as_tensor(u.phoneme_ids, dtype=torch.float32)
        out[b, :n, DURATION] = torch.as_tensor(u.durations, dtype=torch.float32)
        out[b, :n, PITCH] = torch.as_tensor(np.where(voiced, (pitch - LOG_F0[0]) / LOG_F0[1], 0.0), dtype=torch.float32)
        out[b, :n, VOICED] = torch.as_tensor(voiced, dtype=torch.float32)
        energy = np.log(np.maximum(np.asarray(u.energy, np.float64), 1e-5))
        out[b, :n, ENERGY] = torch.as_tensor((energy - LOG_ENERGY[0]) / LOG_ENERGY[1], dtype=torch.float32)
        out[b, :, SPEAKER] = float(u.speaker)
    return out


def tensors(utterances: Sequence["Utterance"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised log-mels [B, F, 80] zero-padded, contexts [B, P, 6], frames [B]) of
    utterances; one longer than :data:`MAX_FRAMES` is refused in one line."""
    utterances = list(utterances)
    if not utterances:
        raise UserError("speech data: no utterances")
    long = [u for u in utterances if u.frames > MAX_FRAMES]
    if long:
        raise UserError(f"speech data: '{long[0].text[:40]}' has {long[0].frames} frames, more than the "
                        f"{MAX_FRAMES} ({MAX_FRAMES * HOP / SAMPLE_RATE:.1f} s) a speech model takes; split it")
    lengths = torch.tensor([u.frames for u in utterances], dtype=torch.long)
    x = torch.zeros(len(utterances), int(lengths.max()), N_MELS)
    for b, u in enumerate(utterances):
        x[b, :u.frames] = normalize_mel(torch.as_tensor(u.mel, dtype=torch.float32))
    return x, context(utterances), lengths


def phonemize(text: str, voice: str = "en-us", speed: int = 160) -> "Utterance":
    """espeak-ng's reading of ``text`` (its phonemes, and its own timing and audio as a
    reference): :func:`synthesize`, cached."""
    text = str(text).strip()
    if not text:
        raise UserError("--text: give a sentence to speak")
    return synthesize(text, voice=voice, speed=speed)


# ------------------------------------------------------------------ vocoder
def mel_to_wav(mel, n_iter: int = 32, seed: int = 0) -> np.ndarray:
    """Griffin-Lim audio (float32, :data:`SAMPLE_RATE`) of a log-mel [F, 80] of this
    module: ``exp``, librosa's NNLS mel inverse (``mel_to_stft``, power 1) and
    ``librosa.griffinlim`` (momentum 0.99, random phases drawn with ``seed``)."""
    librosa = _librosa()

    mel = np.asarray(mel.detach().cpu() if isinstance(mel, torch.Tensor) else mel, dtype=np.float32)
    if mel.ndim != 2 or mel.shape[1] != N_MELS:
        raise UserError(f"mel_to_wav: a log-mel [frames, {N_MELS}] is needed, got shape {mel.shape}")
    mag = librosa.feature.inverse.mel_to_stft(np.exp(mel).T, sr=SAMPLE_RATE, n_fft=N_FFT, power=1.0, fmin=FMIN,
                                              fmax=FMAX)
    mag = np.concatenate([mag, mag[:, -1:]], axis=1)  # the STFT of F * HOP samples has F + 1 centred frames
    return librosa.griffinlim(mag, n_iter=n_iter, hop_length=HOP, win_length=WIN, n_fft=N_FFT, window="hann",
                              center=True, length=len(mel) * HOP, random_state=seed).astype(np.float32)
