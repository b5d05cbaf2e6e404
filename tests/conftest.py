"""Shared fixtures: the array backends to test on, a seeded random generator, and the
test data shipped in tests/data.

Shipped data: tests that read files under tests/data use the ``relion_projected``
fixture and carry the ``shipped_data`` marker.  The data are part of the repository,
so a missing file fails the test, and a skip of a ``shipped_data`` test (for whatever
reason) is reported as a failure: such a test may never pass silently by not running.
"""

from pathlib import Path

import numpy as np
import pytest

from mpirefine.backend import gpu_available

BACKENDS = ["numpy"] + (["cupy"] if gpu_available() else [])

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Test data that ship with the repository (see each folder's README.md)."""

RELION_PROJECTED_FILES = ("README.md", "angles_ctf.star", "ferritin_chainA.mrc", "clean.star",
                          "clean.mrcs", "noisy.star", "noisy.mrcs", "recon_clean.mrc",
                          "recon_noisy.mrc")
SHIPPED_FIXTURES = {"relion_projected"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shipped_data: reads test data shipped in tests/data; a skip of such a "
                   "test is reported as a failure")


def pytest_collection_modifyitems(items):
    """A test that requests a shipped-data fixture is a shipped_data test, marked or not."""
    for item in items:
        if SHIPPED_FIXTURES & set(getattr(item, "fixturenames", ())) \
                and item.get_closest_marker("shipped_data") is None:
            item.add_marker(pytest.mark.shipped_data)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item):
    """Turn a skip of a shipped_data test into a failure (an expected failure, xfail,
    stays what it is)."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("shipped_data") is not None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} needs the data shipped in {DATA_DIR} and must not "
                           f"be skipped; it was skipped with reason: {reason}")


def shipped_path(*parts: str) -> Path:
    """A file or folder under tests/data; a missing one fails the calling test."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"shipped test data missing: {path} (it is part of the repository; "
                    f"restore it from git)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def relion_projected() -> Path:
    """tests/data/relion_projected: particles projected by RELION from one apoferritin
    subunit (README.md there).  Every file must be present, else the test fails."""
    folder = shipped_path("relion_projected")
    for name in RELION_PROJECTED_FILES:
        shipped_path("relion_projected", name)
    return folder


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
