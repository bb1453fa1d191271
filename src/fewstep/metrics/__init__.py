"""Sample-quality metrics: features first, then pure statistics on features."""
from fewstep.metrics.distances import (
    energy_distance,
    median_distance,
    mmd,
    rms,
    sliced_w2,
)
from fewstep.metrics.frechet import classifier_score, frechet_distance
from fewstep.metrics.likelihood import bits_per_dim, dequantize, nll
from fewstep.metrics.pointcloud import chamfer, cloud_set_metrics, pairwise_chamfer
from fewstep.metrics.precision_recall import precision_recall

__all__ = ["energy_distance", "median_distance", "mmd", "rms", "sliced_w2",
           "classifier_score", "frechet_distance", "precision_recall", "nll", "bits_per_dim", "dequantize",
           "chamfer", "pairwise_chamfer", "cloud_set_metrics"]
