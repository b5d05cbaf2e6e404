"""The next iteration's alignment references from this iteration's half maps.

Below the GSFSC split resolution the two halves share one Fourier average, which
keeps them in the same orientation while leaving them independent at the finer
frequencies the FSC measures.  Each half is then weighted shell by shell by
sqrt(2·FSC / (1 + FSC)), the expected correlation of the full map with the truth,
so the reference carries each frequency in proportion to how much of it is signal.

:func:`next_references` works on whole maps (the root pair, one rank per half);
:func:`filter_reference_planes` and :func:`dynamic_mask_rows` do the same per slab
for the distributed reconstruction (halfmaps.py), with the same values voxel by voxel.
"""

from __future__ import annotations

import math

import numpy as np

from mpirefine.backend import array_namespace
from mpirefine.fourier.transforms import centered_irfft3, centered_rfft3, radius_3d
from mpirefine.postprocess.fsc import fsc_weight


def next_references(maps: dict, fsc, split_resolution_A: float,
                    pixel_size_A: float, halves=(0, 1)) -> dict:
    """{half: (n, n, n) float32} references for ``halves`` (NumPy, host); both half
    maps are needed either way, for their shared low-resolution average."""
    n = maps[0].shape[0]
    fa = centered_rfft3(np.asarray(maps[0], np.float64))
    fb = centered_rfft3(np.asarray(maps[1], np.float64))
    r = radius_3d(n, np)
    shared = r < split_shell(n, split_resolution_A, pixel_size_A)
    mean = 0.5 * (fa + fb)
    fa = np.where(shared, mean, fa)
    fb = np.where(shared, mean, fb)
    per_voxel = reference_weights(r, fsc, n)
    spectra = {0: fa, 1: fb}
    return {h: centered_irfft3(spectra[h] * per_voxel, n).astype(np.float32) for h in halves}


def split_shell(n: int, split_resolution_A: float, pixel_size_A: float) -> float:
    """The GSFSC split resolution in cycles per box: shells below it are shared."""
    return n * pixel_size_A / split_resolution_A


def reference_weights(radius, fsc, n: int):
    """Per-voxel weight sqrt(2F/(1+F)) of the voxel's shell (``radius``: |k| as
    radius_3d gives it, any part of the grid), 0 beyond Nyquist, 1 at the origin."""
    xp = array_namespace(radius)
    w = xp.asarray(fsc_weight(fsc))
    idx = xp.minimum(xp.rint(radius).astype(xp.int64), len(w) - 1)
    per_voxel = xp.where(radius <= n // 2, w[idx], 0.0)
    per_voxel[radius < 1] = 1.0
    return per_voxel


def filter_reference_planes(spectrum, radius, low, shared_low, fsc, n: int):
    """One half's reference spectrum on some planes of the n-grid transform: the
    half map's ``spectrum`` (complex128, planes as ``radius``), its voxels ``low``
    (r below the split shell) replaced by ``shared_low`` (the two halves' average
    there, 0.5·(A + B)), weighted by :func:`reference_weights`."""
    out = spectrum.copy()
    out[low] = shared_low
    return out * reference_weights(radius, fsc, n)


# ----------------------------------------------------------------- dynamic mask by rows

def mask_halo_rows(resolution_A: float, pixel_size_A: float, near: float, far: float) -> int:
    """Rows of a map on either side of a slab that its dynamic mask depends on: the
    mask is 0 farther than max(near, far) × resolution from the core."""
    return int(math.ceil(max(near, far) * resolution_A / pixel_size_A)) + 1


def dynamic_mask_rows(rows, first: int, count: int, peak: float, resolution_A: float,
                      pixel_size_A: float, threshold: float, near: float, far: float,
                      absolute: bool = False):
    """Rows first .. first + count of a half map's dynamic mask (float32, [y, z, x]),
    equal voxel for voxel to postprocess.masks.dynamic_mask of the whole map.

    rows: the map's rows [y, z, x] from ``first`` - h to ``first + count`` + h (cut at
    the box's edges; h = :func:`mask_halo_rows`), as float32 or float64, NumPy or
    CuPy; ``first`` is counted within ``rows``. peak: the whole map's maximum voxel
    value. The distance to the core is exact wherever the mask is not 0, so the result
    needs no voxels farther than h rows away. A map whose core is empty everywhere
    gets all ones (the caller knows, from the whole map, whether that is so).
    """
    xp = array_namespace(rows)
    v = rows.astype(xp.float64)
    core = (xp.abs(v) if absolute else v) > threshold * peak
    near_A, far_A = near * resolution_A, far * resolution_A
    d2 = _squared_distance_to(core, mask_halo_rows(resolution_A, pixel_size_A, near, far),
                              first, count)
    distance_A = xp.sqrt(d2.astype(xp.float64)) * pixel_size_A
    if far_A <= near_A:
        return (distance_A <= near_A).astype(xp.float32)
    t = xp.clip((distance_A - near_A) / (far_A - near_A), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(xp.pi * t)).astype(xp.float32)


def _squared_distance_to(core, h: int, first: int = 0, count: int | None = None):
    """Squared Euclidean distance (voxels, float32) from the voxels of rows first ..
    first + count of ``core`` (axis 0) to its nearest True voxel; exact where that
    voxel is at most h away along every axis (so wherever the distance is at most h),
    +inf or a value above h² elsewhere. Three separable min-plus passes of width
    2h + 1: along axes 2 and 1 for every row, then along axis 0 for the rows asked."""
    xp = array_namespace(core)
    g = xp.where(core, xp.float32(0), xp.float32(xp.inf)).astype(xp.float32)
    for axis in (2, 1):
        out = g.copy()
        g_ax, out_ax = xp.moveaxis(g, axis, 0), xp.moveaxis(out, axis, 0)
        for d in range(1, min(h, g_ax.shape[0] - 1) + 1):
            step = xp.float32(d * d)
            xp.minimum(out_ax[:-d], g_ax[d:] + step, out=out_ax[:-d])
            xp.minimum(out_ax[d:], g_ax[:-d] + step, out=out_ax[d:])
        g = out
    rows = g.shape[0]
    count = rows - first if count is None else count
    out = g[first:first + count].copy()
    for d in range(1, h + 1):
        step = xp.float32(d * d)
        hi = min(rows, first + count + d)          # rows below: out[i] vs g[first + i + d]
        if hi > first + d:
            xp.minimum(out[:hi - first - d], g[first + d:hi] + step, out=out[:hi - first - d])
        lo = max(0, first - d)                     # rows above: out[i] vs g[first + i - d]
        if first + count - d > lo:
            i0 = lo - (first - d)
            xp.minimum(out[i0:count], g[lo:first + count - d] + step, out=out[i0:count])
    return out
