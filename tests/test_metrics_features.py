"""The feature classifiers: shipped files, deterministic training, cache, errors."""
import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep.metrics import features as F


@pytest.mark.parametrize("name, shape", [("digits", (1, 8, 8)), ("shapes16", (3, 16, 16)),
                                         ("shapes32", (3, 32, 32))])
def test_shipped_classifiers_load_and_fit_their_images(name, shape):
    path = F.ASSET_DIR / f"classifier_{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not shipped")
    clf = F.load_classifier(path)
    assert clf.image_shape == shape and clf.num_features == F.NUM_FEATURES
    assert clf.train_info["dataset"] == name and clf.train_info["val_accuracy"] > 0.9
    f = F.feature_extractor(clf)(torch.zeros(3, *shape))
    assert f.shape == (3, F.NUM_FEATURES) and f.dtype == torch.float64


def test_training_is_deterministic():
    a = F.train_classifier("digits", epochs=1, n=200, seed=3)
    b = F.train_classifier("digits", epochs=1, n=200, seed=3)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


def test_unknown_image_set_is_trained_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (120,), generator=g)
    x = (torch.rand(120, 1, 8, 8, generator=g) * 0.2 - 1.0)
    x[labels == 1, :, 2:6, 2:6] = 1.0  # class 1: a bright square
    path = tmp_path / "squares.npz"
    np.savez(path, x=x.numpy(), labels=labels.numpy())
    monkeypatch.setattr(F, "DEFAULT_EPOCHS", {str(path): 3})
    F._MEMO.clear()
    clf = F.classifier_for(str(path))
    cached = list((tmp_path / "cache" / "classifiers").glob("*.safetensors"))
    assert len(cached) == 1
    F._MEMO.clear()
    again = F.classifier_for(str(path))
    for (k, va), (_, vb) in zip(clf.state_dict().items(), again.state_dict().items()):
        assert torch.equal(va, vb), k
    F._MEMO.clear()


def test_points_unlabelled_and_corrupt_files_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="image dataset"):
        F.train_classifier("moons")
    path = tmp_path / "nolabels.npy"
    np.save(path, np.zeros((10, 1, 8, 8), np.float32))
    with pytest.raises(UserError, match="no class labels"):
        F.classifier_for(str(path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a fewstep classifier"):
        F.load_classifier(bad)
