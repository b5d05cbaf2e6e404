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


# ------------------------------------------------------------------ the fit
#
# relion_ctf_refine --fit_aniso's formulation (MagnificationHelper): an image whose
# remaining distortion is D = I + G (its true frequencies are D k) is, to first order,
# X(k) ≈ P(k) + ∇P(k) · G k, with P = CTF · (scaled projection) at the particle's pose
# and ∇ the gradient in frequency.  Per frequency pixel, over a group's particles,
#     A = Σ Re(∇P ∇Pᴴ) (2 × 2),   b = Σ Re(conj(∇P) (X − P)) (2),
# and G minimises Σ_k ω(k) [(G k)ᵀ A (G k) − 2 bᵀ G k]: with g = (G00, G01, G10, G11)
# and K(k) = [[kx, ky, 0, 0], [0, 0, kx, ky]], (Σ ω Kᵀ A K) g = Σ ω Kᵀ b (RELION first
# solves each pixel's displacement A⁻¹ b and fits G to that field; the normal
# equations here weight each pixel by its A instead).  The group's new matrix is D M.


def magnification_sums(vft, images_ft, ctf_params, rotations, shifts_px, scale, pixel_size_A,
                       gamma_offset=None, step: float = 0.05):
    """Per-pixel sums (A (n, n//2+1, 2, 2), b (n, n//2+1, 2)) of a batch of particles
    (images_ft: (B, n, n//2+1) undistorted transforms) at their poses against ``vft``.
    Frequencies in cycles per box; the CTF's gradient by central differences of
    ``step`` cycles per box, the projection's exactly (the transform of -2πi x s(x)/n)."""
    from mpirefine.backend import array_namespace
    from mpirefine.fourier.project import project_transforms
    from mpirefine.fourier.transforms import centered_irfft2, centered_rfft2, freq_grid_2d, phase_shift_2d
    from mpirefine.physics.ctf import evaluate_ctf

    xp = array_namespace(images_ft)
    n = images_ft.shape[-2]
    ky, kx = freq_grid_2d(n, xp)
    to_A = 1.0 / (n * pixel_size_A)
    s = project_transforms(vft, rotations) * xp.asarray(scale, xp.float32).reshape(-1, 1, 1)
    image = centered_irfft2(s, n)
    x = xp.arange(n, dtype=xp.float32) - n // 2
    dsx = centered_rfft2(image * x[None, None, :]) * (-2j * np.pi / n)
    dsy = centered_rfft2(image * x[None, :, None]) * (-2j * np.pi / n)

    def ctf_at(dx, dy):
        return evaluate_ctf(ctf_params, (kx + dx) * to_A, (ky + dy) * to_A, gamma_offset=gamma_offset)

    ctf = ctf_at(0.0, 0.0)
    dcx = (ctf_at(step, 0.0) - ctf_at(-step, 0.0)) / (2 * step)
    dcy = (ctf_at(0.0, step) - ctf_at(0.0, -step)) / (2 * step)
    p = ctf * s
    grad = (dcx * s + ctf * dsx, dcy * s + ctf * dsy)
    r = phase_shift_2d(images_ft, shifts_px, n) - p
    A = xp.empty((n, n // 2 + 1, 2, 2), xp.float64)
    b = xp.empty((n, n // 2 + 1, 2), xp.float64)
    for i in range(2):
        b[..., i] = (xp.conj(grad[i]) * r).real.sum(axis=0)
        for j in range(2):
            A[..., i, j] = (grad[i] * xp.conj(grad[j])).real.sum(axis=0)
    return A, b


def fit_magnification(A, b, kx, ky, weight) -> np.ndarray:
    """D = I + G (2 × 2) from the per-pixel sums (module notes); kx, ky: (n, n//2+1)
    frequencies in cycles per box; weight: (n, n//2+1) ω (0 outside the fitted band)."""
    A, b = np.asarray(A, float), np.asarray(b, float)
    w = np.asarray(weight, float)
    K = np.zeros(kx.shape + (2, 4))
    K[..., 0, 0], K[..., 0, 1] = kx, ky
    K[..., 1, 2], K[..., 1, 3] = kx, ky
    KtA = np.einsum("...ji,...jk->...ik", K, A)
    lhs = np.einsum("...,...ij,...jk->ik", w, KtA, K)
    rhs = np.einsum("...,...ji,...j->i", w, K, b)
    g = np.linalg.solve(lhs, rhs)
    return np.eye(2) + g.reshape(2, 2)
