"""Centred FFTs, frequency grids and shells, shared by every Fourier module.

Conventions (docs/architecture.md §3):
- A real-space image or volume has its centre at index n // 2 along each axis.
- 2-D image transforms use Hermitian half-plane storage: shape (..., n, n // 2 + 1),
  indexed [ky, kx] with ky centred (row i ↔ ky = i - n // 2) and kx = 0 .. n // 2.
- 3-D volume transforms likewise: shape (P, P, P // 2 + 1), indexed [kz, ky, kx],
  kz and ky centred, kx = 0 .. P // 2.
- Frequencies are in cycles per box ("Fourier pixels"); divide by n · pixel size
  for 1/Å.  Forward transforms are unnormalised (NumPy's default), so the central
  slice of a volume's transform equals the transform of its projection.
"""

from __future__ import annotations

import numpy as np

from mpirefine.backend import array_namespace


def centered_rfft2(images):
    """(..., n, n) real → (..., n, n // 2 + 1) complex, ky centred."""
    xp = array_namespace(images)
    f = xp.fft.rfft2(xp.fft.ifftshift(images, axes=(-2, -1)))
    return xp.fft.fftshift(f, axes=-2)


def centered_irfft2(transforms, n: int):
    """Inverse of :func:`centered_rfft2` for images of side n."""
    xp = array_namespace(transforms)
    img = xp.fft.irfft2(xp.fft.ifftshift(transforms, axes=-2), s=(n, n))
    return xp.fft.fftshift(img, axes=(-2, -1))


def centered_fft2(images):
    """(..., n, n) real or complex → (..., n, n) complex full plane, ky and kx centred."""
    xp = array_namespace(images)
    f = xp.fft.fft2(xp.fft.ifftshift(images, axes=(-2, -1)))
    return xp.fft.fftshift(f, axes=(-2, -1))


def centered_ifft2(transforms):
    """Inverse of :func:`centered_fft2` (a complex image)."""
    xp = array_namespace(transforms)
    img = xp.fft.ifft2(xp.fft.ifftshift(transforms, axes=(-2, -1)))
    return xp.fft.fftshift(img, axes=(-2, -1))


def centered_rfft3(volume):
    """(P, P, P) real → (P, P, P // 2 + 1) complex, kz and ky centred."""
    xp = array_namespace(volume)
    f = xp.fft.rfftn(xp.fft.ifftshift(volume))
    return xp.fft.fftshift(f, axes=(0, 1))


def centered_irfft3(transform, n: int):
    """Inverse of :func:`centered_rfft3` for a volume of side n."""
    xp = array_namespace(transform)
    vol = xp.fft.irfftn(xp.fft.ifftshift(transform, axes=(0, 1)), s=(n, n, n), axes=(0, 1, 2))
    return xp.fft.fftshift(vol)


def freq_grid_2d(n: int, xp):
    """(ky, kx) frequency grids in cycles per box, each of shape (n, n // 2 + 1), float32."""
    ky = (xp.arange(n, dtype=xp.float32) - n // 2)[:, None]
    kx = xp.arange(n // 2 + 1, dtype=xp.float32)[None, :]
    return xp.broadcast_to(ky, (n, n // 2 + 1)), xp.broadcast_to(kx, (n, n // 2 + 1))


def freq_grid_3d(n: int, xp):
    """(kz, ky, kx) frequency grids in cycles per box, broadcastable to (n, n, n // 2 + 1)."""
    kz = (xp.arange(n, dtype=xp.float32) - n // 2)[:, None, None]
    ky = (xp.arange(n, dtype=xp.float32) - n // 2)[None, :, None]
    kx = xp.arange(n // 2 + 1, dtype=xp.float32)[None, None, :]
    return kz, ky, kx


def radius_2d(n: int, xp):
    """|k| in cycles per box on the half-plane grid, shape (n, n // 2 + 1)."""
    ky, kx = freq_grid_2d(n, xp)
    return xp.sqrt(kx * kx + ky * ky)


def insertion_frequencies(n: int, xp):
    """(kx, ky, index) of the half-plane pixels inside the Nyquist circle: the pixels a
    particle is inserted at and compared with its projection; ``index`` (int64, in
    ascending order) points into the flattened (n, n // 2 + 1) grid.  Found on the
    host, so that a device never reads a mask's size back."""
    ky, kx = freq_grid_2d(n, np)
    index = np.flatnonzero(radius_2d(n, np) <= n // 2)
    return xp.asarray(kx.ravel()[index]), xp.asarray(ky.ravel()[index]), xp.asarray(index)


def radius_3d(n: int, xp):
    """|k| in cycles per box on the half-space grid, shape (n, n, n // 2 + 1)."""
    kz, ky, kx = freq_grid_3d(n, xp)
    return xp.sqrt(kz * kz + ky * ky + kx * kx)


def half_space_multiplicity(n: int, xp):
    """How many full-space voxels each half-space column stands for (1 or 2), shape (n // 2 + 1,).

    Sums over the full transform equal sums over the half space weighted by this
    (columns kx = 0 and, for even n, kx = n / 2 are their own Hermitian mates).
    """
    m = xp.full(n // 2 + 1, 2.0, dtype=xp.float32)
    m[0] = 1.0
    if n % 2 == 0:
        m[-1] = 1.0
    return m


def shell_sums(values, radius, n_shells: int, weights=None):
    """Sum ``values`` over shells round(radius) = 0 .. n_shells - 1 (last axes match radius).

    Leading axes of ``values`` are kept: returns shape values.shape[:-radius.ndim] + (n_shells,).
    """
    xp = array_namespace(values, radius)
    shells = xp.rint(radius).astype(xp.int64).ravel()
    inside = shells < n_shells
    lead = values.shape[: values.ndim - radius.ndim]
    flat = values.reshape(lead + (-1,))
    if weights is not None:
        flat = flat * xp.broadcast_to(weights, radius.shape).ravel()
    flat = flat[..., inside]
    idx = shells[inside]
    out = xp.zeros(lead + (n_shells,), dtype=flat.dtype)
    if flat.ndim == 1:
        return xp.bincount(idx, weights=flat, minlength=n_shells)[:n_shells].astype(flat.dtype)
    for pos in _ndindex(lead):
        out[pos] = xp.bincount(idx, weights=flat[pos], minlength=n_shells)[:n_shells]
    return out


def _ndindex(shape):
    import itertools

    return itertools.product(*(range(s) for s in shape))


def double_box_frequencies(n: int, xp):
    """(kx, ky) of the (2n, n + 1) half-plane grid of a box twice the side of n, in
    cycles of the n-box (half steps): where an n-box projection's transform, sampled,
    is the transform of the projection zero-padded to 2n."""
    ky, kx = freq_grid_2d(2 * n, xp)
    return kx / 2.0, ky / 2.0


def cut_from_double_box(transforms, shifts_px, n: int):
    """Images (B, n, n) from their double-box transforms (B, 2n, n + 1): shifted by
    ``shifts_px`` (B, 2) px and the central n × n cut out, as a particle is cut from a
    micrograph (signal the CTF carries outside the box is lost, not wrapped round)."""
    big, lo = 2 * n, n // 2
    images = centered_irfft2(phase_shift_2d(transforms, shifts_px, big), big)
    return images[:, lo:lo + n, lo:lo + n]


def phase_shift_2d(transforms, shifts_px, n: int):
    """Shift images by (sx, sy) pixels in Fourier space: g(x) = f(x - s).

    transforms: (..., n, n // 2 + 1) centred half-plane; shifts_px: (..., 2) as (x, y).
    """
    xp = array_namespace(transforms)
    ky, kx = freq_grid_2d(n, xp)
    s = xp.asarray(shifts_px, dtype=xp.float32)
    sx = s[..., 0][..., None, None]
    sy = s[..., 1][..., None, None]
    phase = (-2.0 * np.pi / n) * (kx * sx + ky * sy)
    return transforms * (xp.cos(phase) + 1j * xp.sin(phase)).astype(xp.complex64)


def pad_volume(volume, size: int):
    """Zero-pad a cubic volume to side ``size``, keeping its centre at size // 2."""
    xp = array_namespace(volume)
    n = volume.shape[0]
    out = xp.zeros((size,) * 3, dtype=volume.dtype)
    o = size // 2 - n // 2
    out[o : o + n, o : o + n, o : o + n] = volume
    return out


def crop_volume(volume, size: int):
    """Central cube of side ``size`` (inverse of :func:`pad_volume`)."""
    n = volume.shape[0]
    o = n // 2 - size // 2
    return volume[o : o + size, o : o + size, o : o + size]


def gridding_correction(n: int, padded_size: int, xp):
    """sinc²(r / P) per axis on an n³ grid: the real-space footprint of trilinear
    interpolation on a grid of side P.  Divide by it before projecting and after
    reconstructing."""
    r = (xp.arange(n, dtype=xp.float64) - n // 2) / padded_size
    s = xp.sinc(r) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).astype(xp.float32)

