"""Frechet distance (torchmetrics with our feature networks) and the classifier score."""
import numpy as np
import pytest
import torch
from scipy import linalg

from fewstep.data.registry import load_dataset
from fewstep.errors import UserError
from fewstep.metrics import classifier_score, frechet_distance
from fewstep.metrics.features import ASSET_DIR, classifier_for, feature_extractor

# digits: all 1797 images, two halves of 898; shapes16: 2 x 800 generated images
SETS = {"digits": None, "shapes16": 1600}


def halves(name):
    ds = load_dataset(name, n=SETS[name], seed=7)
    x = ds.x[torch.randperm(len(ds.x), generator=torch.Generator().manual_seed(0))]
    h = len(x) // 2
    return x[:h], x[h:2 * h], ds


def test_raw_fd_equals_the_closed_form_on_sample_moments():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0.3, 0], [0, 1, 0], [0, 0, 2]],
                                                                            dtype=torch.float64)
    y = torch.randn(500, 3, generator=g, dtype=torch.float64) + torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    mx, my = x.mean(0).numpy(), y.mean(0).numpy()
    sx, sy = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    ref = ((mx - my) ** 2).sum() + np.trace(sx + sy - 2 * linalg.sqrtm(sx @ sy).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-8)


@pytest.mark.parametrize("name", list(SETS))
def test_fd_of_real_halves_is_near_zero_and_grows_with_noise(name):
    if not (ASSET_DIR / f"classifier_{name}.safetensors").is_file():
        pytest.skip(f"the shipped classifier for {name} is missing")
    a, b, _ = halves(name)
    floor = frechet_distance(a, b, name)
    feats = feature_extractor(classifier_for(name))(b)
    scale = float(torch.cov(feats.T).trace())  # total feature variance
    assert floor < 0.02 * scale
    g = torch.Generator().manual_seed(1)
    noisy = [frechet_distance(a + s * torch.randn(a.shape, generator=g), b, name) for s in (0.1, 0.2, 0.4, 0.8)]
    assert floor < noisy[0]
    assert all(p < q for p, q in zip(noisy, noisy[1:])), noisy


def test_shipped_digit_classifier_is_accurate_and_its_score_behaves():
    a, b, ds = halves("digits")
    clf = classifier_for("digits")
    assert clf.train_info["val_accuracy"] > 0.9
    with torch.no_grad():
        acc = (clf(ds.x).argmax(1) == ds.labels).double().mean()
    assert acc > 0.95
    real = classifier_score(a, "digits")
    assert 7.0 < real <= 10.0  # 10 roughly balanced, confidently classified classes
    one_class = classifier_score(ds.x[ds.labels == 3], "digits")
    assert 1.0 <= one_class < 1.5
    noise = classifier_score(torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(0)), "digits")
    assert noise < real / 2


def test_wrong_image_shape_and_bad_feature_are_user_errors():
    with pytest.raises(UserError, match="classifier for images"):
        frechet_distance(torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 16, 16), "digits")
    with pytest.raises(UserError, match="feature"):
        frechet_distance(torch.zeros(4, 2), torch.zeros(4, 2), feature=3)
    with pytest.raises(UserError, match="shapes"):
        frechet_distance(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(UserError, match="at least 2"):
        classifier_score(torch.zeros(1, 1, 8, 8), "digits")
