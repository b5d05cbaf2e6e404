"""Fused CUDA kernels for CuPy arrays: slice extraction and insertion in one launch.

In array code a trilinear sample costs some thirty element-wise passes (coordinates,
mirroring, clipping, eight corner gathers or scatters, weights), each a kernel launch
on a GPU; a search's fine levels extract tens of millions of samples per iteration in
blocks, so the launches, not the arithmetic, would set its pace.  Each kernel here
computes a whole call's samples in one launch, one thread per (rotation, frequency):

- ``mpirefine_slices`` writes the pose search's scoring tables directly ([Re P, Im P]
  stacked along the frequencies, and |P|²), optionally into given rows of them;
- ``mpirefine_insert`` scatter-adds slices into the double-precision accumulators
  (``atomicAdd`` on doubles: compute capability 6.0 or later).

They are the operators of :func:`mpirefine.fourier.project.extract_slices` and
:meth:`mpirefine.fourier.backproject.Accumulator.insert`, written with the same
floating-point operations in the same order and compiled without fused multiply-adds
(``--fmad=false``), so that extraction gives the array code's values bit for bit and
insertion differs only by the order in which concurrent threads add to a voxel.  They
are the GPU's counterpart of the Numba kernels of :mod:`mpirefine.fourier.compiled`:
the array-namespace code stays the reference, and ``MPIREFINE_JIT=0`` in the
environment selects it on either backend.  The CuPy stand-in of the test suite runs
these sources on the CPU (serially), which is how they are checked without a GPU.
"""

from __future__ import annotations

import os

import numpy as np

from mpirefine.backend import array_namespace

THREADS = 256  # threads per block: one sample each

# The sample of this thread, i = (rotation r, frequency k), and its point A^T (kx, ky,
# 0) · pad (RELION matrices, row-major (3, 3)) mirrored to x >= 0 where the transform
# is stored (s = -1: the conjugate is read); false for a thread past the last sample.
_POINT = r"""
__device__ __forceinline__ bool thread_sample(
    long long n_samples, int K, const float* rot, const float* kx, const float* ky,
    float pad, long long* i, long long* r, int* k, float* x, float* y, float* z, float* s)
{
    *i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (*i >= n_samples) return false;
    *r = *i / K;
    *k = (int)(*i - *r * K);
    const float* A = rot + 9 * *r;
    float px = kx[*k] * pad, py = ky[*k] * pad;
    float qx = A[0] * px + A[3] * py;
    float qy = A[1] * px + A[4] * py;
    float qz = A[2] * px + A[5] * py;
    *s = qx < 0.0f ? -1.0f : 1.0f;
    *x = qx * *s;
    *y = qy * *s;
    *z = qz * *s;
    return true;
}
"""

SLICES_SOURCE = _POINT + r"""
extern "C" __global__ void mpirefine_slices(
    const float2* table, const float* rot, const float* kx, const float* ky,
    const long long* rows, int has_rows, float* stacked, float* power,
    long long n_samples, int K, float pad, float half, float xmax, float ymax,
    long long stride_y, long long stride_z)
{
    long long i, r;
    int k;
    float x, y, z, s;
    if (!thread_sample(n_samples, K, rot, kx, ky, pad, &i, &r, &k, &x, &y, &z, &s)) return;
    /* frame coordinates: x from 0, y and z from the leading zero plane */
    x = fminf(fmaxf(x, 0.0f), xmax);
    y = fminf(fmaxf(y + half, 0.0f), ymax);
    z = fminf(fmaxf(z + half, 0.0f), ymax);
    float xf = floorf(x), yf = floorf(y), zf = floorf(z);
    float fx = x - xf, fy = y - yf, fz = z - zf;
    float gx = 1.0f - fx, gy = 1.0f - fy, gz = 1.0f - fz;
    long long a = (long long)zf * stride_z + (long long)yf * stride_y + (long long)xf;
    long long corner[8] = {a, a + 1, a + stride_y, a + stride_y + 1,
                           a + stride_z, a + stride_z + 1, a + stride_z + stride_y,
                           a + stride_z + stride_y + 1};
    float wzy[4] = {gz * gy, gz * fy, fz * gy, fz * fy};
    float re = 0.0f, im = 0.0f;
    for (int c = 0; c < 8; ++c) {
        float w = wzy[c >> 1] * ((c & 1) ? fx : gx);
        float2 t = table[corner[c]];
        re += t.x * w;
        im += t.y * w;
    }
    if (s < 0.0f) im = -im;
    long long row = has_rows ? rows[r] : r;
    stacked[row * 2 * K + k] = re;
    stacked[row * 2 * K + K + k] = im;
    power[row * K + k] = re * re + im * im;
}
"""

INSERT_SOURCE = _POINT + r"""
extern "C" __global__ void mpirefine_insert(
    double* data, double* weight, const float* rot, const float* vre, const float* vim,
    const float* vw, const float* kx, const float* ky,
    long long n_samples, int K, float pad, int P, int nx)
{
    long long i, r;
    int k;
    float x, y, z, s;
    if (!thread_sample(n_samples, K, rot, kx, ky, pad, &i, &r, &k, &x, &y, &z, &s)) return;
    float xf = floorf(x), yf = floorf(y), zf = floorf(z);
    float fx = x - xf, fy = y - yf, fz = z - zf;
    long long x0 = (long long)xf, y0 = (long long)yf + P / 2, z0 = (long long)zf + P / 2;
    float re = vre[i], im = vim[i] * s, w = vw[i];
    for (int c = 0; c < 8; ++c) {
        long long iz = z0 + (c >> 2), iy = y0 + ((c >> 1) & 1), ix = x0 + (c & 1);
        if (ix >= nx || iy < 0 || iy >= P || iz < 0 || iz >= P) continue;
        float cw = ((c >> 2) ? fz : 1.0f - fz) * (((c >> 1) & 1) ? fy : 1.0f - fy)
                   * ((c & 1) ? fx : 1.0f - fx);
        long long v = (iz * P + iy) * nx + ix;
        atomicAdd(data + 2 * v, (double)(cw * re));
        atomicAdd(data + 2 * v + 1, (double)(cw * im));
        atomicAdd(weight + v, (double)(cw * w));
    }
}
"""

_compiled: dict = {}


def enabled(xp) -> bool:
    """Whether the fused kernels serve arrays of namespace ``xp``: CuPy, unless
    ``MPIREFINE_JIT=0`` asks for the array-namespace code."""
    return (xp is not np and getattr(xp, "RawKernel", None) is not None
            and os.environ.get("MPIREFINE_JIT", "1") != "0")


def _kernel(xp, name: str, source: str):
    key = (id(xp), name)
    if key not in _compiled:
        _compiled[key] = xp.RawKernel(source, name, options=("--fmad=false",))
    return _compiled[key]


def _launch(xp, name, source, n_samples: int, args) -> None:
    if n_samples:
        blocks = (n_samples + THREADS - 1) // THREADS
        _kernel(xp, name, source)((blocks,), (THREADS,), args)


def _device_f32(xp, a):
    return xp.ascontiguousarray(xp.asarray(a, dtype=xp.float32))


def projection_tables(vft, rotations, kx, ky, out=None, rows=None):
    """The scoring tables (stacked (R, 2K) float32 [Re P, Im P], power (R, K) float32
    |P|²) of the slices at ``rotations`` (R, 3, 3), in one launch; with ``out`` and
    ``rows``, rotation r goes into row rows[r] of ``out`` (see
    :func:`mpirefine.fourier.project.projection_tables`)."""
    xp = array_namespace(vft.data)
    rot, kx, ky = (_device_f32(xp, a) for a in (rotations, kx, ky))
    R, K = rot.shape[0], kx.shape[0]
    if out is None:
        out, rows = (xp.empty((R, 2 * K), xp.float32), xp.empty((R, K), xp.float32)), None
    row_index = (xp.empty(1, xp.int64) if rows is None     # unread when has_rows is 0
                 else xp.ascontiguousarray(xp.asarray(rows, dtype=xp.int64)))
    P, nx = vft.size, vft.data.shape[2]
    stride_y = nx + 2
    _launch(xp, "mpirefine_slices", SLICES_SOURCE, R * K, (
        vft.gather_table(), rot, kx, ky, row_index, np.int32(rows is not None), out[0], out[1],
        np.int64(R * K), np.int32(K), np.float32(vft.pad), np.float32(P // 2 + 1),
        np.float32(nx), np.float32(P + 2), np.int64(stride_y), np.int64((P + 4) * stride_y)))
    return out


def insert_slices(data, weight, pad: int, rotations, values, weights, kx, ky) -> None:
    """``data`` (P, P, P // 2 + 1) complex128 and ``weight`` (float64, same shape) +=
    the trilinear spread of ``values`` (R, K) and ``weights`` (R, K) at ``rotations``
    (R, 3, 3), in one launch (see :meth:`mpirefine.fourier.backproject.Accumulator.insert`)."""
    xp = array_namespace(data)
    rot, kx, ky = (_device_f32(xp, a) for a in (rotations, kx, ky))
    values = xp.asarray(values, dtype=xp.complex64)
    vre, vim = xp.ascontiguousarray(values.real), xp.ascontiguousarray(values.imag)
    R, K = rot.shape[0], kx.shape[0]
    P, nx = data.shape[0], data.shape[2]
    _launch(xp, "mpirefine_insert", INSERT_SOURCE, R * K, (
        data.reshape(-1).view(xp.float64), weight.reshape(-1), rot, vre, vim,
        _device_f32(xp, weights), kx, ky,
        np.int64(R * K), np.int32(K), np.float32(pad), np.int32(P), np.int32(nx)))
