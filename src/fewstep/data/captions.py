"""Captions for labelled images, and user folders of captioned images.

A caption is made from an image's class name and three attributes measured from its pixels
(:func:`measure`), put into one of several phrasing templates. Pixel intensity is
``v = (x + 1) / 2`` in ``[0, 1]`` (the channel mean for colour images); the *object* is the
pixels with ``v > OBJECT_LEVEL`` (0.1, about 26/255: the background of Fashion-MNIST is 0, and
the threshold drops faint anti-aliased rims).

- **brightness**: the mean ``v`` over the object's pixels: ``dark`` below 0.56, ``bright``
  above 0.72, ``mid`` (written *mid-grey*) between. The two cuts are the tertiles (0.563, 0.719)
  of this measure over Fashion-MNIST's 60,000 training images, rounded, so each word names
  about a third of them.
- **size**: the object's bounding-box area as a fraction of the image: ``small`` below 0.68,
  ``large`` from it: the median (0.679) over the same training images, so the split is even.
- **orientation**: the principal axis of the object's second moments (its silhouette's
  covariance ``[[c_xx, c_xy], [c_xy, c_yy]]``; axis angle ``theta = atan2(2 c_xy, c_xx - c_yy) / 2``
  from the horizontal, Hu 1962 / Gonzalez & Woods' moment orientation): ``upright`` within 30
  degrees of vertical, ``wide`` within 30 degrees of horizontal, ``tilted`` between. A nearly
  round object (axis ratio ``sqrt(l1 / l2) < 1.1``) has no principal axis; its bounding box
  decides (taller or square: ``upright``, else ``wide``). On Fashion-MNIST trousers, dresses
  and tops come out upright, sneakers wide, and 43% of ankle boots tilted.

An image without object pixels is ``dark``, ``small``, ``upright``.

Templates hold ``{label}``, ``{brightness}``, ``{size}`` and ``{orientation}``; :data:`TEMPLATES`
are for training, :data:`TEST_TEMPLATES` are held out (prompt adherence on unseen phrasings).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence, Union

import torch

from ..errors import UserError
from . import images

PathLike = Union[str, Path]

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")

OBJECT_LEVEL = 0.1
DARK_BELOW, BRIGHT_ABOVE = 0.56, 0.72
SMALL_BELOW = 0.68
UPRIGHT_FROM, WIDE_TO = 60.0, 30.0  # degrees of the principal axis above the horizontal
ROUND_BELOW = 1.1  # axis ratio under which the bounding box decides the orientation

# attribute value -> the word a caption uses
WORDS = {"brightness": {"dark": "dark", "mid": "mid-grey", "bright": "bright"},
         "size": {"small": "small", "large": "large"},
         "orientation": {"upright": "upright", "tilted": "tilted", "wide": "wide"}}
ATTRIBUTES = tuple(WORDS)

TEMPLATES = (
    "a {brightness} {size} {label}, {orientation}",
    "a photo of a {size} {orientation} {label} in {brightness} tones",
    "{label}: {brightness}, {size}, {orientation}",
    "a {size} {label} that is {brightness} and {orientation}",
    "an image of a {orientation} {label}, {brightness} and {size}",
    "a {brightness} {label} shown {orientation}, {size} in the frame",
    "product shot: {size} {brightness} {label}, {orientation}",
    "a grayscale picture of a {label}; it looks {brightness}, {size} and {orientation}",
)
TEST_TEMPLATES = (
    "there is a {orientation} {brightness} {label} taking up a {size} area",
    "{size}, {brightness}, {orientation}: a {label}",
)
ALL_TEMPLATES = TEMPLATES + TEST_TEMPLATES
SPLITS = {"train": TEMPLATES, "test": TEST_TEMPLATES}
CAPTIONS_FILE = "captions.txt"


# ----------------------------------------------------------------------------- attributes
def _intensity(images_: torch.Tensor) -> torch.Tensor:
    if not isinstance(images_, torch.Tensor) or images_.ndim != 4 or images_.shape[0] == 0:
        shape = tuple(images_.shape) if isinstance(images_, torch.Tensor) else type(images_).__name__
        raise UserError(f"captions: images must be a tensor [n, C, H, W] in [-1, 1] with n >= 1, got {shape}")
    if not torch.isfinite(images_).all():
        raise UserError("captions: images contain NaN or infinite values; clean the data first")
    return ((images_.float().mean(1) + 1) / 2).clamp(0, 1)


def _span(rows: torch.Tensor) -> torch.Tensor:
    """Per image, the extent (first to last True, inclusive) of a ``[n, K]`` bool mask."""
    idx = torch.arange(rows.shape[1], dtype=torch.float32)
    lo = torch.where(rows, idx, torch.full_like(idx, math.inf)).amin(1)
    hi = torch.where(rows, idx, torch.full_like(idx, -math.inf)).amax(1)
    return (hi - lo + 1).clamp(min=0).nan_to_num(0.0)


def measure(images_: torch.Tensor) -> dict:
    """Per-image attributes of ``images_`` [n, C, H, W] in [-1, 1].

    Returns the words (lists of n strings) ``brightness`` (dark / mid / bright), ``size``
    (small / large), ``orientation`` (upright / tilted / wide), and the numbers behind them
    (tensors [n]): ``intensity`` (mean object intensity in [0, 1]), ``area`` (bounding-box
    fraction), ``angle`` (principal axis above the horizontal, degrees in [0, 90]) and
    ``elongation`` (axis ratio ``sqrt(l1 / l2)`` of the second moments, >= 1).
    """
    v = _intensity(images_)
    n, h, w = v.shape
    obj = v > OBJECT_LEVEL
    count = obj.sum((1, 2)).float()
    some = count > 0
    intensity = (v * obj).sum((1, 2)) / count.clamp(min=1)
    height, width = _span(obj.any(2)), _span(obj.any(1))
    area = height * width / (h * w)

    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    m = obj.float()
    mx = (m * xx).sum((1, 2)) / count.clamp(min=1)
    my = (m * yy).sum((1, 2)) / count.clamp(min=1)
    dx, dy = xx - mx[:, None, None], yy - my[:, None, None]
    cxx = (m * dx * dx).sum((1, 2)) / count.clamp(min=1)
    cyy = (m * dy * dy).sum((1, 2)) / count.clamp(min=1)
    cxy = (m * dx * dy).sum((1, 2)) / count.clamp(min=1)
    angle = torch.rad2deg(0.5 * torch.atan2(2 * cxy, cxx - cyy)).abs()  # image y points down: |.| is the same
    half, disc = (cxx + cyy) / 2, torch.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
    elongation = torch.sqrt((half + disc) / (half - disc).clamp(min=1e-6)).where(some, torch.ones(n))

    brightness = ["dark" if (not s or i < DARK_BELOW) else "bright" if i > BRIGHT_ABOVE else "mid"
                  for s, i in zip(some.tolist(), intensity.tolist())]
    size = ["small" if a < SMALL_BELOW else "large" for a in area.tolist()]
    orientation = []
    for s, a, e, hh, ww in zip(some.tolist(), angle.tolist(), elongation.tolist(), height.tolist(), width.tolist()):
        if not s:
            orientation.append("upright")
        elif e < ROUND_BELOW:
            orientation.append("upright" if hh >= ww else "wide")
        else:
            orientation.append("upright" if a >= UPRIGHT_FROM else "wide" if a <= WIDE_TO else "tilted")
    return {"brightness": brightness, "size": size, "orientation": orientation,
            "intensity": intensity, "area": area, "angle": angle, "elongation": elongation}


def per_image(measured: dict) -> list[dict]:
    """:func:`measure`'s lists as one ``{brightness, size, orientation}`` dict per image."""
    return [dict(zip(ATTRIBUTES, words)) for words in zip(*(measured[a] for a in ATTRIBUTES))]


# ----------------------------------------------------------------------------- captions
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def caption(label: Union[int, str], attrs: dict, template: Union[int, str] = 0,
            names: Sequence[str] = FASHION_CLASSES) -> str:
    """The caption of one image: ``template`` (an index into :data:`ALL_TEMPLATES`, or a
    string with ``{label}``, ``{brightness}``, ``{size}``, ``{orientation}``) filled with the
    class name (``names[label]`` lower-cased, or ``label`` itself when a string) and the words
    of ``attrs`` (values as :func:`measure` gives them); 'a' becomes 'an' before a vowel."""
    if isinstance(template, str):
        text = template
    else:
        try:
            text = ALL_TEMPLATES[int(template)]
        except (IndexError, ValueError, TypeError):
            raise UserError(f"caption template {template!r}: give an index 0..{len(ALL_TEMPLATES) - 1} "
                            f"or a template string") from None
    if isinstance(label, str):
        name = label
    else:
        k = int(label)
        if not 0 <= k < len(names):
            raise UserError(f"caption: label {k} outside 0..{len(names) - 1} ({len(names)} class names)")
        name = names[k].lower()
    words = {}
    for a in ATTRIBUTES:
        value = attrs.get(a)
        if value not in WORDS[a]:
            raise UserError(f"caption: attribute {a}={value!r}; expected one of {', '.join(WORDS[a])}")
        words[a] = WORDS[a][value]
    try:
        out = text.format(label=name, **words)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"caption template {text[:60]!r}: bad placeholder ({err}); use only {{label}}, "
                        f"{{brightness}}, {{size}}, {{orientation}}") from None
    return _ARTICLE.sub(lambda m: m.group(1) + "n ", out)


def captions_for(images_: torch.Tensor, labels, seed: int = 0, split: str = "train",
                 names: Sequence[str] = FASHION_CLASSES) -> list[str]:
    """One caption per image of ``images_`` [n, C, H, W] in [-1, 1] with class ``labels`` [n]:
    its attributes measured (:func:`measure`) and a template of ``split`` ('train':
    :data:`TEMPLATES`, 'test': :data:`TEST_TEMPLATES`) drawn uniformly per image from a
    generator seeded by ``seed``: the same captions for the same images, labels and seed."""
    if split not in SPLITS:
        raise UserError(f"caption split {split!r}: use 'train' or 'test'")
    labels = torch.as_tensor(labels).reshape(-1)
    if len(labels) != len(images_):
        raise UserError(f"captions: {len(labels)} labels for {len(images_)} images; give one label per image")
    if labels.is_floating_point() or (len(labels) and (labels.min() < 0 or labels.max() >= len(names))):
        raise UserError(f"captions: labels must be class indices 0..{len(names) - 1} ({len(names)} class names)")
    attrs = per_image(measure(images_))
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randint(len(SPLITS[split]), (len(labels),), generator=g).tolist()
    return [caption(int(k), a, SPLITS[split][t], names) for k, a, t in zip(labels.tolist(), attrs, pick)]


# ----------------------------------------------------------------------------- user folders
def read_captions_file(path: PathLike) -> list[tuple[str, str]]:
    """``(filename, caption)`` per line ``filename|caption`` of ``path`` (UTF-8; blank lines
    and lines starting with ``#`` skipped; the caption is what follows the first ``|``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"captions file not found: {path}; write one line 'filename|caption' per image")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read as UTF-8 text ({err})") from None
    out = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, bar, text = line.partition("|")
        name, text = name.strip(), text.strip()
        if not bar or not name:
            raise UserError(f"{path} line {number}: expected 'filename|caption', got {line[:60]!r}")
        if not text:
            raise UserError(f"{path} line {number}: empty caption for {name!r}; write one (the empty "
                            f"prompt is the null prompt) or drop the line")
        out.append((name, text))
    if not out:
        raise UserError(f"{path}: no captions; write one line 'filename|caption' per image")
    return out


def read_captioned_folder(folder: PathLike) -> tuple[torch.Tensor, list[str]]:
    """Images of ``folder`` (read by :func:`fewstep.data.images.read_png_folder`: same-sized
    PNG/JPEG/BMP, at its top level or in subfolders) with their captions from its
    ``captions.txt``, one row per caption line, in the file's order (an image with two lines
    appears twice). File names are relative to ``folder`` (``sub/x.png`` in a subfolder).
    A line naming a missing image, and an image with no line, are refused in one line each."""
    root = Path(folder)
    entries = read_captions_file(root / CAPTIONS_FILE)
    files, _, _ = images._list_images(root)
    x, _, _ = images.read_png_folder(root)
    row = {f.relative_to(root).as_posix(): i for i, f in enumerate(files)}
    missing = next((name for name, _ in entries if Path(name).as_posix() not in row), None)
    if missing is not None:
        raise UserError(f"{root / CAPTIONS_FILE}: image {missing!r} not found in {root}; fix the name "
                        f"or add the image")
    named = {Path(name).as_posix() for name, _ in entries}
    lonely = next((name for name in row if name not in named), None)
    if lonely is not None:
        raise UserError(f"{root}: image {lonely!r} has no caption in {CAPTIONS_FILE}; add a line "
                        f"'{lonely}|caption' or remove the image")
    idx = torch.tensor([row[Path(name).as_posix()] for name, _ in entries])
    return x[idx], [text for _, text in entries]
