"""Fourier shell correlation between two maps and the resolution it implies."""

from __future__ import annotations

import numpy as np

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.transforms import (
    centered_rfft3,
    half_space_multiplicity,
    radius_3d,
    shell_sums,
)


def fsc_curve(map_a, map_b, mask=None) -> np.ndarray:
    """FSC per shell 0 .. n // 2 (cycles per box) between two (n, n, n) maps (NumPy result)."""
    xp = array_namespace(map_a, map_b)
    if map_a.shape != map_b.shape:
        raise ValueError(f"maps differ in shape: {map_a.shape} vs {map_b.shape}")
    if mask is not None:
        map_a = map_a * mask
        map_b = map_b * mask
    n = map_a.shape[0]
    fa = centered_rfft3(xp.asarray(map_a, xp.float64))
    fb = centered_rfft3(xp.asarray(map_b, xp.float64))
    radius = radius_3d(n, xp)
    mult = half_space_multiplicity(n, xp)
    n_shells = n // 2 + 1
    num = shell_sums((fa * xp.conj(fb)).real, radius, n_shells, weights=mult)
    pa = shell_sums((fa * xp.conj(fa)).real, radius, n_shells, weights=mult)
    pb = shell_sums((fb * xp.conj(fb)).real, radius, n_shells, weights=mult)
    curve = to_numpy(num / xp.sqrt(xp.maximum(pa * pb, 1e-300)))
    curve[0] = 1.0 if curve[0] > 0 else curve[0]
    return curve


def shell_resolution_A(n: int, pixel_size_A: float) -> np.ndarray:
    """Resolution in Å of shells 0 .. n // 2 (inf for shell 0)."""
    shells = np.arange(n // 2 + 1, dtype=float)
    with np.errstate(divide="ignore"):
        return n * pixel_size_A / shells


def crossing_shell(curve, threshold: float = 0.143) -> float:
    """Fractional shell where the curve first falls below ``threshold`` (linear
    interpolation between shells; the last shell if it never does)."""
    curve = np.asarray(curve, float)
    for s in range(1, len(curve)):
        if curve[s] < threshold:
            c0, c1 = curve[s - 1], curve[s]
            return (s - 1) + (c0 - threshold) / (c0 - c1) if c0 != c1 else float(s)
    return float(len(curve) - 1)


def resolution_A(curve, n: int, pixel_size_A: float, threshold: float = 0.143) -> float:
    """Resolution in Å where the FSC crosses ``threshold``."""
    shell = max(crossing_shell(curve, threshold), 1e-6)
    return n * pixel_size_A / shell
