"""The white-or-coloured Gaussian noise model: a variance σ²(k) per frequency shell.

Variances are in the units of our unnormalised image transforms (|X|² per Fourier
pixel).  The likelihood and the backprojection weight each pixel by 1/σ²(k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.project import extract_slices
from mpirefine.fourier.transforms import (
    half_space_multiplicity,
    insertion_frequencies,
    phase_shift_2d,
    radius_2d,
    shell_sums,
)


@dataclass
class NoiseModel:
    """σ² per shell 0 .. n // 2 (NumPy, float64); beyond the last shell the last value."""

    sigma2: np.ndarray

    @property
    def n_shells(self) -> int:
        return len(self.sigma2)

    def pixel_weights(self, n: int, xp):
        """1/σ² on the half-plane grid, (n, n // 2 + 1) float32."""
        shells = xp.minimum(xp.rint(radius_2d(n, xp)).astype(xp.int64), self.n_shells - 1)
        inv = xp.asarray(1.0 / np.maximum(self.sigma2, 1e-30), dtype=xp.float32)
        return inv[shells]

    @classmethod
    def constant(cls, value: float, n: int) -> "NoiseModel":
        return cls(np.full(n // 2 + 1, float(value)))


def shell_power_sums(transforms, n: int):
    """(Σ |X|² per shell, pixel count per shell) over a batch, both NumPy (n // 2 + 1,).

    Half-plane pixels are counted with their Hermitian multiplicity so the means
    equal those over full transforms.
    """
    xp = array_namespace(transforms)
    r = radius_2d(n, xp)
    mult = half_space_multiplicity(n, xp)
    power = (transforms.real ** 2 + transforms.imag ** 2).sum(axis=0)
    n_shells = n // 2 + 1
    sums = shell_sums(power.astype(xp.float64), r, n_shells, weights=mult)
    counts = shell_sums(xp.full(r.shape, float(transforms.shape[0])), r, n_shells, weights=mult)
    return to_numpy(sums), to_numpy(counts)


def residual_power_sums(vft, images_ft, ctf, rotations, shifts_px, scale):
    """(Σ |X - a C P|² per shell, pixel count per shell) at the given poses, both NumPy
    (n // 2 + 1,), as :func:`shell_power_sums` counts them.

    vft: the reference (:func:`~mpirefine.fourier.project.volume_ft`); images_ft, ctf
    (B, n, n // 2 + 1) on its device; rotations (B, 3, 3), shifts_px (B, 2) the poses
    (RELION origins, as the search returns them); scale (B,) the particles' scales a.
    Pixels beyond the Nyquist circle are left out (the reference has none there).
    """
    xp = array_namespace(images_ft)
    n, B = vft.n, images_ft.shape[0]
    x, pred, inside = images_at_poses(vft, images_ft, rotations, shifts_px, scale)
    resid = xp.zeros((B, n * (n // 2 + 1)), xp.complex64)
    resid[:, inside] = x - ctf.reshape(B, -1)[:, inside] * pred
    return shell_power_sums(resid.reshape(B, n, n // 2 + 1), n)


def images_at_poses(vft, images_ft, rotations, shifts_px, scale):
    """(x, a P, inside): the images shifted to their poses and their scaled projections
    (no CTF), both (B, K) on the K half-plane pixels inside the Nyquist circle (the
    flat index ``inside``); arguments as for :func:`residual_power_sums`."""
    xp = array_namespace(images_ft)
    n, B = vft.n, images_ft.shape[0]
    kx, ky, inside = insertion_frequencies(n, xp)
    proj = extract_slices(vft, xp.asarray(rotations, dtype=xp.float32), kx, ky)
    x = phase_shift_2d(images_ft, shifts_px, n).reshape(B, -1)[:, inside]
    a = xp.asarray(np.asarray(scale, float), dtype=xp.float32)[:, None]
    return x, a * proj, inside


def model_from_sums(power_sums, counts, constant: bool) -> NoiseModel:
    """A noise model from accumulated residual (or image) power.

    constant=True gives one white level (the mean over all shells but the DC term);
    otherwise per-shell means, with empty shells filled from their neighbours.
    """
    power_sums = np.asarray(power_sums, float)
    counts = np.asarray(counts, float)
    if constant:
        level = power_sums[1:].sum() / max(counts[1:].sum(), 1.0)
        return NoiseModel(np.full(len(power_sums), level))
    sigma2 = power_sums / np.maximum(counts, 1.0)
    good = counts > 0
    sigma2 = np.interp(np.arange(len(sigma2)), np.flatnonzero(good), sigma2[good])
    # the DC shell holds one pixel per image and any residual offset: use shell 1
    sigma2[0] = sigma2[1]
    return NoiseModel(sigma2)
