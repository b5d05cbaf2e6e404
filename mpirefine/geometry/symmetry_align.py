"""Symmetry alignment: turn and shift an input map so that its axes lie on ours (host
NumPy, rank 0, once before the first iteration).

Refinement with a point group assumes the map's symmetry axes sit on the convention
axes (geometry/symmetry.py) through the box centre.  An input map from elsewhere
(another program's setting, a map refined in C1) generally does not, so before the
first iteration we

1. centre it on its centre of mass (every symmetry axis passes through that point;
   the returned shift is this centring, refined to the axes' common point; for Cn
   only its part across the axis, since a move along the axis is free), then
2. find the rotation R that makes the centred map V best agree with its own copies
   under the group: the map W(x) = V(Rᵀx) is G-symmetric when V is symmetric under
   Rᵀ·g·R, so we score R by the mean correlation between V and V∘(Rᵀ·g·R) over the
   elements g ≠ 1 and never rotate V by R itself.

The search is a global grid (``so3_grid``) on a Fourier-cropped copy of the map,
restricted to one rotation per class {g·R} (the score cannot tell these apart),
followed by a local pattern search on finer copies.  Of all the equivalent answers
(g·R for g in the group, and for Cn any turn about Z or a flip of the axis) the one
closest to the identity is returned, so an already aligned map is left alone.

Runs once per job on the host with NumPy and scipy.ndimage.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import affine_transform, map_coordinates, spline_filter
from scipy.spatial.transform import Rotation

from mpirefine.geometry.grids import so3_grid
from mpirefine.geometry.symmetry import (
    asymmetric_unit_mask,
    canonical_name,
    normalizer,
    point_group,
)

#: box sides (Fourier-cropped copies) of the global search and the two local refinements
COARSE_BOX, MIDDLE_BOX, FINE_BOX = 16, 24, 48
#: group elements scored in the local refinements
N_REFINE_ELEMENTS = 4


def rotate_volume(volume, rotation, shift_px=(0.0, 0.0, 0.0), order: int = 1,
                  prefiltered: bool = False) -> np.ndarray:
    """W(x) = V(Rᵀ·x − s): move the map by s, then rotate it by R about voxel n // 2.

    volume: (n, n, n) [z, y, x]; rotation: (3, 3) acting on (x, y, z); shift_px: s as
    (x, y, z) voxels.  order: spline order (1 trilinear, 3 cubic); ``prefiltered``
    says the volume already holds cubic-spline coefficients.  Outside reads 0.
    """
    v = np.asarray(volume)
    c = np.full(3, v.shape[0] // 2, dtype=float)
    m = np.asarray(rotation, float).T[::-1, ::-1]          # Rᵀ in [z, y, x] order
    offset = c - m @ c - np.asarray(shift_px, float)[::-1]
    return affine_transform(v, m, offset=offset, order=order, mode="constant", cval=0.0,
                            prefilter=not prefiltered)


def _density(volume, size: int = 32):
    """Low-passed copy of the map (side ≤ ``size``) and its voxel size in input voxels,
    with the solvent level and 3σ of the noise in the corners subtracted and negatives
    set to 0: the weights of a centre of mass that noise does not drag to the middle."""
    n = volume.shape[0]
    v = fourier_crop(volume, min(n, size))
    m = v.shape[0]
    r = np.arange(m) - m // 2
    radius = np.sqrt(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2)
    corners = v[radius > m / 2]
    noise = corners.std() if corners.size > 8 else 0.0
    return np.clip(v - np.median(v) - 3.0 * noise, 0.0, None), n / m


def center_of_mass_px(volume) -> np.ndarray:
    """Centre of the map's density, (x, y, z) voxels from n // 2 (see :func:`_density`)."""
    w, scale = _density(np.asarray(volume, float))
    if w.sum() <= 0:
        return np.zeros(3)
    idx = np.arange(w.shape[0]) - w.shape[0] // 2
    z = (w.sum(axis=(1, 2)) * idx).sum()
    y = (w.sum(axis=(0, 2)) * idx).sum()
    x = (w.sum(axis=(0, 1)) * idx).sum()
    return np.array([x, y, z]) / w.sum() * scale


def fourier_crop(volume, size: int) -> np.ndarray:
    """The map on a coarser grid of side ``size`` (same field of view), by cropping its
    centred transform; the centre stays at index size // 2."""
    v = np.asarray(volume, float)
    n = v.shape[0]
    if size >= n:
        return v.copy()
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v)))
    o = n // 2 - size // 2
    f = f[o:o + size, o:o + size, o:o + size]
    return np.real(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f)))) * (size / n) ** 3


def _particle_box(volume) -> np.ndarray:
    """The centred map cut to a box just holding the particle (the sphere with 99 % of
    its density, plus 10 %), so that the cropped copies resolve it."""
    n = volume.shape[0]
    w, scale = _density(volume)
    r = np.arange(w.shape[0]) - w.shape[0] // 2
    radius = np.sqrt(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2)
    order = np.argsort(radius.ravel())
    cumulative = np.cumsum(w.ravel()[order])
    if cumulative[-1] <= 0:
        return volume
    r99 = radius.ravel()[order][np.searchsorted(cumulative, 0.99 * cumulative[-1])] * scale
    m = min(n, 2 * int(np.ceil(1.1 * r99 + scale)) + 4)
    o = n // 2 - m // 2
    return volume[o:o + m, o:o + m, o:o + m]


class _Scorer:
    """Mean correlation of a centred map V with its copies V∘(Rᵀ·g·R).

    Only the voxels inside a sphere of radius n/2 − 1 take part (rotations keep it in
    place); all copies are sampled in one map_coordinates call.
    """

    def __init__(self, volume, elements, order: int):
        v = np.asarray(volume, float)
        n = v.shape[0]
        r = np.arange(n) - n // 2
        z, y, x = np.meshgrid(r, r, r, indexing="ij")
        inside = x * x + y * y + z * z <= (n / 2 - 1) ** 2
        self.points = np.stack([x[inside], y[inside], z[inside]]).astype(float)  # (3, P) xyz
        self.center = n // 2
        self.reference = v[inside] - v[inside].mean()
        self.norm = np.sqrt((self.reference ** 2).sum()) + 1e-30
        masked = np.where(inside, v, 0.0)
        self.coeffs = spline_filter(masked, order=order, mode="constant") if order > 1 else masked
        self.order = order
        self.elements = np.asarray(elements, float)

    def __call__(self, R, centre_px=None) -> float:
        """Score of symmetry axes R through ``centre_px`` (xyz voxels from the box
        centre; default the centre itself): copy_k(x) = V(h_k (x − c) + c)."""
        h = R.T @ self.elements @ R                       # (K, 3, 3)
        c = np.zeros(3) if centre_px is None else np.asarray(centre_px, float)
        xyz = np.einsum("kij,jp->kip", h, self.points - c[:, None]) + c[None, :, None]
        zyx = xyz[:, ::-1].transpose(1, 0, 2).reshape(3, -1) + self.center
        copies = map_coordinates(self.coeffs, zyx, order=self.order, mode="constant",
                                 prefilter=False).reshape(len(h), -1)
        copies -= copies.mean(axis=1, keepdims=True)
        c = copies @ self.reference / (np.sqrt((copies ** 2).sum(axis=1)) * self.norm + 1e-30)
        return float(c.mean())


def _spread_elements(group, k: int) -> np.ndarray:
    """Up to k elements about well-separated axes (highest order first): enough to pin
    the orientation down, at a fraction of the cost of the whole group."""
    axes = []                                   # (fold, axis, smallest rotation about it)
    for g in group[1:]:
        rv = Rotation.from_matrix(g).as_rotvec()
        angle = np.linalg.norm(rv)
        a = rv / angle
        fold = int(round(2 * np.pi / angle))
        same = [i for i, (_, b, _) in enumerate(axes) if abs(abs(a @ b) - 1) < 1e-6]
        if not same:
            axes.append((fold, a, g))
        elif fold > axes[same[0]][0]:
            axes[same[0]] = (fold, a, g)
    axes.sort(key=lambda t: -t[0])
    chosen = [axes[0]]
    while len(chosen) < min(k, len(axes)):
        rest = [t for t in axes if not any(t is c for c in chosen)]
        chosen.append(max(rest, key=lambda t: (min(np.arccos(min(1.0, abs(t[1] @ c[1])))
                                                   for c in chosen), t[0])))
    return np.array([t[2] for t in chosen])


def _pattern_search(score, R, step_deg: float, min_step_deg: float):
    """Greedy local ascent over exp(δ)·R, δ = ±step along x, y, z; halve when stuck."""
    best = score(R)
    step = np.radians(step_deg)
    while step >= np.radians(min_step_deg):
        moved = True
        while moved:
            moved = False
            for axis in range(3):
                for sign in (1.0, -1.0):
                    trial = Rotation.from_rotvec(np.eye(3)[axis] * sign * step).as_matrix() @ R
                    s = score(trial)
                    if s > best + 1e-9:
                        best, R, moved = s, trial, True
        step /= 2.0
    return R, best


def _refine_centre(score, R, cyclic: bool, step_px: float = 1.0, min_step_px: float = 0.05):
    """The point the symmetry axes pass through, by greedy ascent of ``score(R, c)``
    from the box centre (where the centre of mass put the map).  The centre of mass
    of a pseudo-symmetric map (one subunit differs) is off its axis; the symmetry
    score is not.  For Cn only moves across the axis count (along it nothing changes)."""
    if cyclic:
        axis = R.T @ np.array([0.0, 0.0, 1.0])
        u = np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0])
        u /= np.linalg.norm(u)
        directions = [u, np.cross(axis, u)]
    else:
        directions = list(np.eye(3))
    c = np.zeros(3)
    best = score(R, c)
    step = step_px
    while step >= min_step_px:
        moved = True
        while moved:
            moved = False
            for d in directions:
                for sign in (1.0, -1.0):
                    trial = c + sign * step * d
                    s = score(R, trial)
                    if s > best + 1e-9:
                        best, c, moved = s, trial, True
        step /= 2.0
    return c


def _closest_to_identity(R, group, cyclic: bool) -> np.ndarray:
    """Among the equivalent answers h·R (h in the group's normaliser: the group
    itself, and e.g. O for T; for Cn any turn about Z or a flip of the axis), the one
    with the smallest rotation angle."""
    if cyclic:
        axis = R.T @ np.array([0.0, 0.0, 1.0])      # the map's n-fold, in its own frame
        # the shortest turns taking it onto +Z and onto -Z
        options = [Rotation.align_vectors([[0.0, 0.0, z]], [axis])[0].as_matrix()
                   for z in (1.0, -1.0)]
        return min(options, key=lambda m: Rotation.from_matrix(m).magnitude())
    candidates = normalizer(group) @ R
    return candidates[int(np.argmin(Rotation.from_matrix(candidates).magnitude()))]


def align_symmetry_axes(volume, group_name: str, pixel_size_A: float,
                        coarse_step_deg: float = 12.0, n_candidates: int = 3,
                        tolerance_deg: float = 0.1):
    """Rotation and shift that bring the map's symmetry axes onto the convention axes.

    volume: (n, n, n) [z, y, x]; group_name: our point group (see geometry/symmetry.py).
    Returns (R (3, 3), shift_A (3,) as (x, y, z) Å, score): apply_alignment(volume, R,
    shift_A, pixel_size_A) is the aligned map; score is its mean correlation with
    its symmetry copies (1 for a perfectly symmetric map).  C1: no change, score 1.
    """
    name = canonical_name(group_name)
    group = point_group(name)
    v = np.asarray(volume, float)
    if len(group) == 1:
        return np.eye(3), np.zeros(3), 1.0
    shift_px = -center_of_mass_px(v)
    centred = _particle_box(rotate_volume(v, np.eye(3), shift_px, order=3))
    n = centred.shape[0]

    coarse = _Scorer(fourier_crop(centred, min(n, COARSE_BOX)), group[1:], order=1)
    grid = so3_grid(coarse_step_deg)
    # R and g·R score alike: keep one per class (R ~ g·R  ⇔  Rᵀ ~ Rᵀ·gᵀ)
    grid = grid[asymmetric_unit_mask(grid.transpose(0, 2, 1), group)]
    scores = np.array([coarse(R) for R in grid])
    starts = grid[np.argsort(scores)[::-1][:n_candidates]]

    few = _spread_elements(group, N_REFINE_ELEMENTS)
    middle = _Scorer(fourier_crop(centred, min(n, MIDDLE_BOX)), few, order=1)
    refined = [_pattern_search(middle, R, coarse_step_deg / 2, 1.0) for R in starts]
    R, _ = max(refined, key=lambda t: t[1])
    cyclic = name.startswith("C")
    fine_box = min(n, FINE_BOX)
    fine = _Scorer(fourier_crop(centred, fine_box), few, order=3)
    R, _ = _pattern_search(fine, R, 1.0, tolerance_deg)
    # put the axes' common point, not the centre of mass, on the box centre; then
    # touch up the rotation about that point
    centre = _refine_centre(fine, R, cyclic) * (n / fine_box)
    if np.linalg.norm(centre) > 0:
        shift_px = shift_px - centre
        centred = _particle_box(rotate_volume(v, np.eye(3), shift_px, order=3))
        fine = _Scorer(fourier_crop(centred, fine_box), few, order=3)
        R, _ = _pattern_search(fine, R, 0.5, tolerance_deg)
    R = _closest_to_identity(R, group, cyclic=cyclic)
    if Rotation.from_matrix(R).magnitude() < np.radians(2 * tolerance_deg):
        R = np.eye(3)   # already on the axes: leave the map unturned
    score = _Scorer(fourier_crop(centred, fine_box), group[1:], order=3)(R)
    if cyclic:
        # a Cn map keeps its symmetry under any move along its axis: make none, so the
        # map stays where it was along the axis (only the centring across it counts)
        axis = R.T @ np.array([0.0, 0.0, 1.0])
        shift_px = shift_px - (shift_px @ axis) * axis
    return R, shift_px * pixel_size_A, score


def apply_alignment(volume, R, shift_A, pixel_size_A: float, order: int = 3) -> np.ndarray:
    """The aligned map W(x) = V(Rᵀ·x − shift): shift by ``shift_A`` (x, y, z Å), then
    rotate by R about the box centre, in one interpolation.  float32 (n, n, n)."""
    # W(x) = V1(Rᵀx) with V1(y) = V(y − s)  ⇒  W(x) = V(Rᵀx − s)
    out = rotate_volume(np.asarray(volume, float), R, np.asarray(shift_A, float) / pixel_size_A,
                        order=order)
    return out.astype(np.float32)


__all__ = ["align_symmetry_axes", "apply_alignment", "rotate_volume", "center_of_mass_px",
           "fourier_crop"]
