"""Shared fixtures: the array backends to test on and a seeded random generator."""

import numpy as np
import pytest

from mpirefine.backend import gpu_available

BACKENDS = ["numpy"] + (["cupy"] if gpu_available() else [])


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module of each installed backend: numpy always, cupy with a GPU."""
    if request.param == "cupy":
        import cupy

        return cupy
    return np


@pytest.fixture
def rng():
    """A fresh seeded generator per test, so tests do not depend on their order."""
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def refine_dataset(tmp_path_factory):
    """A small simulated dataset with known truth (tests/refine_data.py)."""
    from refine_data import make_dataset

    folder = tmp_path_factory.mktemp("refine_data")
    make_dataset(str(folder))
    return str(folder)
