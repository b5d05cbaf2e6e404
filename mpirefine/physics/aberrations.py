"""Odd (antisymmetric) aberrations of an optics group: beam tilt and trefoil, in
RELION's conventions (RELION 3.1 ObservationModel, Zernike.cpp, TiltHelper).

An odd aberration shifts the phase of every Fourier component of an image by φ(k),
φ(−k) = −φ(k), on top of the CTF (which only holds even terms):

    observed image  X(k) = CTF(k) · exp(+i φ(k)) · projection(k)

so the images are *demodulated* (multiplied by exp(−i φ)) before the search scores
them and the backprojection inserts them, and the simulator modulates its
projections by exp(+i φ).

φ is a sum of odd Zernike polynomials of the frequency k = (kx, ky) in 1/Å (not scaled
to a unit disc; RELION's ``rlnOddZernike`` coefficients are then in rad·Å^n), in
RELION's order (``Zernike::Z_cart``, no normalisation factors):

    [0] Z1⁻¹ = y          [1] Z1¹ = x
    [2] Z3⁻³ = 3x²y − y³   [3] Z3⁻¹ = (3r² − 2) y   [4] Z3¹ = (3r² − 2) x   [5] Z3³ = x³ − 3xy²

Beam tilt (τx, τy in mrad; ``rlnBeamTiltX/Y``) is the third-order coma

    φ(k) = −2π · Cs · λ² · 10⁻³ · |k|² (τx kx + τy ky)      (Cs in Å, λ in Å)

which is Z3¹ and Z3⁻¹ with coefficient −2π Cs λ² 10⁻³ τ / 3, less the linear part
(2 × that on Z1¹, Z1⁻¹) that the Z3 terms carry.  Trefoil is Z3⁻³ and Z3³.  Z1 is a
plain image shift, which the per-particle origins absorb; the fit keeps it as a
nuisance parameter, as relion_ctf_refine does.

The fit (:func:`fit_odd_aberrations`) follows relion_ctf_refine's formulation: per
frequency pixel, over the group's particles at their current poses,
xy(k) = Σ c(k) · conj(P(k)) · X(k) and w(k) = Σ c(k)² |P(k)|² (c the CTF, P the
reference projection, X the shifted image); then the coefficients minimise
Σ_k ω(k) |exp(i Σ cⱼ Zⱼ(k)) − xy(k) / w(k)|² with ω = w · FSC weight, between a minimum
fit resolution and the current resolution, started from a linear fit to the phase
of xy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpirefine.backend import array_namespace
from mpirefine.errors import InputError
from mpirefine.physics.noise import images_at_poses

N_ODD = 6                                  # Zernike terms up to n = 3
TILT_TERMS = (0, 1, 3, 4)                  # shift and coma: what beam tilt changes
TREFOIL_TERMS = (2, 5)


def odd_zernike_basis(kx_A, ky_A):
    """The six odd Zernike polynomials up to n = 3 at frequencies (1/Å), RELION's order;
    (6,) + kx_A.shape, in the arrays' own namespace."""
    x, y = kx_A, ky_A
    r2 = x * x + y * y
    return [y, x, 3 * x * x * y - y ** 3, (3 * r2 - 2) * y, (3 * r2 - 2) * x, x ** 3 - 3 * x * y * y]


def coma_scale(cs_mm: float, wavelength_A: float) -> float:
    """2π Cs λ² per rad of beam tilt, Cs in Å: φ = −coma_scale · 10⁻³ τ[mrad] |k|² (k·t̂)."""
    return 2.0 * np.pi * cs_mm * 1e7 * wavelength_A ** 2


def tilt_to_zernike(tilt_x_mrad: float, tilt_y_mrad: float, cs_mm: float, wavelength_A: float,
                    coefficients=None) -> np.ndarray:
    """Odd Zernike coefficients with the beam tilt added (RELION's insertTilt)."""
    c = np.zeros(N_ODD) if coefficients is None else np.array(coefficients, float).copy()
    s = coma_scale(cs_mm, wavelength_A) * 1e-3
    z3x, z3y = -s * tilt_x_mrad / 3.0, -s * tilt_y_mrad / 3.0
    c[1] += 2 * z3x
    c[4] += z3x
    c[0] += 2 * z3y
    c[3] += z3y
    return c


def zernike_to_tilt(coefficients, cs_mm: float, wavelength_A: float):
    """(tilt_x_mrad, tilt_y_mrad, rest): the coma terms as beam tilt, and the coefficients
    left without it (their Z3¹/Z3⁻¹ zero; RELION's extractTilt)."""
    c = np.array(coefficients, float).copy()
    s = coma_scale(cs_mm, wavelength_A) * 1e-3
    tilt_x, tilt_y = -3.0 * c[4] / s, -3.0 * c[3] / s
    c[1] -= 2 * c[4]
    c[0] -= 2 * c[3]
    c[3] = c[4] = 0.0
    return tilt_x, tilt_y, c


def odd_phase(coefficients, kx_A, ky_A):
    """φ(k) = Σ cⱼ Zⱼ(k) (radians) at frequencies in 1/Å."""
    basis = odd_zernike_basis(kx_A, ky_A)
    out = 0.0 * kx_A
    for c, z in zip(np.asarray(coefficients, float), basis):
        if c:
            out = out + float(c) * z
    return out


@dataclass(frozen=True)
class OddFit:
    """One optics group's fitted odd aberrations."""

    coefficients: np.ndarray        # (6,) all odd terms, tilt included (rad·Å^n)
    tilt_x_mrad: float
    tilt_y_mrad: float
    trefoil: np.ndarray             # (2,) Z3⁻³, Z3³ coefficients
    pixels: int                     # frequency pixels that carried weight

    def as_dict(self) -> dict:
        return {"beam_tilt_x_mrad": self.tilt_x_mrad, "beam_tilt_y_mrad": self.tilt_y_mrad,
                "trefoil": [float(v) for v in self.trefoil],
                "odd_zernike": [float(v) for v in self.coefficients], "pixels": self.pixels}


def fit_odd_aberrations(xy, w, kx_A, ky_A, weight, cs_mm: float, wavelength_A: float,
                        fit_tilt: bool = True, fit_trefoil: bool = True) -> OddFit:
    """Odd Zernike coefficients of one optics group from its per-pixel sums (NumPy).

    xy (complex), w (real): Σ c conj(P) X and Σ c² |P|² per frequency pixel; kx_A, ky_A
    the pixels' frequencies (1/Å); weight: ω/w per pixel (the FSC weight, 0 outside the
    fitted band).  Terms not fitted stay zero, except Z1 (image shift), always fitted.
    """
    from scipy.optimize import least_squares

    xy, w = np.asarray(xy).ravel(), np.asarray(w, float).ravel()
    kx, ky = np.asarray(kx_A, float).ravel(), np.asarray(ky_A, float).ravel()
    om = np.asarray(weight, float).ravel() * w
    use = (om > 0) & (np.abs(xy) > 0)
    terms = [0, 1]
    if fit_tilt:
        terms += [3, 4]
    if fit_trefoil:
        terms += list(TREFOIL_TERMS)
    terms = sorted(terms)
    if use.sum() < 4 * len(terms):
        return OddFit(np.zeros(N_ODD), 0.0, 0.0, np.zeros(2), int(use.sum()))
    z = xy[use] / w[use]
    om = om[use]
    basis = np.stack([odd_zernike_basis(kx[use], ky[use])[j] for j in terms], axis=1)
    # scale each column to unit RMS so the solvers see a well-conditioned problem
    norm = np.sqrt(np.mean(basis ** 2, axis=0))
    A = basis / norm
    sq = np.sqrt(om)
    phase = np.angle(z)
    # linear start on the phase, from the low frequencies where it cannot wrap
    low = np.hypot(kx[use], ky[use]) <= np.quantile(np.hypot(kx[use], ky[use]), 0.5)
    start, *_ = np.linalg.lstsq(A[low] * sq[low, None], phase[low] * sq[low], rcond=None)

    def residual(p):
        d = np.exp(1j * (A @ p)) - z
        return np.concatenate([sq * d.real, sq * d.imag])

    p = least_squares(residual, start, method="lm", xtol=1e-12, ftol=1e-12).x
    c = np.zeros(N_ODD)
    c[terms] = p / norm
    tx, ty, _ = zernike_to_tilt(c, cs_mm, wavelength_A)
    return OddFit(c, float(tx), float(ty), c[list(TREFOIL_TERMS)].copy(), int(use.sum()))


def odd_aberration_sums(vft, images_ft, ctf, rotations, shifts_px, scale):
    """Per-pixel (xy, w) = (Σ c · conj(a P) · X, Σ c² |a P|²) over a batch of one optics
    group at its poses, (n, n // 2 + 1) complex128 and float64 on the images' device:
    what :func:`fit_odd_aberrations` fits.  images_ft: the images *not* demodulated (so
    the fit gives the group's whole odd phase); ctf (B, n, n // 2 + 1) real; rotations
    (B, 3, 3), shifts_px (B, 2) the poses (RELION origins); scale (B,)."""
    xp = array_namespace(images_ft)
    n, B = vft.n, images_ft.shape[0]
    x, pred, inside = images_at_poses(vft, images_ft, rotations, shifts_px, scale)
    c = ctf.reshape(B, -1)[:, inside]
    xy = xp.zeros(n * (n // 2 + 1), xp.complex128)
    w = xp.zeros(n * (n // 2 + 1), xp.float64)
    xy[inside] = (c * xp.conj(pred) * x).astype(xp.complex128).sum(axis=0)
    w[inside] = (c * c * (pred.real ** 2 + pred.imag ** 2)).astype(xp.float64).sum(axis=0)
    return xy.reshape(n, n // 2 + 1), w.reshape(n, n // 2 + 1)


def demodulation(coefficients, kx_A, ky_A, xp):
    """exp(−i φ(k)) on a frequency grid (1/Å), complex64: multiplies the images."""
    phi = odd_phase(coefficients, xp.asarray(kx_A, dtype=xp.float64), xp.asarray(ky_A, dtype=xp.float64))
    return xp.exp(-1j * phi).astype(xp.complex64)


class GroupDemodulation:
    """exp(−i φ) of each optics group's odd aberrations on the (n, n // 2 + 1) image
    grid of ``pixel_size_A``, applied to each particle's transforms by its group
    (particles of groups without aberrations are multiplied by 1)."""

    def __init__(self, coefficients: dict, n: int, pixel_size_A: float, xp):
        from mpirefine.fourier.transforms import freq_grid_2d

        groups = sorted(int(g) for g in coefficients)
        ky, kx = freq_grid_2d(n, xp)
        scale = 1.0 / (n * pixel_size_A)
        self.table = xp.stack([xp.ones((n, n // 2 + 1), xp.complex64)]
                              + [demodulation(coefficients[g], kx * scale, ky * scale, xp)
                                 for g in groups])
        self.row = np.zeros(max(groups, default=0) + 1, np.int64)   # group → table row
        self.row[groups] = np.arange(1, len(groups) + 1)
        self.xp = xp

    def __call__(self, optics_groups, *images):
        """``images`` (each (B, n, n // 2 + 1)) × their particles' factors, a tuple."""
        g = np.asarray(optics_groups, np.int64)
        rows = np.where((g >= 0) & (g < len(self.row)), self.row[np.clip(g, 0, len(self.row) - 1)], 0)
        factor = self.table[self.xp.asarray(rows)]
        return tuple(a * factor for a in images)


def parse_zernike(value) -> np.ndarray:
    """A STAR ``rlnOddZernike`` / ``rlnEvenZernike`` value ("[a,b,...]" or a list) as floats."""
    if isinstance(value, str):
        value = [v for v in value.strip().strip("[]").split(",") if v.strip()]
    return np.asarray([float(v) for v in value], float)


def format_zernike(coefficients) -> str:
    """RELION's text form of a Zernike list: [a,b,...]."""
    return "[" + ",".join(f"{float(v):.10g}" for v in coefficients) + "]"


def input_odd_aberrations(particle_set) -> dict:
    """{optics group: (6,) odd Zernike coefficients} from a RELION 3.1+ optics table's
    rlnBeamTiltX/Y (mrad) and rlnOddZernike, as RELION combines them on reading
    (the tilt is added to the Zernike terms); groups without either are left out."""
    optics = getattr(particle_set, "_star_optics", None)
    if optics is None or not ({"rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike"} & set(optics.columns)):
        return {}
    from mpirefine.physics.ctf import electron_wavelength_A

    out = {}
    groups = np.asarray(particle_set.optics_group)
    for _, row in optics.iterrows():
        g = int(row["rlnOpticsGroup"])
        c = np.zeros(N_ODD)
        if "rlnOddZernike" in optics.columns:
            z = parse_zernike(row["rlnOddZernike"])
            if np.any(z[N_ODD:]):
                raise InputError(f"optics group {g}: rlnOddZernike has terms beyond third order "
                                 f"({len(z)} coefficients); only the first {N_ODD} (n <= 3: "
                                 "shift, beam tilt, trefoil) are supported yet")
            c[:min(len(z), N_ODD)] = z[:N_ODD]
        tx = float(row["rlnBeamTiltX"]) if "rlnBeamTiltX" in optics.columns else 0.0
        ty = float(row["rlnBeamTiltY"]) if "rlnBeamTiltY" in optics.columns else 0.0
        if tx or ty:
            c = tilt_to_zernike(tx, ty, float(row["rlnSphericalAberration"]),
                                float(electron_wavelength_A(float(row["rlnVoltage"]))), c)
        if np.any(c) and np.any(groups == g):
            out[g] = c
    return out
