"""cupy.cuda.runtime of the stand-in: CUPY_STANDIN_DEVICES devices (default 1), all
of them this machine's memory (or CUPY_STANDIN_DEVICE_MEMORY bytes each)."""

# Signatures are CuPy's, arguments it takes that do not matter here included.
# ruff: noqa: ARG001, ARG002

from __future__ import annotations

import os

_current = [0]


class CUDARuntimeError(RuntimeError):
    pass


def getDeviceCount() -> int:  # noqa: N802 (CUDA's names)
    return int(os.environ.get("CUPY_STANDIN_DEVICES", "1"))


def getDevice() -> int:  # noqa: N802
    return _current[0]


def setDevice(device: int) -> None:  # noqa: N802
    if not 0 <= int(device) < getDeviceCount():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    _current[0] = int(device)


def deviceSynchronize() -> None:  # noqa: N802
    pass


def memGetInfo():  # noqa: N802
    """(free, total) bytes: this machine's memory, or with CUPY_STANDIN_DEVICE_MEMORY
    (bytes) a device of that size, less what the stand-in's arrays hold now (to size
    the work as on a given GPU; the arrays still live in host memory)."""
    size = os.environ.get("CUPY_STANDIN_DEVICE_MEMORY")
    if size:
        from cupy import _standin

        total = int(float(size))
        return max(0, total - _standin._MEMORY.live), total
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return free, total


def getDeviceProperties(device: int) -> dict:  # noqa: N802
    return {"name": b"CuPy stand-in (NumPy on the CPU)", "totalGlobalMem": memGetInfo()[1],
            "major": 9, "minor": 0, "multiProcessorCount": os.cpu_count() or 1}


def runtimeGetVersion() -> int:  # noqa: N802
    return 12080


def driverGetVersion() -> int:  # noqa: N802
    return 12080
