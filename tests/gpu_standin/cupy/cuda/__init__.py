"""cupy.cuda of the stand-in: devices (CUPY_STANDIN_DEVICES of them, default 1),
streams that are always synchronised, and the runtime queries mpirefine makes."""

# Signatures are CuPy's, arguments it takes that do not matter here included.
# ruff: noqa: ARG001, ARG002

from __future__ import annotations

from cupy.cuda import runtime

__all__ = ["Device", "Stream", "get_current_stream", "is_available", "runtime"]


def is_available() -> bool:
    return runtime.getDeviceCount() > 0


class Device:
    def __init__(self, device=None):
        self.id = runtime.getDevice() if device is None else int(device)
        if not 0 <= self.id < runtime.getDeviceCount():
            raise runtime.CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self._previous = []

    def use(self):
        runtime.setDevice(self.id)

    def synchronize(self):
        runtime.deviceSynchronize()

    def __enter__(self):
        self._previous.append(runtime.getDevice())
        runtime.setDevice(self.id)
        return self

    def __exit__(self, *exc):
        runtime.setDevice(self._previous.pop())
        return False

    @property
    def compute_capability(self) -> str:
        return "90"

    @property
    def mem_info(self):
        return runtime.memGetInfo()

    def __int__(self):
        return self.id

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.ptr = 0

    def synchronize(self):
        pass

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


def get_current_stream(device_id=-1):
    return Stream.null
