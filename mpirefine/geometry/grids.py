"""Search grids on SO(3) and on image shifts, for the coarse-to-fine pose search.

Global rotation grid (:func:`so3_grid`): the Hopf-fibration construction (Yershova
et al. 2010, as in cryoDRGN's ``so3_grid``): viewing directions from a Fibonacci
lattice on the sphere, each combined with uniformly spaced in-plane angles.  With an
angular step s (radians) there are about 4π/s² directions and 2π/s in-plane angles,
so the grid holds about 8π²/s³ rotations and every rotation lies within about s of
one of them.

Local refinement (:func:`rotation_children`): each grid point stands for a cell of
side s around it, in rotation-vector coordinates u of the particle frame (the child is
exp(u)·A: u_z turns the in-plane angle, u_x and u_y tilt the viewing direction, which
is how the Hopf grid's cells are laid out).  The "octant" stencil gives the 8 centres
of the half-size sub-cells, exp(±s/4, ±s/4, ±s/4)·A: one subdivision halves the step,
children of a regular lattice never coincide, and a chain of subdivisions converges to
any rotation inside the cell.  The global grid's cells are not cubes (the Fibonacci
directions have hexagonal cells reaching about 0.7 s from their centre), so its first
subdivision uses the "hopf" stencil: 3 × 3 children at u_x, u_y ∈ {−s/2, 0, s/2} and
2 at u_z = ±s/4, which covers |u_x|, |u_y| ≤ 3s/4 and |u_z| ≤ s/2 — every rotation
lies in such a box around one of its nearest grid points.

Shifts (:func:`shift_grid`, :func:`shift_children`): a square lattice of spacing
``step_px`` inside a disc, subdivided the same way (4 children at ±step/4).

The global grids are made on the host with NumPy (float64); the subdivisions
(:func:`rotation_children`, :func:`shift_children`, :func:`unique_shifts`) run in the
namespace of their input, so that the search's poses stay on its device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.spatial.transform import Rotation

from mpirefine.backend import array_namespace
from mpirefine.geometry.rotations import euler_to_matrix

#: Rotation-vector offsets (particle frame) of the children, in units of the parent's step.
ROTATION_STENCILS = {
    "octant": np.array([[x, y, z] for x in (-0.25, 0.25) for y in (-0.25, 0.25)
                        for z in (-0.25, 0.25)]),
    "hopf": np.array([[x, y, z] for x in (-0.5, 0.0, 0.5) for y in (-0.5, 0.0, 0.5)
                      for z in (-0.25, 0.25)]),
}
_SQUARE_CORNERS = np.array([[x, y] for x in (-0.25, 0.25) for y in (-0.25, 0.25)])


def fibonacci_sphere(n_points: int) -> np.ndarray:
    """Near-uniform unit vectors on the sphere, shape (n_points, 3).

    Points sit at equal steps of z (cell centres, so neither pole is sampled twice)
    and advance by the golden angle in azimuth.
    """
    if n_points < 1:
        raise ValueError("fibonacci_sphere needs at least one point")
    i = np.arange(n_points, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n_points
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def so3_grid_counts(step_deg: float) -> tuple[int, int]:
    """(viewing directions, in-plane angles) of :func:`so3_grid` for this step."""
    if not step_deg > 0:
        raise ValueError(f"angular step must be positive, got {step_deg}")
    step_rad = math.radians(step_deg)
    n_dirs = max(2, round(4.0 * math.pi / step_rad ** 2))
    n_psi = max(1, round(360.0 / step_deg))
    return n_dirs, n_psi


def so3_grid(step_deg: float) -> np.ndarray:
    """A near-uniform global grid of RELION matrices A, shape (R, 3, 3), R ≈ 8π²/step³.

    step_deg: the grid spacing in degrees; every rotation lies within about one step
    of a grid point.  Ordered direction-major: grid[d * n_psi + j] has viewing
    direction d and in-plane angle j · 360 / n_psi.
    """
    n_dirs, n_psi = so3_grid_counts(step_deg)
    v = fibonacci_sphere(n_dirs)
    tilt = np.degrees(np.arccos(np.clip(v[:, 2], -1.0, 1.0)))
    rot = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    psi = np.arange(n_psi) * (360.0 / n_psi)
    return euler_to_matrix(np.repeat(rot, n_psi), np.repeat(tilt, n_psi), np.tile(psi, n_dirs))


def rotation_children(parents, step_deg: float, stencil: str = "octant") -> np.ndarray:
    """Children of each parent cell, shape (P, c, 3, 3): c = 8 ("octant") or 18 ("hopf").

    parents: (P, 3, 3) (or (3, 3)) RELION matrices, the centres of cells of side
    ``step_deg``.  Child c is exp(u_c · step)·A with u_c from ROTATION_STENCILS (radians,
    particle frame); the children form a grid of step ``step_deg / 2``.  Octant children
    lie √3/4·step from their parent, hopf children at most 3/4·step.
    """
    xp = array_namespace(parents)
    A = xp.asarray(parents, dtype=xp.float64).reshape(-1, 3, 3)
    return xp.einsum("cij,pjk->pcik", xp.asarray(_stencil_matrices(stencil, step_deg)), A)


@lru_cache(maxsize=64)
def _stencil_matrices(stencil: str, step_deg: float) -> np.ndarray:
    """exp(u_c · step) of a stencil's offsets, (c, 3, 3) (read-only: it is shared)."""
    m = Rotation.from_rotvec(ROTATION_STENCILS[stencil] * math.radians(step_deg)).as_matrix()
    m.flags.writeable = False
    return m


def shift_grid(range_px: float, step_px: float) -> np.ndarray:
    """Shifts (x, y) in pixels on a square lattice of spacing ``step_px`` with |t| ≤ range_px.

    Shape (T, 2); (0, 0) is always included, so range_px = 0 gives one shift.
    """
    if not step_px > 0 or range_px < 0:
        raise ValueError(f"need step_px > 0 and range_px >= 0, got {step_px}, {range_px}")
    m = int(math.floor(range_px / step_px + 1e-9))
    i = np.arange(-m, m + 1, dtype=np.float64) * step_px
    x, y = np.meshgrid(i, i, indexing="xy")
    t = np.stack([x.ravel(), y.ravel()], axis=-1)
    return t[np.hypot(t[:, 0], t[:, 1]) <= range_px + 1e-9 * step_px]


def shift_children(parents, step_px: float) -> np.ndarray:
    """The 4 sub-cell centres of each parent shift cell of side ``step_px``, shape (..., 4, 2).

    parents: (..., 2) shifts in pixels.  Children sit at ±step/4 in x and y, forming a
    lattice of spacing step/2.
    """
    xp = array_namespace(parents)
    t = xp.asarray(parents, dtype=xp.float64)
    return t[..., None, :] + xp.asarray(_SQUARE_CORNERS * step_px)


def unique_shifts(shifts):
    """Drop repeated shifts within each row, padding rows to a common length.

    shifts: (b, m, 2), NumPy or CuPy.  Returns (b, T, 2) and valid (b, T) bool, T the
    largest number of distinct shifts in a row: each row's distinct shifts sorted by x,
    then y, then padding that repeats the row's first shift and is invalid.  Children of
    equal parents come from the same arithmetic, so exact comparison finds every repeat.
    Reading T is the one synchronising step on a GPU.
    """
    xp = array_namespace(shifts)
    b, m = shifts.shape[:2]
    # lexicographic order by two stable sorts: by y, then by x
    by_y = xp.argsort(shifts[..., 1], axis=1, kind="stable")
    x = xp.take_along_axis(shifts[..., 0], by_y, axis=1)
    order = xp.take_along_axis(by_y, xp.argsort(x, axis=1, kind="stable"), axis=1)
    s = xp.take_along_axis(shifts, order[..., None], axis=1)
    new = xp.ones((b, m), dtype=bool)
    new[:, 1:] = xp.any(s[:, 1:] != s[:, :-1], axis=-1)
    count = new.sum(axis=1)
    T = int(count.max())
    column = xp.where(new, xp.cumsum(new, axis=1) - 1, T)     # repeats go to a spare column
    out = xp.repeat(s[:, :1], T + 1, axis=1)
    out[xp.arange(b)[:, None], column] = s
    return out[:, :T], xp.arange(T)[None, :] < count[:, None]
