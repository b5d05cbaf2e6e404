"""The GPU path checked without a GPU, on the CuPy stand-in of tests/gpu_standin.

The stand-in is a module named ``cupy`` whose arrays wrap NumPy arrays; it refuses
what CuPy refuses (implicit conversion to NumPy, NumPy arrays in device operations,
names CuPy lacks) and counts kernel launches, host/device copies and synchronising
reads (tests/gpu_standin/cupy/_standin.py).  It runs ``cupy.RawKernel`` sources by
compiling them with g++ and running their threads one after another
(tests/gpu_standin/cupy/_kernels.py).  Since it computes with NumPy, and mpirefine's
fused kernels (fourier/kernels.py) repeat the array code's float operations in its
order, mpirefine on it must give exactly what the NumPy array path gives
(``MPIREFINE_JIT=0``: the array-namespace code, without the Numba kernels).  Here:

1. the stand-in itself: it refuses a host/device mix, counts what it should, sees a
   per-particle loop of launches, runs CUDA sources, and never stands in for an
   installed CuPy;
2. the pose search on it equals the NumPy array path bit for bit, within a budget of
   launches, copies and synchronising reads per particle, and with none of them growing
   with the number of particles;
3. ``mpirefine refine --gpu`` on it (C4 with adaptive marginalization on 1 and 3 MPI
   ranks, C4 relaxation by marginalization on 3) writes the same maps and poses as
   ``--cpu`` with ``MPIREFINE_JIT=0``, within a budget per particle and iteration;
4. benchmarks/gpu_check.sh, the check for a GPU node: valid bash, and its gathering of
   results into one JSON.

launch/run_tests.sh runs this file in its stand-in step (with the backend-parametrised
tests under the stand-in); with a real CuPy installed the tests of the stand-in (1-3)
are skipped, except the one that shows it refuses to stand in for CuPy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mpirefine import backend

STANDIN_DIR = Path(__file__).resolve().parent / "gpu_standin"
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def real_cupy_installed() -> bool:
    """Whether a CuPy other than the stand-in is imported or importable."""
    loaded = sys.modules.get("cupy")
    if loaded is not None:
        return not hasattr(loaded, "_standin")
    if str(STANDIN_DIR) in sys.path:
        return False      # the stand-in itself refuses to import beside a real CuPy
    return importlib.util.find_spec("cupy") is not None


standin = pytest.mark.skipif(
    real_cupy_installed(),
    reason="a real CuPy is installed: the GPU tests run on it and the stand-in never replaces it")


@pytest.fixture(scope="module")
def cupy():
    """The stand-in, imported as ``cupy`` for this module's tests only: sys.path,
    sys.modules and mpirefine.backend's GPU probe are restored afterwards."""
    saved_modules = {k: v for k, v in sys.modules.items() if k == "cupy" or k.startswith("cupy.")}
    saved_path, saved_problems = list(sys.path), dict(backend._GPU_PROBLEMS)
    for name in saved_modules:
        del sys.modules[name]
    sys.path.insert(0, str(STANDIN_DIR))
    backend._GPU_PROBLEMS.clear()
    try:
        import cupy

        assert hasattr(cupy, "_standin"), cupy.__file__
        yield cupy
    finally:
        for name in [k for k in sys.modules if k == "cupy" or k.startswith("cupy.")]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        backend._GPU_PROBLEMS.clear()
        backend._GPU_PROBLEMS.update(saved_problems)


def one_thread_env(**extra) -> dict:
    """Environment of a subprocess (one rank of a job): one BLAS thread."""
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                **extra)


def standin_env(**extra) -> dict:
    """Environment of a subprocess that imports the stand-in as cupy."""
    path = os.pathsep.join(p for p in (str(STANDIN_DIR), os.environ.get("PYTHONPATH")) if p)
    return one_thread_env(PYTHONPATH=path, **extra)


# ---------------------------------------------------------------- 1. the stand-in itself

@standin
def test_standin_refuses_a_host_device_mix(cupy):
    x = cupy.arange(6, dtype=cupy.float32).reshape(2, 3)
    host = np.ones((2, 3), np.float32)
    refused = {
        "np.asarray(device)": lambda: np.asarray(x),
        "device + host": lambda: x + host,
        "host + device": lambda: host + x,
        "host 0-d array in a ufunc": lambda: x * np.array(2.0, np.float32),
        "cupy ufunc on host": lambda: cupy.sqrt(host),
        "cupy function on host": lambda: cupy.stack([x, host]),
        "cupy FFT on host": lambda: cupy.fft.rfft2(host),
        "host array into a basic selection": lambda: x.__setitem__(slice(None), host),
        "NumPy function on a mix": lambda: np.where(x > 1, x, host),
        "device scalar as an index": lambda: range(x[0, 1]),
        "NumPy scalar from a device array": lambda: np.float32(x[0, 1]),
    }
    for what, call in refused.items():
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"not refused: {what}")
    for name in ("histogram_bin_edges", "frobnicate", "random"):   # not in CuPy / here
        with pytest.raises(AttributeError):
            getattr(cupy, name)
    with pytest.raises(AttributeError):
        x.itemset   # noqa: B018 (CuPy's ndarray has no itemset)
    # what CuPy allows: scalars of either kind, NumPy dispatching to CuPy, explicit copies
    y = np.exp(x) * np.float32(2) + 1
    assert type(y) is cupy.ndarray and type(x.sum()) is cupy.ndarray and x.sum().ndim == 0
    np.testing.assert_array_equal(cupy.asnumpy(y), np.exp(x.get()) * 2 + 1)
    x[np.array([0])] = host[:1]               # advanced index: an (implicit) copy
    assert float(x[0, 2]) == 1.0


@standin
def test_standin_counts_launches_copies_and_syncs(cupy):
    from cupy import _standin

    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    with _standin.counting() as c:
        x = cupy.asarray(host)          # 1 copy to the device
        y = x.T.reshape(-1)             # views, then one copy (the transpose is not contiguous)
        z = (y * 2 + 1).sum()           # 3 launches
        x[1:, :2] = 0                   # 1 launch
        value = float(z)                # 1 synchronising read
        back = x.get()                  # 1 copy to the host
        _ = x[:, 1]                     # a view: nothing
    assert (c["h2d"], c["d2h"], c["syncs"], c["launches"]) == (1, 1, 1, 5), c
    assert value == float((host.T.reshape(-1) * 2 + 1).sum())
    assert back[2, 1] == 0 and c["h2d_bytes"] == host.nbytes


def _particle_loop(cupy, images):
    """An injected regression: one launch per particle (as a Python loop over a batch)."""
    out = cupy.empty_like(images)
    for b in range(images.shape[0]):
        out[b] = images[b] * 2.0
    return out


@standin
def test_standin_counts_a_per_particle_loop_of_launches(cupy):
    """The per-particle budget check catches a loop over particles: launches grow with
    the batch for the loop, not for the batched operation."""
    from cupy import _standin

    def launches(fn, batch):
        images = cupy.zeros((batch, 8, 8), cupy.float32)
        with _standin.counting() as c:
            fn(images)
        return c["launches"]

    batched = [launches(lambda a: a * 2.0, b) for b in (16, 64)]
    looped = [launches(lambda a: _particle_loop(cupy, a), b) for b in (16, 64)]
    assert batched == [1, 1]
    assert looped == [32, 128]        # getitem is a view; the product and the assignment
    budget_per_particle = 0.5
    assert batched[1] / 64 <= budget_per_particle < looped[1] / 64


SAXPY = r"""
extern "C" __global__ void saxpy(float a, const float* __restrict__ x, float* y, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""


@standin
def test_standin_raw_kernel_runs_cuda_source(cupy):
    """cupy.RawKernel compiles CUDA C with g++ and runs every thread of the grid: float32
    arithmetic as NumPy's (no fused multiply-add), atomics, 2-D indices, complex data."""
    rng = np.random.default_rng(7)
    n = 1000
    x, y = rng.standard_normal((2, n)).astype(np.float32)
    dy = cupy.asarray(y)
    cupy.RawKernel(SAXPY, "saxpy")(((n + 127) // 128,), (128,),
                                   (np.float32(1.3), cupy.asarray(x), dy, np.int32(n)))
    np.testing.assert_array_equal(dy.get().view(np.uint32), (np.float32(1.3) * x + y).view(np.uint32))

    histogram = cupy.RawKernel(r"""
        extern "C" __global__ void histogram(const long long* values, unsigned int* counts,
                                             long long n)
        {
            long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) atomicAdd(counts + values[i], 1u);
        }""", "histogram")
    values = rng.integers(0, 17, 5000)
    counts = cupy.zeros(17, cupy.uint32)
    histogram(20, 256, (cupy.asarray(values), counts, np.int64(values.size)))
    np.testing.assert_array_equal(counts.get(), np.bincount(values, minlength=17))

    grid_2d = cupy.RawKernel(r"""
        extern "C" {
        __global__ void where(int* out, int width, int height)
        {
            int col = blockIdx.x * blockDim.x + threadIdx.x;
            int row = blockIdx.y * blockDim.y + threadIdx.y;
            if (col < width && row < height)
                out[row * width + col] = 1000 * row + col + 100000 * (int)(gridDim.x * blockDim.y);
        }
        }""", "where")
    out = cupy.zeros((21, 30), cupy.int32)
    grid_2d((4, 6), (8, 4), (out, np.int32(30), np.int32(21)))
    rows, cols = np.mgrid[:21, :30]
    np.testing.assert_array_equal(out.get(), 1000 * rows + cols + 100000 * 4 * 4)

    rotate = cupy.RawKernel(r"""
        #include <cupy/complex.cuh>
        __device__ __forceinline__ float2 turn(float2 v, float angle)
        {
            float s, c;
            sincosf(angle, &s, &c);
            return make_float2(v.x * c - v.y * s, v.x * s + v.y * c);
        }
        extern "C" __global__ void rotate(const complex<float>* in, float2* out, double* norm,
                                          float angle, int n)
        {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i >= n) return;
            float2 v = turn(make_float2(in[i].real(), in[i].imag()), angle);
            out[i] = make_float2(fminf(fmaxf(v.x, -1.0f), 1.0f), floorf(v.y));
            atomicAdd(norm, (double)sqrtf(v.x * v.x + v.y * v.y));
        }""", "rotate")
    z = (rng.standard_normal(300) + 1j * rng.standard_normal(300)).astype(np.complex64)
    turned, norm = cupy.empty(300, cupy.complex64), cupy.zeros(1, cupy.float64)
    rotate(3, 128, (cupy.asarray(z), turned, norm, np.float32(0.5), np.int32(300)))
    expected = z * np.exp(0.5j)
    np.testing.assert_allclose(turned.get().real, np.clip(expected.real, -1, 1), atol=1e-6)
    np.testing.assert_allclose(turned.get().imag, np.floor(expected.imag), atol=1e-6)
    np.testing.assert_allclose(norm.get()[0], np.abs(z).sum(dtype=np.float64), rtol=1e-5)


@standin
def test_standin_raw_kernel_refuses_what_a_gpu_would_misread(cupy):
    """Arguments a kernel would silently misread, and sources a serial run cannot honour."""
    kernel = cupy.RawKernel(SAXPY, "saxpy")
    x, y = cupy.ones(16, cupy.float32), cupy.ones(16, cupy.float32)
    a, n = np.float32(2), np.int32(16)
    kernel(1, 16, (a, x, y, n))
    refused = {
        "a non-contiguous array": (ValueError, (a, cupy.ones(32, cupy.float32)[::2], y, n)),
        "a host array": (TypeError, (a, np.ones(16, np.float32), y, n)),
        "a list": (TypeError, (a, [1.0] * 16, y, n)),
        "a Python int": (TypeError, (a, x, y, 16)),
        "a Python float": (TypeError, (2.0, x, y, n)),
        "a float64 array for float*": (TypeError, (a, cupy.ones(16, cupy.float64), y, n)),
        "an int64 scalar for int": (TypeError, (a, x, y, np.int64(16))),
        "a device array for a scalar": (TypeError, (a, x, y, cupy.asarray(n))),
        "too few arguments": (TypeError, (a, x, y)),
    }
    for what, (error, args) in refused.items():
        with pytest.raises(error):
            kernel(1, 16, args)
            pytest.fail(f"not refused: {what}")
    for grid, block in (((0,), (16,)), (1, (0, 1)), (1, (32, 32, 2)), ((1, 1, 1, 1), 1)):
        with pytest.raises(ValueError):
            kernel(grid, block, (a, x, y, n))
    np.testing.assert_array_equal(y.get(), np.full(16, 3, np.float32))   # the one valid launch
    for source in ("__shared__ float tile[32];", "__syncthreads();",
                   "v = __shfl_down_sync(0xffffffff, v, 1);", "#include <cuda_fp16.h>"):
        with pytest.raises(NotImplementedError):
            cupy.RawKernel(f'extern "C" __global__ void k(float v) {{\n{source}\n}}', "k")
    with pytest.raises(RuntimeError, match="undeclared_name"):
        cupy.RawKernel('extern "C" __global__ void k(float* v) { v[0] = undeclared_name; }',
                       "k")(1, 1, (x,))


@standin
def test_standin_raw_kernel_counts_one_launch(cupy):
    from cupy import _standin

    x, y = cupy.ones(300, cupy.float32), cupy.ones(300, cupy.float32)
    kernel = cupy.RawKernel(SAXPY, "saxpy")
    with _standin.counting() as c:
        site = f"tests/test_gpu_standin.py:{sys._getframe().f_lineno + 1}"
        kernel((3,), (128,), (np.float32(2), x, y, np.int32(300)))
    assert (c["launches"], c["h2d"], c["d2h"], c["syncs"]) == (1, 0, 0, 0), c
    assert c["by_op"] == {"RawKernel:saxpy": 1} and c["by_site"] == {site: 1}
    np.testing.assert_array_equal(y.get(), np.full(300, 3, np.float32))


@standin
def test_standin_is_a_working_gpu_for_mpirefine(cupy):
    assert backend.gpu_problem() is None
    xp, device = backend.choose_device("gpu", local_rank=0)
    assert xp is cupy and device == 0
    assert backend.backend_name(xp) == "cupy"
    assert backend.array_namespace(cupy.zeros(3)) is cupy
    assert type(backend.to_numpy(cupy.zeros(3))) is np.ndarray


def test_standin_never_shadows_a_real_cupy(tmp_path):
    """With another package named cupy on the path, importing the stand-in fails, and
    the test module's check sees the real one."""
    fake = tmp_path / "site" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("REAL = True\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STANDIN_DIR), str(tmp_path / "site")]))
    res = subprocess.run([sys.executable, "-c", "import cupy"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode != 0
    assert "does not shadow the real CuPy" in res.stderr, res.stderr[-2000:]
    check = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_gpu_standin import real_cupy_installed
        print(real_cupy_installed())
    """)
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")), timeout=60)
    assert res.stdout.strip().splitlines()[-1] == "True", res.stdout + res.stderr


# ---------------------------------------------------------------- 2. the pose search

def _search(xp, monkeypatch, B, counting=contextlib.nullcontext, **params):
    """search_poses of B noisy particles (32 px, host images) on a reference on ``xp``;
    (result, what ``counting()`` gave for the search alone).  NumPy runs the array code
    (MPIREFINE_JIT=0), the stand-in its fused CUDA kernels (fourier/kernels.py)."""
    from test_search import PARAMS, blob_volume, simulate

    from mpirefine.fourier.project import volume_ft
    from mpirefine.search.poses import search_poses

    monkeypatch.setenv("MPIREFINE_JIT", "0")       # the same particles for both
    vol = blob_volume(32)
    images, ctf, noise_var, _, _ = simulate(volume_ft(vol), B, seed=4, noise_rel=0.5)
    if xp is not np:
        monkeypatch.delenv("MPIREFINE_JIT")
    vft = volume_ft(xp.asarray(vol))
    with counting() as counted:
        result = search_poses(vft, images, ctf, noise_var,
                              params=dataclasses.replace(PARAMS, **params))
    return result, counted


@standin
@pytest.mark.parametrize("marginalize", [False, True])
def test_search_on_the_standin_is_the_numpy_array_path(cupy, monkeypatch, marginalize):
    """Bit for bit the same poses, shifts, likelihoods and posteriors.

    Budget per particle and search (32 px, 48 particles, 4 levels, one chunk), measured
    with the fused extraction kernel (fourier/kernels.py) and the poses on the device:
    without marginalization 5.02 launches, 0.56 copies and 0.19 synchronising reads,
    with it 5.40, 0.62 and 0.19 (with the array code's extraction and the poses on the
    host: 32.6 launches, 1.08 copies, no read).  Budgets about 20 % above.  All of them
    are per search or per block of particles, not per particle (next test): the reads
    are the number of distinct shifts of each level's children and the first level's
    projection cache fill (data-dependent sizes), and the count of poses scored.
    """
    from cupy import _standin

    B = 48
    expected, _ = _search(np, monkeypatch, B, marginalize=marginalize)
    got, c = _search(cupy, monkeypatch, B, _standin.counting, marginalize=marginalize)
    for field in ("rotations", "shifts_px", "log_likelihood", "optimal_scale", "posterior",
                  "candidate_rotations", "candidate_shifts_px"):
        a, b = getattr(expected, field), getattr(got, field)
        assert (a is None and b is None) or np.array_equal(a, b), field
        assert a is None or type(b) is np.ndarray, field
    launches, copies = c["launches"] / B, (c["h2d"] + c["d2h"]) / B
    print(f"\nsearch on the stand-in, per particle: {launches:.2f} launches, {copies:.2f} copies, "
          f"{c['syncs'] / B:.2f} syncs")
    assert launches <= 6.4, sorted(c["by_site"].items(), key=lambda kv: -kv[1])[:15]
    assert copies <= 0.75, c["copy_sites"]
    assert c["syncs"] / B <= 0.23, c["sync_sites"]


@standin
def test_search_launches_and_copies_do_not_grow_with_the_particles(cupy, monkeypatch):
    """No loop over particles: with slice extraction in one launch per call (the fused
    kernel) and scoring blocks sized by the device's memory, 96 particles cost what 48 do.

    Measured (32 px, 4 levels, one chunk): 241 launches, 27 copies and 9 synchronising
    reads for 48 particles, the same for 96.  Budgets: 1 launch and 0.15 copies per
    further particle, and no further read.  A loop over the particles of a block (one
    GEMM each, say) adds 6 launches per particle.
    """
    from cupy import _standin

    counts = {B: _search(cupy, monkeypatch, B, _standin.counting)[1] for B in (48, 96)}
    extra_launches = (counts[96]["launches"] - counts[48]["launches"]) / 48
    extra_copies = (counts[96]["copies"] - counts[48]["copies"]) / 48
    print(f"\nper further particle: {extra_launches:.2f} launches, {extra_copies:.3f} copies "
          f"({counts[48]['launches']} launches, {counts[48]['copies']} copies for 48)")
    grown = {k: v for k, v in counts[96]["by_site"].items() if v > counts[48]["by_site"].get(k, 0)}
    assert extra_launches <= 1.0, sorted(grown.items(), key=lambda kv: -kv[1])[:10]
    assert extra_copies <= 0.15, counts[96]["copy_sites"]
    assert counts[48]["syncs"] == counts[96]["syncs"], counts[96]["sync_sites"]


@standin
def test_ewald_insertion_on_the_standin_is_the_numpy_array_path(cupy, monkeypatch):
    """The side-band insertion (physics/ewald.py) runs on the device as the same array
    code: equal to NumPy's with MPIREFINE_JIT=0 to single-precision rounding (measured
    7e-8 of the largest sum: the stand-in's scalar promotions differ from NumPy's in the
    last bit somewhere in the side-band operands)."""
    from scipy.spatial.transform import Rotation

    from mpirefine.backend import to_numpy
    from mpirefine.fourier.backproject import Accumulator
    from mpirefine.fourier.transforms import centered_rfft2
    from mpirefine.physics.ctf import CTFParams
    from mpirefine.physics.ewald import EwaldCorrection
    from mpirefine.refinement.halfmaps import insert_particles
    from mpirefine.refinement.images import ImagePrep, ctf_grid, ewald_sidebands

    monkeypatch.setenv("MPIREFINE_JIT", "0")
    rng = np.random.default_rng(2)
    n, B = 24, 5
    prep = ImagePrep(box=n, pixel_size_A=1.5)
    images = centered_rfft2(rng.normal(size=(B, n, n)).astype(np.float32))
    params = CTFParams(defocus_u_A=rng.uniform(300, 500, B), defocus_v_A=rng.uniform(300, 500, B),
                       defocus_angle_deg=20.0, voltage_kV=1.0, cs_mm=0.0, amplitude_contrast=0.1)
    rot = Rotation.random(B, random_state=1).as_matrix()
    shifts = rng.normal(size=(B, 2))
    correction = EwaldCorrection("positive", 15.0)
    sums = []
    for xp in (np, cupy):
        acc = Accumulator.zeros(n, 2, xp)
        insert_particles(acc, xp.asarray(images), ctf_grid(params, prep, xp),
                         xp.ones((n, n // 2 + 1), xp.float32), xp.asarray(rot), xp.asarray(shifts),
                         xp.ones(B), ewald=ewald_sidebands(correction, params, prep, xp))
        sums.append((to_numpy(acc.data), to_numpy(acc.weight)))
    for cpu, gpu in zip(*sums):
        np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-6 * np.abs(cpu).max())


@standin
def test_magnification_sums_on_the_standin_are_the_numpy_ones(cupy, monkeypatch):
    """--fit-anisomag's per-pixel sums (physics/anisomag.py) run on the device as the
    same array code: equal to NumPy's with MPIREFINE_JIT=0 to single-precision rounding."""
    from scipy.spatial.transform import Rotation

    from mpirefine.backend import to_numpy
    from mpirefine.fourier.project import volume_ft
    from mpirefine.fourier.transforms import centered_rfft2
    from mpirefine.physics.anisomag import magnification_sums
    from mpirefine.physics.ctf import CTFParams
    from mpirefine.refinement.images import ImagePrep, ctf_grid

    monkeypatch.setenv("MPIREFINE_JIT", "0")
    rng = np.random.default_rng(3)
    n, B = 24, 5
    volume = rng.normal(size=(n, n, n)).astype(np.float32)
    images = centered_rfft2(rng.normal(size=(B, n, n)).astype(np.float32))
    params = CTFParams(defocus_u_A=rng.uniform(8000, 15000, B), defocus_v_A=rng.uniform(8000, 15000, B),
                       defocus_angle_deg=20.0, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    rot = Rotation.random(B, random_state=1).as_matrix()
    shifts = rng.normal(size=(B, 2))
    double = ImagePrep(box=2 * n, pixel_size_A=2.0)
    sums = []
    for xp in (np, cupy):
        def ctf_at(rows, dx, dy, xp=xp):
            return ctf_grid(params.subset(rows), double, xp, freq_shift=(2 * dx, 2 * dy))

        A, b = magnification_sums(volume_ft(xp.asarray(volume)), xp.asarray(images), ctf_at,
                                  rot, shifts, np.ones(B))
        sums.append((to_numpy(A), to_numpy(b)))
    for cpu, gpu in zip(*sums):
        np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-5 * np.abs(cpu).max())


# ---------------------------------------------------------------- 3. refine, end to end

C4_BOX, C4_PIXEL_A, C4_PARTICLES, C4_SNR = 32, 4.4, 120, 0.3
ITERATIONS = 2


@pytest.fixture(scope="module")
def c4_particles(tmp_path_factory):
    """Four apoferritin chains related by the 4-fold on Z, 120 particles of 32 px."""
    from mpirefine.synthetic.models import model_volume
    from mpirefine.synthetic.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("standin_c4")
    volume = model_volume(box=C4_BOX, pixel_size_A=C4_PIXEL_A, chains=["A", "H", "C", "B"])
    simulate_dataset(volume, C4_PIXEL_A, C4_PARTICLES, folder, snr=C4_SNR, seed=4, overwrite=True)
    return str(folder)


def _refine(data, out, ranks, device, options, env):
    cmd = [sys.executable, "-m", "mpirefine", "refine", os.path.join(data, "particles.star"),
           os.path.join(data, "start_20A.mrc"), "--out", out, "--overwrite", device,
           "--max-iterations", str(ITERATIONS), *options]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


CASES = {
    # (ranks, options): budgets of (launches, copies, synchronising reads) per particle
    # and iteration, all ranks together (the measured numbers are in the test's docstring)
    (1, "adaptive"): (40, 2.3, 0.6),
    (3, "adaptive"): (77, 5.6, 1.5),
    (3, "relax-c4"): (49, 5.7, 1.5),
}
OPTIONS = {"adaptive": ["--symmetry", "C4", "--adaptive-marginalization"],
           "relax-c4": ["--symmetry", "C4", "--symmetry-relaxation", "marginalization"]}


@standin
@pytest.mark.parametrize("ranks,case", list(CASES), ids=[f"{r}rank-{c}" for r, c in CASES])
def test_refine_on_the_standin_writes_the_numpy_maps(c4_particles, tmp_path, ranks, case):
    """``refine --gpu`` on the stand-in = ``refine --cpu`` with MPIREFINE_JIT=0, exactly.

    Budget per particle and iteration (launches and host/device copies of all ranks
    together; 120 particles of 32 px, 2 iterations; fixed costs per iteration, such as
    the reconstruction, included), measured:

    =============  ========  ======  ===================
    case           launches  copies  synchronising reads
    =============  ========  ======  ===================
    1 rank,  AM      33.2     1.91    0.50
    3 ranks, AM      64.8     4.62    1.26
    3 ranks, C4r     41.1     4.75    1.26
    =============  ========  ======  ===================

    (AM: C4 with --adaptive-marginalization; C4r: C4 relaxation by marginalization; one
    rank with C4r is left out for time: its rank serving both halves is what the last
    of 3 ranks does too); budgets are about 20 % above.  Before the fused extraction
    and insertion kernels (fourier/kernels.py) and the poses on the device, the three
    took 198, 307 and 213 launches, 3.4, 6.3 and 6.7 copies.
    The GPU runs the kernels, the CPU the array code (MPIREFINE_JIT=0): the maps agree
    bit for bit because the stand-in runs the kernels' threads in order.  The failure
    message lists the lines that launch the most.
    """
    if ranks > 1 and MPIEXEC is None:
        pytest.skip("no mpiexec")
    data, options = c4_particles, OPTIONS[case]
    cpu_out, gpu_out = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    report = tmp_path / "counts"
    cpu = _refine(data, cpu_out, ranks, "--cpu", options, one_thread_env(MPIREFINE_JIT="0"))
    gpu = _refine(data, gpu_out, ranks, "--gpu", options,
                  standin_env(CUPY_STANDIN_REPORT=str(report)))
    assert (cpu["backend"], gpu["backend"]) == ("numpy", "cupy")
    assert (cpu["projection_kernel"], gpu["projection_kernel"]) == ("array", "cuda")
    assert gpu["n_ranks"] == ranks

    from mpirefine.io import read_particles, read_volume

    for name in ("map_half_A", "map_half_B", "map", "mask_refine"):
        a, _ = read_volume(os.path.join(cpu_out, f"{name}.mrc"))
        b, _ = read_volume(os.path.join(gpu_out, f"{name}.mrc"))
        assert np.array_equal(a, b), name
    p, q = (read_particles(os.path.join(o, "particles.star")) for o in (cpu_out, gpu_out))
    assert np.array_equal(p.rotations, q.rotations) and np.array_equal(p.shifts_A, q.shifts_A)
    assert cpu["final_resolution_A"] == gpu["final_resolution_A"]

    counts = [json.load(open(f)) for f in glob.glob(f"{report}.*.json")]
    assert len(counts) == ranks, [c["argv"] for c in counts]
    per = sum(it["batch_size"] for it in gpu["iterations"])   # particle-iterations
    launches = sum(c["launches"] for c in counts) / per
    copies = sum(c["copies"] for c in counts) / per
    syncs = sum(c["syncs"] for c in counts) / per
    print(f"\n{ranks} rank(s), {case}: per particle and iteration {launches:.1f} launches, "
          f"{copies:.2f} copies, {syncs:.2f} syncs")
    max_launches, max_copies, max_syncs = CASES[ranks, case]
    assert launches <= max_launches, _top(counts, "by_site")
    assert copies <= max_copies, _top(counts, "copy_sites")
    assert syncs <= max_syncs, _top(counts, "sync_sites")


def _top(counts, key, n=15):
    total: dict = {}
    for c in counts:
        for k, v in c[key].items():
            total[k] = total.get(k, 0) + v
    return sorted(total.items(), key=lambda kv: -kv[1])[:n]


# ---------------------------------------------------------------- benchmarks/gpu_check.sh

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses_and_gathers_its_results(tmp_path):
    """The GPU node's check (it needs a GPU, except with GPU_CHECK_STANDIN=1): valid
    bash, and its gathering of the steps' outputs into one JSON, failures included."""
    script = REPO / "benchmarks" / "gpu_check.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "refine_1rank.log").write_text("line 1\nTraceback: it broke\n")
    steps = [("backend", "0", "2"), ("tests", "0", "30"), ("bench_box128", "0", "20"),
             ("refine_1rank", "1", "40"), ("refine_2rank", "skipped (budget)", "0")]
    (out / "steps.tsv").write_text("".join(f"{n}\t{s}\t{t}\t{out}/logs/{n}.log\n"
                                           for n, s, t in steps))
    (out / "pytest_serial.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_fourier" name="test_a[cupy]"/>'
        '<testcase classname="tests.test_fourier" name="test_b[cupy]"><failure message="x"/>'
        '</testcase></testsuite></testsuites>')
    (out / "bench_box128.json").write_text(json.dumps(
        {"backend": "cupy", "box": 128, "search_seconds_median": 1.5,
         "seconds_per_1000_particles": 3.0, "device_pool_total_bytes": 123, "params": {}}))
    refine = out / "refine_1rank"
    (refine / "pool").mkdir(parents=True)
    (refine / "pool" / "0.json").write_text(json.dumps({"rank": 0, "peak_used_bytes": 77}))
    (refine / "summary.json").write_text(json.dumps(
        {"n_ranks": 1, "backend": "cupy", "final_resolution_A": 4.2, "wall_seconds": 30.0,
         "iterations": [{"iteration": 1, "batch_size": 500, "seconds": 9.0}],
         "timings_per_rank": [{"rank": 0, "seconds": {"search": 5.0, "reconstruction": 1.0}}]}))
    env = dict(os.environ, OUT=str(out))
    res = subprocess.run(["bash", str(script), "--gather-only"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] is False and result["failed_steps"] == ["refine_1rank", "refine_2rank"]
    assert result["steps"][3]["log_tail"][-1] == "Traceback: it broke"
    assert result["tests"]["serial"]["failures"] == 1
    assert result["tests"]["serial"]["failed"] == ["tests.test_fourier::test_b[cupy]"]
    assert result["bench_search"]["128"]["seconds_per_1000_particles"] == 3.0
    one = result["refine"]["1rank"]
    assert one["final_resolution_A"] == 4.2 and one["particle_iterations"] == 500
    assert one["device_memory_per_rank"] == [{"rank": 0, "peak_used_bytes": 77}]
    assert one["timings_per_rank"][0]["seconds"]["search"] == 5.0
    (out / "steps.tsv").write_text("".join(f"{n}\t0\t{t}\t{out}/logs/{n}.log\n"
                                           for n, _, t in steps))
    res = subprocess.run(["bash", str(script), "--gather-only"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((out / "gpu_check.json").read_text())["ok"] is True
