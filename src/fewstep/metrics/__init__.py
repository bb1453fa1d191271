"""Sample-quality metrics: features first, then pure statistics on features."""
from fewstep.metrics.distances import (
    energy_distance,
    median_distance,
    mmd,
    rms,
    sliced_w2,
)

__all__ = ["energy_distance", "median_distance", "mmd", "rms", "sliced_w2"]
