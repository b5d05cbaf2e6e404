"""The next iteration's alignment references from this iteration's half maps.

Below the GSFSC split resolution the two halves share one Fourier average, which
keeps them in the same orientation while leaving them independent at the finer
frequencies the FSC measures.  Each half is then weighted shell by shell by
sqrt(2·FSC / (1 + FSC)), the expected correlation of the full map with the truth,
so the reference carries each frequency in proportion to how much of it is signal.
"""

from __future__ import annotations

import numpy as np

from mpirefine.fourier.transforms import centered_irfft3, centered_rfft3, radius_3d
from mpirefine.postprocess.fsc import fsc_weight


def next_references(maps: dict, fsc, split_resolution_A: float,
                    pixel_size_A: float, halves=(0, 1)) -> dict:
    """{half: (n, n, n) float32} references for ``halves`` (NumPy, host); both half
    maps are needed either way, for their shared low-resolution average."""
    n = maps[0].shape[0]
    fa = centered_rfft3(np.asarray(maps[0], np.float64))
    fb = centered_rfft3(np.asarray(maps[1], np.float64))
    r = radius_3d(n, np)
    split_shell = n * pixel_size_A / split_resolution_A
    shared = r < split_shell
    mean = 0.5 * (fa + fb)
    fa = np.where(shared, mean, fa)
    fb = np.where(shared, mean, fb)
    w = fsc_weight(fsc)
    idx = np.minimum(np.rint(r).astype(int), len(w) - 1)
    per_voxel = np.where(r <= n // 2, w[idx], 0.0)
    per_voxel[r < 1] = 1.0
    spectra = {0: fa, 1: fb}
    return {h: centered_irfft3(spectra[h] * per_voxel, n).astype(np.float32) for h in halves}
