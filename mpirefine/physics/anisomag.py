"""Anisotropic magnification: RELION's per-optics-group rlnMagMat00..11.

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

#: RELION's labels (metadata_label.h, 3.1 to 5.0); what we write
MAG_COLUMNS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")
#: another spelling some tools write; read as RELION's (RELION itself ignores it)
ALIAS_MAG_COLUMNS = ("rlnMagMatrix_00", "rlnMagMatrix_01", "rlnMagMatrix_10", "rlnMagMatrix_11")


def input_mag_matrices(particle_set) -> dict:
    """{optics group: (2, 2) M} from the optics table's rlnMagMat00..11 (or
    rlnMagMatrix_00..11), for the groups whose M is not the identity (and that hold
    particles)."""
    optics = getattr(particle_set, "_star_optics", None)
    if optics is None:
        return _cs_mag_matrices(particle_set)
    names = MAG_COLUMNS
    if not set(names) & set(optics.columns):
        names = ALIAS_MAG_COLUMNS
        if not set(names) & set(optics.columns):
            return {}
    missing = [c for c in names if c not in optics.columns]
    if missing:
        raise InputError(f"the optics table has {sorted(set(names) - set(missing))} but not "
                         f"{missing}: give all four {names[0][:-2]}00..11 or none")
    groups = np.asarray(particle_set.optics_group)
    out = {}
    for _, row in optics.iterrows():
        g = int(row["rlnOpticsGroup"])
        m = np.array([[row[names[0]], row[names[1]]], [row[names[2]], row[names[3]]]], float)
        _check_distortion(m, g, f"{names[0][:-2]}00..11")
        if np.any(groups == g) and not np.allclose(m, np.eye(2), atol=1e-9):
            out[g] = m
    return out


def _check_distortion(m, group: int, source: str) -> None:
    """InputError unless ``m`` is a plausible magnification distortion (finite, its
    determinant within a factor 2 of 1)."""
    det = abs(np.linalg.det(m)) if np.all(np.isfinite(m)) else np.nan
    if not 0.5 <= det <= 2:
        raise InputError(f"optics group {group}: magnification matrix {m.tolist()} from {source} "
                         "is not a distortion (determinant far from 1)")


def _cs_mag_matrices(particle_set) -> dict:
    """{optics group: M} from a CryoSPARC table's ctf/anisomag (M − I, row-major, as
    io/cs.py writes it), each group's median; {} where it is absent or zero."""
    table = getattr(particle_set, "_cs_table", None)
    if table is None or "ctf/anisomag" not in table.dtype.names:
        return {}
    values = np.asarray(table["ctf/anisomag"], float).reshape(-1, 4)
    groups = np.asarray(particle_set.optics_group)
    out = {}
    for g in np.unique(groups):
        m = np.eye(2) + np.median(values[groups == g], axis=0).reshape(2, 2)
        if not np.allclose(m, np.eye(2), rtol=0.0, atol=1e-9):
            _check_distortion(m, int(g), "ctf/anisomag (+ I)")
            out[int(g)] = m
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
        for g, m in list(self.matrices.items()):
            if np.allclose(m, np.eye(2), rtol=0.0, atol=1e-9):
                continue
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



# ------------------------------------------------------------------ the fit
#
# relion_ctf_refine --fit_aniso's first-order model: an image whose remaining
# distortion is I + G (its true frequencies are (I + G) k, G small) is
#     X ≈ P + Σ_ij G_ij B_ij,   B_ij = ∂P/∂k_i · k_j,
# P = a · CTF · (projection at the particle's pose), a its least-squares amplitude; ∂
# takes the CTF's change as well as the projection's (without it the isotropic part
# drifted at every fit).  Per frequency pixel, over a group's particles,
#     A = Σ Re(B Bᴴ) (4 × 4),   b = Σ Re(conj(B) (X − P)) (4),
# and g = (G00, G01, G10, G11) solves (Σ_k ω A) g = Σ_k ω b.  The images were
# undistorted with the group's matrix M in use, so its new matrix is (I + G) M.
#
# P and the B_ij are made as the particle was: in a box twice the size, shifted to the
# particle's origin and cut to the box, as the particle was cut from the micrograph.
# B_ij weights the particle's outer parts (∂P/∂k is the transform of −2πi x p(x)), where
# the CTF's delocalised signal leaves the box; made in the box itself (periodic), they
# overstate what the image can show, and one round recovered 35–60 % of a stretch
# (relion_ctf_refine's, which does the same, likewise).  Cut from the double box, a
# round recovers 98 % of a 0.2 % stretch and 91 % of a 1.5 % one (the rest is the
# model's first order), the isotropic part included.

FIT_CHUNK = 8    # particles whose double-box arrays are in memory at once


def magnification_sums(vft, images_ft, ctf_at, rotations, shifts_px, scale):
    """Per-pixel sums (A (n, n//2+1, 4, 4), b (n, n//2+1, 4)), float64 on the images'
    device, of a batch of one optics group at its poses against ``vft`` (module notes).

    images_ft: (B, n, n//2+1) the undistorted images' transforms; ctf_at(rows, dx, dy):
    the CTFs of particles ``rows`` on the (2n, n+1) double-box grid at frequencies
    shifted by (dx, dy) cycles of the n-box; rotations (B, 3, 3), shifts_px (B, 2) the
    poses (RELION origins, px), scale (B,)."""
    from mpirefine.backend import array_namespace
    from mpirefine.fourier.project import extract_slices
    from mpirefine.fourier.transforms import (
        centered_irfft2,
        centered_rfft2,
        cut_from_double_box,
        double_box_frequencies,
    )

    xp = array_namespace(images_ft)
    n, B = images_ft.shape[-2], images_ft.shape[0]
    big = 2 * n
    kx, ky = double_box_frequencies(n, xp)            # cycles of the n-box
    x = xp.arange(big, dtype=xp.float32) - n
    h = 0.05
    A = xp.zeros((n, n // 2 + 1, 4, 4), xp.float64)
    b = xp.zeros((n, n // 2 + 1, 4), xp.float64)
    rotations = np.asarray(rotations, float)
    origins = np.asarray(shifts_px, float)
    scale = np.asarray(scale, float)

    def cut(f, shift):
        return centered_rfft2(cut_from_double_box(f, shift, n))

    for start in range(0, B, FIT_CHUNK):
        rows = np.arange(start, min(start + FIT_CHUNK, B))
        m = len(rows)
        s = extract_slices(vft, xp.asarray(rotations[rows], dtype=xp.float32), kx.ravel(),
                           ky.ravel()).reshape(m, big, n + 1)
        s = s * xp.asarray(scale[rows], dtype=xp.float32).reshape(m, 1, 1)
        image = centered_irfft2(s, big)
        ds = (centered_rfft2(image * x[None, None, :]) * (-2j * np.pi / n),
              centered_rfft2(image * x[None, :, None]) * (-2j * np.pi / n))
        c = ctf_at(rows, 0.0, 0.0)
        dc = ((ctf_at(rows, h, 0.0) - ctf_at(rows, -h, 0.0)) / (2 * h),
              (ctf_at(rows, 0.0, h) - ctf_at(rows, 0.0, -h)) / (2 * h))
        shift = -origins[rows]                        # the particle: projection at -origin
        p = cut(c * s, shift)
        obs = images_ft[xp.asarray(rows)]
        a = ((xp.conj(p) * obs).real.sum(axis=(1, 2))
             / xp.maximum((p.real ** 2 + p.imag ** 2).sum(axis=(1, 2)), 1e-30)).reshape(m, 1, 1)
        r = obs - a * p
        basis = [a * cut((dc[i] * s + c * ds[i]) * k, shift) for i in range(2) for k in (kx, ky)]
        for i in range(4):
            b[..., i] += (xp.conj(basis[i]) * r).real.astype(xp.float64).sum(axis=0)
            for j in range(i, 4):
                A[..., i, j] += (basis[i] * xp.conj(basis[j])).real.astype(xp.float64).sum(axis=0)
    for i in range(4):
        for j in range(i):
            A[..., i, j] = A[..., j, i]
    return A, b


def fit_magnification(A, b, weight) -> np.ndarray:
    """I + G (2 × 2) from the per-pixel sums (module notes), on the host; weight: ω per
    (n, n//2+1) pixel (0 outside the band)."""
    A, b, w = np.asarray(A, float), np.asarray(b, float), np.asarray(weight, float)
    g = np.linalg.solve(np.einsum("ab,abij->ij", w, A), np.einsum("ab,abi->i", w, b))
    return np.eye(2) + g.reshape(2, 2)


def describe_matrix(matrix) -> dict:
    """A magnification matrix as a user reads it: the isotropic scale √|det M| − 1 and
    the anisotropy (the ratio of the stretches along the symmetric part's principal
    axes, minus 1) with the angle of the stronger one from X, in % and degrees."""
    m = np.asarray(matrix, float)
    sym = 0.5 * (m + m.T)
    values, vectors = np.linalg.eigh(sym)
    major = vectors[:, 1]
    angle = float(np.degrees(np.arctan2(major[1], major[0]))) % 180.0
    return {"matrix": [[float(v) for v in row] for row in m],
            "isotropic_percent": float(100.0 * (np.sqrt(abs(np.linalg.det(m))) - 1.0)),
            "anisotropy_percent": float(100.0 * (values[1] / values[0] - 1.0)),
            "anisotropy_angle_deg": angle}
