"""Fourier shell correlation between two maps and the resolution it implies."""

from __future__ import annotations

import numpy as np

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.transforms import (
    centered_irfft3,
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


def fsc_weight(fsc) -> np.ndarray:
    """sqrt(2·FSC / (1 + FSC)) per shell, 0 where the FSC is not positive: the expected
    correlation of the average of two half maps with the truth (NumPy)."""
    f = np.clip(np.asarray(fsc, float), 0.0, 1.0)
    return np.sqrt(2.0 * f / (1.0 + f))


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


# --------------------------------------------------------------- mask correction (Chen et al. 2013)

def randomization_shell(fsc_unmasked, threshold: float = 0.8) -> int:
    """First shell (>= 1) where the unmasked FSC falls below ``threshold``: phases are
    randomised from there on (relion_postprocess's --randomize_at_fsc rule, default 0.8).
    len(curve) when it never does, i.e. nothing is randomised."""
    curve = np.asarray(fsc_unmasked, float)
    below = np.nonzero(curve[1:] < threshold)[0]
    return int(below[0] + 1) if len(below) else len(curve)


def randomize_phases_beyond(volume, shell: int, rng) -> np.ndarray:
    """Copy of an (n, n, n) map whose Fourier phases in shells >= ``shell`` (round(|k|),
    cycles per box, the shells of :func:`fsc_curve`) are replaced by uniform random
    phases; amplitudes are kept.  NumPy float64.

    rng: a ``numpy.random.Generator`` (seeded by the caller, so the correction is
    reproducible).  The irfft keeps the result real where the random phases break the
    Hermitian symmetry of the kx = 0 plane.
    """
    v = np.asarray(to_numpy(volume), np.float64)
    n = v.shape[0]
    f = centered_rfft3(v)
    beyond = np.rint(radius_3d(n, np)) >= shell
    phases = rng.uniform(0.0, 2.0 * np.pi, size=int(beyond.sum()))
    f[beyond] = np.abs(f[beyond]) * np.exp(1j * phases)
    return centered_irfft3(f, n)


def corrected_fsc(fsc_masked, fsc_randomized_masked, shell: int, margin_shells: int = 2) -> np.ndarray:
    """Mask-corrected FSC: FSC_true = (FSC_t - FSC_n) / (1 - FSC_n) from shell
    ``shell + margin_shells`` on, FSC_t below it.

    FSC_t is the masked FSC of the half maps, FSC_n the masked FSC of the same maps with
    phases randomised beyond ``shell``.  The margin follows relion_postprocess (two
    shells), which keeps the correction away from the shells next to the randomisation
    edge, where the mask mixes randomised and intact shells and over-corrects.
    """
    t = np.asarray(fsc_masked, float)
    n_ = np.asarray(fsc_randomized_masked, float)
    out = t.copy()
    start = max(int(shell) + int(margin_shells), 1)
    denom = np.maximum(1.0 - n_[start:], 1e-6)
    out[start:] = (t[start:] - n_[start:]) / denom
    return out
