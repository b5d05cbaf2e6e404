"""Array namespace handling: one code path for NumPy and CuPy.

Math modules call :func:`array_namespace` on their inputs and use what it returns;
they never import cupy themselves and never branch on the backend, with one
exception: slice extraction and insertion hand NumPy arrays to the compiled kernels
of :mod:`mpirefine.fourier.compiled` (Numba) and CuPy arrays to the fused CUDA
kernels of :mod:`mpirefine.fourier.kernels`.  The array-namespace code they stand in
for stays the reference (``MPIREFINE_JIT=0`` selects it on either backend), and the
tests check them against it.
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


_GPU_PROBLEMS: dict = {}


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def gpu_device_count() -> int:
    """Number of CUDA devices CuPy sees; 0 without CuPy, driver or device."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no cupy, no driver, no device
        return 0


def gpu_problem(device: int | None = None) -> str | None:
    """Why CuPy cannot compute on GPU ``device`` (default: the current one), in one
    line; None when it can.

    Finding a device is not enough (a driver older than CuPy's CUDA, a missing NVRTC
    or cuFFT library, a GPU in exclusive mode held by another process all show only
    when work starts), so an elementwise kernel, a 3D FFT and a matrix product are run
    and checked against NumPy. The answer is kept per device for the process.
    """
    if device not in _GPU_PROBLEMS:
        _GPU_PROBLEMS[device] = _probe_gpu(device)
    return _GPU_PROBLEMS[device]


def _probe_gpu(device: int | None) -> str | None:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return (f"CuPy is not installed or does not load ({_one_line(exc)}); install the "
                "'gpu' extra (pip install 'mpirefine[gpu]') for this machine's CUDA")
    version = f"CuPy {getattr(cupy, '__version__', '?')}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"{version} finds no usable CUDA driver or GPU ({_one_line(exc)})"
    if count < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return f"{version} sees no GPU" + (f" (CUDA_VISIBLE_DEVICES={visible!r})"
                                          if visible is not None else "")
    step = "select the GPU"
    index = device
    try:
        index = cupy.cuda.runtime.getDevice() if device is None else int(device)
        with cupy.cuda.Device(index):
            step = "run an elementwise kernel (needs NVRTC)"
            x = np.linspace(-1.0, 1.0, 4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
            ok = np.allclose(cupy.asnumpy(cupy.asarray(x) * 2 + 1), x * 2 + 1, atol=1e-6)
            step = "run an FFT (cuFFT)"
            ok = ok and np.allclose(cupy.asnumpy(cupy.fft.rfftn(cupy.asarray(x))),
                                    np.fft.rfftn(x), atol=1e-3)
            step = "run a matrix product (cuBLAS)"
            a = x.reshape(24, 8)
            ok = ok and np.allclose(cupy.asnumpy(cupy.asarray(a) @ cupy.asarray(a.T)),
                                    a @ a.T, atol=1e-3)
            cupy.cuda.runtime.deviceSynchronize()
    except Exception as exc:
        return f"{version} cannot {step} on GPU {index} ({_one_line(exc)})"
    if not ok:
        return f"{version} gives wrong results on GPU {index} (at: {step})"
    return None


def gpu_available(device: int | None = None) -> bool:
    """Whether CuPy can compute on GPU ``device`` (default: the current one); see
    :func:`gpu_problem`."""
    return gpu_problem(device) is None


def choose_device(prefer: str = "auto", local_rank: int = 0):
    """(numpy or cupy, GPU index or None) for this process.

    ``prefer`` is "auto", "gpu" or "cpu"; the environment variable MPIREFINE_BACKEND
    (gpu|cpu) overrides "auto". The GPU is ``local_rank % visible GPUs``, and is used
    only if :func:`gpu_problem` finds it working: "auto" falls back to NumPy, "gpu"
    raises RuntimeError with the problem in one line.
    """
    prefer = prefer.lower()
    if prefer == "auto":
        prefer = os.environ.get("MPIREFINE_BACKEND", "auto").lower()
    if prefer == "cpu":
        return np, None
    count = gpu_device_count()
    device = local_rank % count if count else None
    problem = gpu_problem(device)
    if problem is None:
        import cupy

        return cupy, device
    if prefer == "gpu":
        raise RuntimeError(f"--gpu, but {problem}; or use --cpu")
    return np, None


def device_memory(device: int | None = None) -> tuple[int, int]:
    """(free, total) bytes of GPU ``device`` (default: the current one), as the CUDA
    runtime reports them (cudaMemGetInfo); memory CuPy's pool holds counts as used."""
    import cupy

    if device is None:
        return tuple(int(v) for v in cupy.cuda.runtime.memGetInfo())
    with cupy.cuda.Device(int(device)):
        return tuple(int(v) for v in cupy.cuda.runtime.memGetInfo())


def ranks_per_device(local_size: int, device: int, n_devices: int) -> int:
    """How many of a node's ``local_size`` ranks share GPU ``device`` (rank r uses GPU
    r % n_devices, as :func:`choose_device` picks)."""
    return max(1, sum(1 for r in range(int(local_size)) if r % max(1, n_devices) == device))


def choose_backend(prefer: str = "auto"):
    """numpy or cupy for this process (see :func:`choose_device`)."""
    return choose_device(prefer)[0]


def backend_name(xp) -> str:
    return "cupy" if xp.__name__.startswith("cupy") else "numpy"


def _report() -> int:
    """``python -m mpirefine.backend``: one line on whether CuPy works on the GPU(s)
    this process sees; status 0 if so, 1 if not (launch/slurm_refine.sbatch uses it)."""
    count = gpu_device_count()
    problems = {device: gpu_problem(device) for device in (range(count) if count else [None])}
    for device, problem in problems.items():
        if problem is None:
            import cupy

            name = cupy.cuda.runtime.getDeviceProperties(device)["name"]
            name = name.decode() if isinstance(name, bytes) else name
            print(f"GPU {device}: usable ({name}, CuPy {cupy.__version__})")
        else:
            print(f"{'GPU' if device is None else f'GPU {device}'}: {problem}")
    return 0 if all(problem is None for problem in problems.values()) else 1


if __name__ == "__main__":
    raise SystemExit(_report())
