"""From raw particle images to what the search and the backprojector consume.

Each image batch is background-subtracted, windowed in real space (a soft
circle between the inner and outer window radii, as fractions of half the box),
Fourier transformed, and paired with its CTF on the same half-plane grid.  No
per-image intensity scaling is done: contrast differences between particles are
what the per-particle scale models.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpirefine.fourier.transforms import centered_rfft2, freq_grid_2d
from mpirefine.geometry.spheres import radial_distance
from mpirefine.physics.ctf import CTFParams, evaluate_ctf


@dataclass(frozen=True)
class ImagePrep:
    """How images are prepared.  Radii are fractions of half the box (0..1]."""

    box: int
    pixel_size_A: float
    window: bool = True
    window_inner: float = 0.85
    window_outer: float = 0.99

    def __post_init__(self):
        if not 0 < self.window_inner <= self.window_outer <= 1.0:
            raise ValueError(
                f"window radii must satisfy 0 < inner ({self.window_inner}) <= outer "
                f"({self.window_outer}) <= 1 (fractions of half the box)")


def real_space_window(prep: ImagePrep, xp):
    """(n, n) float32: 1 inside the inner radius, raised cosine to 0 at the outer."""
    n = prep.box
    r = radial_distance(n, xp, ndim=2) / (n / 2.0)
    lo, hi = prep.window_inner, prep.window_outer
    if hi <= lo:
        return (r <= lo).astype(xp.float32)
    t = xp.clip((r - lo) / (hi - lo), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(xp.pi * t)).astype(xp.float32)


def prepare_images(images, prep: ImagePrep, xp):
    """Windowed transforms, (B, n, n // 2 + 1) complex64 on ``xp``'s device.

    images: (B, n, n) real (host or device).  The mean of the ring outside the inner
    window radius is subtracted first, so the window does not cut a pedestal.
    """
    imgs = xp.asarray(images, dtype=xp.float32)
    if prep.window:
        w = real_space_window(prep, xp)
        ring = (radial_distance(prep.box, xp, ndim=2) >= prep.window_inner * prep.box / 2.0)
        background = (imgs * ring).sum(axis=(1, 2)) / max(int(ring.sum()), 1)
        imgs = (imgs - background[:, None, None]) * w
    return centered_rfft2(imgs).astype(xp.complex64)


def ctf_grid(params: CTFParams, prep: ImagePrep, xp):
    """CTF of each particle on the half-plane grid, (B, n, n // 2 + 1) float32."""
    ky, kx = freq_grid_2d(prep.box, xp)
    scale = 1.0 / (prep.box * prep.pixel_size_A)
    return evaluate_ctf(params, kx * scale, ky * scale)
