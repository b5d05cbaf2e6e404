"""Orientation diagnostics of a refinement, as CryoSPARC's Orientation Diagnostics reports
them: the conical FSC area ratio (cFAR) from the half maps and the sampling
compensation factor (SCF, SCF*) from the viewing directions.

**Conical FSC.** The FSC between the half maps restricted to a double cone of Fourier
directions (half-angle 20°, CryoSPARC's default) around a direction d.  Every Fourier
voxel of the Hermitian half space (shells 1 .. n // 2, |k| rounded as in
:func:`mpirefine.postprocess.fsc.fsc_curve`) is put into one cell of an equal-area grid
on the upper hemisphere of directions (k and -k are the same voxel pair, so the sign is
dropped); one pass of ``bincount`` sums A·B*, |A|² and |B|² per (shell, cell).  A cone
is then the set of cells whose centre lies within the half-angle of ±d, and every cone's
sums are one matrix product: no Python loop over voxels or cones.  The cells are about
1.8° across, which blurs the cone's edge by that much.

**cFAR.** For each cone, the area under its FSC (clipped to [0, 1]) from the origin up
to the shell where the full FSC of the same (masked) half maps first falls below 0.143,
divided by that shell; cFAR = min area / max area over the cones, in [0, 1].  About 1
for an isotropic map; CryoSPARC reads values below 0.5 as anisotropic resolution (most
often from preferred orientation).  A cone with no voxel in a low shell takes the full
FSC there.

**SCF (Baldwin & Lyumkis 2020, Prog. Biophys. Mol. Biol. 150:160).**  A view with beam
direction d fills the central plane ⊥ d of Fourier space.  For Fourier directions u on
a Fibonacci hemisphere (min(2πR², 5000) of them, R = 50 Fourier pixels, less for
fewer than 2,000 views: :func:`scf_fourier_radius`), count the
views whose plane passes within half a voxel of R·u (|u·d|·R < 0.5); with s(u) those
counts, SCF = 1 / (mean(s) · mean(1/s) over u with s > 0) and SCF* = SCF / (1 +
(zero/non-zero fraction) · mean(s) · SCF / 2), which penalises directions no view
samples.  Both are 1 for uniform views; CryoSPARC treats SCF* below about 0.81 as
anisotropic sampling.  Views are symmetry-expanded for a symmetric map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: CryoSPARC's cone half-angle for conical FSCs (degrees)
CONE_HALF_ANGLE_DEG = 20.0
#: number of cone directions on the upper hemisphere (Fibonacci points)
N_CONE_DIRECTIONS = 300
#: equal-area grid the Fourier voxels are binned on: rows uniform in |kz|/|k|, columns in azimuth
CELL_ROWS, CELL_COLUMNS = 40, 160
FSC_THRESHOLD = 0.143
#: SCF: Fourier radius of the sampled shell (Baldwin & Lyumkis's default) and most directions
SCF_FOURIER_RADIUS = 50
SCF_MAX_DIRECTIONS = 5000
#: SCF uses at most this many views (a fixed random subset; the bias is ~1 / (views / 100))
SCF_MAX_VIEWS = 50_000


def fibonacci_hemisphere(n: int) -> np.ndarray:
    """n near-uniform unit vectors (x, y, z) with z >= 0, shape (n, 3)."""
    j = np.arange(n) + 0.5
    z = 1.0 - j / n
    phi = np.pi * (3.0 - np.sqrt(5.0)) * j
    r = np.sqrt(np.maximum(1.0 - z * z, 0.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _cell_centres(rows: int = CELL_ROWS, columns: int = CELL_COLUMNS) -> np.ndarray:
    """Unit vectors (rows · columns, 3) at the centres of the equal-area hemisphere cells."""
    z = (np.arange(rows) + 0.5) / rows
    phi = (np.arange(columns) + 0.5) / columns * 2 * np.pi - np.pi
    z, phi = np.meshgrid(z, phi, indexing="ij")
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1).reshape(-1, 3)


def _crossings(curves: np.ndarray, threshold: float = FSC_THRESHOLD) -> np.ndarray:
    """Fractional shell where each row first falls below ``threshold`` (from shell 1 on,
    linear interpolation; the last shell when it never does), as fsc.crossing_shell."""
    curves = np.atleast_2d(curves)
    n_shells = curves.shape[1]
    below = curves[:, 1:] < threshold
    first = np.where(below.any(axis=1), below.argmax(axis=1) + 1, n_shells - 1)
    rows = np.arange(len(curves))
    c0, c1 = curves[rows, np.maximum(first - 1, 0)], curves[rows, first]
    frac = np.where(c0 != c1, (c0 - threshold) / np.where(c0 != c1, c0 - c1, 1.0), 1.0)
    return np.where(below.any(axis=1), first - 1 + np.clip(frac, 0.0, 1.0), float(n_shells - 1))


@dataclass(frozen=True)
class ConicalFSC:
    """Conical FSCs of a pair of half maps (see the module's docstring)."""

    directions: np.ndarray    # (D, 3) cone axes (x, y, z), z >= 0; a cone includes its mirror
    curves: np.ndarray        # (D, n // 2 + 1) conical FSC per shell
    full: np.ndarray          # (n // 2 + 1,) FSC over every direction (same mask)
    cutoff_shell: float       # where ``full`` first falls below 0.143 (fractional shell)
    areas: np.ndarray         # (D,) mean of the clipped conical FSC over shells 0 .. cutoff
    box: int
    pixel_size_A: float
    half_angle_deg: float

    @property
    def cfar(self) -> float:
        """Conical FSC area ratio: min area / max area, in [0, 1]."""
        top = float(self.areas.max())
        return float(self.areas.min()) / top if top > 0 else 0.0

    @property
    def cutoff_resolution_A(self) -> float:
        return self.box * self.pixel_size_A / max(self.cutoff_shell, 1e-6)

    def resolution_A(self) -> np.ndarray:
        """(D,) each cone's resolution (Å) at FSC 0.143."""
        return self.box * self.pixel_size_A / np.maximum(_crossings(self.curves), 1e-6)


def conical_fsc(half_a: np.ndarray, half_b: np.ndarray, pixel_size_A: float, mask=None,
                directions: np.ndarray | None = None,
                half_angle_deg: float = CONE_HALF_ANGLE_DEG) -> ConicalFSC:
    """Conical FSCs between two (n, n, n) half maps indexed [z, y, x], both multiplied by
    ``mask`` when given; cone axes ``directions`` (D, 3) in (x, y, z), by default
    :data:`N_CONE_DIRECTIONS` Fibonacci points on the upper hemisphere."""
    from scipy import fft

    half_a = np.asarray(half_a, np.float32)
    half_b = np.asarray(half_b, np.float32)
    if half_a.shape != half_b.shape or half_a.ndim != 3 or len(set(half_a.shape)) != 1:
        raise ValueError(f"half maps must be equal cubes, got {half_a.shape} and {half_b.shape}")
    if mask is not None:
        mask = np.asarray(mask, np.float32)
        half_a, half_b = half_a * mask, half_b * mask
    n = half_a.shape[0]
    n_shells = n // 2 + 1
    directions = fibonacci_hemisphere(N_CONE_DIRECTIONS) if directions is None else (
        np.asarray(directions, float).reshape(-1, 3))
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    fa = fft.rfftn(half_a, workers=-1)
    fb = fft.rfftn(half_b, workers=-1)
    del half_a, half_b
    # half-space geometry: [kz, ky, kx] with kx = 0 .. n // 2; a column stands for 1 or 2 voxels
    mult = np.full(n_shells, 2.0, np.float32)
    mult[0] = 1.0
    if n % 2 == 0:
        mult[-1] = 1.0
    k = (np.fft.fftfreq(n) * n).astype(np.float32)
    n_cells = CELL_ROWS * CELL_COLUMNS
    binned = np.zeros((3, n_shells * n_cells))
    # slabs of kz planes bound the temporaries (about 16 M voxels each)
    step = max(1, (1 << 24) // (n * n_shells))
    for z0 in range(0, n, step):
        z1 = min(n, z0 + step)
        a, b = fa[z0:z1], fb[z0:z1]
        kz3 = k[z0:z1, None, None]
        ky3 = k[None, :, None]
        kx3 = np.arange(n_shells, dtype=np.float32)[None, None, :]
        radius = np.sqrt(kz3 * kz3 + ky3 * ky3 + kx3 * kx3)
        shell = np.rint(radius).astype(np.int32)
        keep = (shell >= 1) & (shell < n_shells)
        # each voxel's cell on the upper hemisphere (k and -k are one pair: flip kz < 0)
        sign = np.where(kz3 < 0, -1.0, 1.0).astype(np.float32)
        row = np.minimum((np.abs(kz3) / np.maximum(radius, 1e-6) * CELL_ROWS).astype(np.int32),
                         CELL_ROWS - 1)
        col = ((np.arctan2(ky3 * sign, kx3 * sign) + np.pi)
               * (CELL_COLUMNS / (2 * np.pi))).astype(np.int32) % CELL_COLUMNS
        flat = (shell * n_cells + row * CELL_COLUMNS + col)[keep]
        for q, v in enumerate(((a.real * b.real + a.imag * b.imag) * mult,
                               (a.real ** 2 + a.imag ** 2) * mult,
                               (b.real ** 2 + b.imag ** 2) * mult)):
            binned[q] += np.bincount(flat, weights=v[keep], minlength=n_shells * n_cells)
    del fa, fb
    binned = binned.reshape(3, n_shells, n_cells)
    totals = binned.sum(axis=2)                                   # (3, S): the full FSC's sums
    full = totals[0] / np.sqrt(np.maximum(totals[1] * totals[2], 1e-300))
    full[0] = 1.0
    cutoff = float(_crossings(full)[0])

    # cones: cells within the half-angle of ±d; every cone's sums in one product
    cos_cut = np.cos(np.radians(half_angle_deg))
    member = (np.abs(directions @ _cell_centres().T) >= cos_cut).astype(np.float64)   # (D, cells)
    cone = (member @ binned.reshape(-1, n_cells).T).reshape(len(directions), 3, n_shells)
    cone = cone.transpose(1, 0, 2)                                                    # (3, D, S)
    denom = cone[1] * cone[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        curves_part = np.where(denom > 0, cone[0] / np.sqrt(np.where(denom > 0, denom, 1.0)),
                               np.nan)
    curves = np.broadcast_to(full, (len(directions), n_shells)).copy()
    curves[:, 1:] = np.where(np.isnan(curves_part[:, 1:]), full[1:],
                                     curves_part[:, 1:])
    curves[:, 0] = 1.0
    areas = _areas(curves, cutoff)
    return ConicalFSC(directions=directions, curves=curves, full=full, cutoff_shell=cutoff,
                      areas=areas, box=n, pixel_size_A=float(pixel_size_A),
                      half_angle_deg=float(half_angle_deg))


def _areas(curves: np.ndarray, cutoff: float) -> np.ndarray:
    """Mean of each clipped curve over the shells 0 .. cutoff (trapezoids, the last one
    partial), i.e. the area under it divided by the cutoff."""
    if cutoff <= 0:
        return np.ones(len(curves))
    c = np.clip(np.nan_to_num(curves, nan=0.0), 0.0, 1.0)
    whole = int(np.floor(cutoff))
    area = np.zeros(len(c))
    if whole >= 1:
        area += 0.5 * (c[:, 0] + c[:, whole]) + c[:, 1:whole].sum(axis=1)
    frac = cutoff - whole
    if frac > 0 and whole + 1 < c.shape[1]:
        end = c[:, whole] + frac * (c[:, whole + 1] - c[:, whole])
        area += 0.5 * frac * (c[:, whole] + end)
    return area / cutoff


def scf_fourier_radius(n_views: int) -> float:
    """The shell radius R (Fourier pixels) SCF is measured on: Baldwin & Lyumkis's 50, or
    less for fewer than 2,000 views, so that a direction expects at least 20 views
    (a view's plane is within 0.5 / R of a direction for a fraction 0.5 / R of views);
    with fewer, the counting noise alone would read as uneven sampling."""
    return float(np.clip(n_views / 40.0, 5.0, SCF_FOURIER_RADIUS))


def sampling_compensation_factor(view_directions: np.ndarray,
                                 fourier_radius: float | None = None,
                                 seed: int = 0) -> tuple[float, float]:
    """(SCF, SCF*) of views with beam directions (N, 3) (module docstring) on the shell
    of radius ``fourier_radius`` (default :func:`scf_fourier_radius`).  More than
    :data:`SCF_MAX_VIEWS` views are subsampled at random (``seed``)."""
    views = np.asarray(view_directions, float).reshape(-1, 3)
    if len(views) == 0:
        return 0.0, 0.0
    if fourier_radius is None:
        fourier_radius = scf_fourier_radius(len(views))
    if len(views) > SCF_MAX_VIEWS:
        views = views[np.random.default_rng(seed).choice(len(views), SCF_MAX_VIEWS, replace=False)]
    views = (views / np.linalg.norm(views, axis=1, keepdims=True)).astype(np.float32)
    n_dirs = int(min(2 * np.pi * fourier_radius ** 2, SCF_MAX_DIRECTIONS))
    u = fibonacci_hemisphere(n_dirs).astype(np.float32)
    half_width = 0.5 / fourier_radius
    counts = np.zeros(n_dirs)
    step = max(1, 20_000_000 // n_dirs)
    for start in range(0, len(views), step):
        counts += (np.abs(u @ views[start:start + step].T) < half_width).sum(axis=1)
    sampled = counts > 0
    if not sampled.any():
        return 0.0, 0.0
    mean = counts.mean()
    scf = float(1.0 / (np.mean(1.0 / counts[sampled]) * mean))
    zeros_over_nonzeros = (~sampled).sum() / sampled.sum()
    return scf, float(scf / (1.0 + zeros_over_nonzeros * mean * scf / 2.0))


def symmetry_expanded(directions: np.ndarray, symmetry: str | None) -> np.ndarray:
    """Beam directions (N, 3) and their copies under the point group (poses A and A·g are
    one view, whose beam runs along gᵀ·d); unchanged for C1 or an unknown name."""
    if not symmetry or str(symmetry).upper() == "C1":
        return directions
    from mpirefine.geometry.symmetry import point_group

    try:
        group = point_group(str(symmetry))
    except ValueError:
        return directions
    return np.einsum("gji,nj->gni", group, directions).reshape(-1, 3)
