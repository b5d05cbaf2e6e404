"""Per-particle defocus: a 1-D search at the particle's pose against its half's reference.

For particle i at its best pose (rotation R, origin s, scale a) and a defocus offset
Δ added to both defocus U and V (the astigmatism and its angle stay as they are), the
score is the pose search's Gaussian log-likelihood restricted to a band of
frequencies, from ``min_resolution_A`` (20 Å by default, where the CTF hardly depends
on Δ) to the current resolution:

    L(Δ) = -Σ_k w_k |X_k - a C_k(Δ) P_k|² / 2  =  Σ_k w_k (a C_k(Δ) g_k - a² C_k(Δ)² h_k / 2) + const

with w = 1/σ² of the noise model, g = Re(conj(X) P), h = |P|² (X the shifted image, P
the reference's central slice). Offsets run over ±``range_A`` in steps that change the
CTF phase at the band's highest frequency by at most ``PHASE_STEP_RAD`` (π λ Δ k² is
the phase a defocus change Δ adds at frequency k), and the best one is refined by a
parabola through it and its neighbours.

The arithmetic runs in the images' array namespace (NumPy or CuPy).
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.project import extract_slices
from mpirefine.fourier.transforms import insertion_frequencies, phase_shift_2d
from mpirefine.physics.ctf import CTFParams, electron_wavelength_A, evaluate_ctf

PHASE_STEP_RAD = 0.25      # CTF phase change between neighbouring offsets at the band's edge
OFFSETS_PER_CHUNK = 8      # offsets scored at once (memory: chunk × particles × band pixels)


def defocus_offsets(range_A: float, resolution_A: float, voltage_kV: float) -> np.ndarray:
    """The offsets searched (Å): symmetric about 0, 2 m + 1 of them, m ≥ 4."""
    lam = float(electron_wavelength_A(voltage_kV))
    step = PHASE_STEP_RAD / (math.pi * lam / resolution_A ** 2)
    m = max(4, int(math.ceil(range_A / step)))
    return np.linspace(-range_A, range_A, 2 * m + 1)


def band_frequencies(n: int, pixel_size_A: float, min_resolution_A: float,
                     max_resolution_A: float, xp):
    """(kx, ky, flat index) of the half-plane pixels (inside Nyquist) whose resolution
    lies between ``min_resolution_A`` and ``max_resolution_A``."""
    kx, ky, inside = insertion_frequencies(n, xp)
    r = xp.sqrt(kx * kx + ky * ky)
    lo, hi = n * pixel_size_A / min_resolution_A, n * pixel_size_A / max_resolution_A
    band = (r >= lo) & (r <= hi)
    index = inside[band]
    return kx[band], ky[band], index


def search_defocus(vft, images_ft, params: CTFParams, rotations, shifts_px, scale, pixel_weights,
                   pixel_sizes_A, min_resolution_A: float, max_resolution_A: float,
                   range_A: float, gamma_offset=None) -> np.ndarray:
    """Best defocus offset (Å, NumPy (B,)) of each particle.

    vft: the half's reference (volume_ft); images_ft (B, n, n // 2 + 1) prepared images
    on the reference grid; params: their CTF parameters (B particles); rotations
    (B, 3, 3), shifts_px (B, 2), scale (B,): the poses the search found; pixel_weights
    (n, n // 2 + 1): 1/σ² (NoiseModel.pixel_weights); pixel_sizes_A (B,): each
    particle's effective pixel size on the reference grid (ImageGrid), which sets its
    CTF frequencies; gamma_offset: (B, n, n // 2 + 1) even-aberration phases added to
    each particle's γ (its optics group's), or None."""
    xp = array_namespace(images_ft)
    n = vft.n
    B = images_ft.shape[0]
    ref_px = float(np.min(pixel_sizes_A))
    kx, ky, index = band_frequencies(n, ref_px, min_resolution_A, max_resolution_A, xp)
    if B == 0 or kx.shape[0] == 0:
        return np.zeros(B)
    proj = extract_slices(vft, xp.asarray(rotations, dtype=xp.float32), kx, ky)
    x = phase_shift_2d(images_ft, shifts_px, n).reshape(B, -1)[:, index]
    w = pixel_weights.reshape(-1)[index][None]
    g = w * (x.real * proj.real + x.imag * proj.imag)
    h = w * (proj.real ** 2 + proj.imag ** 2)
    a = xp.asarray(np.asarray(scale, float), dtype=xp.float32)[:, None]
    even = None if gamma_offset is None else gamma_offset.reshape(B, -1)[:, index]
    offsets = defocus_offsets(range_A, max_resolution_A, float(np.max(params.voltage_kV)))
    scores = np.empty((B, len(offsets)))
    pixel = np.asarray(pixel_sizes_A, float).reshape(-1)
    sizes, which = np.unique(pixel, return_inverse=True)
    for start in range(0, len(offsets), OFFSETS_PER_CHUNK):
        chunk = offsets[start:start + OFFSETS_PER_CHUNK]
        for k, p in enumerate(sizes):
            rows = np.flatnonzero(which == k)
            shifted = _with_offsets(params.subset(rows), chunk, len(rows))
            r = xp.asarray(rows)
            off = None if even is None else xp.tile(even[r], (len(chunk), 1))   # offset-major
            c = evaluate_ctf(shifted, kx / (n * p), ky / (n * p),
                             gamma_offset=off).reshape(len(chunk), len(rows), -1)
            s = (a[r][None] * c * g[r][None] - 0.5 * (a[r][None] * c) ** 2 * h[r][None]).sum(axis=-1)
            scores[rows, start:start + len(chunk)] = to_numpy(s).T
    return _parabolic_peak(scores, offsets)


def _with_offsets(params: CTFParams, offsets: np.ndarray, m: int) -> CTFParams:
    """The m particles' parameters repeated for each offset (offset-major), the offset
    added to both defocus U and V."""
    values = {}
    for f in fields(params):
        v = getattr(params, f.name)
        if f.name in ("defocus_u_A", "defocus_v_A"):
            v = (np.broadcast_to(v, (m,))[None] + offsets[:, None]).ravel()
        elif v.shape[0] == m > 1:
            v = np.tile(v, len(offsets))
        values[f.name] = v
    return CTFParams(**values)


def _parabolic_peak(scores: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The offset of each row's maximum, refined by a parabola through it and its two
    neighbours (kept at the grid point at the ends of the range)."""
    best = np.argmax(scores, axis=1)
    out = offsets[best].astype(float)
    step = offsets[1] - offsets[0]
    inner = (best > 0) & (best < len(offsets) - 1)
    i = np.flatnonzero(inner)
    left, mid, right = scores[i, best[i] - 1], scores[i, best[i]], scores[i, best[i] + 1]
    curvature = left - 2 * mid + right
    ok = curvature < 0
    out[i[ok]] += step * 0.5 * (left[ok] - right[ok]) / curvature[ok]
    return out
