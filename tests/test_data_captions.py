"""Captions from labels and measured attributes (fewstep.data.captions): synthetic images of
known brightness, size and orientation give the right words; templates split into seen and
held-out phrasings; deterministic for a seed; the thresholds are Fashion-MNIST's tertiles /
median (checked on its held-out test split where Debian's dataset-fashion-mnist is installed); user
folders of images with a captions.txt."""
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.data import captions as C
from fewstep.data.images import read_mnist_idx, read_png_folder
from fewstep.data.registry import FASHION_DIR
from fewstep.errors import UserError

REAL = Path(FASHION_DIR) / "t10k-images-idx3-ubyte.gz"


def _image(value, rows=None, cols=None, band=None, size=28):
    """[1, 1, size, size] in [-1, 1]: background 0, intensity ``value`` on a rectangle
    (rows x cols slices) or on the diagonal band |r - c| <= band (within rows x cols)."""
    v = torch.zeros(size, size)
    r = torch.arange(size)[:, None].expand(size, size)
    c = torch.arange(size)[None, :].expand(size, size)
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[rows or slice(None), cols or slice(None)] = True
    if band is not None:
        inside &= (r - c).abs() <= band
    v[inside] = value
    return (2 * v - 1)[None, None]


def test_known_images_give_the_right_words():
    imgs = torch.cat([
        _image(0.9, slice(8, 20), slice(11, 17)),        # bright, 12 x 6 = 72 px: small, upright
        _image(0.4, slice(3, 25), slice(1, 27)),         # dark, 22 x 26 = 572 px (0.73): large, wide
        _image(0.65, slice(4, 14), slice(4, 14), band=1),  # mid, diagonal in a 10 x 10 box: small, tilted
        _image(0.65, band=2),                            # mid, the full diagonal: large, tilted
        _image(0.8, slice(8, 18), slice(8, 18)),         # a square: no principal axis, box tall enough: upright
        _image(0.8, slice(8, 19), slice(8, 20)),         # 11 x 12, axis ratio 1.09 < 1.1: the box decides: wide
        _image(0.0),                                     # nothing: dark, small, upright
    ])
    m = C.measure(imgs)
    assert m["brightness"] == ["bright", "dark", "mid", "mid", "bright", "bright", "dark"]
    assert m["size"] == ["small", "large", "small", "large", "small", "small", "small"]
    assert m["orientation"] == ["upright", "wide", "tilted", "tilted", "upright", "wide", "upright"]
    torch.testing.assert_close(m["intensity"][:2], torch.tensor([0.9, 0.4]))
    torch.testing.assert_close(m["area"][:2], torch.tensor([72 / 784, 572 / 784]))
    torch.testing.assert_close(m["angle"][:4], torch.tensor([90.0, 0.0, 45.0, 45.0]), atol=1e-3, rtol=0)
    # uniform w x h rectangle: variances (w^2 - 1) / 12, (h^2 - 1) / 12, so the axis ratio is known
    torch.testing.assert_close(m["elongation"][0], torch.tensor(((12 ** 2 - 1) / (6 ** 2 - 1)) ** 0.5))
    attrs = C.per_image(m)[0]
    text = C.caption(7, attrs, 0)
    assert text == "a bright small sneaker, upright"
    assert C.caption(9, attrs, "a {orientation} {label}, {size} and {brightness}") == \
        "an upright ankle boot, small and bright"                   # 'a' -> 'an' before a vowel
    assert C.caption("jacket", C.per_image(m)[2], 2) == "jacket: mid-grey, small, tilted"


def test_templates_seen_and_held_out_are_disjoint():
    assert len(C.TEMPLATES) >= 8 and len(C.TEST_TEMPLATES) >= 2
    assert not set(C.TEMPLATES) & set(C.TEST_TEMPLATES) and len(set(C.ALL_TEMPLATES)) == len(C.ALL_TEMPLATES)
    for t in C.ALL_TEMPLATES:       # every phrasing carries the class and all three attributes
        assert all("{" + k + "}" in t for k in ("label", *C.ATTRIBUTES)), t
    attrs = {"brightness": "dark", "size": "large", "orientation": "wide"}
    seen = {C.caption(1, attrs, t) for t in C.TEMPLATES}
    held = {C.caption(1, attrs, t) for t in C.TEST_TEMPLATES}
    assert not seen & held


def test_captions_for_is_deterministic_and_uses_its_split():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(64, 1, 12, 12, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (64,), generator=g)
    train = C.captions_for(imgs, labels, seed=5)
    assert train == C.captions_for(imgs, labels, seed=5)
    assert train != C.captions_for(imgs, labels, seed=6)
    test = C.captions_for(imgs, labels, seed=5, split="test")
    for k, a, tr, te in zip(labels.tolist(), C.per_image(C.measure(imgs)), train, test):
        assert tr in {C.caption(k, a, t) for t in C.TEMPLATES}
        assert te in {C.caption(k, a, t) for t in C.TEST_TEMPLATES}
        assert C.FASHION_CLASSES[k].lower() in tr
    assert len({t for t in train}) > 8                                # several phrasings drawn
    digits = C.captions_for(imgs[:3], labels[:3], names=[str(i) for i in range(10)])
    assert all(any(ch.isdigit() for ch in c) for c in digits)


def test_caption_errors_are_one_line():
    imgs, attrs = torch.zeros(2, 1, 8, 8), {"brightness": "dark", "size": "small", "orientation": "wide"}
    calls = [lambda: C.captions_for(imgs, [0, 1], split="val"),
             lambda: C.captions_for(imgs, [0], seed=0),
             lambda: C.captions_for(imgs, [0, 10]),
             lambda: C.captions_for(torch.zeros(2, 8, 8), [0, 1]),
             lambda: C.caption(0, {**attrs, "size": "huge"}),
             lambda: C.caption(0, attrs, 99),
             lambda: C.caption(0, attrs, "a {colour} {label}")]
    for call in calls:
        with pytest.raises(UserError) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.skipif(not REAL.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
def test_thresholds_split_fashion_mnist_as_documented():
    """Cuts set on the 60,000 training images split the 10,000 held-out test images as promised."""
    x, _, _ = read_mnist_idx(REAL)
    m = C.measure(x)
    for word in ("dark", "mid", "bright"):                           # tertiles: about a third each
        assert 0.30 < m["brightness"].count(word) / len(x) < 0.37, word
    assert 0.45 < m["size"].count("small") / len(x) < 0.55           # the median
    assert m["orientation"].count("tilted") / len(x) > 0.03          # ankle boots and sandals lean


# ----------------------------------------------------------------------------- user folders
def _write_folder(root: Path, names):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), "L").save(f)
    return root


def test_read_captioned_folder(tmp_path):
    root = _write_folder(tmp_path / "d", ["a.png", "b.png", "c.png"])
    (root / "captions.txt").write_text("# my data\nc.png|a bright coat\n\na.png | a dark bag|with a bar\n"
                                       "b.png|a sneaker\nc.png|the same coat again\n", encoding="utf-8")
    x, caps = C.read_captioned_folder(root)
    ref, _, _ = read_png_folder(root)                                # a, b, c in sorted order
    assert caps == ["a bright coat", "a dark bag|with a bar", "a sneaker", "the same coat again"]
    assert torch.equal(x, ref[[2, 0, 1, 2]])
    sub = _write_folder(tmp_path / "s", ["bags/x.png", "coats/y.png"])
    (sub / "captions.txt").write_text("coats/y.png|a coat\nbags/x.png|a bag\n")
    xs, caps = C.read_captioned_folder(sub)
    assert caps == ["a coat", "a bag"] and torch.equal(xs, read_png_folder(sub)[0][[1, 0]])


def test_read_captioned_folder_errors(tmp_path):
    root = _write_folder(tmp_path / "d", ["a.png", "b.png"])
    cases = {"": "captions file not found",
             "a.png|one\nb.png|two\nz.png|three\n": "'z.png' not found",
             "a.png|one\n": "'b.png' has no caption",
             "a.png one\nb.png|two\n": "expected 'filename|caption'",
             "a.png|\nb.png|two\n": "empty caption",
             "# nothing\n": "no captions"}
    for text, message in cases.items():
        f = root / "captions.txt"
        f.unlink(missing_ok=True)
        if text:
            f.write_text(text)
        with pytest.raises(UserError, match=message) as err:
            C.read_captioned_folder(root)
        assert "\n" not in str(err.value)
