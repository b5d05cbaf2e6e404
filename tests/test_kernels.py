"""The fused CUDA kernels of mpirefine.fourier.kernels against the array-namespace code.

They run wherever ``cupy`` does: on a GPU, and on the CuPy stand-in of
tests/gpu_standin, which compiles the same CUDA source for the CPU and runs its
threads one after another (the stand-in step of launch/run_tests.sh).  Extraction is
written with the array code's floating-point operations in their order, so it equals
it bit for bit; so does insertion when the threads run in order (the stand-in); on a
GPU concurrent threads add to a voxel in any order, which changes the last bits.
"""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.backend import to_numpy
from mpirefine.fourier import kernels
from mpirefine.fourier.backproject import Accumulator
from mpirefine.fourier.project import (
    VolumeFT,
    extract_slices,
    prepare_projections,
    projection_tables,
)
from mpirefine.search.likelihood import search_frequencies


@pytest.fixture
def cupy(xp):
    if xp is np:
        pytest.skip("the fused kernels serve CuPy arrays (a GPU, or the stand-in)")
    return xp


def _serial(cupy) -> bool:
    """Whether kernel threads run one after another (the stand-in): sums then are exact."""
    return "standin" in getattr(cupy, "__version__", "")


def _assert_same(cupy, got, want, rel=1e-6):
    got, want = to_numpy(got), to_numpy(want)
    if _serial(cupy):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, atol=rel * float(np.abs(want).max()))


def _volume(cupy, n=16, pad=2):
    rng = np.random.default_rng(0)
    size = n * pad
    shape = (size, size, size // 2 + 1)
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    return VolumeFT(cupy.asarray(data), n, pad)


def _rotations(count, seed):
    # random ones, and two with kx >= 0 and kx <= 0 exactly on the grid (the mirror's edge)
    return np.concatenate([Rotation.random(count, random_state=seed).as_matrix(), np.eye(3)[None],
                           np.diag([-1.0, -1.0, 1.0])[None]]).astype(np.float32)


def test_fused_tables_equal_the_array_code(cupy, monkeypatch):
    vft = _volume(cupy)
    kx, ky, _, _ = search_frequencies(vft.n, vft.n // 2 - 1, cupy)
    rot = cupy.asarray(_rotations(40, 4))
    assert kernels.enabled(cupy)
    stacked, power = projection_tables(vft, rot, kx, ky)
    slices = extract_slices(vft, rot, kx, ky)
    rows = np.random.default_rng(1).permutation(2 * rot.shape[0])[:rot.shape[0]]
    out = (cupy.zeros((2 * rot.shape[0], 2 * kx.shape[0]), cupy.float32),
           cupy.zeros((2 * rot.shape[0], kx.shape[0]), cupy.float32))
    projection_tables(vft, rot, kx, ky, out=out, rows=cupy.asarray(rows))

    monkeypatch.setenv("MPIREFINE_JIT", "0")
    assert not kernels.enabled(cupy)
    ref_slices = extract_slices(vft, rot, kx, ky)
    ref_stacked, ref_power = prepare_projections(ref_slices)
    _assert_same(cupy, stacked, ref_stacked)
    _assert_same(cupy, power, ref_power)
    _assert_same(cupy, slices, ref_slices)
    _assert_same(cupy, out[0][cupy.asarray(rows)], ref_stacked)
    _assert_same(cupy, out[1][cupy.asarray(rows)], ref_power)
    untouched = np.delete(np.arange(2 * rot.shape[0]), rows)
    assert not to_numpy(out[0][cupy.asarray(untouched)]).any()


def test_fused_insertion_equals_the_array_code(cupy, monkeypatch):
    rng = np.random.default_rng(3)
    n, pad = 16, 2
    kx, ky, _, _ = search_frequencies(n, n // 2 - 1, cupy)
    rot = cupy.asarray(_rotations(30, 5))
    shape = (rot.shape[0], kx.shape[0])
    values = cupy.asarray((rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
                          .astype(np.complex64))
    weights = cupy.asarray(rng.uniform(0.1, 1.0, shape).astype(np.float32))
    fused = Accumulator.zeros(n, pad, cupy)
    fused.insert(rot, values, weights, kx, ky)
    fused.insert(rot[::-1], values, weights, kx, ky)    # onto sums already there
    monkeypatch.setenv("MPIREFINE_JIT", "0")
    ref = Accumulator.zeros(n, pad, cupy)
    ref.insert(rot, values, weights, kx, ky)
    ref.insert(rot[::-1], values, weights, kx, ky)
    assert float(ref.weight.max()) > 0
    _assert_same(cupy, fused.data, ref.data, rel=1e-12)
    _assert_same(cupy, fused.weight, ref.weight, rel=1e-12)


def test_a_fused_call_is_one_launch(cupy):
    """However many rotations, an extraction or an insertion is one kernel launch
    (counted by the stand-in; skipped on a real GPU)."""
    if not _serial(cupy):
        pytest.skip("launch counts come from the stand-in")
    vft = _volume(cupy)
    kx, ky, _, _ = search_frequencies(vft.n, vft.n // 2 - 1, cupy)
    acc = Accumulator.zeros(vft.n, vft.pad, cupy)
    launches = {}
    for count in (10, 400):
        rot = cupy.asarray(_rotations(count, 6))
        vft.gather_table()
        out = (cupy.empty((rot.shape[0], 2 * kx.shape[0]), cupy.float32),
               cupy.empty((rot.shape[0], kx.shape[0]), cupy.float32))
        values = cupy.ones((rot.shape[0], kx.shape[0]), cupy.complex64)
        weights = cupy.ones((rot.shape[0], kx.shape[0]), cupy.float32)
        with cupy._standin.counting() as c:
            projection_tables(vft, rot, kx, ky, out=out)
        with cupy._standin.counting() as d:
            acc.insert(rot, values, weights, kx, ky)
        launches[count] = (c["by_op"], d["by_op"])
    for tables, insertion in launches.values():
        assert tables.get("RawKernel:mpirefine_slices") == 1, tables
        assert insertion.get("RawKernel:mpirefine_insert") == 1, insertion
    assert launches[10] == launches[400]
