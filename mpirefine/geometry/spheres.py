"""Spherical shapes on the box: distance from the centre, soft spheres, and the
corner masking applied after reconstruction (array namespace of the caller)."""

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
