"""One entry point for every dataset: ``load_dataset(spec, n, seed) -> Dataset``.

``spec`` is one of
- a toy name (``moons``, ``swiss_roll``, ``8gaussians``, ``checkerboard``, ``rings``,
  ``pinwheel``): ``n`` points drawn with ``seed`` (default 20000);
- ``digits`` (scikit-learn 8x8), ``shapes16`` / ``shapes32`` (procedural, default 10000);
- ``pointclouds[:points=N,classes=a+b,pose=so3|yaw|none]``: procedural 3-D point clouds
  ``[n, N, 3]`` (:mod:`fewstep.data.pointclouds`, default 2000 clouds);
- ``renders[:classes=a+b,size=S,pose=none|yaw,shade=position|depth,elevation=LO+HI]``:
  labelled views of those shapes from random cameras (:mod:`fewstep.data.renders`,
  default 10000 images of 32x32);
- ``fashion``: Fashion-MNIST's 60,000 training images (28x28, 10 labels) from Debian's
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, or the folder in
  ``$FEWSTEP_FASHION_DIR``); ``fashion:test`` its 10,000 test images;
- ``mnist:DIR`` (``train-images-idx3-ubyte[.gz]`` and, if present, the train labels; any
  MNIST-format copy, Fashion-MNIST's included), ``mnist:DIR:test`` the ``t10k-*`` files
  there; ``cifar10:DIR`` (the binary batches);
- a path to a ``.npy`` / ``.npz`` file or a folder of images;
- ``clouds:FILE.npy`` / ``clouds:FILE.npz``: user point clouds ``[n, N, 3]``;
- ``speech[:N][:test]`` / ``speech:DIR``: utterances (:mod:`fewstep.data.speech`, default
  1000) as a :class:`SpeechData`: normalised log-mels ``[n, F, 80]`` padded to the longest,
  each with its phoneme context ``labels`` ``[n, P, 6]`` (:data:`fewstep.nets.prodiff.CONTEXT`)
  and its frame count; ``speech:N``'s held-out counterpart is ``speech:N:test``;
- ``captions:SOURCE[,encoder=minilm|hash|FILE.npz][,templates=train|test]``: a labelled image
  set captioned from its labels and measured attributes (:mod:`fewstep.data.captions`), or a
  folder with ``captions.txt``, as a :class:`TextData` whose contexts are the captions' text
  encodings (:mod:`fewstep.nets.text`); held out: the source's test split with the held-out
  templates;
- ``latents:AE_RUN,DATA``: the images of DATA encoded by an autoencoder (a ``fewstep
  train-autoencoder`` run or ``diffusers:PATH``), labels / captions kept (:func:`latent_data`);
- ``gmm:FILE.npz``: ``n`` fresh samples (float32, default 20000) of the exact Gaussian
  mixture (:mod:`fewstep.data.gmm`), with its classes as labels when it has them: the
  data whose density, score and flow are known, for training any family against truth.
An array file holds points ``[n, d]``, images (``[n, H, W]``, ``[n, C, H, W]``,
``[n, H, W, C]``) or point clouds ``[n, N, 3]``. Clouds must be marked, because
``[n, N, 3]`` is also grayscale images 3 pixels wide: the ``clouds:`` prefix, or an
``.npz`` array named ``clouds`` or ``points`` (beside no ``x`` / ``samples`` / ``data``).
A marked array of another shape, and an unmarked ``[n, H, 3]`` array, are refused with a
:class:`~fewstep.errors.UserError` saying how to mark it.
For finite sets (files, digits) ``n`` keeps at most ``n`` samples, a random subset drawn
with ``seed``. A set with an official test split (``fashion``, ``mnist:DIR`` with its
``t10k`` files: :func:`test_split`) trains on the training split only; :func:`held_out`
and the benchmark's reference images come from the test split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError, unknown_name
from . import images, pointclouds, renders
from .toys import TOYS, make_toy

DEFAULT_TOY_N = 20000
DEFAULT_SHAPES_N = 10000
_SHAPES = {"shapes16": 16, "shapes32": 32}
_PREFIXES = ("speech:N[:test]", "speech:DIR", "captions:SOURCE", "latents:AE_RUN,DATA", "fashion:test", "mnist:DIR[:test]", "cifar10:DIR", "pointclouds:points=N,classes=a+b",
             "renders:classes=a+b,size=S", "clouds:FILE.npy", "gmm:FILE.npz")
_MNIST_NAMES = {
    "images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


@dataclass
class Dataset:
    """Samples ``x`` ``[n, *shape]`` with optional long ``labels`` ``[n]``.

    ``num_classes`` is 0 for an unconditional set; ``kind`` is ``'points'`` (``x`` is
    ``[n, d]``), ``'clouds'`` (``x`` is ``[n, N, 3]``: sets of points) or ``'image'``
    (``x`` is ``[n, C, H, W]`` in ``[-1, 1]``).
    """

    x: torch.Tensor
    labels: Optional[torch.Tensor]
    num_classes: int
    kind: str
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.x.shape[1:])

    @property
    def dim(self) -> int:
        """Number of values in one sample."""
        return math.prod(self.shape)

    def __len__(self) -> int:
        return len(self.x)

    context = False  # True for data whose labels are a per-sample context tensor (speech), not classes

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(x0, labels or None, mask or None) of the samples at ``idx``; a mask (speech) marks
        the real positions of padded samples."""
        return self.x[idx], None if self.labels is None else self.labels[idx], None


@dataclass
class SpeechData(Dataset):
    """Speech (``kind == 'speech'``): ``x`` normalised log-mels [n, F, 80] zero-padded to the
    set's longest, ``labels`` the phoneme contexts [n, P, 6] (always there: the condition of
    every speech model), ``lengths`` the frames of each. One sample's ``shape`` is
    ``(MAX_FRAMES, 80)``, the longest a speech model takes, for every speech set alike;
    :meth:`take` cuts a batch to its own longest utterance and gives its frame mask."""

    lengths: Optional[torch.Tensor] = None
    utterances: Optional[object] = None  # the SpeechSet

    context = True

    @property
    def shape(self) -> tuple[int, ...]:
        from .speech import MAX_FRAMES, N_MELS

        return (MAX_FRAMES, N_MELS)

    def take(self, idx: torch.Tensor):
        from ..nets.prodiff import PHONEME

        idx = torch.as_tensor(idx).long()
        lengths = self.lengths[idx]
        frames = int(lengths.max())
        ctx = self.labels[idx]
        phonemes = int((ctx[..., PHONEME] > 0).sum(1).max())
        mask = torch.arange(frames)[None] < lengths[:, None]
        return self.x[idx, :frames], ctx[:, :phonemes], mask


def dataset_names() -> list[str]:
    """The built-in dataset names (files and ``mnist:DIR`` / ``cifar10:DIR`` come on top)."""
    return [*TOYS, "digits", "fashion", *_SHAPES, "pointclouds", "renders", "speech"]


def _find_mnist(folder: Path, role: str) -> Optional[Path]:
    for base in _MNIST_NAMES[role]:
        for name in (base, base + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def fashion_dir() -> Path:
    """The Fashion-MNIST folder: ``$FEWSTEP_FASHION_DIR`` or Debian's, else one UserError."""
    import os

    path = Path(os.environ.get("FEWSTEP_FASHION_DIR") or FASHION_DIR)
    if _find_mnist(path, "images") is None or _find_mnist(path, "test_images") is None:
        raise UserError(f"--data fashion: Fashion-MNIST not found in {path}; install it with 'apt-get install "
                        "dataset-fashion-mnist' (Debian), set FEWSTEP_FASHION_DIR to a folder of its IDX files, "
                        "or give mnist:DIR for a copy elsewhere")
    return path


def _mnist_split(spec: str) -> tuple[str, str]:
    """(folder, 'train' | 'test') of ``mnist:DIR`` / ``mnist:DIR:test``."""
    rest = spec[len("mnist:"):]
    if rest.endswith(":test") and not Path(rest).is_dir():
        return rest[:-len(":test")], "test"
    return rest, "train"


def _read_mnist(folder, split: str = "train") -> images.ImageSet:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"MNIST folder not found: {path}; give mnist:DIR with the IDX files")
    role = "images" if split == "train" else "test_images"
    found = _find_mnist(path, role)
    if found is None:
        want = "train-images-idx3-ubyte[.gz]" if split == "train" else "t10k-images-idx3-ubyte[.gz] (the test split)"
        raise UserError(f"{path}: no {want}; put the MNIST IDX files there")
    return images.read_mnist_idx(found, _find_mnist(path, "labels" if split == "train" else "test_labels"))


def test_split(spec: str) -> Optional[str]:
    """The spec of the official test split of ``spec`` (``fashion`` -> ``fashion:test``,
    ``mnist:DIR`` -> ``mnist:DIR:test`` when its t10k files are there), else None."""
    spec = str(spec)
    if spec == "fashion":
        return "fashion:test"
    if spec.startswith("mnist:"):
        folder, split = _mnist_split(spec)
        if split == "train" and Path(folder).is_dir() and _find_mnist(Path(folder), "test_images") is not None:
            return f"mnist:{folder}:test"
    return None


def _read_path(spec: str) -> images.ImageSet:
    path = Path(spec)
    if path.is_dir():
        return images.read_png_folder(path)
    if path.suffix.lower() in (".npy", ".npz"):
        return images.read_array_file(path)
    if not path.exists():
        raise UserError(f"dataset file not found: {path}; give a dataset name "
                        f"({', '.join(dataset_names())}), mnist:DIR, cifar10:DIR or a path")
    raise UserError(f"{path}: unsupported dataset file; use .npy, .npz or a folder of PNGs")


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix.lower() in (".npy", ".npz") \
        or Path(spec).exists()


def _subset(triple: images.ImageSet, n: Optional[int], seed: int) -> images.ImageSet:
    """At most ``n`` samples of a finite set: a random subset drawn with ``seed``."""
    x, labels, k = triple
    if n is None or n >= len(x):
        return triple
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[keep], None if labels is None else labels[keep], k


def _load(spec: str, n: Optional[int], seed: int) -> tuple[images.ImageSet, bool]:
    """The triple for ``spec`` and whether it is already exactly ``n`` samples."""
    gen = torch.Generator().manual_seed(seed)
    if spec in TOYS:
        return make_toy(spec, DEFAULT_TOY_N if n is None else n, gen), True
    if spec in _SHAPES:
        count = DEFAULT_SHAPES_N if n is None else n
        return images.shapes(count, _SHAPES[spec], gen), True
    if spec == "digits":
        return images.digits(), False
    if pointclouds.is_spec(spec):
        return pointclouds.load(spec, n, gen), True
    if renders.is_spec(spec):
        return renders.load(spec, n, gen), True
    if spec in ("fashion", "fashion:test"):
        return _read_mnist(fashion_dir(), "test" if spec.endswith(":test") else "train"), False
    if spec.startswith("mnist:"):
        return _read_mnist(*_mnist_split(spec)), False
    if spec.startswith("cifar10:"):
        return images.read_cifar10_bin(spec[len("cifar10:"):]), False
    if spec.startswith("gmm:"):
        return _gmm_samples(spec[len("gmm:"):], DEFAULT_TOY_N if n is None else n, gen), True
    if spec.startswith("clouds:"):
        path = Path(spec[len("clouds:"):])
        if path.suffix.lower() not in (".npy", ".npz"):
            raise UserError(f"--data {spec}: clouds:FILE needs a .npy or .npz file of clouds [n, N, 3]")
        return images.read_array_file(path, clouds=True), False
    if _looks_like_path(spec):
        return _read_path(spec), False
    raise unknown_name("dataset", spec, [*dataset_names(), *_PREFIXES, "PATH.npz"])


def _gmm_samples(path: str, n: int, gen: torch.Generator) -> images.ImageSet:
    """n samples of the mixture in ``path`` (float32) and, for a labelled one, their classes."""
    from .gmm import GaussianMixture

    gmm = GaussianMixture.load(path)
    x, k = gmm.sample(int(n), generator=gen, return_labels=True)
    labels = None if gmm.labels is None else gmm.labels[k].long()
    return x.float(), labels, gmm.num_classes


def _dataset(spec: str, triple: images.ImageSet) -> Dataset:
    x, labels, k = triple
    kind = {2: "points", 3: "clouds"}.get(x.ndim, "image")
    name = Path(spec).stem if _looks_like_path(spec) and ":" not in spec else spec
    return Dataset(x=x, labels=labels, num_classes=k, kind=kind, name=name)


@dataclass
class TextData(Dataset):
    """Captioned images (``kind == 'image'``): ``x`` [n, C, H, W], their captions, and each
    image's caption as a text context (``labels`` of :meth:`take`: [n, L, D + 1], token states
    and mask, :func:`fewstep.nets.unet.text_context`) from the table of the distinct captions'
    encodings; ``text_encoder`` the config that rebuilds the encoder (for ``--prompt``)."""

    captions: Optional[list] = None
    caption_index: Optional[torch.Tensor] = None
    table: Optional[torch.Tensor] = None
    text_encoder: Optional[dict] = None
    class_labels: Optional[torch.Tensor] = None
    null_context: Optional[torch.Tensor] = None  # the empty prompt's context [L, D + 1]

    context = True

    def take(self, idx: torch.Tensor):
        idx = torch.as_tensor(idx).long()
        return self.x[idx], self.table[self.caption_index[idx]], None


CAPTION_KEYS = ("encoder", "length", "templates")
CAPTION_USAGE = "captions:SOURCE[,encoder=minilm|hash|FILE.npz][,length=L][,templates=train|test]"


def _caption_spec(spec: str) -> tuple[str, dict]:
    rest = spec[len("captions:"):]
    source, _, opts = rest.partition(",")
    if not source:
        raise UserError(f"--data {spec}: give {CAPTION_USAGE} (SOURCE: fashion, fashion:test, a labelled set, or a "
                        f"folder of images with captions.txt)")
    options = dict(pointclouds.spec_options("x:" + opts, CAPTION_KEYS, CAPTION_USAGE)) if opts else {}
    return source, options


def caption_data(spec: str, n: Optional[int] = None, seed: int = 0, split: Optional[str] = None) -> TextData:
    """``captions:SOURCE[,encoder=...][,length=L][,templates=train|test]``: the images of SOURCE
    (a labelled set, captioned by :func:`fewstep.data.captions.captions_for` with the training or
    the held-out templates, drawn with ``seed``; or a folder with ``captions.txt``) and their
    captions encoded by the text encoder (default ``minilm``; ``hash`` a toy; a ``.npz`` of
    precomputed embeddings), at most ``n`` images."""
    from ..nets.text import build_text_encoder
    from ..nets.unet import text_context
    from . import captions as C

    source, opts = _caption_spec(str(spec))
    templates = split or opts.get("templates", "train")
    if Path(source).is_dir() and (Path(source) / C.CAPTIONS_FILE).is_file():
        x, texts = C.read_captioned_folder(source)
        keep = _subset((x, torch.arange(len(x)), 0), n, seed)[1]
        x, texts, labels = x[keep], [texts[int(i)] for i in keep], None
    else:
        ds = load_dataset(source, n=n, seed=seed)
        if ds.kind != "image" or ds.labels is None:
            raise UserError(f"--data {spec}: captions are made for labelled images; {source} is {ds.kind} data"
                            f"{'' if ds.labels is not None else ' without labels'}")
        names = C.FASHION_CLASSES if source.startswith("fashion") and ds.num_classes == 10 else \
            tuple(f"class {k}" for k in range(ds.num_classes))
        x, labels = ds.x, ds.labels
        texts = C.captions_for(x, labels, seed=seed, split=templates, names=names)
    enc_spec = opts.get("encoder", "minilm")
    enc_cfg = {"kind": "file", "path": enc_spec} if enc_spec.endswith(".npz") else {"kind": enc_spec}
    if "length" in opts:
        enc_cfg["length"] = pointclouds.spec_int(str(spec), "length", opts["length"], 2, 512)
    encoder = build_text_encoder(enc_cfg)
    unique = sorted(set(texts))
    where = {t: i for i, t in enumerate(unique)}
    parts = []
    with torch.no_grad():
        for i in range(0, len(unique), 256):
            e = encoder.encode(unique[i:i + 256])
            parts.append(text_context(e.states.cpu(), e.mask.cpu()))
        null = encoder.encode([""])
        null = text_context(null.states.cpu(), null.mask.cpu())[0]
    return TextData(x=x, labels=None, num_classes=0, kind="image", name=str(spec), captions=texts,
                    caption_index=torch.tensor([where[t] for t in texts], dtype=torch.long), table=torch.cat(parts),
                    text_encoder=encoder.config, class_labels=labels, null_context=null)


def latent_data(spec: str, n: Optional[int] = None, seed: int = 0, split: Optional[str] = None) -> Dataset:
    """``latents:AE,SPEC``: the images of ``SPEC`` encoded by the autoencoder ``AE`` (a
    ``fewstep train-autoencoder`` run or ``diffusers:PATH``) to its scaled latents
    (``s * z``, the posterior mean: :class:`fewstep.nets.autoencoder.LatentCodec`), with the
    set's labels or text contexts as they were: every model and method trained on it works in
    the latent space (latent diffusion, Rombach et al. 2022). ``split='test'``: SPEC's held-out set."""
    import dataclasses

    from ..nets.autoencoder import load_autoencoder

    rest = str(spec)[len("latents:"):]
    ae, comma, inner = rest.partition(",")
    if not ae or not comma or not inner:
        raise UserError(f"--data {spec}: give latents:AE_RUN,DATA (an autoencoder run or diffusers:PATH, then the "
                        f"image data spec)")
    ds = held_out(inner, n or 10**9, seed)[0] if split == "test" else load_dataset(inner, n=n, seed=seed)
    if ds.kind != "image":
        raise UserError(f"--data {spec}: an autoencoder encodes images; {inner} is {ds.kind} data")
    codec = load_autoencoder(ae, device="cpu")
    if tuple(ds.shape) != tuple(codec.image_shape):
        raise UserError(f"--data {spec}: the autoencoder {ae} takes images of shape {list(codec.image_shape)}, "
                        f"{inner} has {list(ds.shape)}")
    with torch.no_grad():
        z = torch.cat([codec.encode(ds.x[i:i + 512].float()).cpu() for i in range(0, len(ds.x), 512)])
    return dataclasses.replace(ds, x=z, name=str(spec))


def speech_data(utterances, name: str) -> SpeechData:
    """A :class:`SpeechData` of a :class:`~fewstep.data.speech.SpeechSet`."""
    from . import speech

    x, ctx, lengths = speech.tensors(utterances)
    return SpeechData(x=x, labels=ctx, num_classes=0, kind="speech", name=name, lengths=lengths,
                      utterances=utterances)


def load_dataset(spec: str, n: Optional[int] = None, seed: int = 0) -> Dataset:
    """Load the dataset named by ``spec`` (see the module docstring) as a :class:`Dataset`."""
    if n is not None and int(n) < 1:
        raise UserError(f"dataset '{spec}': n must be a positive count, got {n}")
    from . import speech

    if speech.is_spec(spec):
        return speech_data(speech.load_speech(str(spec), n, seed), str(spec))
    if str(spec).startswith("captions:"):
        return caption_data(str(spec), n, seed)
    if str(spec).startswith("latents:"):
        return latent_data(str(spec), n, seed)
    triple, exact = _load(str(spec), None if n is None else int(n), seed)
    return _dataset(str(spec), triple if exact else _subset(triple, n, seed))


def held_out(spec: str, n: int, seed: int, train_n: Optional[int] = None, train_seed: int = 0) -> tuple[Dataset, str]:
    """Reference samples for evaluating a model trained on ``load_dataset(spec, train_n,
    train_seed)``, and where they come from:

    - ``"fresh"``: a generated set (toys, shapes, pointclouds, renders) drawn anew with ``seed``;
    - ``"test"``: a set with an official test split (:func:`test_split`): up to ``n`` of its
      test images, drawn with ``seed`` (never trained on);
    - ``"held-out"``: a finite set (files, digits, ...) larger than ``train_n``: up to ``n``
      of the samples after the training subset in the same random order (never trained on);
    - ``"training"``: a finite set used whole for training: ``n`` of its samples."""
    if int(n) < 1:
        raise UserError(f"dataset '{spec}': n must be a positive count, got {n}")
    from . import speech

    if speech.is_spec(spec):  # the held-out sentences, never in training
        return speech_data(speech.held_out_speech(str(spec), int(n), seed), f"{spec} (held-out sentences)"), "test"
    if str(spec).startswith("latents:"):
        return latent_data(str(spec), int(n), seed, split="test"), "test"
    if str(spec).startswith("captions:"):  # the source's test images, captioned with the held-out templates
        source, opts = _caption_spec(str(spec))
        test = test_split(source)
        if test is None:
            raise UserError(f"--data {spec}: {source} has no test split to hold out; evaluate on another set")
        rest = ",".join(f"{k}={v}" for k, v in opts.items() if k != "templates")
        return caption_data(f"captions:{test}" + (f",{rest}" if rest else ""), int(n), seed, split="test"), "test"
    test = test_split(spec)
    if test is not None:
        return load_dataset(test, n=int(n), seed=seed), "test"
    triple, exact = _load(str(spec), int(n), seed)
    if exact:
        return _dataset(str(spec), triple), "fresh"
    x, labels, k = triple
    if train_n is None or int(train_n) >= len(x) - 1:
        return _dataset(str(spec), _subset(triple, int(n), seed)), "training"
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(train_seed))  # as _subset's
    keep = order[int(train_n):int(train_n) + int(n)]
    return _dataset(str(spec), (x[keep], None if labels is None else labels[keep], k)), "held-out"
