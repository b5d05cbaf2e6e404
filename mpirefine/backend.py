"""Array namespace handling: one code path for NumPy and CuPy.

Math modules call :func:`array_namespace` on their inputs and use what it returns;
they never import cupy themselves and never branch on the backend, with one
exception: slice extraction and insertion hand NumPy arrays to the compiled kernels
of :mod:`mpirefine.fourier.compiled` (Numba).  The array-namespace code they stand
in for is what CuPy runs, and the tests check the two against each other.
"""

from __future__ import annotations

import os

import numpy as np


def array_namespace(*arrays):
    """The array module (numpy or cupy) that owns ``arrays`` (NumPy for plain Python)."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_numpy(a):
    """A host NumPy copy of ``a`` (no copy for NumPy input)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device
        return False


def choose_backend(prefer: str = "auto"):
    """numpy or cupy for this process.

    ``prefer`` is "auto", "gpu" or "cpu"; the environment variable
    MPIREFINE_BACKEND (gpu|cpu) overrides "auto".
    """
    prefer = prefer.lower()
    if prefer == "auto":
        prefer = os.environ.get("MPIREFINE_BACKEND", "auto").lower()
    if prefer == "cpu":
        return np
    if prefer == "gpu":
        if not gpu_available():
            raise RuntimeError(
                "--gpu was requested but no CUDA device is usable; install the 'gpu' extra "
                "(pip install mpirefine[gpu]) on a machine with an NVIDIA GPU, or use --cpu"
            )
        import cupy

        return cupy
    if gpu_available():
        import cupy

        return cupy
    return np


def backend_name(xp) -> str:
    return "cupy" if xp.__name__.startswith("cupy") else "numpy"
