"""fewstep: fast diffusion sampling and distillation, checked against exact flows.

    import fewstep, torch
    gmm = fewstep.GaussianMixture.ring(8)                 # an exact teacher
    x = 80.0 * torch.randn(1000, 2)                       # noise at sigma_max
    y = fewstep.sample(gmm, x, sampler="heun", nfe=10, sigma_min=0.002, sigma_max=80.0)
"""
__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin while waiting make small CPU models 10-15x slower as soon as
# another process shares the cores (measured: 100 moons training steps, 2 threads, 3 other
# busy processes on 2 cores: 293 s spinning, 20 s passive). libgomp reads this when torch
# loads it, so it only takes effect when fewstep is imported before torch; a user's own
# setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import grids, process, samplers  # noqa: F401,E402
from .data.gmm import GaussianMixture  # noqa: E402
from .errors import UserError  # noqa: E402
from .samplers import sample  # noqa: E402


def load(spec, device=None):
    """Load a run folder or ``gmm:FILE.npz`` as a sampleable model (see fewstep.model)."""
    from .model import load as _load

    return _load(spec, device=device)


__all__ = ["GaussianMixture", "UserError", "sample", "load", "grids", "process", "samplers"]
