"""Gaussian log-likelihood of particle images against projections, as dense products.

For particle b, rotation r and shift t (docs/architecture.md §4), up to terms constant in the pose,

    L(b, r, t) = a_b · G(b, t, r) − ½ a_b² · H(b, r)
    G(b, t, r) = Re Σ_k w_k C_bk X_bk S_tk conj(P_rk)
    H(b, r)    = Σ_k w_k C_bk² |P_rk|²

with w_k = m_k / σ²(|k|): σ²(s) = E|N_k|² is the noise power per Fourier pixel in
shell s (unnormalised FFT, as :func:`~mpirefine.fourier.transforms.centered_rfft2`),
and m_k ∈ {1, 2} counts each half-plane pixel for itself and its Hermitian mate, so
the half-plane sums equal full-plane sums and L = −½ Σ_full |X − a C P|² / σ² + const
is the exact log-likelihood of complex Gaussian noise.  S_tk = exp(−2πi k·t / n)
shifts the image by +t pixels (:func:`~mpirefine.fourier.transforms.phase_shift_2d`),
i.e. centres a particle whose origin is t.

G is one real GEMM: stack Y_btk = w_k C_bk X_bk S_tk and P_rk as [Re, Im] along k,
then G = [(B·T) × 2K] · [2K × R].  H is [B × K] · [K × R].  Both run in float32.

Frequencies are ordered by radius (:func:`search_frequencies`), so the first K_r
entries are exactly the pixels with |k| ≤ r: a lower cut-off is a prefix slice.
"""

from __future__ import annotations

import numpy as np

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier.project import stack_real
from mpirefine.fourier.transforms import freq_grid_2d, half_space_multiplicity


def search_frequencies(n: int, radius_px: float, xp=np):
    """Half-plane pixels with 0 < |k| ≤ radius_px, sorted by |k|.

    Returns (kx (K,), ky (K,) float32 in cycles per box, index (K,) int64 into the
    flattened (n, n // 2 + 1) grid, radius (K,) float32), in namespace ``xp``.
    The DC term is left out: it carries the image mean, which normalisation removes.
    """
    ky, kx = freq_grid_2d(n, np)
    kx, ky = kx.ravel(), ky.ravel()
    r = np.hypot(kx, ky)
    index = np.nonzero((r > 0.5) & (r <= radius_px))[0]
    index = index[np.argsort(r[index], kind="stable")]
    return (xp.asarray(kx[index]), xp.asarray(ky[index]), xp.asarray(index),
            xp.asarray(r[index].astype(np.float32)))


def count_within(radius, radius_px: float) -> int:
    """How many of the radius-sorted frequencies have |k| ≤ radius_px."""
    r = to_numpy(radius)
    return int(np.searchsorted(r, radius_px + 1e-6, side="right"))


def noise_weights(noise_var_shell, n: int, index):
    """w_k = m_k / σ²(round |k|) at the search frequencies, shape (K,) float32.

    noise_var_shell: (n // 2 + 1,) noise power E|N_k|² per shell (must be > 0 where used).
    """
    xp = array_namespace(index)
    ky, kx = freq_grid_2d(n, np)
    shell = np.rint(np.hypot(kx, ky)).astype(np.int64).ravel()
    mult = np.broadcast_to(half_space_multiplicity(n, np), kx.shape).ravel()
    idx = to_numpy(index)
    var = to_numpy(noise_var_shell).astype(np.float64)
    if var.shape[0] <= shell[idx].max(initial=0):
        raise ValueError(f"noise_var_shell has {var.shape[0]} shells; the search needs "
                         f"{shell[idx].max(initial=0) + 1}")
    v = var[shell[idx]]
    if not np.all(np.isfinite(v) & (v > 0)):
        raise ValueError("noise variance must be positive and finite at the search frequencies")
    return xp.asarray((mult[idx] / v).astype(np.float32))


def shift_ramps(kx, ky, shifts_px, n: int):
    """S_tk = exp(−2πi (kx t_x + ky t_y) / n), shape shifts_px.shape[:-1] + (K,), complex64.

    Multiplying a transform by S_t shifts the image by +t pixels, as phase_shift_2d does.
    """
    xp = array_namespace(kx)
    t = xp.asarray(shifts_px, dtype=xp.float32)
    phase = (-2.0 * np.pi / n) * (t[..., 0, None] * kx + t[..., 1, None] * ky)
    return (xp.cos(phase) + 1j * xp.sin(phase)).astype(xp.complex64)


def weighted_data(images_k, ctf_k, weights):
    """(w C X (B, K) complex64, w C² (B, K) float32) from images and CTFs at the search pixels."""
    xp = array_namespace(images_k)
    wc = weights * ctf_k
    return (wc * images_k).astype(xp.complex64), (wc * ctf_k).astype(xp.float32)


def score_shared(wcx, wc2, ramps, stacked, power):
    """G (B, T, R) and H (B, R) for rotations shared by all particles.

    wcx: (B, K) complex w C X; wc2: (B, K) float w C²; ramps: (T, K) or (B, T, K)
    complex; stacked (R, 2K), power (R, K) from :func:`prepare_projections`.
    G is one (B·T, 2K) × (2K, R) GEMM, H one (B, K) × (K, R) GEMM.
    """
    B, K = wcx.shape
    y = stack_real(wcx[:, None, :] * ramps)
    T = y.shape[1]
    g = (y.reshape(B * T, 2 * K) @ stacked.T).reshape(B, T, -1)
    return g, wc2 @ power.T


def score_batched(wcx, wc2, ramps, stacked, power):
    """G (B, T, C) and H (B, C) for per-particle rotations and shifts.

    wcx, wc2: (B, K); ramps: (B, T, K) complex; stacked (B, C, 2K), power (B, C, K)
    from :func:`prepare_projections`.  G is a batched GEMM (B, T, 2K) @ (B, 2K, C).
    """
    xp = array_namespace(wcx)
    y = stack_real(wcx[:, None, :] * ramps)
    g = xp.matmul(y, stacked.transpose(0, 2, 1))
    return g, xp.matmul(power, wc2[:, :, None])[..., 0]


def log_likelihood(g, h, scale):
    """L = a G − ½ a² H; g (B, T, C), h (B, C), scale (B,) → (B, T, C)."""
    a = scale[:, None, None]
    return a * g - 0.5 * a * a * h[:, None, :]


def profile_log_likelihood(g, h):
    """max over a ≥ 0 of a G − ½ a² H = max(G, 0)² / (2 H), with broadcasting (the scale
    fitted per pose, as a = G / H); g (B, T, C) or (B, C), h matching (B, 1, C) or (B, C).
    Masked poses (G = −inf) stay −inf."""
    xp = array_namespace(g)
    gp = xp.maximum(g, 0.0)
    out = gp * gp / (2.0 * xp.maximum(h, xp.finfo(h.dtype).tiny))
    return xp.where(g == -xp.inf, -xp.inf, out)
