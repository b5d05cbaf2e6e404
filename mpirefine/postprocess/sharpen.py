"""Global B-factor sharpening from a Guinier plot (host NumPy, root rank, once a job).

Convention: a map blurred by a B-factor B (Å²) has its amplitudes multiplied by
exp(-B s² / 4), s = 1/d in 1/Å.  Its power |F|² then falls as exp(-B s² / 2), so the
Guinier plot ln⟨|F|²⟩ against s² has slope -B/2 and B = -2 · slope.  (RELION fits
ln⟨|F|⟩, slope -B/4, and reports 4 · slope = -B as its negative "sharpening" B-factor;
we report the positive blurring B and sharpen by exp(+B s² / 4).)

The fit runs between ``low_resolution_A`` (10 Å, as relion_postprocess --autob_lowres)
and the map's resolution, where the spectrum of a macromolecule is past its low-
resolution features and falls roughly exponentially in s².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpirefine.backend import to_numpy
from mpirefine.fourier.transforms import (
    centered_irfft3,
    centered_rfft3,
    half_space_multiplicity,
    radius_3d,
    shell_sums,
)
from mpirefine.postprocess.fsc import fsc_weight

#: fits with fewer shells than this are not trusted; the B-factor is then 0 (no sharpening)
MIN_FIT_SHELLS = 3


@dataclass(frozen=True)
class GuinierFit:
    """A straight line through ln⟨|F|²⟩ against s² (1/Å²) and the B-factor it implies."""

    bfactor_A2: float           # positive = the map is blurred; 0 when the fit was skipped
    slope_A2: float             # d ln⟨|F|²⟩ / d s², Å²
    intercept: float
    correlation: float          # Pearson r of the fitted points (close to -1 for a clean fit)
    n_shells: int               # shells used; < MIN_FIT_SHELLS means no fit
    low_resolution_A: float
    high_resolution_A: float


def _spatial_frequency_sq(n: int, pixel_size_A: float) -> np.ndarray:
    """s² = (|k| / (n · pixel size))² in 1/Å² on the half-space grid (n, n, n // 2 + 1)."""
    r = radius_3d(n, np).astype(np.float64)
    return (r / (n * pixel_size_A)) ** 2


def guinier_plot(volume, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(s², ln⟨|F|²⟩) per shell 0 .. n // 2: the mean s² of each shell's voxels (1/Å²)
    and the log of its mean power (-inf for an empty-power shell)."""
    v = np.asarray(to_numpy(volume), np.float64)
    n = v.shape[0]
    f = centered_rfft3(v)
    radius = radius_3d(n, np)
    mult = half_space_multiplicity(n, np)
    n_shells = n // 2 + 1
    count = shell_sums(np.ones(radius.shape), radius, n_shells, weights=mult)
    power = shell_sums((f * np.conj(f)).real, radius, n_shells, weights=mult)
    s2 = shell_sums(_spatial_frequency_sq(n, pixel_size_A), radius, n_shells, weights=mult)
    count = np.maximum(count, 1.0)
    with np.errstate(divide="ignore"):
        return s2 / count, np.log(power / count)


def fit_bfactor(volume, pixel_size_A: float, resolution_A: float,
                low_resolution_A: float = 10.0) -> GuinierFit:
    """Fit the Guinier plot of ``volume`` ((n, n, n), Å units via ``pixel_size_A``)
    between ``low_resolution_A`` and ``resolution_A`` (shells wholly inside it);
    B = -2 · slope (Å²).

    Fewer than MIN_FIT_SHELLS usable shells in that range (a map at 10 Å or worse,
    or a tiny box) gives B = 0: no sharpening rather than a guess.
    """
    s2, ln_power = guinier_plot(volume, pixel_size_A)
    n = volume.shape[0]
    shells = np.arange(len(s2), dtype=float)
    lo_shell = n * pixel_size_A / low_resolution_A
    hi_shell = n * pixel_size_A / resolution_A
    # a shell holds voxels out to half a shell beyond its centre: keep only shells lying
    # wholly inside the resolution, since a map cut off there (the GSFSC-filtered map)
    # has a partly emptied top shell that would bend the line down
    use = (shells >= lo_shell - 1e-9) & (shells + 0.5 <= hi_shell + 1e-9) & np.isfinite(ln_power)
    use[0] = False
    if use.sum() < MIN_FIT_SHELLS:
        return GuinierFit(0.0, 0.0, 0.0, 0.0, int(use.sum()), low_resolution_A, resolution_A)
    x, y = s2[use], ln_power[use]
    slope, intercept = np.polyfit(x, y, 1)
    corr = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else 0.0
    return GuinierFit(float(-2.0 * slope), float(slope), float(intercept), corr, int(use.sum()),
                      low_resolution_A, resolution_A)


def apply_bfactor(volume, bfactor_A2: float, pixel_size_A: float) -> np.ndarray:
    """Multiply the amplitudes of ``volume`` by exp(-B s² / 4): B > 0 blurs, B < 0
    sharpens.  No band limit; NumPy float32 (n, n, n)."""
    v = np.asarray(to_numpy(volume), np.float64)
    n = v.shape[0]
    f = centered_rfft3(v) * np.exp(-0.25 * bfactor_A2 * _spatial_frequency_sq(n, pixel_size_A))
    return centered_irfft3(f, n).astype(np.float32)


def sharpen(volume, bfactor_A2: float, resolution_A: float, pixel_size_A: float) -> np.ndarray:
    """Undo a blurring B-factor up to ``resolution_A``: amplitudes times exp(+B s² / 4)
    at s <= 1 / resolution, zero beyond (the boost would otherwise amplify noise without
    bound).  NumPy float32 (n, n, n)."""
    v = np.asarray(to_numpy(volume), np.float64)
    n = v.shape[0]
    s2 = _spatial_frequency_sq(n, pixel_size_A)
    keep = s2 <= (1.0 / resolution_A) ** 2 * (1 + 1e-9)
    f = centered_rfft3(v) * np.where(keep, np.exp(0.25 * bfactor_A2 * s2), 0.0)
    return centered_irfft3(f, n).astype(np.float32)


def weighted_guinier(average, fsc, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(s², ln⟨|F|⟩²·… ) of the FSC-weighted average, as relion_postprocess plots it:
    the average of the half maps times sqrt(2 FSC / (1 + FSC)) per shell (0 where the
    FSC is not positive), then ln of the shell-mean amplitude, doubled so that it is
    on the ln⟨|F|²⟩ scale of :func:`guinier_plot` (slope -B/2).  -inf where the
    weight is 0."""
    v = np.asarray(to_numpy(average), np.float64)
    n = v.shape[0]
    weight = fsc_weight(np.asarray(fsc, float)[: n // 2 + 1])
    radius = radius_3d(n, np)
    shell = np.minimum(np.rint(radius).astype(int), n // 2)
    amplitude = np.abs(centered_rfft3(v)) * weight[shell]
    mult = half_space_multiplicity(n, np)
    n_shells = n // 2 + 1
    count = np.maximum(shell_sums(np.ones(radius.shape), radius, n_shells, weights=mult), 1.0)
    mean_amp = shell_sums(amplitude, radius, n_shells, weights=mult) / count
    s2 = shell_sums(_spatial_frequency_sq(n, pixel_size_A), radius, n_shells, weights=mult) / count
    with np.errstate(divide="ignore"):
        return s2, 2.0 * np.log(mean_amp)


def relion_bfactor(average, fsc, pixel_size_A: float, resolution_A: float | None,
                   low_resolution_A: float = 10.0) -> tuple[GuinierFit, np.ndarray, np.ndarray]:
    """B-factor as relion_postprocess --auto_bfac estimates it: a line through
    :func:`weighted_guinier` from ``low_resolution_A`` to ``resolution_A`` (RELION's
    --autob_highres), every shell whose centre lies in that range.  With
    ``resolution_A`` None the fit runs out to the last shell before the FSC first
    drops to zero (RELION's default --autob_highres 0); we use the resolution, since
    the shells past it are noise whose FSC-weighted amplitudes moved B by 30 % between
    two phase randomisations of the same half maps.  Returns (fit, s², curve)."""
    s2, curve = weighted_guinier(average, fsc, pixel_size_A)
    n = np.asarray(average).shape[0]
    shells = np.arange(len(s2))
    lo_shell = n * pixel_size_A / low_resolution_A
    f = np.asarray(fsc, float)[: len(s2)]
    beyond = shells[(shells >= lo_shell - 1e-9) & (f <= 0)]
    last = beyond[0] - 1 if len(beyond) else shells[-1]
    if resolution_A is not None:
        last = min(last, int(np.floor(n * pixel_size_A / resolution_A + 1e-9)))
    use = (shells >= lo_shell - 1e-9) & (shells <= last) & np.isfinite(curve)
    high_A = n * pixel_size_A / max(last, 1)
    if use.sum() < MIN_FIT_SHELLS:
        return (GuinierFit(0.0, 0.0, 0.0, 0.0, int(use.sum()), low_resolution_A, high_A),
                s2, curve)
    slope, intercept = np.polyfit(s2[use], curve[use], 1)
    corr = float(np.corrcoef(s2[use], curve[use])[0, 1])
    return (GuinierFit(float(-2.0 * slope), float(slope), float(intercept), corr,
                       int(use.sum()), low_resolution_A, high_A), s2, curve)


def sharpen_filtered_map(filtered_map, average, fsc, resolution_A: float, pixel_size_A: float,
                         low_resolution_A: float = 10.0):
    """The map_sharp of a job: B from :func:`relion_bfactor` on the average of the
    unregularised half maps and the final FSC, applied to the FSC-filtered map up to
    the resolution.  Returns (map, fit, s², fitted curve)."""
    fit, s2, curve = relion_bfactor(average, fsc, pixel_size_A, resolution_A, low_resolution_A)
    # (resolution_A given: the fit stops at the resolution, see relion_bfactor)
    return sharpen(filtered_map, fit.bfactor_A2, resolution_A, pixel_size_A), fit, s2, curve


__all__ = ["GuinierFit", "guinier_plot", "fit_bfactor", "apply_bfactor", "sharpen",
           "sharpen_filtered_map", "weighted_guinier", "relion_bfactor", "MIN_FIT_SHELLS"]
