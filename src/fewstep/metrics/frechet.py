"""Frechet distance and the Inception-style score, computed by torchmetrics.

Frechet distance between Gaussians fitted to the features of two sets
(Heusel et al. 2017, eq. 6):

    FD = |mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2}),

with sample means mu and unbiased covariances S of the features. Inception-style score
(Salimans et al. 2016):

    IS = exp( E_x KL(p(c | x) || p(c)) ),   p(c) = E_x p(c | x),

from a classifier's softmax; it lies in [1, K] for K classes.

Both go through torchmetrics (``FrechetInceptionDistance(feature=module)`` and
``InceptionScore(feature=module)``), which accept any feature network; here the feature
network is the image set's own small classifier (:mod:`fewstep.metrics.features`), so
**the numbers are not CIFAR-10 FID/IS** (no Inception weights are used or downloaded).
With ``feature=None`` the "features" are the flattened samples themselves (the Frechet
distance of the raw coordinates: for points, or features computed elsewhere).

The FD of two finite samples of one distribution is positive (bias of order d/n for
d features and n samples); compare methods at one n and report the data-to-data floor.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fewstep.errors import UserError
from fewstep.metrics.distances import _pair


class _Flatten(nn.Module):
    """The identity on flattened samples, float64: x [B, ...] -> [B, d]."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = int(d)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).double()


def _feature_module(feature: Union[None, str, nn.Module], x: Tensor) -> nn.Module:
    if feature is None:
        return _Flatten(x[0].numel())
    if isinstance(feature, str):
        from fewstep.metrics.features import classifier_for, feature_extractor

        return feature_extractor(classifier_for(feature))
    if isinstance(feature, nn.Module):
        if not isinstance(getattr(feature, "num_features", None), int):
            raise UserError("frechet_distance: a feature module needs an integer 'num_features' attribute")
        return feature
    raise UserError(f"frechet_distance: feature must be None, a dataset name or an nn.Module, "
                    f"not {type(feature).__name__}")


def frechet_distance(x: Tensor, y: Tensor, feature: Union[None, str, nn.Module] = None,
                     batch_size: int = 1000) -> float:
    """FD between the feature Gaussians of sets ``x`` [n, ...] and ``y`` [m, ...].

    ``feature``: None (raw flattened samples), an image dataset name (its classifier's
    64 features: ``'digits'``, ``'shapes16'``, ...), or a module with ``num_features``.
    ``y`` plays torchmetrics' "real" set; the value is symmetric anyway.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = torch.as_tensor(x), torch.as_tensor(y)
    _pair(x, y, min_n=2)  # shapes, sizes, finiteness
    module = _feature_module(feature, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fid = FrechetInceptionDistance(feature=module, reset_real_features=True, normalize=False)
    for data, real in ((y, True), (x, False)):
        for i in range(0, len(data), batch_size):
            fid.update(data[i:i + batch_size], real=real)
    if module.num_features > min(len(x), len(y)):
        warnings.warn(f"frechet_distance: {module.num_features} features from {min(len(x), len(y))} samples: "
                      "the covariances are singular and the value is dominated by its bias", stacklevel=2)
    value = float(fid.compute())
    return max(value, 0.0)


def classifier_score(x: Tensor, feature: Union[str, nn.Module], splits: int = 1) -> float:
    """Inception-style score exp(E_x KL(p(c|x) || p(c))) of samples x with a classifier.

    ``feature``: an image dataset name (its shipped or cached classifier) or a module
    returning logits. ``splits`` > 1 averages the score over that many consecutive chunks
    (the original protocol used 10 splits of 50000 images); the default uses the whole set.
    """
    from torchmetrics.image.inception import InceptionScore

    x = torch.as_tensor(x)
    if x.ndim < 2 or len(x) < 2:
        raise UserError(f"classifier_score: need a batch of at least 2 samples, got shape {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise UserError("classifier_score: the samples contain NaN or inf")
    if int(splits) < 1 or int(splits) > len(x):
        raise UserError(f"classifier_score: splits={splits} must be in 1..{len(x)}")
    if isinstance(feature, str):
        from fewstep.metrics.features import classifier_for, logits_extractor

        module = logits_extractor(classifier_for(feature))
    else:
        module = feature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = InceptionScore(feature=module, splits=int(splits), normalize=False)
        metric.update(x)
        with torch.random.fork_rng(devices=[]):  # torchmetrics permutes with the global RNG
            torch.manual_seed(0)
            mean, _ = metric.compute()
    value = float(mean)
    return value if math.isfinite(value) else float("nan")
