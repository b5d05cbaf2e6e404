"""Fourier-space filters for volumes and images (NumPy or CuPy, whichever holds the data).

Frequencies are in shells (cycles per box, docs/architecture.md §3).  A resolution d Å in a box of
n pixels of size p Å lies at shell n·p / d.
"""

from __future__ import annotations

import numpy as np

from mpirefine.backend import array_namespace
from mpirefine.errors import InputError
from mpirefine.fourier.transforms import (
    centered_irfft2,
    centered_irfft3,
    centered_rfft2,
    centered_rfft3,
    radius_2d,
    radius_3d,
)


def shell_resolution_A(n: int, pixel_size_A: float) -> np.ndarray:
    """Resolution in Å of shells 0 .. n // 2 (inf for shell 0)."""
    shells = np.arange(n // 2 + 1, dtype=float)
    with np.errstate(divide="ignore"):
        return n * pixel_size_A / shells


def resolution_to_shell(resolution_A: float, box: int, pixel_size_A: float) -> float:
    """Shell index (cycles per box, may be fractional) of a resolution in Å."""
    if resolution_A <= 0 or pixel_size_A <= 0:
        raise InputError(f"resolution ({resolution_A} Å) and pixel size ({pixel_size_A} Å) "
                         "must be positive")
    return box * pixel_size_A / resolution_A


def raised_cosine(radius, cutoff_shell: float, edge_width_shells: float = 2.0):
    """Low-pass profile on a grid of |k| (shells): RELION's soft edge.

    1 up to cutoff - width/2, a raised cosine through 0.5 at the cut-off, 0 from
    cutoff + width/2 on.  width 0 gives a hard edge (1 where |k| <= cutoff).
    Returns float32 with the shape and namespace of ``radius``.
    """
    xp = array_namespace(radius)
    if edge_width_shells <= 0:
        return (radius <= cutoff_shell).astype(xp.float32)
    t = xp.clip((radius - (cutoff_shell - 0.5 * edge_width_shells)) / edge_width_shells,
                0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(xp.pi * t)).astype(xp.float32)


def lowpass(volume, resolution_A: float, pixel_size_A: float, edge_width_shells: float = 2.0):
    """Low-pass a cubic volume (n, n, n) to ``resolution_A`` with a raised-cosine edge
    ``edge_width_shells`` wide (centred on the cut-off).  Returns float32, same namespace.
    """
    xp = array_namespace(volume)
    n = volume.shape[0]
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"lowpass needs a cubic volume, got shape {volume.shape}")
    cutoff = resolution_to_shell(resolution_A, n, pixel_size_A)
    f = centered_rfft3(xp.asarray(volume, dtype=xp.float32))
    f = f * raised_cosine(radius_3d(n, xp), cutoff, edge_width_shells)
    return centered_irfft3(f, n).astype(xp.float32)


def lowpass_images(images, resolution_A: float, pixel_size_A: float,
                   edge_width_shells: float = 2.0):
    """Low-pass square images (..., n, n) like :func:`lowpass`.  Returns float32."""
    xp = array_namespace(images)
    n = images.shape[-1]
    if images.ndim < 2 or images.shape[-2] != n:
        raise InputError(f"lowpass_images needs square images (..., n, n), got {images.shape}")
    cutoff = resolution_to_shell(resolution_A, n, pixel_size_A)
    f = centered_rfft2(xp.asarray(images, dtype=xp.float32))
    f = f * raised_cosine(radius_2d(n, xp), cutoff, edge_width_shells)
    return centered_irfft2(f, n).astype(xp.float32)


__all__ = ["resolution_to_shell", "raised_cosine", "lowpass", "lowpass_images"]
