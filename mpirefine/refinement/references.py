"""The next iteration's alignment references from this iteration's half maps.

Below the GSFSC split resolution the two halves share one Fourier average, which
keeps them in the same orientation while leaving them independent at the finer
frequencies the FSC measures.  Each half is then weighted shell by shell by
sqrt(2·FSC / (1 + FSC)), the expected correlation of the full map with the truth,
so the reference carries each frequency in proportion to how much of it is signal.

:func:`next_references` works on whole maps (the root pair, one rank per half);
:func:`filter_reference_planes` (and postprocess.masks.dynamic_mask_rows for the
masks) do the same per slab for the distributed reconstruction (halfmaps.py), with
the same values voxel by voxel.
"""

from __future__ import annotations

from mpirefine.backend import array_namespace
from mpirefine.fourier.transforms import centered_irfft3, centered_rfft3, radius_3d
from mpirefine.postprocess.fsc import fsc_weight


def next_references(maps: dict, fsc, split_resolution_A: float,
                    pixel_size_A: float, halves=(0, 1)) -> dict:
    """{half: (n, n, n) float32} references for ``halves``, in the maps' array namespace
    (on the device for a GPU rank); both half maps are needed either way, for their
    shared low-resolution average."""
    xp = array_namespace(maps[0])
    n = maps[0].shape[0]
    fa = centered_rfft3(maps[0].astype(xp.float64))
    fb = centered_rfft3(maps[1].astype(xp.float64))
    r = radius_3d(n, xp)
    shared = r < split_shell(n, split_resolution_A, pixel_size_A)
    mean = 0.5 * (fa + fb)
    fa = xp.where(shared, mean, fa)
    fb = xp.where(shared, mean, fb)
    per_voxel = reference_weights(r, fsc, n)
    spectra = {0: fa, 1: fb}
    return {h: centered_irfft3(spectra[h] * per_voxel, n).astype(xp.float32) for h in halves}


def split_shell(n: int, split_resolution_A: float, pixel_size_A: float) -> float:
    """The GSFSC split resolution in cycles per box: shells below it are shared."""
    return n * pixel_size_A / split_resolution_A


def reference_weights(radius, fsc, n: int):
    """Per-voxel weight sqrt(2F/(1+F)) of the voxel's shell (``radius``: |k| as
    radius_3d gives it, any part of the grid), 0 beyond Nyquist, 1 at the origin."""
    xp = array_namespace(radius)
    w = xp.asarray(fsc_weight(fsc))
    idx = xp.minimum(xp.rint(radius).astype(xp.int64), len(w) - 1)
    per_voxel = xp.where(radius <= n // 2, w[idx], 0.0)
    per_voxel[radius < 1] = 1.0
    return per_voxel


def filter_reference_planes(spectrum, radius, low, shared_low, fsc, n: int):
    """One half's reference spectrum on some planes of the n-grid transform: the
    half map's ``spectrum`` (complex128, planes as ``radius``), its voxels ``low``
    (r below the split shell) replaced by ``shared_low`` (the two halves' average
    there, 0.5·(A + B)), weighted by :func:`reference_weights`."""
    out = spectrum.copy()
    out[low] = shared_low
    return out * reference_weights(radius, fsc, n)
