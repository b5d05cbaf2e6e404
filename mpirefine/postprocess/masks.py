"""Real-space masks of a map: its thresholded core, soft edges, the dynamic mask.

Spheres and corner masking are in :mod:`mpirefine.geometry.spheres`."""

from __future__ import annotations


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
    """The dynamic refinement mask of one half map (NumPy, host; once per iteration).

    Seed, "Dynamic masking": voxels above ``threshold`` × the map's maximum voxel value
    (compared with |map| when ``absolute``) form the core; the mask is 1 out to
    ``near`` × resolution from the core and falls to 0 with a raised-cosine edge at
    ``far`` × resolution (distances in Å; v5 makes near/far multiples of the current
    resolution).  A map with nothing above the threshold gets no masking (all ones)
    rather than an empty mask, which would erase the reference.
    """
    import numpy as np

    core = threshold_core(half_map, threshold, absolute)
    if not core.any():
        return np.ones(core.shape, np.float32)
    return soft_dilate(core, pixel_size_A, near * resolution_A, far * resolution_A)
