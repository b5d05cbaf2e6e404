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
    freq_grid_3d,
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


# ------------------------------------------------------------------ distributed: slabs
#
# The same reconstruction cut into ``parts`` slabs, one per rank of a half group
# (docs/parallel.md, "Distributed reconstruction"). Only the voxels that reconstruct()
# can use travel and are divided: those of the padded half-space grid whose shell
# rint(|k| / pad) is below n // 2 + 1 (the "sphere"); in each row (kz, ky) they are a
# prefix kx = 0 .. L(kz, ky) - 1. Slab s holds
#
#   the sphere voxels of padded planes kz ∈ z_edges[s] .. z_edges[s+1] (reduction,
#     division), balanced by voxel count;
#   rows y ∈ y_edges[s] .. y_edges[s+1] of the n³ map, stored [y, z, x] (real space);
#   planes kz ∈ k_edges[s] .. k_edges[s+1] of the map's n-grid transform (FSC, filters).
#
# A 3-D FFT is two local steps with an all-to-all between them (the "transpose"); the
# functions below are the local steps, the caller moves the blocks (halfmaps.py).


class SlabLayout:
    """Which part of every grid slab s of ``parts`` holds (host NumPy; see above)."""

    def __init__(self, n: int, pad: int, parts: int):
        self.n, self.pad, self.parts = int(n), int(pad), int(parts)
        self.P = self.pad * self.n
        self.nx = self.P // 2 + 1
        self.n_shells = self.n // 2 + 1
        self.row_length = sphere_row_lengths(self.n, self.pad)          # (P, P)
        plane_voxels = self.row_length.sum(axis=1)
        self.z_edges = balanced_edges(plane_voxels, self.parts)
        self.y_edges = balanced_edges(np.ones(self.n), self.parts)
        self.k_edges = self.y_edges
        cumulative = np.concatenate([[0], np.cumsum(plane_voxels)])
        self.voxels = np.diff(cumulative[self.z_edges])                # per slab

    def planes(self, s: int) -> tuple[int, int]:
        return int(self.z_edges[s]), int(self.z_edges[s + 1])

    def rows(self, s: int) -> tuple[int, int]:
        return int(self.y_edges[s]), int(self.y_edges[s + 1])

    def kplanes(self, s: int) -> tuple[int, int]:
        return int(self.k_edges[s]), int(self.k_edges[s + 1])

    def in_sphere(self, z0: int, z1: int, xp):
        """(z1 - z0, P, nx) bool: the sphere voxels of padded planes z0 .. z1."""
        length = xp.asarray(self.row_length[z0:z1])
        return xp.arange(self.nx)[None, None, :] < length[:, :, None]


_ROW_LENGTHS: dict = {}


def sphere_row_lengths(n: int, pad: int) -> np.ndarray:
    """(P, P) int64: how many voxels kx = 0, 1, ... of each padded half-space row
    (kz, ky) lie in a shell below n // 2 + 1, with reconstruct()'s own float32 radii
    (so the sets agree voxel for voxel). Cached per (n, pad)."""
    key = (int(n), int(pad))
    if key not in _ROW_LENGTHS:
        P = pad * n
        n_shells = n // 2 + 1
        kz, ky, kx = freq_grid_3d(P, np)
        out = np.empty((P, P), np.int64)
        for z0 in range(0, P, 16):
            z = kz[z0:z0 + 16]
            radius = np.sqrt(z * z + ky * ky + kx * kx) / pad
            out[z0:z0 + 16] = (np.rint(radius).astype(np.int64) < n_shells).sum(axis=2)
        _ROW_LENGTHS[key] = out
    return _ROW_LENGTHS[key]


def balanced_edges(weights, parts: int) -> np.ndarray:
    """parts + 1 edges cutting items 0 .. len(weights) into contiguous runs of about
    equal total weight (a run may be empty when there are more parts than items)."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(weights, float))])
    targets = cumulative[-1] * np.arange(parts + 1) / parts
    edges = np.searchsorted(cumulative, targets, side="left")
    edges[0], edges[-1] = 0, len(weights)
    return np.maximum.accumulate(np.minimum(edges, len(weights)))


def fold_kx0(data, weight) -> None:
    """In place: the kx = 0 plane folded onto its Hermitian mates, as
    :func:`~mpirefine.fourier.backproject.hermitian_complete` does on a copy."""
    xp = array_namespace(data)
    size = data.shape[0]
    mate = (size - xp.arange(size)) % size
    d0 = data[:, :, 0]
    w0 = weight[:, :, 0]
    data[:, :, 0] = d0 + xp.conj(d0[mate][:, mate])
    weight[:, :, 0] = w0 + w0[mate][:, mate]


def pack_sphere(data, weight, layout: SlabLayout, chunk: int = 16):
    """(V, 3) float32 [Re D, Im D, W] of every sphere voxel of whole accumulator arrays
    (P, P, nx), plane by plane in C order, so that slab s is rows
    sum(voxels[:s]) .. sum(voxels[:s + 1])."""
    xp = array_namespace(data)
    out = xp.empty((int(layout.voxels.sum()), 3), xp.float32)
    pos = 0
    for z0 in range(0, layout.P, chunk):
        z1 = min(layout.P, z0 + chunk)
        inside = layout.in_sphere(z0, z1, xp)
        d = data[z0:z1][inside]
        count = d.shape[0]
        out[pos:pos + count, 0] = d.real
        out[pos:pos + count, 1] = d.imag
        out[pos:pos + count, 2] = weight[z0:z1][inside]
        pos += count
    return out


def sphere_shells(layout: SlabLayout, s: int, xp):
    """Shell (int64) of each sphere voxel of padded slab s, in packing order."""
    z0, z1 = layout.planes(s)
    kz, ky, kx = freq_grid_3d(layout.P, xp)
    radius = xp.sqrt(kz[z0:z1] * kz[z0:z1] + ky * ky + kx * kx) / layout.pad
    return xp.rint(radius[layout.in_sphere(z0, z1, xp)]).astype(xp.int64)


def shell_weight_sums(packed, shells, n_shells: int):
    """(2, n_shells) float64: Σ W and the number of voxels per shell over a slab's
    packed sums (add the slabs' together for the whole grid's)."""
    xp = array_namespace(packed)
    w = xp.bincount(shells, weights=packed[:, 2], minlength=n_shells)[:n_shells]
    c = xp.bincount(shells, minlength=n_shells)[:n_shells].astype(xp.float64)
    return xp.stack([w.astype(xp.float64), c])


def slab_regulariser(weight_sums, ssnr=None) -> np.ndarray:
    """1/τ² per shell (NumPy float64) from the whole grid's :func:`shell_weight_sums`,
    as reconstruct() makes it (nearly none without an SSNR)."""
    from mpirefine.backend import to_numpy

    sums = to_numpy(weight_sums)
    mean_w = sums[0] / np.maximum(sums[1], 1)
    if ssnr is None:
        reg = UNREGULARISED_FRACTION * mean_w
    else:
        reg = mean_w / np.asarray(ssnr, float)[:len(mean_w)]
    return np.where(reg > 0, reg, 1.0)


def divide_sphere(packed, shells, regulariser):
    """D / (W + 1/τ²) of a slab's packed sums: complex64 per sphere voxel."""
    xp = array_namespace(packed)
    data = packed[:, 0].astype(xp.float64) + 1j * packed[:, 1].astype(xp.float64)
    reg = xp.asarray(regulariser)[shells]
    return (data / (packed[:, 2].astype(xp.float64) + reg)).astype(xp.complex64)


def _crop_index(n: int, size: int, xp):
    """Uncentred indices, along an axis of length ``size``, of the n centred samples
    that crop_volume keeps after an fftshift: (i - n // 2) mod size for i < n."""
    return (xp.arange(n) - n // 2) % size


def padded_inverse_rows(values, layout: SlabLayout, s: int):
    """First step of the inverse FFT of padded slab s: its divided sphere voxels
    (complex64) → (n, nz, nx) complex64 [y, kz, kx], the ky transform done and only the
    n rows y that the crop keeps; rows y_edges[t] .. y_edges[t+1] go to slab t."""
    xp = array_namespace(values)
    z0, z1 = layout.planes(s)
    dense = xp.zeros((z1 - z0, layout.P, layout.nx), xp.complex64)
    dense[layout.in_sphere(z0, z1, xp)] = values
    rows = xp.fft.ifft(xp.fft.ifftshift(dense, axes=1), axis=1)
    rows = rows[:, _crop_index(layout.n, layout.P, xp), :]
    return xp.ascontiguousarray(rows.transpose(1, 0, 2))


def padded_inverse_columns(blocks, layout: SlabLayout, s: int):
    """Second step for real-space slab s: ``blocks`` (flat complex64, from every slab t
    in order, each (ny, nz_t, nx)) → (ny, n, n) float32 rows [y, z, x] of the cropped,
    gridding-corrected map (reconstruct()'s result, rows y_edges[s] .. y_edges[s+1])."""
    xp = array_namespace(blocks)
    n, P, nx = layout.n, layout.P, layout.nx
    y0, y1 = layout.rows(s)
    ny = y1 - y0
    full = xp.empty((ny, P, nx), xp.complex64)
    pos = 0
    for t in range(layout.parts):
        z0, z1 = layout.planes(t)
        size = ny * (z1 - z0) * nx
        full[:, z0:z1, :] = blocks[pos:pos + size].reshape(ny, z1 - z0, nx)
        pos += size
    cols = xp.fft.ifft(xp.fft.ifftshift(full, axes=1), axis=1)[:, _crop_index(n, P, xp), :]
    vol = xp.fft.irfft(cols, n=P, axis=2)[:, :, _crop_index(n, P, xp)]
    return (vol / gridding_rows(n, P, y0, y1, xp)).astype(xp.float32)


def gridding_rows(n: int, padded_size: int, y0: int, y1: int, xp):
    """Rows y0 .. y1 of :func:`gridding_correction`, stored [y, z, x] (same values)."""
    r = (xp.arange(n, dtype=xp.float64) - n // 2) / padded_size
    s = xp.sinc(r) ** 2
    return (s[None, :, None] * s[y0:y1, None, None] * s[None, None, :]).astype(xp.float32)


def forward_rows(rows):
    """First step of centered_rfft3 (float64) of real-space slab rows (ny, n, n)
    [y, z, x]: → (n, ny, n // 2 + 1) complex128 [kz, y, kx], kz centred; planes
    k_edges[t] .. k_edges[t+1] go to slab t."""
    xp = array_namespace(rows)
    a = xp.fft.ifftshift(xp.asarray(rows, xp.float64), axes=(1, 2))
    f = xp.fft.fftshift(xp.fft.fft(xp.fft.rfft(a, axis=2), axis=1), axes=1)
    return xp.ascontiguousarray(f.transpose(1, 0, 2))


def forward_columns(blocks, layout: SlabLayout, s: int):
    """Second step for transform slab s: ``blocks`` (flat complex128, from every slab t
    in order, each (nk, ny_t, n // 2 + 1)) → (nk, n, n // 2 + 1) [kz, ky, kx], planes
    k_edges[s] .. k_edges[s+1] of centered_rfft3 of the map."""
    xp = array_namespace(blocks)
    n, nxn = layout.n, layout.n // 2 + 1
    k0, k1 = layout.kplanes(s)
    full = xp.empty((k1 - k0, n, nxn), xp.complex128)
    pos = 0
    for t in range(layout.parts):
        y0, y1 = layout.rows(t)
        size = (k1 - k0) * (y1 - y0) * nxn
        full[:, y0:y1, :] = blocks[pos:pos + size].reshape(k1 - k0, y1 - y0, nxn)
        pos += size
    return xp.fft.fftshift(xp.fft.fft(xp.fft.ifftshift(full, axes=1), axis=1), axes=1)


def inverse_rows(spectrum, n: int):
    """First step of centered_irfft3 of transform slab planes (nk, n, n // 2 + 1)
    [kz, ky, kx]: → (n, nk, n // 2 + 1) complex128 [y, kz, kx] (rows in map order)."""
    xp = array_namespace(spectrum)
    a = xp.fft.ifft(xp.fft.ifftshift(spectrum, axes=1), axis=1)[:, _crop_index(n, n, xp), :]
    return xp.ascontiguousarray(a.transpose(1, 0, 2))


def inverse_columns(blocks, layout: SlabLayout, s: int):
    """Second step for real-space slab s: ``blocks`` (flat complex128, from every slab t,
    each (ny, nk_t, n // 2 + 1)) → (ny, n, n) float64 rows [y, z, x] of centered_irfft3."""
    xp = array_namespace(blocks)
    n, nxn = layout.n, layout.n // 2 + 1
    y0, y1 = layout.rows(s)
    ny = y1 - y0
    full = xp.empty((ny, n, nxn), xp.complex128)
    pos = 0
    for t in range(layout.parts):
        k0, k1 = layout.kplanes(t)
        size = ny * (k1 - k0) * nxn
        full[:, k0:k1, :] = blocks[pos:pos + size].reshape(ny, k1 - k0, nxn)
        pos += size
    cols = xp.fft.ifft(xp.fft.ifftshift(full, axes=1), axis=1)[:, _crop_index(n, n, xp), :]
    return xp.fft.irfft(cols, n=n, axis=2)[:, :, _crop_index(n, n, xp)]


def slab_radius(n: int, k0: int, k1: int, xp):
    """|k| (float32, as radius_3d) of planes k0 .. k1 of the n-grid half-space transform."""
    kz, ky, kx = freq_grid_3d(n, xp)
    return xp.sqrt(kz[k0:k1] * kz[k0:k1] + ky * ky + kx * kx)
