"""From raw particle images to what the search and the backprojector consume.

Each image batch is background-subtracted, windowed in real space (a soft
circle between the inner and outer window radii, as fractions of half the box),
Fourier transformed, and paired with its CTF on the same half-plane grid.  No
per-image intensity scaling is done: contrast differences between particles are
what the per-particle scale models.

Optics groups with another box or pixel size than the reference grid (the first
group's, or ``--box`` / ``--pixel-size``) are brought onto it first: each image of n px
of p Å is Fourier cropped or padded to n' = round(n·p / p_ref) px, which makes its
pixels n·p / n' Å (p_ref up to the rounding of n'), then cut or padded in real space to
the reference box.  Where that rounding would scale the image by more than 0.1 / box
(small boxes: 64 px of 1.24 Å give 63 px of 1.2597 Å), the image is first padded in
real space to a box m that rounds well (:func:`~mpirefine.io.particles.resampling_plan`).
Its CTF is evaluated with the group's own parameters at the effective pixel size m·p /
n', and is zero beyond the group's own Nyquist frequency where the image was padded in
Fourier space (nothing was measured there).  Particles on the reference grid take
exactly the path they always took.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mpirefine.backend import array_namespace
from mpirefine.fourier.transforms import centered_rfft2, freq_grid_2d, radius_2d
from mpirefine.geometry.spheres import radial_distance
from mpirefine.io import ImageSource
from mpirefine.io.particles import ImageGrid, ParticleSet
from mpirefine.physics.ctf import CTFParams, evaluate_ctf


@dataclass(frozen=True)
class ImagePrep:
    """How images are prepared.  Radii are fractions of half the box (0..1]."""

    box: int
    pixel_size_A: float
    window: bool = True
    window_inner: float = 0.85
    window_outer: float = 0.99

    def __post_init__(self):
        if not 0 < self.window_inner <= self.window_outer <= 1.0:
            raise ValueError(
                f"window radii must satisfy 0 < inner ({self.window_inner}) <= outer "
                f"({self.window_outer}) <= 1 (fractions of half the box)")


def real_space_window(prep: ImagePrep, xp):
    """(n, n) float32: 1 inside the inner radius, raised cosine to 0 at the outer."""
    n = prep.box
    r = radial_distance(n, xp, ndim=2) / (n / 2.0)
    lo, hi = prep.window_inner, prep.window_outer
    if hi <= lo:
        return (r <= lo).astype(xp.float32)
    t = xp.clip((r - lo) / (hi - lo), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(xp.pi * t)).astype(xp.float32)


def prepare_images(images, prep: ImagePrep, xp, grid: ImageGrid | None = None,
                   unwindowed: bool = False):
    """Windowed transforms, (B, n, n // 2 + 1) complex64 on ``xp``'s device.

    images: (B, m, m) real (host or device).  grid: the particles' own grids
    (``ParticleSet.image_grid``), None when they are on the reference grid (then m is
    the reference box); otherwise they are brought onto it first (:func:`to_reference_grid`).
    The mean of the ring outside the inner window radius is subtracted first, so the
    window does not cut a pedestal.

    unwindowed: return (windowed, unwindowed) transforms: the search scores the
    windowed images (less solvent noise), the backprojection inserts the same images
    without the window, as RELION backprojects its unmasked images.  The window would
    cut the signal the CTF spreads beyond the particle (about λ·Δz / d: 80 Å at 6 Å and
    2.5 µm defocus) and, in a box little larger than the particle, the particle itself;
    on the apoferritin benchmark (140 Å in a 160 Å box) inserting windowed images held
    the map's FSC vs the truth at 0.96 at 20 Å (docs/refinement.md).  Without a window
    (``prep.window`` off) both are the same array.
    """
    imgs = xp.asarray(images, dtype=xp.float32)
    if grid is not None:
        imgs = to_reference_grid(imgs, grid)
    if not prep.window:
        f = centered_rfft2(imgs).astype(xp.complex64)
        return (f, f) if unwindowed else f
    w = real_space_window(prep, xp)
    ring = (radial_distance(prep.box, xp, ndim=2) >= prep.window_inner * prep.box / 2.0)
    background = (imgs * ring).sum(axis=(1, 2)) / max(int(ring.sum()), 1)
    imgs = imgs - background[:, None, None]
    windowed = centered_rfft2(imgs * w).astype(xp.complex64)
    if not unwindowed:
        return windowed
    return windowed, centered_rfft2(imgs).astype(xp.complex64)


def ctf_grid(params: CTFParams, prep: ImagePrep, xp, grid: ImageGrid | None = None,
             gamma_offset=None, freq_shift=(0.0, 0.0)):
    """CTF of each particle on the half-plane grid, (B, n, n // 2 + 1) float32.

    grid: as for :func:`prepare_images`; particles off the reference grid get their CTF
    at their effective pixel size, cut at their own Nyquist frequency where their
    images were Fourier padded.  gamma_offset: (B, n, n // 2 + 1) phases added to each
    particle's γ (its optics group's even aberrations, physics/aberrations.py) or None.
    freq_shift: (dx, dy) cycles per box added to every frequency (for the CTF's
    derivatives by central differences, refine.add_mag_sums).
    """
    ky, kx = freq_grid_2d(prep.box, xp)
    if freq_shift[0] or freq_shift[1]:
        kx, ky = kx + freq_shift[0], ky + freq_shift[1]
    if grid is None:
        scale = 1.0 / (prep.box * prep.pixel_size_A)
        return evaluate_ctf(params, kx * scale, ky * scale, gamma_offset=gamma_offset)
    n = prep.box
    pixel = grid.effective_pixel_size_A()
    values, which = np.unique(pixel, return_inverse=True)
    out = xp.empty((len(pixel), n, n // 2 + 1), dtype=xp.float32)
    for k, p in enumerate(values):
        rows = np.flatnonzero(which.reshape(-1) == k)
        scale = 1.0 / (n * float(p))
        out[xp.asarray(rows)] = evaluate_ctf(
            params.subset(rows), kx * scale, ky * scale,
            gamma_offset=None if gamma_offset is None else gamma_offset[xp.asarray(rows)])
    padded, resampled = grid.padded_box(), grid.resampled_box()
    upsampled = np.flatnonzero(resampled > padded)
    if upsampled.size:
        # each such particle's own Nyquist frequency, in shells of the reference grid
        nyquist = xp.asarray(0.5 * padded[upsampled] * n / resampled[upsampled], xp.float32)
        rows = xp.asarray(upsampled)
        out[rows] = out[rows] * (radius_2d(n, xp)[None] <= nyquist[:, None, None])
    return out


# ------------------------------------------------------------- onto the reference grid

def ewald_sidebands(correction, params: CTFParams, prep: ImagePrep, xp,
                    grid: ImageGrid | None = None, gamma_offset=None):
    """The batch's curved-sphere insertion operands (physics/ewald.py EwaldSidebands)
    for an EwaldCorrection, with each particle's effective pixel size and, for
    Fourier-padded particles, their own Nyquist frequency (as :func:`ctf_grid`)."""
    n = prep.box
    if grid is None:
        return correction.sidebands(params, prep.pixel_size_A, n, xp, gamma_offset)
    padded, resampled = grid.padded_box(), grid.resampled_box()
    nyquist = np.where(resampled > padded, 0.5 * padded * n / np.maximum(resampled, 1), np.inf)
    return correction.sidebands(params, grid.effective_pixel_size_A(), n, xp, gamma_offset, nyquist)


def fourier_resample(images, size: int):
    """(B, n, n) → (B, size, size) float32: the centred transform cropped or zero-padded
    to size × size, so pixels become n / size times as large (or small).  Pixel values
    keep their scale (the transform is multiplied by (size / n)²); the centre stays at
    index n // 2 → size // 2."""
    xp = array_namespace(images)
    n = images.shape[-1]
    if size == n:
        return images
    axes = (-2, -1)
    f = xp.fft.fftshift(xp.fft.fft2(xp.fft.ifftshift(images, axes=axes)), axes=axes)
    out = xp.zeros(images.shape[:-2] + (size, size), dtype=f.dtype)
    k = min(n, size)                     # frequencies -k//2 .. k - 1 - k//2 are kept
    i, o = n // 2 - k // 2, size // 2 - k // 2
    out[..., o:o + k, o:o + k] = f[..., i:i + k, i:i + k]
    img = xp.fft.fftshift(xp.fft.ifft2(xp.fft.ifftshift(out, axes=axes)), axes=axes).real
    return (img * ((size / n) ** 2)).astype(xp.float32)


def crop_or_pad(images, size: int):
    """(B, n, n) → (B, size, size): the central size × size pixels, or the images in the
    middle of a larger box filled with each image's mean over its outermost pixels (so
    no step is added at the old edge).  The centre stays at index n // 2 → size // 2."""
    xp = array_namespace(images)
    n = images.shape[-1]
    if size == n:
        return images
    if size < n:
        o = n // 2 - size // 2
        return images[..., o:o + size, o:o + size]
    edge = xp.concatenate([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0],
                           images[..., 1:-1, -1]], axis=-1).mean(axis=-1)
    out = xp.empty(images.shape[:-2] + (size, size), dtype=images.dtype)
    out[...] = edge[..., None, None]
    o = size // 2 - n // 2
    out[..., o:o + n, o:o + n] = images
    return out


def to_reference_grid(images, grid: ImageGrid):
    """(B, n, n) images of particles of box n → (B, N, N) float32 on the reference grid
    (N = grid.box): pad each to its m, Fourier crop or pad to its n' = round(m·p /
    p_ref) (``ImageGrid``; usually m = n), then cut or pad to N in real space.  Runs on
    the images' array namespace."""
    xp = array_namespace(images)
    n = images.shape[-1]
    if np.any(grid.image_box != n):
        raise ValueError(f"images of {n} px given for particles of "
                         f"{sorted(set(grid.image_box.tolist()))} px")
    plan = np.stack([grid.padded_box(), grid.resampled_box()], axis=1)
    steps, which = np.unique(plan, axis=0, return_inverse=True)

    def resample(block, m, n_res):
        return crop_or_pad(fourier_resample(crop_or_pad(block, m), n_res), grid.box)

    if len(steps) == 1:
        return resample(images, int(steps[0, 0]), int(steps[0, 1]))
    out = xp.empty((images.shape[0], grid.box, grid.box), dtype=xp.float32)
    for k, (m, n_res) in enumerate(steps):
        rows = xp.asarray(np.flatnonzero(which.reshape(-1) == k))
        out[rows] = resample(images[rows], int(m), int(n_res))
    return out


# -------------------------------------------------------------------- reading images

def open_images(ps: ParticleSet, mag_matrices: dict | None = None):
    """Where a job's images come from: an :class:`ImageSource` over ``ps``, or, when
    its optics groups have more than one box, a :class:`MixedBoxImages` that yields
    each batch from one box (``prepare_images`` then brings them onto the reference
    grid).  Both are context managers with ``batches(indices, size)``.  Optics groups
    with an anisotropic magnification (rlnMagMat00..11) have their images undistorted as
    they are read (physics/anisomag.py): by the input's matrices, or by ``mag_matrices``
    ({group: M}, read at each batch, so that a refinement that fits them updates the
    dict in place and the next batch uses the new ones)."""
    from mpirefine.physics.anisomag import Undistorted, input_mag_matrices

    source = ImageSource(ps) if np.all(ps.image_box == ps.box) else MixedBoxImages(ps)
    if mag_matrices is not None:
        return Undistorted(source, ps.optics_group, mag_matrices)
    matrices = input_mag_matrices(ps)
    return Undistorted(source, ps.optics_group, matrices) if matrices else source


class MixedBoxImages:
    """:class:`ImageSource` for a particle set whose optics groups differ in box: one
    source per box, and batches that never mix boxes (each batch is one array).
    ``batches`` yields (indices, images) like ImageSource's: box after box, the
    particles of each box in the order given."""

    def __init__(self, ps: ParticleSet):
        self.particles = ps
        self._sources: dict[int, tuple[np.ndarray, ImageSource]] = {}
        for box in np.unique(ps.image_box):
            rows = np.flatnonzero(ps.image_box == box)
            view = replace(
                ps, box=int(box), stack_id=ps.stack_id[rows], stack_index=ps.stack_index[rows],
                ctf=ps.ctf.subset(rows), rotations=None, shifts_A=ps.shifts_A[rows],
                split=ps.split[rows], scale=ps.scale[rows], optics_group=ps.optics_group[rows],
                image_box=ps.image_box[rows], image_pixel_size_A=ps.image_pixel_size_A[rows],
                notes=[], _star_optics=None, _star_particles=None, _cs_table=None,
                _reference_row=0)
            self._sources[int(box)] = (rows, ImageSource(view))

    def batches(self, indices, size: int):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        boxes = self.particles.image_box[idx]
        for box, (rows, source) in self._sources.items():
            mine = idx[boxes == box]
            if mine.size:
                for local, images in source.batches(np.searchsorted(rows, mine), size):
                    yield rows[local], images

    @property
    def ahead_used(self) -> int:
        return sum(source.ahead_used for _, source in self._sources.values())

    def read_ahead(self, indices) -> None:
        """ImageSource.read_ahead for a batch of one box (as ``batches`` makes them)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        boxes = np.unique(self.particles.image_box[idx])
        if boxes.size == 1:
            rows, source = self._sources[int(boxes[0])]
            source.read_ahead(np.searchsorted(rows, idx))

    def images(self, indices) -> np.ndarray:
        """Images of particles ``indices``, which must share one box (m, box, box)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        boxes = np.unique(self.particles.image_box[idx])
        if boxes.size != 1:
            raise ValueError(f"particles of several boxes ({boxes.tolist()}) asked at once")
        rows, source = self._sources[int(boxes[0])]
        return source.images(np.searchsorted(rows, idx))

    def close(self) -> None:
        for _, source in self._sources.values():
            source.close()

    def __enter__(self) -> "MixedBoxImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
