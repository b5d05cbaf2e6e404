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
        if not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) < 0.5 or abs(np.linalg.det(m)) > 2:
            raise InputError(f"optics group {g}: magnification matrix {m.tolist()} is not a distortion "
                             "distortion (determinant far from 1)")
        if np.any(groups == g) and not np.allclose(m, np.eye(2), atol=1e-9):
            out[g] = m
    return out


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
            if abs(np.linalg.det(m)) < 0.5 or abs(np.linalg.det(m)) > 2:
                raise InputError(f"optics group {g}: ctf/anisomag {(m - np.eye(2)).ravel().tolist()} "
                                 "is not a magnification distortion (M − I far from small)")
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
#     X(k) ≈ P(k) + ∇P(k) · G k,    P = a · CTF · (projection at the particle's pose),
# with ∇ the gradient in frequency; here ∇ takes the CTF's change as well as the
# projection's (without it the isotropic part drifted at every fit).  Per frequency
# pixel, over a group's particles,
#     A(k) = Σ Re(∇P ∇Pᴴ) (2 × 2),   b(k) = Σ Re(conj(∇P) (X − P)) (2),
# and g = (G00, G01, G10, G11) minimises Σ_k ω(k) [(G k)ᵀ A (G k) − 2 bᵀ G k]: with
# K(k) = [[kx, ky, 0, 0], [0, 0, kx, ky]], (Σ ω Kᵀ A K) g = Σ ω Kᵀ b.  The images were
# undistorted with the group's matrix M in use, so its new matrix is (I + G) M.
#
# The isotropic part of M is nearly free: a map reconstructed from the same particles
# takes on their scale, and only the CTF (at the nominal pixel size) pins it.  The
# anisotropic part is what the fit measures; both are written, as RELION writes them.


def magnification_sums(vft, images_ft, ctf, ctf_dx, ctf_dy, rotations, shifts_px, scale):
    """Per-pixel sums (A (n, n//2+1, 2, 2), b (n, n//2+1, 2)), float64 on the images'
    device, of a batch of one optics group at its poses against ``vft`` (module notes).

    images_ft: (B, n, n//2+1) the undistorted images' transforms; ctf, ctf_dx, ctf_dy:
    the CTF and its derivatives along kx, ky (per cycle per box); rotations (B, 3, 3),
    shifts_px (B, 2) the poses (RELION origins), scale (B,).  Each image's prediction
    gets its least-squares amplitude a first (the reference's greyscale and filter are
    not the images'); the projection's gradient is exact (the transform of −2πi x s(x)/n)."""
    from mpirefine.backend import array_namespace
    from mpirefine.fourier.project import project_transforms
    from mpirefine.fourier.transforms import centered_irfft2, centered_rfft2, phase_shift_2d

    xp = array_namespace(images_ft)
    n, B = images_ft.shape[-2], images_ft.shape[0]
    s = project_transforms(vft, xp.asarray(rotations, dtype=xp.float32))
    s = s * xp.asarray(np.asarray(scale, float), dtype=xp.float32).reshape(B, 1, 1)
    image = centered_irfft2(s, n)
    x = xp.arange(n, dtype=xp.float32) - n // 2
    ds = (centered_rfft2(image * x[None, None, :]) * (-2j * np.pi / n),
          centered_rfft2(image * x[None, :, None]) * (-2j * np.pi / n))
    obs = phase_shift_2d(images_ft, shifts_px, n)
    p = ctf * s
    a = ((xp.conj(p) * obs).real.sum(axis=(1, 2))
         / xp.maximum((p.real ** 2 + p.imag ** 2).sum(axis=(1, 2)), 1e-30)).reshape(B, 1, 1)
    r = obs - a * p
    grad = (a * (ctf_dx * s + ctf * ds[0]), a * (ctf_dy * s + ctf * ds[1]))
    A = xp.empty((n, n // 2 + 1, 2, 2), xp.float64)
    b = xp.empty((n, n // 2 + 1, 2), xp.float64)
    for i in range(2):
        b[..., i] = (xp.conj(grad[i]) * r).real.astype(xp.float64).sum(axis=0)
        for j in range(i, 2):
            A[..., i, j] = (grad[i] * xp.conj(grad[j])).real.astype(xp.float64).sum(axis=0)
    A[..., 1, 0] = A[..., 0, 1]
    return A, b


def fit_magnification(A, b, kx, ky, weight) -> np.ndarray:
    """I + G (2 × 2) from the per-pixel sums (module notes), on the host; kx, ky:
    (n, n//2+1) frequencies in cycles per box; weight: ω per pixel (0 outside the band)."""
    A, b, w = np.asarray(A, float), np.asarray(b, float), np.asarray(weight, float)
    K = np.zeros(np.shape(kx) + (2, 4))
    K[..., 0, 0], K[..., 0, 1] = kx, ky
    K[..., 1, 2], K[..., 1, 3] = kx, ky
    KtA = np.einsum("abji,abjk->abik", K, A)
    lhs = np.einsum("ab,abij,abjk->ik", w, KtA, K)
    rhs = np.einsum("ab,abji,abj->i", w, K, b)
    return np.eye(2) + np.linalg.solve(lhs, rhs).reshape(2, 2)


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
