"""Test session set-up: one torch thread per worker (pytest -n 2 on 2 cores; tiny tensors
spin-wait badly with more), and float defaults left untouched."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def spec(tmp_path_factory):
    """The exact ring-of-8 teacher (tests/_exact.py ``gmm2``) saved as a ``gmm:FILE.npz`` spec."""
    from _exact import gmm2

    path = tmp_path_factory.mktemp("gmm") / "ring.npz"
    gmm2().save(path)
    return f"gmm:{path}"


@pytest.fixture(scope="session")
def gmm_spec(tmp_path_factory):
    """``GaussianMixture.ring(8)`` (std 0.1) saved as a ``gmm:FILE.npz`` spec (command-line tests)."""
    from fewstep.data.gmm import GaussianMixture

    p = tmp_path_factory.mktemp("g") / "g.npz"
    GaussianMixture.ring(8).save(p)
    return f"gmm:{p}"
