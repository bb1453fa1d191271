"""Classifier features for image sets: the feature network behind the Frechet distance,
the Inception-style score and precision/recall on images.

No Inception weights can be downloaded here, so every image set gets its own small
classifier, trained by this module on the set's labelled real images. Its features (the
global-average-pooled last convolution, ``num_features`` = 64) stand in for Inception's
pool3 features, its logits for Inception's class logits. **Numbers computed with them are
not CIFAR-10 FID or IS and are not comparable with published ones**; they compare methods
on the same teacher and data, which is what a benchmark here needs.

Network (``SmallClassifier``): two 3x3 convolutions per stage, SiLU, 2x average-pool
between stages until the map is at most 4x4; channels 32, 64, 64...; then
``f(x) = mean_{h,w} a(x)`` (the features) and ``logits = W f(x) + b``. Inputs are clamped
to [-1, 1] first (samples outside the data range are judged like saturated pixels, as
8-bit quantisation would do).

Where the weights come from (:func:`classifier_for`):

1. shipped with the package for ``digits``, ``shapes16``, ``shapes32``, ``fashion``
   (``fewstep/assets/classifier_<name>.safetensors``, made by
   ``python -m fewstep.metrics.features --write-assets``), and for ``fashion`` a second,
   differently built network (``arch="b"``: 5x5 convolutions, max-pooling, 16 channels,
   96 features; ``classifier_fashion_b.safetensors``) for cross-checking a method that
   trains against the first (a student tuned on one feature space can fool it, not both);
2. otherwise trained on first use from the labelled dataset and cached in
   ``$FEWSTEP_CACHE`` (default ``~/.cache/fewstep``) under ``classifiers/``.

Training is deterministic: a fixed seed for initialisation and batch order, Adam, a fixed
number of epochs, 10% of the set held out to report accuracy (stored in the file's
metadata); a set with an official test split (``fashion``) trains on all its training
images and reports the accuracy on the test split (``test_accuracy``). Bit-identical weights across machines are not promised (CPU kernels may round
differently with other thread counts); the shipped files are what the numbers in
docs/BENCHMARKS.md used.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from fewstep.errors import UserError
from fewstep.io import cache_dir

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = ("digits", "shapes16", "shapes32", "fashion")
SHIPPED_B = ("fashion",)  # sets shipped with the second, cross-check classifier too
# the two architectures: "a" the default feature network, "b" the cross-check
ARCHS = {"a": {}, "b": {"width": 16, "num_features": 96, "kernel": 5, "pool": "max"}}
FORMAT = "fewstep-classifier-1"
NUM_FEATURES = 64
DEFAULT_EPOCHS = {"digits": 40, "shapes16": 6, "shapes32": 4, "fashion": 6}
_DEFAULT_N = {"shapes16": 10000, "shapes32": 6000}


class SmallClassifier(nn.Module):
    """A small CNN: ``features(x)`` [B, num_features] and ``forward(x)`` logits [B, K]."""

    def __init__(self, in_channels: int, size: int, num_classes: int, width: int = 32,
                 num_features: int = NUM_FEATURES, kernel: int = 3, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max") or kernel % 2 != 1:
            raise UserError(f"classifier: pool must be avg or max and kernel odd, got {pool!r}, {kernel}")
        self.config = {"in_channels": int(in_channels), "size": int(size), "num_classes": int(num_classes),
                       "width": int(width), "num_features": int(num_features), "kernel": int(kernel), "pool": pool}
        layers: list[nn.Module] = []
        c_in, c, s = in_channels, width, size
        k = int(kernel)
        while True:
            layers += [nn.Conv2d(c_in, c, k, padding=k // 2), nn.SiLU(), nn.Conv2d(c, c, k, padding=k // 2), nn.SiLU()]
            c_in = c
            if s <= 4:
                break
            layers.append(nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2))
            s //= 2
            c = min(2 * c, num_features)
        layers += [nn.Conv2d(c_in, num_features, 1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.image_shape = (int(in_channels), int(size), int(size))

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise UserError(f"classifier for images {list(self.image_shape)} got a batch of shape "
                            f"{list(x.shape)}; compare samples of the dataset the classifier was trained on")
        p = next(self.parameters())
        return x.detach().to(p.device, p.dtype).clamp(-1.0, 1.0)

    def features(self, x: Tensor) -> Tensor:
        """f(x) = mean over pixels of the last feature map, [B, num_features]."""
        return self.body(self._check(x)).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits W f(x) + b, [B, num_classes]."""
        return self.head(self.features(x))


class _Batched(nn.Module):
    """``fn`` applied in batches without gradients, returned in float64 (for torchmetrics)."""

    def __init__(self, clf: SmallClassifier, kind: str, batch_size: int = 512):
        super().__init__()
        self.clf, self.kind, self.batch_size = clf, kind, batch_size
        self.num_features = clf.num_features if kind == "features" else clf.num_classes

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        fn = self.clf.features if self.kind == "features" else self.clf.forward
        return torch.cat([fn(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]).double()


def feature_extractor(clf: SmallClassifier, batch_size: int = 512) -> nn.Module:
    """A module x [B, C, H, W] -> features [B, num_features] (float64), no gradients."""
    return _Batched(clf, "features", batch_size)


def logits_extractor(clf: SmallClassifier, batch_size: int = 512) -> nn.Module:
    """A module x [B, C, H, W] -> class logits [B, K] (float64), no gradients."""
    return _Batched(clf, "logits", batch_size)


# ------------------------------------------------------------------------------ training
def _load_labelled(spec: str, n: Optional[int]):
    from fewstep.data.registry import load_dataset

    ds = load_dataset(spec, n=n if n is not None else _DEFAULT_N.get(spec), seed=12345)
    if ds.kind != "image":
        raise UserError(f"classifier features need an image dataset; '{spec}' holds points "
                        f"(use the raw coordinates for points)")
    if ds.labels is None or ds.num_classes < 2:
        raise UserError(f"dataset '{spec}' has no class labels, so no classifier can be trained for its "
                        "features; give a labelled set (digits, shapes16, shapes32, mnist:DIR, cifar10:DIR, "
                        "or an .npz with 'labels')")
    if ds.shape[1] != ds.shape[2]:
        raise UserError(f"dataset '{spec}': classifier features need square images, got {list(ds.shape)}")
    return ds


def train_classifier(spec: str, epochs: Optional[int] = None, seed: int = 0, n: Optional[int] = None,
                     batch_size: int = 128, lr: float = 2e-3, progress: bool = False,
                     arch: str = "a") -> SmallClassifier:
    """Train a :class:`SmallClassifier` (architecture ``arch`` of :data:`ARCHS`) on
    dataset ``spec`` (deterministic given ``seed``).

    Cross-entropy, Adam(lr) with cosine decay, ``epochs`` passes in a seeded order;
    augmentation: Gaussian pixel noise of std ~ U[0, 0.1] so that features vary smoothly
    for slightly noisy samples. 10% of the images are held out, or, for a set with an
    official test split, all training images are used and the test split is the held-out
    set; the accuracy on the held-out images is kept in ``clf.train_info``.
    """
    from fewstep.data.registry import load_dataset, test_split

    if arch not in ARCHS:
        raise UserError(f"classifier architecture {arch!r}: choose from {', '.join(ARCHS)}")
    ds = _load_labelled(spec, n)
    g = torch.Generator().manual_seed(seed)
    test = test_split(spec)
    x, y = ds.x.float(), ds.labels
    if test is not None:
        held = load_dataset(test)
        val, train = None, torch.arange(len(ds))
        x_val, y_val = held.x.float(), held.labels
    else:
        perm = torch.randperm(len(ds), generator=g)
        n_val = max(1, len(ds) // 10)
        val, train = perm[:n_val], perm[n_val:]
        x_val, y_val = x[val], y[val]
    epochs = int(epochs or DEFAULT_EPOCHS.get(spec, 10))
    import time

    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = SmallClassifier(ds.shape[0], ds.shape[1], ds.num_classes, **ARCHS[arch])
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"classifier {spec}", disable=not progress, leave=False)
    clf.train()
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx]
            xb = xb + 0.1 * torch.rand(len(xb), 1, 1, 1, generator=g) * torch.randn(xb.shape, generator=g)
            loss = nn.functional.cross_entropy(clf(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    clf.eval()
    with torch.no_grad():
        acc = float((logits_extractor(clf)(x_val).argmax(1) == y_val).double().mean())
    clf.train_info = {"dataset": spec, "n": len(ds), "epochs": epochs, "seed": seed, "arch": arch,
                      "val_accuracy": acc, "seconds": round(time.time() - t0, 1)}
    if test is not None:
        clf.train_info.update({"test_split": test, "test_n": len(x_val), "test_accuracy": acc})
    return clf


# ------------------------------------------------------------------------------ storage
def save_classifier(clf: SmallClassifier, path) -> Path:
    """Write weights + metadata (config, training info) as one safetensors file."""
    from safetensors.torch import save_file

    from fewstep.io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(clf.config),
            "train_info": json.dumps(getattr(clf, "train_info", {}))}
    state = {k: v.detach().contiguous() for k, v in clf.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    path.chmod(0o644)
    return path


def load_classifier(path) -> SmallClassifier:
    """Read a file written by :func:`save_classifier`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        clf = SmallClassifier(**json.loads(meta["config"]))
        clf.load_state_dict(state)
    except Exception as e:  # a corrupt or foreign file
        raise UserError(f"{path} is not a fewstep classifier ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "delete it and it will be trained again") from None
    clf.train_info = json.loads(meta.get("train_info", "{}"))
    return clf.eval()



def _cache_path(spec: str) -> Path:
    key = str(Path(spec).resolve()) if (":" not in spec and Path(spec).exists()) else spec
    stem = "".join(ch if ch.isalnum() else "_" for ch in Path(spec.rstrip("/")).name)[:40] or "data"
    return cache_dir() / "classifiers" / f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.safetensors"


_MEMO: dict[tuple[str, str], SmallClassifier] = {}


def _asset(spec: str, arch: str) -> Path:
    return ASSET_DIR / f"classifier_{spec}{'' if arch == 'a' else '_' + arch}.safetensors"


def has_cross_check(spec: str) -> bool:
    """Whether dataset ``spec`` ships the second classifier (``arch="b"``)."""
    return str(spec) in SHIPPED_B and _asset(str(spec), "b").is_file()


def classifier_for(spec: str, progress: bool = False, arch: str = "a") -> SmallClassifier:
    """The feature classifier for image dataset ``spec``: shipped, cached, or trained now;
    ``arch="b"``: the second, cross-check network (shipped for :data:`SHIPPED_B`)."""
    spec = str(spec)
    if (spec, arch) in _MEMO:
        return _MEMO[spec, arch]
    if arch not in ARCHS:
        raise UserError(f"classifier architecture {arch!r}: choose from {', '.join(ARCHS)}")
    shipped = _asset(spec, arch)
    if spec in (SHIPPED if arch == "a" else SHIPPED_B) and shipped.is_file():
        clf = load_classifier(shipped)
    else:
        path = _cache_path(spec if arch == "a" else f"{spec}_{arch}")
        if path.is_file():
            clf = load_classifier(path)
        else:
            clf = train_classifier(spec, progress=progress, arch=arch)
            save_classifier(clf, path)
    _MEMO[spec, arch] = clf
    return clf


def _write_assets(names=SHIPPED) -> None:
    """Train and write the shipped classifiers (``--write-assets [NAME ...]``; NAME_b for
    the cross-check network of a set in :data:`SHIPPED_B`)."""
    import time

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    for name in names:
        spec, arch = (name[:-2], "b") if name.endswith("_b") else (name, "a")
        t0 = time.time()
        clf = train_classifier(spec, progress=True, arch=arch)
        path = save_classifier(clf, _asset(spec, arch))
        print(f"{path}: {clf.train_info} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    import sys

    if "--write-assets" not in sys.argv:
        print("usage: python -m fewstep.metrics.features --write-assets [NAME ...]")
        raise SystemExit(2)
    _write_assets([a for a in sys.argv[1:] if not a.startswith("--")] or SHIPPED)
