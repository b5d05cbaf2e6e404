"""Backprojection: trilinear insertion of weighted slices into half-space accumulators.

Insertion is the exact adjoint of :func:`mpirefine.fourier.project.extract_slices`
(same stencil, same mirroring, scatter instead of gather).  A rank inserts its
particles' CTF-weighted, noise-whitened transforms into ``data`` and their squared
CTF weights into ``weight``; reductions across ranks sum these two arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpirefine.backend import array_namespace, to_numpy
from mpirefine.fourier import compiled, kernels
from mpirefine.fourier.project import slice_coordinates, trilinear_stencil


@dataclass
class Accumulator:
    """Sums for one half map on the padded half-space grid.

    data: (P, P, P // 2 + 1) complex128 (Σ a C X / σ²); weight: same shape float64
    (Σ a² C² / σ²).  Double precision so that sums over 10⁵–10⁶ particles stay exact.
    """

    data: object
    weight: object
    n: int
    pad: int

    @classmethod
    def zeros(cls, n: int, pad: int, xp) -> "Accumulator":
        size = pad * n
        shape = (size, size, size // 2 + 1)
        return cls(xp.zeros(shape, xp.complex128), xp.zeros(shape, xp.float64), n, pad)

    @property
    def size(self) -> int:
        return self.pad * self.n

    def insert(self, rotations, values, weights, kx, ky, kz=None) -> None:
        """Add slices at A^T (kx, ky, 0).

        rotations: (R, 3, 3); values: (R, K) complex; weights: (R, K) real;
        kx, ky: (K,) frequencies in cycles per box of the unpadded images.
        kz: (K,) or (R, K) heights off the central plane, for curved Ewald spheres
        (physics/ewald.py); on a GPU these take the array code.
        NumPy accumulators use the compiled scatter of :mod:`mpirefine.fourier.compiled`
        when Numba is installed, CuPy ones the fused kernel of
        :mod:`mpirefine.fourier.kernels`; otherwise (``MPIREFINE_JIT=0``) an unbuffered
        scatter-add (``add.at``) of every sample's eight corners, in the order in
        which the kernel's threads add them when they run one after another.
        """
        xp = array_namespace(self.data)
        contiguous = self.data.flags.c_contiguous and self.weight.flags.c_contiguous
        if compiled.enabled(xp) and contiguous:
            compiled.insert_slices(self.data, self.weight, self.pad, rotations, values, weights,
                                   kx, ky, None if kz is None else to_numpy(kz))
            return
        if kernels.enabled(xp) and contiguous and kz is None:
            kernels.insert_slices(self.data, self.weight, self.pad, rotations, values, weights, kx, ky)
            return
        q = slice_coordinates(xp.asarray(rotations), xp.asarray(kx), xp.asarray(ky), self.pad, kz)
        index, corner_w, flip = trilinear_stencil(*q, self.size)
        values = xp.asarray(values, dtype=xp.complex64)
        values = xp.where(flip, xp.conj(values), values)
        idx = xp.moveaxis(index, 0, -1).ravel()          # sample by sample, corners inside
        cw = xp.moveaxis(corner_w, 0, -1)
        vr = (cw * values.real[..., None]).ravel()
        vi = (cw * values.imag[..., None]).ravel()
        vw = (cw * xp.asarray(weights, dtype=xp.float32)[..., None]).ravel()
        pairs = self.data.reshape(-1).view(xp.float64)   # [re, im] per voxel
        xp.add.at(pairs, 2 * idx, vr)
        xp.add.at(pairs, 2 * idx + 1, vi)
        xp.add.at(self.weight.reshape(-1), idx, vw)

    def add(self, other: "Accumulator") -> None:
        self.data += other.data
        self.weight += other.weight


def hermitian_complete(data, weight):
    """Fold the kx = 0 plane onto its Hermitian mates.

    In half-space storage the kx = 0 plane holds both k and -k; an insertion reaches
    only one of each pair, so the mate's share is added here (data as conjugate).
    Returns new (data, weight) arrays.
    """
    xp = array_namespace(data)
    size = data.shape[0]
    mate = (size - xp.arange(size)) % size
    data = data.copy()
    weight = weight.copy()
    d0 = data[:, :, 0]
    w0 = weight[:, :, 0]
    data[:, :, 0] = d0 + xp.conj(d0[mate][:, mate])
    weight[:, :, 0] = w0 + w0[mate][:, mate]
    return data, weight
