"""Real-space masks of a map: its thresholded core, soft edges, the dynamic mask.

Spheres and corner masking are in :mod:`mpirefine.geometry.spheres`."""

from __future__ import annotations

import math

from mpirefine.backend import array_namespace


def threshold_core(volume, fraction: float, absolute: bool = False):
    """Boolean core of a map (NumPy, host): voxels above ``fraction`` × the map's
    maximum voxel value, of |map| when ``absolute``.

    The level is always taken from the signed maximum (CryoSPARC's rule, docs/architecture.md §6: a relative
    threshold of the largest voxel value), so ``absolute`` only changes which voxels
    are compared with it; negative pockets deeper than the level join the core.
    An all-False core is returned for a map with no positive voxel.
    """
    import numpy as np

    from mpirefine.backend import to_numpy

    v = to_numpy(volume).astype(np.float64)
    peak = v.max()
    if not peak > 0:
        return np.zeros(v.shape, bool)
    level = fraction * peak
    return (np.abs(v) if absolute else v) > level


def soft_dilate(core, pixel_size_A: float, near_A: float, far_A: float):
    """A soft mask (NumPy float32) grown from a boolean ``core``: 1 within ``near_A`` Å
    of the core, a raised-cosine fall to 0 at ``far_A`` Å, 0 beyond.

    Distances are Euclidean from the nearest core voxel centre, in Å.  An empty core
    gives an all-zero mask (callers decide what an empty core means).
    """
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    core = np.asarray(core, bool)
    if not core.any():
        return np.zeros(core.shape, np.float32)
    return soft_edge(distance_transform_edt(~core) * pixel_size_A, near_A, far_A)


def soft_edge(distance_A, near_A: float, far_A: float):
    """Raised cosine of a distance map (Å): 1 up to ``near_A``, 0 from ``far_A`` on
    (a hard edge at ``near_A`` when far <= near).  NumPy float32."""
    import numpy as np

    if far_A <= near_A:
        return (distance_A <= near_A).astype(np.float32)
    t = np.clip((distance_A - near_A) / (far_A - near_A), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


def dynamic_mask(half_map, resolution_A: float, pixel_size_A: float, threshold: float,
                 near: float, far: float, absolute: bool = False):
    """The dynamic refinement mask of one half map (float32, in the map's array
    namespace: on the device for a GPU rank; once per iteration).

    Seed, "Dynamic masking": voxels above ``threshold`` × the map's maximum voxel value
    (compared with |map| when ``absolute``) form the core; the mask is 1 out to
    ``near`` × resolution from the core and falls to 0 with a raised-cosine edge at
    ``far`` × resolution (distances in Å; v5 makes near/far multiples of the current
    resolution).  A map with nothing above the threshold gets no masking (all ones)
    rather than an empty mask, which would erase the reference.  Distances are those
    of :func:`soft_dilate` (Euclidean, to the nearest core voxel), found by
    :func:`dynamic_mask_rows` over the whole map: the same mask voxel for voxel.
    """
    xp = array_namespace(half_map)
    n = half_map.shape[0]
    peak = float(half_map.max())
    v = xp.abs(half_map) if absolute else half_map
    if not peak > 0 or not bool((v > threshold * peak).any()):
        return xp.ones(half_map.shape, xp.float32)
    return dynamic_mask_rows(half_map, 0, n, peak, resolution_A, pixel_size_A, threshold,
                             near, far, absolute)


def mask_halo_rows(resolution_A: float, pixel_size_A: float, near: float, far: float) -> int:
    """Rows of a map on either side of a slab that its dynamic mask depends on: the
    mask is 0 farther than max(near, far) × resolution from the core."""
    return int(math.ceil(max(near, far) * resolution_A / pixel_size_A)) + 1


def dynamic_mask_rows(rows, first: int, count: int, peak: float, resolution_A: float,
                      pixel_size_A: float, threshold: float, near: float, far: float,
                      absolute: bool = False):
    """Rows first .. first + count of a half map's dynamic mask (float32, [y, z, x]),
    equal voxel for voxel to :func:`soft_dilate` of the whole map's core (and so to
    :func:`dynamic_mask`, which calls this with the whole map).

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
