"""Half-map reconstruction from backprojection sums.

F(k) = D(k) / (W(k) + 1/τ²(k)), where D and W are the inserted sums and 1/τ² the
regulariser.  With noise-whitened data the spectral SNR of a half map in a shell is
SSNR = τ² · mean(W), and SSNR = FSC / (1 - FSC) for two half maps, so
1/τ² = mean_shell(W) / SSNR (RELION's "tau2" regularisation).  Before an FSC is
known a tiny regulariser (a fraction of the shell's mean weight) only guards
against division by zero.  The result is divided by the sinc² footprint of
trilinear insertion (gridding correction).
"""

from __future__ import annotations

import numpy as np

from mpirefine.backend import array_namespace
from mpirefine.fourier.backproject import hermitian_complete
from mpirefine.fourier.transforms import (
    centered_irfft3,
    crop_volume,
    gridding_correction,
    radius_3d,
    shell_sums,
)
from mpirefine.geometry.spheres import mask_outside_sphere

#: regulariser, as a fraction of the shell's mean weight, when no SSNR is known
UNREGULARISED_FRACTION = 1e-3


def ssnr_from_fsc(fsc, floor: float = 1e-3, ceiling: float = 0.999):
    """Half-map spectral SNR per shell from the FSC between half maps (NumPy)."""
    f = np.clip(np.asarray(fsc, float), floor, ceiling)
    return f / (1.0 - f)


def reconstruct(data, weight, n: int, pad: int, ssnr=None, complete: bool = True,
                mask_corners: bool = True):
    """Real-space map (n, n, n) float32 from accumulator arrays.

    data, weight: (P, P, P // 2 + 1) sums for one half map (see Accumulator).
    ssnr: per-shell spectral SNR indexed by shell in cycles per (unpadded) box,
    length ≥ n // 2 + 1; None means nearly unregularised.
    complete: fold the kx = 0 plane first (set False if already done).
    mask_corners: replace the box corners (beyond a sphere of half the box, soft
    edge) by their mean, as relion_reconstruct does, to suppress aliased noise there.
    Not for gold-standard half maps (see halfmaps.reconstruct_half_maps).
    """
    xp = array_namespace(data)
    size = pad * n
    if complete:
        data, weight = hermitian_complete(data, weight)
    radius = radius_3d(size, xp) / pad
    n_shells = n // 2 + 1
    shell = xp.rint(radius).astype(xp.int64)
    counts = shell_sums(xp.ones(radius.shape, xp.float64), radius, n_shells)
    mean_w = shell_sums(weight, radius, n_shells) / xp.maximum(counts, 1)
    if ssnr is None:
        reg = UNREGULARISED_FRACTION * mean_w
    else:
        s = xp.asarray(np.asarray(ssnr, float)[:n_shells])
        reg = mean_w / s
    # guard shells with no data at all
    reg = xp.where(reg > 0, reg, 1.0)
    reg_vox = xp.where(shell < n_shells, reg[xp.minimum(shell, n_shells - 1)], xp.inf)
    f = data / (weight + reg_vox)
    vol = crop_volume(centered_irfft3(f.astype(xp.complex64), size), n)
    vol = (vol / gridding_correction(n, size, xp)).astype(xp.float32)
    return mask_outside_sphere(vol) if mask_corners else vol
