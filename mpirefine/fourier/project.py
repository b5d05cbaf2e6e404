"""Projection: central slices of a 2×-padded 3-D transform, trilinear interpolation.

The volume transform is stored in half space (kx ≥ 0).  A sample at a point q with
qx < 0 is read as the complex conjugate at -q (the volume is real).  After that
flip every trilinear corner has x ≥ 0, so the half-space array suffices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier import compiled, kernels
from mpirefine.fourier.transforms import (
    centered_irfft2,
    centered_rfft3,
    freq_grid_2d,
    gridding_correction,
    pad_volume,
    phase_shift_2d,
)


@dataclass
class VolumeFT:
    """A volume's centred half-space transform on a padded grid.

    data: (P, P, P // 2 + 1) complex64, [kz, ky, kx], P = pad · n.
    n: the volume's side in voxels; pad: the padding factor.
    """

    data: object
    n: int
    pad: int
    _table: object = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return self.data.shape[0]

    def gather_table(self):
        """``data`` framed by zero planes (one before, three after, in y and z; two
        after in x), flattened, so that every trilinear corner of a point clipped to
        the frame is a valid index and corners outside the grid read 0.  Built once."""
        if self._table is None:
            xp = array_namespace(self.data)
            P, nx = self.size, self.data.shape[2]
            table = xp.zeros((P + 4, P + 4, nx + 2), xp.complex64)
            table[1:P + 1, 1:P + 1, :nx] = self.data
            self._table = table.ravel()
        return self._table


def volume_ft(volume, pad: int = 2, gridding: bool = True) -> VolumeFT:
    """Transform a real (n, n, n) volume for slice extraction.

    With ``gridding`` the volume is first divided by the sinc² footprint of trilinear
    interpolation, so that interpolated slices match exact projections.
    """
    xp = array_namespace(volume)
    n = volume.shape[0]
    size = pad * n
    vol = xp.asarray(volume, dtype=xp.float32)
    if gridding:
        vol = vol / gridding_correction(n, size, xp)
    data = centered_rfft3(pad_volume(vol, size)).astype(xp.complex64)
    return VolumeFT(data=data, n=n, pad=pad)


def slice_coordinates(rotations, kx, ky, pad: int, kz=None):
    """Padded-grid coordinates (qx, qy, qz) of A^T (kx, ky, kz) · pad.

    rotations: (R, 3, 3) RELION matrices A; kx, ky: (K,) frequencies in cycles per box;
    kz: None (the central plane) or (K,) or (R, K) heights off it (a curved Ewald
    sphere, physics/ewald.py).  Returns three (R, K) float32 arrays.
    """
    xp = array_namespace(rotations, kx)
    A = xp.asarray(rotations, dtype=xp.float32)
    kx = xp.asarray(kx, dtype=xp.float32)[None, :] * pad
    ky = xp.asarray(ky, dtype=xp.float32)[None, :] * pad
    # (A^T k)_i = A[0, i] kx + A[1, i] ky + A[2, i] kz
    q = tuple(A[:, 0, i, None] * kx + A[:, 1, i, None] * ky for i in range(3))
    if kz is None:
        return q
    kz = xp.asarray(kz, dtype=xp.float32) * pad
    kz = kz if kz.ndim == 2 else kz[None, :]
    return tuple(q[i] + A[:, 2, i, None] * kz for i in range(3))


def _mirror_to_half_space(qx, qy, qz):
    """Points with qx < 0 replaced by -q, where the stored half of the transform
    holds them: (qx, qy, qz, flip), the sample being the conjugate where ``flip``."""
    xp = array_namespace(qx)
    flip = qx < 0
    sign = xp.where(flip, xp.float32(-1), xp.float32(1))
    return qx * sign, qy * sign, qz * sign, flip


def trilinear_stencil(qx, qy, qz, size: int):
    """Flat indices and weights of the 8 trilinear corners in a half-space grid.

    Points with qx < 0 are mirrored to -q (``flip`` is True there: the value is the
    conjugate).  Corners outside the grid get weight 0 (and a safe index).
    Returns (index (8, ...) int64, weight (8, ...) float32, flip (...) bool).
    """
    xp = array_namespace(qx)
    qx, qy, qz, flip = _mirror_to_half_space(qx, qy, qz)
    half = size // 2
    nx = half + 1
    x0 = xp.floor(qx)
    y0 = xp.floor(qy)
    z0 = xp.floor(qz)
    fx, fy, fz = qx - x0, qy - y0, qz - z0
    x0 = x0.astype(xp.int64)
    y0 = y0.astype(xp.int64) + half
    z0 = z0.astype(xp.int64) + half
    indices, weights = [], []
    for dz in (0, 1):
        wz = fz if dz else 1.0 - fz
        iz = z0 + dz
        for dy in (0, 1):
            wy = fy if dy else 1.0 - fy
            iy = y0 + dy
            for dx in (0, 1):
                wx = fx if dx else 1.0 - fx
                ix = x0 + dx
                ok = (ix < nx) & (iy >= 0) & (iy < size) & (iz >= 0) & (iz < size)
                indices.append(xp.where(ok, (iz * size + iy) * nx + ix, 0))
                weights.append(xp.where(ok, wz * wy * wx, 0.0).astype(xp.float32))
    return xp.stack(indices), xp.stack(weights), flip


def stack_real(z):
    """[Re z, Im z] along the last axis: (..., K) complex → (..., 2K) float32."""
    xp = array_namespace(z)
    return xp.concatenate([z.real, z.imag], axis=-1).astype(xp.float32, copy=False)


def prepare_projections(projections):
    """(stacked (..., 2K) float32 [Re P, Im P], power (..., K) float32 |P|²) for scoring."""
    xp = array_namespace(projections)
    power = (projections.real ** 2 + projections.imag ** 2).astype(xp.float32)
    return stack_real(projections), power


def extract_slices(vft: VolumeFT, rotations, kx, ky, kz=None):
    """Central-slice samples of the volume at A^T (kx, ky, 0).

    rotations: (R, 3, 3); kx, ky: (K,) cycles per box of the *unpadded* images.
    Returns (R, K) complex64: the Fourier transform of each projection at (kx, ky).
    kz: (K,) or (R, K) heights off the central plane (cycles per box), for samples
    on a curved Ewald sphere (physics/ewald.py); these take the array code.

    The same operator as :func:`trilinear_stencil` with a gather (the adjoint of
    insertion), written for speed: blocks of about 10⁵ samples stay in cache, and
    the zero frame of :meth:`VolumeFT.gather_table` replaces per-corner bounds checks.
    NumPy arrays go through the compiled kernel when Numba is installed, CuPy arrays
    through the fused kernel of :mod:`mpirefine.fourier.kernels`.
    """
    xp = array_namespace(vft.data)
    stacked = None
    if kz is None and compiled.enabled(xp):
        stacked, _ = compiled.projection_tables(vft, to_numpy(rotations), to_numpy(kx), to_numpy(ky))
    elif kz is None and kernels.enabled(xp):
        stacked, _ = kernels.projection_tables(vft, rotations, kx, ky)
    if stacked is not None:
        K = stacked.shape[1] // 2
        return (stacked[:, :K] + 1j * stacked[:, K:]).astype(xp.complex64)
    rotations = xp.asarray(rotations, dtype=xp.float32)
    kx, ky = xp.asarray(kx, dtype=xp.float32), xp.asarray(ky, dtype=xp.float32)
    blocks = rotation_blocks(rotations.shape[0], kx.shape[0], xp)
    if kz is not None:
        kz = xp.asarray(kz, dtype=xp.float32)
    if len(blocks) == 1:
        return _extract_block(vft, rotations, kx, ky, kz)
    out = xp.empty((rotations.shape[0], kx.shape[0]), xp.complex64)
    for blk in blocks:
        out[blk] = _extract_block(vft, rotations[blk], kx, ky,
                                  kz[blk] if kz is not None and kz.ndim == 2 else kz)
    return out


_SAMPLES_PER_BLOCK = 1 << 17


# On a GPU a block is sized by the device's free memory instead: each sample costs
# about this many bytes of extraction temporaries (coordinates, corner indices and
# weights, the complex result), and a block may take this fraction of free memory.
_DEVICE_BYTES_PER_SAMPLE = 160
_DEVICE_MEMORY_FRACTION = 0.05
_DEVICE_MAX_SAMPLES = 1 << 24


def samples_per_block(xp) -> int:
    """Samples per extraction block: about 10⁵ on the CPU (the temporaries stay in
    cache); on a GPU as many as a small fraction of its free memory holds (each block
    is some 30 kernel launches, so small blocks would be launch-bound)."""
    if xp is None or getattr(xp, "cuda", None) is None:   # NumPy
        return _SAMPLES_PER_BLOCK
    free, _total = xp.cuda.runtime.memGetInfo()
    fit = int(free * _DEVICE_MEMORY_FRACTION) // _DEVICE_BYTES_PER_SAMPLE
    return max(_SAMPLES_PER_BLOCK, min(_DEVICE_MAX_SAMPLES, fit))


def rotation_blocks(n_rotations: int, n_freq: int, xp=None) -> list[slice]:
    """Slices of rotations whose slices hold :func:`samples_per_block` samples:
    extraction's temporaries then stay in cache (CPU) or fill a GPU's launches, and
    callers that post-process projections (the search) can do so block by block too."""
    step = max(1, samples_per_block(xp) // max(1, n_freq))
    return [slice(i, min(n_rotations, i + step)) for i in range(0, max(n_rotations, 1), step)]


def _extract_block(vft: VolumeFT, rotations, kx, ky, kz=None):
    xp = array_namespace(vft.data)
    table = vft.gather_table()
    P, nx = vft.size, vft.data.shape[2]
    stride_y, stride_z = nx + 2, (P + 4) * (nx + 2)
    qx, qy, qz, flip = _mirror_to_half_space(*slice_coordinates(rotations, kx, ky, vft.pad, kz))
    # frame coordinates: x from 0, y and z from 1 (the leading zero plane)
    x = xp.clip(qx, 0, nx)
    y = xp.clip(qy + (P // 2 + 1), 0, P + 2)
    z = xp.clip(qz + (P // 2 + 1), 0, P + 2)
    x0, y0, z0 = (xp.floor(c) for c in (x, y, z))
    fx, fy, fz = x - x0, y - y0, z - z0
    itype = xp.int32 if table.size < 2 ** 31 else xp.int64
    base = z0.astype(itype) * stride_z + y0.astype(itype) * stride_y + x0.astype(itype)
    wx, wy, wz = (1 - fx, fx), (1 - fy, fy), (1 - fz, fz)
    out = xp.zeros(qx.shape, xp.complex64)
    for dz in (0, 1):
        for dy in (0, 1):
            wzy = wz[dz] * wy[dy]
            offset = dz * stride_z + dy * stride_y
            for dx in (0, 1):
                out += table[base + (offset + dx)] * (wzy * wx[dx])
    return xp.where(flip, xp.conj(out), out)


def projection_tables(vft: VolumeFT, rotations, kx, ky, out=None, rows=None):
    """The pose search's scoring tables of the slices at ``rotations`` (R, 3, 3):
    (stacked (R, 2K) float32 [Re P, Im P], power (R, K) float32 |P|²), as
    :func:`prepare_projections` makes them from
    :func:`extract_slices`.  With ``out`` (a (stacked, power) pair) and ``rows``
    (R,), rotation r's tables go into row rows[r] of ``out`` (returned) instead.

    NumPy arrays go through the compiled kernel of :mod:`mpirefine.fourier.compiled`
    when Numba is installed, CuPy arrays through the fused kernel of
    :mod:`mpirefine.fourier.kernels` (one launch); otherwise (``MPIREFINE_JIT=0``) the
    tables are built block by block, so that each block's slices are still in cache
    when they are stacked.
    """
    xp = array_namespace(vft.data)
    contiguous = out is None or all(a.flags.c_contiguous for a in out)
    if compiled.enabled(xp) and contiguous:
        return compiled.projection_tables(vft, to_numpy(rotations), to_numpy(kx), to_numpy(ky),
                                          out, None if rows is None else to_numpy(rows))
    if kernels.enabled(xp) and contiguous:
        return kernels.projection_tables(vft, rotations, kx, ky, out, rows)
    R, K = rotations.shape[0], kx.shape[0]
    if out is None:
        out, rows = (xp.empty((R, 2 * K), xp.float32), xp.empty((R, K), xp.float32)), None
    for blk in rotation_blocks(R, K, xp):
        where = blk if rows is None else xp.asarray(rows[blk])
        out[0][where], out[1][where] = prepare_projections(extract_slices(vft, rotations[blk], kx, ky))
    return out


def project_transforms(vft: VolumeFT, rotations):
    """Full half-plane transforms of the projections, shape (R, n, n // 2 + 1)."""
    xp = array_namespace(vft.data)
    n = vft.n
    ky, kx = freq_grid_2d(n, xp)
    slices = extract_slices(vft, rotations, kx.ravel(), ky.ravel())
    return slices.reshape(-1, n, n // 2 + 1)


def project_images(vft: VolumeFT, rotations, shifts_px=None, ctf=None):
    """Real-space projections, shape (R, n, n), float32.

    shifts_px: (R, 2) image shifts (x, y) applied after projection; ctf: (R, n, n // 2 + 1)
    CTF values multiplied in Fourier space (both optional).
    """
    f = project_transforms(vft, rotations)
    if ctf is not None:
        f = f * ctf
    if shifts_px is not None:
        f = phase_shift_2d(f, shifts_px, vft.n)
    xp = array_namespace(f)
    return centered_irfft2(f, vft.n).astype(xp.float32)
