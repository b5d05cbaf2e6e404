"""Real-space masks: soft spheres and the corner masking applied after reconstruction."""

from __future__ import annotations

from mpirefine.backend import array_namespace


def radial_distance(n: int, xp, ndim: int = 3):
    """Distance in voxels from the box centre (index n // 2), shape (n,) * ndim."""
    c = xp.arange(n, dtype=xp.float32) - n // 2
    if ndim == 2:
        return xp.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def soft_sphere(n: int, radius_px: float, width_px: float, xp, ndim: int = 3):
    """1 inside ``radius_px``, a raised-cosine fall to 0 over ``width_px``, 0 beyond."""
    r = radial_distance(n, xp, ndim)
    if width_px <= 0:
        return (r <= radius_px).astype(xp.float32)
    t = xp.clip((r - radius_px) / width_px, 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(xp.pi * t)).astype(xp.float32)


def mask_outside_sphere(volume, radius_px: float | None = None, width_px: float = 3.0):
    """Blend everything beyond a sphere into the mean background value (RELION's
    treatment of box corners after reconstruction, which would otherwise hold
    aliased noise).  radius defaults to half the box."""
    xp = array_namespace(volume)
    n = volume.shape[0]
    radius = n / 2.0 if radius_px is None else radius_px
    inside = soft_sphere(n, radius, width_px, xp, volume.ndim)
    outside = 1.0 - inside
    background = (volume * outside).sum() / xp.maximum(outside.sum(), 1e-12)
    return (volume * inside + background * outside).astype(volume.dtype)


def dynamic_mask(half_map, resolution_A: float, pixel_size_A: float, threshold: float,
                 near: float, far: float, absolute: bool = False):
    """The dynamic refinement mask of one half map (NumPy, host; once per iteration).

    Voxels above ``threshold`` × the map's maximum (of |map| when ``absolute``) form the
    core; the mask is 1 out to ``near`` × resolution from the core and falls to 0 with
    a raised-cosine edge at ``far`` × resolution (distances in Å, v5 convention).
    """
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    from mpirefine.backend import to_numpy

    v = to_numpy(half_map).astype(np.float64)
    if absolute:
        v = np.abs(v)
    peak = v.max()
    core = v > threshold * peak if peak > 0 else np.zeros(v.shape, bool)
    if not core.any():  # nothing above threshold: no masking rather than an empty mask
        return np.ones(v.shape, np.float32)
    dist_A = distance_transform_edt(~core) * pixel_size_A
    near_A, far_A = near * resolution_A, far * resolution_A
    t = np.clip((dist_A - near_A) / max(far_A - near_A, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)
