"""Compiled slice extraction and insertion for NumPy arrays: the refinement's hot loops.

The pose search extracts tens of millions of central-slice samples per iteration (the
fine levels' per-particle projections).  In NumPy each trilinear sample costs some
thirty passes over temporaries; this kernel (Numba) computes a rotation's samples in
two passes: the corners and fractions of every frequency (vectorised by the
compiler), then the gathers and weighted sums.  Groups of rotations run in parallel
on this rank's share of the cores.  It writes the scoring tables directly:
[Re P, Im P] stacked along the frequencies, and |P|².  Backprojection's scatter
(:func:`insert_slices`) is compiled likewise, on one thread, and so is the
symmetrisation of the backprojection sums (:func:`symmetrize`: the sums read by
trilinear interpolation at g·q for every operator g and sphere point q), one plane of
the grid per work item.

They are the same operators as :func:`mpirefine.fourier.project.extract_slices`,
:meth:`mpirefine.fourier.backproject.Accumulator.insert` and
:func:`mpirefine.geometry.symmetry.symmetrize_accumulator` (same stencil, clipping
and Hermitian flip; the tests compare them), used only for NumPy arrays when Numba
imports.  CuPy arrays, and NumPy ones with ``MPIREFINE_JIT=0`` in the environment,
take the array-namespace code instead.
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
except ImportError:  # the array-namespace code serves instead
    numba = None

_GROUP = 16  # rotations per parallel work item
_kernels: dict = {}


def enabled(xp) -> bool:
    """Whether the kernels can run for arrays of namespace ``xp``."""
    if xp is not np or os.environ.get("MPIREFINE_JIT", "1") == "0":
        return False
    return _get_kernel("slices") is not None


def kernel_name(xp) -> str:
    """"numba" where the compiled kernel runs for ``xp``'s arrays, "cuda" where the
    fused CUDA kernels of :mod:`mpirefine.fourier.kernels` do, "array" otherwise."""
    from mpirefine.fourier import kernels

    if enabled(xp):
        return "numba"
    return "cuda" if kernels.enabled(xp) else "array"


def projection_tables(vft, rotations, kx, ky, out=None, rows=None):
    """(stacked (R, 2K) float32 [Re P, Im P], power (R, K) float32 |P|²) of the
    central slices at ``rotations`` (R, 3, 3) and frequencies ``kx``, ``ky`` (K,)
    (cycles per box of the unpadded images); NumPy arrays only.  With ``out`` (a
    (stacked, power) pair of C-contiguous arrays) and ``rows`` (R,), rotation r is
    written into row rows[r] of ``out`` instead, which is returned."""
    kernel = _get_kernel("slices")
    rotations = np.ascontiguousarray(rotations, dtype=np.float32)
    kx = np.ascontiguousarray(kx, dtype=np.float32)
    ky = np.ascontiguousarray(ky, dtype=np.float32)
    R, K = rotations.shape[0], kx.shape[0]
    P, nx = vft.size, vft.data.shape[2]
    table = vft.gather_table().view(np.float32).reshape(P + 4, P + 4, 2 * (nx + 2))
    if out is None:
        out, rows = (np.empty((R, 2 * K), np.float32), np.empty((R, K), np.float32)), np.arange(R)
    kernel(table, rotations, kx, ky, np.float32(vft.pad), np.float32(P // 2 + 1),
           np.float32(nx), np.float32(P + 2), _GROUP, np.asarray(rows, np.int64), *out)
    return out


def insert_slices(data, weight, pad: int, rotations, values, weights, kx, ky, kz=None) -> None:
    """Add slices into half-space accumulators, the adjoint of the extraction:
    ``data`` (P, P, P // 2 + 1) complex128 += trilinear spread of ``values`` (R, K)
    (conjugated where the point is mirrored), ``weight`` (same shape, float64) +=
    that of ``weights`` (R, K); corners outside the grid are dropped.  kz: None (the
    central plane) or (K,) or (R, K) heights off it (curved Ewald spheres).  One
    thread (a scatter)."""
    kernel = _get_kernel("insert")
    values = np.asarray(values, dtype=np.complex64)
    P = data.shape[0]
    kz = np.zeros((1, len(kx)), np.float32) if kz is None else np.asarray(kz, np.float32)
    kernel(data.reshape(P, P, -1).view(np.float64), weight,
           np.ascontiguousarray(rotations, dtype=np.float32),
           np.ascontiguousarray(values.real, dtype=np.float32),
           np.ascontiguousarray(values.imag, dtype=np.float32),
           np.ascontiguousarray(weights, dtype=np.float32),
           np.ascontiguousarray(kx, dtype=np.float32), np.ascontiguousarray(ky, dtype=np.float32),
           np.ascontiguousarray(kz.reshape(-1, len(kx))), np.float32(pad))


def symmetrize(table, group, lengths, P: int, nx: int):
    """Σ_g of the framed table of sums read at g·q, for every point q of the sphere
    (rows of ``lengths`` points, kx = 0, 1, ...; the other points stay zero): the
    (P, P, nx) complex128 data and float64 weight of
    :func:`mpirefine.geometry.symmetry.symmetrize_accumulator`, before its halving of
    the kx = 0 plane.  table: ((P + 3)² (nx + 2), 3) float64 (re, im, w) rows of
    :func:`mpirefine.geometry.symmetry._framed_table`; group (N, 3, 3).  The
    operators are summed in the group's order at every point, one kz plane per work
    item, so the result does not depend on the number of threads."""
    data = np.zeros((P, P, nx), np.complex128)
    weight = np.zeros((P, P, nx), np.float64)
    _get_kernel("symmetrize")(np.ascontiguousarray(table, dtype=np.float64),
                              np.ascontiguousarray(group, dtype=np.float64),
                              np.ascontiguousarray(lengths, dtype=np.int64), P, nx,
                              data.view(np.float64).reshape(P, P, nx, 2), weight)
    return data, weight


def _get_kernel(name: str):
    if not _kernels and numba is not None:
        for key, func, parallel in (("slices", _slices, True), ("insert", _insert, False),
                                    ("symmetrize", _symmetrize, True)):
            options = dict(parallel=parallel, fastmath=True, boundscheck=False)
            try:
                _kernels[key] = numba.njit(cache=True, **options)(func)
            except RuntimeError:  # no writable cache location: compile per process
                _kernels[key] = numba.njit(**options)(func)
        numba.set_num_threads(_threads(numba.config.NUMBA_NUM_THREADS))
    return _kernels.get(name)


def _threads(available: int) -> int:
    """This rank's share of the cores, as for BLAS (OMP_NUM_THREADS, which the
    launchers and :func:`mpirefine.ranks.limit_threads` set), at most ``available``."""
    try:
        wanted = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        wanted = available
    return max(1, min(available, wanted))


def _half_space_point_py(a00, a10, a01, a11, a02, a12, px, py, ox, oy, oz):
    """The point A^T (px, py, 0) + (ox, oy, oz) of a slice (padded grid units; the
    offset is A^T (0, 0, pz) on a curved Ewald sphere, 0 on the central plane),
    mirrored to x >= 0 (the stored half of the transform): (x, y, z, sign), sign -1
    where mirrored (the sample is then the conjugate).  The one copy of this step for
    both kernels."""
    x = a00 * px + a10 * py + ox
    y = a01 * px + a11 * py + oy
    z = a02 * px + a12 * py + oz
    s = np.float32(1) if x >= np.float32(0) else np.float32(-1)
    return x * s, y * s, z * s, s


_half_space_point = (numba.njit(inline="always", fastmath=True)(_half_space_point_py)
                     if numba is not None else _half_space_point_py)


def _slices(table, rot, kx, ky, pad, half, xmax, ymax, group, rows, stacked, power):
    """Trilinear samples of the framed half-space table (z, y, [re, im] × x).

    Frame coordinates: x from 0 (clipped to xmax = nx), y and z shifted by ``half``
    (P / 2 + 1, the leading zero plane) and clipped to [0, ymax = P + 2]; a point with
    x < 0 is read at -q and conjugated; rotation r goes to row rows[r] of the
    outputs.  Two passes per rotation: the corner indices and fractions of every
    frequency (no memory gathers, so the compiler vectorises it), then the gathers
    and weighted sums.
    """
    R, K = rot.shape[0], kx.shape[0]
    sy = table.shape[2]
    sz = table.shape[1] * sy
    flat = table.reshape(-1)
    zero, one = np.float32(0), np.float32(1)
    px, py = kx * pad, ky * pad
    for g in numba.prange((R + group - 1) // group):
        corner = np.empty(K, np.int64)
        fx, fy, fz = np.empty(K, np.float32), np.empty(K, np.float32), np.empty(K, np.float32)
        sign = np.empty(K, np.float32)
        for r in range(g * group, min(R, (g + 1) * group)):
            a00, a10 = rot[r, 0, 0], rot[r, 1, 0]
            a01, a11 = rot[r, 0, 1], rot[r, 1, 1]
            a02, a12 = rot[r, 0, 2], rot[r, 1, 2]
            row = rows[r]
            for k in range(K):
                x, y, z, s = _half_space_point(a00, a10, a01, a11, a02, a12, px[k], py[k],
                                               zero, zero, zero)
                x = min(x, xmax)
                y = min(max(y + half, zero), ymax)
                z = min(max(z + half, zero), ymax)
                xf, yf, zf = np.floor(x), np.floor(y), np.floor(z)
                corner[k] = np.int64(zf) * sz + np.int64(yf) * sy + 2 * np.int64(xf)
                fx[k], fy[k], fz[k], sign[k] = x - xf, y - yf, z - zf, s
            for k in range(K):
                a = corner[k]
                b, c = a + sy, a + sz
                d = c + sy
                gx, gy, gz = one - fx[k], one - fy[k], one - fz[k]
                w0, w1 = gz * gy * gx, gz * gy * fx[k]
                w2, w3 = gz * fy[k] * gx, gz * fy[k] * fx[k]
                w4, w5 = fz[k] * gy * gx, fz[k] * gy * fx[k]
                w6, w7 = fz[k] * fy[k] * gx, fz[k] * fy[k] * fx[k]
                re = (w0 * flat[a] + w1 * flat[a + 2] + w2 * flat[b] + w3 * flat[b + 2]
                      + w4 * flat[c] + w5 * flat[c + 2] + w6 * flat[d] + w7 * flat[d + 2])
                im = (w0 * flat[a + 1] + w1 * flat[a + 3] + w2 * flat[b + 1] + w3 * flat[b + 3]
                      + w4 * flat[c + 1] + w5 * flat[c + 3] + w6 * flat[d + 1]
                      + w7 * flat[d + 3]) * sign[k]
                stacked[row, k] = re
                stacked[row, K + k] = im
                power[row, k] = re * re + im * im


def _insert(data, weight, rot, vre, vim, vw, kx, ky, kz, pad):
    """Scatter of :func:`insert_slices`: data (P, P, 2 (P / 2 + 1)) float64 [re, im]
    pairs, weight (P, P, P / 2 + 1) float64; kz (1 or R, K) heights off the central
    plane; the stencil of :func:`mpirefine.fourier.project.trilinear_stencil`.  As in
    :func:`_slices`, the corners and fractions of a rotation's frequencies come first
    (vectorised), then the scatter."""
    P, nx = weight.shape[0], weight.shape[2]
    half = P // 2
    R, K = rot.shape[0], kx.shape[0]
    one = np.float32(1)
    px, py = kx * pad, ky * pad
    x0, y0, z0 = np.empty(K, np.int64), np.empty(K, np.int64), np.empty(K, np.int64)
    fx, fy, fz = np.empty(K, np.float32), np.empty(K, np.float32), np.empty(K, np.float32)
    sign = np.empty(K, np.float32)
    for r in range(R):
        a00, a10 = rot[r, 0, 0], rot[r, 1, 0]
        a01, a11 = rot[r, 0, 1], rot[r, 1, 1]
        a02, a12 = rot[r, 0, 2], rot[r, 1, 2]
        a20, a21, a22 = rot[r, 2, 0] * pad, rot[r, 2, 1] * pad, rot[r, 2, 2] * pad
        rz = r if kz.shape[0] == R else 0
        for k in range(K):
            pz = kz[rz, k]
            x, y, z, s = _half_space_point(a00, a10, a01, a11, a02, a12, px[k], py[k],
                                           a20 * pz, a21 * pz, a22 * pz)
            xf, yf, zf = np.floor(x), np.floor(y), np.floor(z)
            x0[k], y0[k], z0[k] = np.int64(xf), np.int64(yf) + half, np.int64(zf) + half
            fx[k], fy[k], fz[k], sign[k] = x - xf, y - yf, z - zf, s
        for k in range(K):
            re, im, w = vre[r, k], vim[r, k] * sign[k], vw[r, k]
            for dz in range(2):
                iz = z0[k] + dz
                if iz < 0 or iz >= P:
                    continue
                wz = fz[k] if dz else one - fz[k]
                for dy in range(2):
                    iy = y0[k] + dy
                    if iy < 0 or iy >= P:
                        continue
                    wzy = wz * (fy[k] if dy else one - fy[k])
                    for dx in range(2):
                        ix = x0[k] + dx
                        if ix >= nx:
                            continue
                        c = wzy * (fx[k] if dx else one - fx[k])
                        data[iz, iy, 2 * ix] += c * re
                        data[iz, iy, 2 * ix + 1] += c * im
                        weight[iz, iy, ix] += c * w


def _symmetrize(table, group, lengths, P, nx, out_d, out_w):
    """Kernel of :func:`symmetrize`: the steps of the array code
    (:func:`mpirefine.geometry.symmetry._trilinear_rows`) point by point: the rotated
    point, mirrored to x >= 0 (its sample then conjugated), clipped into the frame (x
    to [0, nx]; y and z shifted by P / 2 + 1 and clipped to [0, P + 1]), eight
    corners.  out_d (P, P, nx, 2) float64 [re, im]; out_w (P, P, nx)."""
    sy = nx + 2
    sz = (P + 3) * sy
    half = np.float64(P // 2 + 1)
    xmax, ymax = np.float64(nx), np.float64(P + 1)
    N = group.shape[0]
    for iz in numba.prange(P):
        kz = np.float64(iz - P // 2)
        for iy in range(P):
            ky = np.float64(iy - P // 2)
            for ix in range(lengths[iz, iy]):
                kx = np.float64(ix)
                tr, ti, tw = 0.0, 0.0, 0.0
                for n in range(N):
                    px = group[n, 0, 0] * kx + group[n, 0, 1] * ky + group[n, 0, 2] * kz
                    py = group[n, 1, 0] * kx + group[n, 1, 1] * ky + group[n, 1, 2] * kz
                    pz = group[n, 2, 0] * kx + group[n, 2, 1] * ky + group[n, 2, 2] * kz
                    s = -1.0 if px < 0.0 else 1.0
                    x = min(max(px * s, 0.0), xmax)
                    y = min(max(py * s + half, 0.0), ymax)
                    z = min(max(pz * s + half, 0.0), ymax)
                    x0, y0, z0 = np.floor(x), np.floor(y), np.floor(z)
                    fx, fy, fz = x - x0, y - y0, z - z0
                    base = np.int64(z0) * sz + np.int64(y0) * sy + np.int64(x0)
                    re, im, w = 0.0, 0.0, 0.0
                    for dz in range(2):
                        wz = fz if dz else 1.0 - fz
                        for dy in range(2):
                            wzy = wz * (fy if dy else 1.0 - fy)
                            a = base + dz * sz + dy * sy
                            c0, c1 = wzy * (1.0 - fx), wzy * fx
                            re += table[a, 0] * c0 + table[a + 1, 0] * c1
                            im += table[a, 1] * c0 + table[a + 1, 1] * c1
                            w += table[a, 2] * c0 + table[a + 1, 2] * c1
                    tr += re
                    ti += im * s
                    tw += w
                out_d[iz, iy, ix, 0] = tr
                out_d[iz, iy, ix, 1] = ti
                out_w[iz, iy, ix] = tw
