"""Anisotropic magnification: RELION's per-optics-group rlnMagMatrix_00..11.

In RELION's convention the 2×2 matrix M maps an image's observed frequency k to the
true one: the image's transform at k is CTF(M k) · V(M k).  A particle's image is
brought onto the true grid once, as it is read: x_u(r) = |det M| x(Mᵀ r) about the box
centre, whose transform at q is the observed one at M⁻¹ q, i.e. CTF(q) V(q).  Everything
after (search, insertion, CTF refinement) then works on undistorted images.  The warp
is a cubic spline on the host (scipy.ndimage), periodic like the images' FFTs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mpirefine.errors import InputError

MAG_COLUMNS = ("rlnMagMatrix_00", "rlnMagMatrix_01", "rlnMagMatrix_10", "rlnMagMatrix_11")


def input_mag_matrices(particle_set) -> dict:
    """{optics group: (2, 2) M} from the optics table's rlnMagMatrix_00..11, for the
    groups whose M is not the identity (and that hold particles)."""
    optics = getattr(particle_set, "_star_optics", None)
    if optics is None or not set(MAG_COLUMNS) & set(optics.columns):
        return {}
    missing = [c for c in MAG_COLUMNS if c not in optics.columns]
    if missing:
        raise InputError(f"the optics table has {sorted(set(MAG_COLUMNS) - set(missing))} but not "
                         f"{missing}: give all four rlnMagMatrix_00..11 or none")
    groups = np.asarray(particle_set.optics_group)
    out = {}
    for _, row in optics.iterrows():
        g = int(row["rlnOpticsGroup"])
        m = np.array([[row[MAG_COLUMNS[0]], row[MAG_COLUMNS[1]]],
                      [row[MAG_COLUMNS[2]], row[MAG_COLUMNS[3]]]], float)
        if not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) < 0.5 or abs(np.linalg.det(m)) > 2:
            raise InputError(f"optics group {g}: rlnMagMatrix {m.tolist()} is not a magnification "
                             "distortion (determinant far from 1)")
        if np.any(groups == g) and not np.allclose(m, np.eye(2), atol=1e-9):
            out[g] = m
    return out


def undistort_images(images, matrix) -> np.ndarray:
    """Images (B, n, n) float32 on the host brought onto the true frequency grid of
    their optics group's M (module docstring)."""
    m = np.asarray(matrix, float)
    n = images.shape[-1]
    # out(r) = in(Mᵀ r) with r = (x, y) from the centre; ndimage indexes (y, x)
    t = m.T
    index_map = np.array([[t[1, 1], t[1, 0]], [t[0, 1], t[0, 0]]])
    centre = np.full(2, n // 2, float)
    offset = centre - index_map @ centre
    scale = abs(np.linalg.det(m))
    out = np.empty(images.shape, np.float32)
    for i, image in enumerate(np.asarray(images, np.float32)):
        out[i] = scale * ndimage.affine_transform(image, index_map, offset=offset, order=3,
                                                  mode="grid-wrap")
    return out


def observed_frequencies(kx, ky, matrix):
    """The true frequencies M k of observed frequencies (kx, ky) (any units)."""
    m = np.asarray(matrix, float)
    return m[0, 0] * kx + m[0, 1] * ky, m[1, 0] * kx + m[1, 1] * ky


def anisotropic_matrix(amount: float, angle_deg: float) -> np.ndarray:
    """M that stretches frequencies by (1 + amount) along the direction at ``angle_deg``
    from X and leaves the perpendicular one unchanged."""
    a = np.radians(angle_deg)
    u = np.array([np.cos(a), np.sin(a)])
    return np.eye(2) + amount * np.outer(u, u)


class Undistorted:
    """An image source (ImageSource, MixedBoxImages) whose batches come out undistorted
    by their optics groups' M (:func:`undistort_images`)."""

    def __init__(self, source, optics_group: np.ndarray, matrices: dict):
        self.source = source
        self.optics_group = np.asarray(optics_group)
        self.matrices = matrices

    def _fix(self, indices, images):
        groups = self.optics_group[np.asarray(indices, np.int64).reshape(-1)]
        out = np.asarray(images, np.float32)
        for g, m in self.matrices.items():
            rows = np.flatnonzero(groups == g)
            if rows.size:
                out = out.copy() if out is images else out
                out[rows] = undistort_images(out[rows], m)
        return out

    def batches(self, indices, size: int):
        for idx, images in self.source.batches(indices, size):
            yield idx, self._fix(idx, images)

    def images(self, indices):
        return self._fix(indices, self.source.images(indices))

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __enter__(self) -> "Undistorted":
        self.source.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.source.__exit__(*exc)

