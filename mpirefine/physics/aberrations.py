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


def frequency_grid_A(n: int, pixel_size_A: float, xp):
    """(kx, ky) in 1/Å on the (n, n // 2 + 1) image grid of ``pixel_size_A``, float64."""
    from mpirefine.fourier.transforms import freq_grid_2d

    ky, kx = freq_grid_2d(n, xp)
    scale = 1.0 / (n * pixel_size_A)
    shape = (n, n // 2 + 1)
    return (xp.broadcast_to(xp.asarray(kx, dtype=xp.float64) * scale, shape),
            xp.broadcast_to(xp.asarray(ky, dtype=xp.float64) * scale, shape))


class GroupTable:
    """One (n, n // 2 + 1) array per optics group, stacked behind ``neutral`` (row 0:
    the particles of groups without an entry); :meth:`lookup` gives each particle's."""

    def __init__(self, neutral, per_group: dict, xp):
        groups = sorted(int(g) for g in per_group)
        self.table = xp.stack([neutral] + [per_group[g] for g in groups])
        self.row = np.zeros(max(groups, default=0) + 1, np.int64)   # group → table row
        self.row[groups] = np.arange(1, len(groups) + 1)
        self.xp = xp

    def lookup(self, optics_groups):
        """(B, n, n // 2 + 1): the array of each particle's optics group."""
        g = np.asarray(optics_groups, np.int64)
        rows = np.where((g >= 0) & (g < len(self.row)), self.row[np.clip(g, 0, len(self.row) - 1)], 0)
        return self.table[self.xp.asarray(rows)]


class GroupDemodulation(GroupTable):
    """exp(−i φ) of each optics group's odd aberrations on the (n, n // 2 + 1) image
    grid of ``pixel_size_A``, applied to each particle's transforms by its group
    (particles of groups without aberrations are multiplied by 1)."""

    def __init__(self, coefficients: dict, n: int, pixel_size_A: float, xp):
        kx_A, ky_A = frequency_grid_A(n, pixel_size_A, xp)
        super().__init__(xp.ones((n, n // 2 + 1), xp.complex64),
                         {int(g): demodulation(c, kx_A, ky_A, xp) for g, c in coefficients.items()},
                         xp)

    def __call__(self, optics_groups, *images):
        """``images`` (each (B, n, n // 2 + 1)) × their particles' factors, a tuple."""
        factor = self.lookup(optics_groups)
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


# ------------------------------------------------------------------ even aberrations
#
# An even aberration δ(k), δ(−k) = δ(k), changes the CTF itself: CTF = −sin(γ + δ), γ
# the low-order phase of physics/ctf.py (RELION adds its rlnEvenZernike terms to γ the
# same way).  δ = Σ cⱼ Zⱼ(k) over the even Zernike polynomials up to n = 4, in RELION's
# order (Zernike::evenIndexToMN), k in 1/Å:
#
#     [0] Z0⁰ = 1            [1] Z2⁻² = 2xy           [2] Z2⁰ = 2r² − 1    [3] Z2² = x² − y²
#     [4] Z4⁻⁴ = 4x³y − 4xy³  [5] Z4⁻² = (4r² − 3) 2xy  [6] Z4⁰ = 6r⁴ − 6r² + 1
#     [7] Z4² = (4r² − 3)(x² − y²)                     [8] Z4⁴ = x⁴ − 6x²y² + y⁴
#
# A spherical-aberration error ΔCs adds (π/2) ΔCs λ³ k⁴ to γ: Z4⁰'s coefficient c
# carries 6c k⁴, so ΔCs = 12 c / (π λ³) (the lower-order parts of Z4⁰ are absorbed by
# Z2⁰ and Z0⁰, which are fitted with it).  Tetrafoil is Z4⁻⁴ and Z4⁴.
#
# The fit (:func:`fit_even_aberrations`) is relion_ctf_refine's (AberrationEstimator,
# TiltHelper::optimiseEvenZernike): per frequency pixel, over a group's particles at
# their poses, with P the scaled projection, X the image and (s, c) = (sin γ, cos γ),
#     A = Σ |P|² [[s², s c], [s c, c²]],   b = −Σ Re(X conj P) [s, c],
# whose solution u = A⁻¹ b ≈ (cos δ, sin δ); the coefficients start from a weighted
# linear fit to the phase arg u (weights × sqrt |det A|) and then minimise
# Σ ω (e(k)ᵀ A e(k)), e = |u| (cos δ, sin δ) − u, ω the FSC weight (RELION's e uses
# the unit circle; keeping |u| leaves δ unbiased where u shrinks).  Two additions:
# the half map's noise is taken out of A, and insignificant fourth-order terms are
# dropped (see fit_even_aberrations).

N_EVEN = 9                                 # Zernike terms up to n = 4
DEFOCUS_TERMS = (0, 1, 2, 3)               # piston, astigmatism, defocus: nuisance terms
SPHERICAL_TERM = 6
TETRAFOIL_TERMS = (4, 8)
COMA_LIKE_TERMS = (5, 7)                   # secondary astigmatism (n = 4, m = ±2)


def even_zernike_basis(kx_A, ky_A):
    """The nine even Zernike polynomials up to n = 4 at frequencies (1/Å), RELION's
    order; a list of arrays in the inputs' own namespace."""
    x, y = kx_A, ky_A
    r2 = x * x + y * y
    return [0.0 * x + 1.0, 2 * x * y, 2 * r2 - 1, x * x - y * y, 4 * x ** 3 * y - 4 * x * y ** 3,
            (4 * r2 - 3) * 2 * x * y, 6 * r2 * r2 - 6 * r2 + 1, (4 * r2 - 3) * (x * x - y * y),
            x ** 4 - 6 * x * x * y * y + y ** 4]


def even_phase(coefficients, kx_A, ky_A):
    """δ(k) = Σ cⱼ Zⱼ(k) (radians) at frequencies in 1/Å."""
    out = 0.0 * kx_A
    for c, z in zip(np.asarray(coefficients, float), even_zernike_basis(kx_A, ky_A)):
        if c:
            out = out + float(c) * z
    return out


def spherical_to_zernike(delta_cs_mm: float, wavelength_A: float) -> float:
    """The Z4⁰ coefficient of a spherical-aberration change ΔCs (mm)."""
    return delta_cs_mm * 1e7 * np.pi * wavelength_A ** 3 / 12.0


def zernike_to_spherical(z40: float, wavelength_A: float) -> float:
    """ΔCs (mm) that a Z4⁰ coefficient stands for."""
    return 12.0 * z40 / (np.pi * wavelength_A ** 3) * 1e-7


@dataclass(frozen=True)
class EvenFit:
    """One optics group's fitted even aberrations."""

    coefficients: np.ndarray        # (9,) all even terms fitted (rad·Å^n)
    delta_cs_mm: float              # the spherical-aberration change Z4⁰ stands for
    tetrafoil: np.ndarray           # (2,) Z4⁻⁴, Z4⁴ coefficients
    pixels: int

    def as_dict(self) -> dict:
        return {"delta_cs_mm": self.delta_cs_mm, "tetrafoil": [float(v) for v in self.tetrafoil],
                "even_zernike": [float(v) for v in self.coefficients], "even_pixels": self.pixels}


def even_aberration_sums(vft, images_ft, gamma, rotations, shifts_px, scale):
    """Per-pixel sums of :func:`fit_even_aberrations` over a batch of one optics group at
    its poses: (Axx, Axy, Ayy, bx, by, Sxx, Sxy, Syy, Pw), each (n, n // 2 + 1) float64
    on the images' device; S = Σ [[s², s c], [s c, c²]] and Pw = Σ |P|² (for the
    reference-noise correction).
    images_ft: demodulated images (odd aberrations taken out); gamma (B, n, n // 2 + 1):
    each particle's low-order CTF phase (physics/ctf.py ``ctf_gamma``)."""
    xp = array_namespace(images_ft)
    n, B = vft.n, images_ft.shape[0]
    x, pred, inside = images_at_poses(vft, images_ft, rotations, shifts_px, scale)
    g = gamma.reshape(B, -1)[:, inside]
    s, c = xp.sin(g), xp.cos(g)
    p2 = (pred.real ** 2 + pred.imag ** 2).astype(xp.float64)
    zz = (x.real * pred.real + x.imag * pred.imag).astype(xp.float64)
    out = []
    for term in (p2 * s * s, p2 * c * s, p2 * c * c, -zz * s, -zz * c, s * s, c * s, c * c, p2):
        grid = xp.zeros(n * (n // 2 + 1), xp.float64)
        grid[inside] = term.sum(axis=0)
        out.append(grid.reshape(n, n // 2 + 1))
    return tuple(out)


def fit_even_aberrations(sums, kx_A, ky_A, weight, wavelength_A: float,
                         fit_spherical: bool = True, fit_tetrafoil: bool = True,
                         reference_fsc=None) -> EvenFit:
    """Even Zernike coefficients of one optics group from its per-pixel sums (NumPy):
    ``sums`` from :func:`even_aberration_sums`, ``weight`` the FSC weight per pixel (0
    outside the fitted band).  Piston, astigmatism and defocus (Z0⁰, Z2⁻², Z2⁰, Z2²) are
    always fitted; Z4⁰ with ``fit_spherical``, Z4⁻⁴ and Z4⁴ with ``fit_tetrafoil``, Z4^±2
    with either (RELION fits all nine).

    reference_fsc: the half maps' FSC at each pixel.  The projections P of a half map
    carry noise of power (1 − FSC)·|P|², which A = Σ |P|² (s², s c; s c, c²) counts as
    signal with every particle weighted alike, while the signal weights the particles
    by their own |P|²: that turns u and, at the resolutions where the map is noisy,
    pulls a Cs error towards zero (measured at 3.4 Å: 0.355 mm for 0.4 with the half
    maps, 0.408 with the true map; relion_ctf_refine 0.360).  With the FSC given, the
    expected noise part, (1 − FSC) · (Σ |P|² / count) · Σ (s², s c; s c, c²), is taken
    out of A first (0.380 mm there)."""
    from scipy.optimize import least_squares

    axx, axy, ayy, bx, by = (np.asarray(a, float).ravel() for a in sums[:5])
    if reference_fsc is not None and len(sums) >= 9:
        sxx, sxy, syy, pw = (np.asarray(a, float).ravel() for a in sums[5:9])
        count = sxx + syy                                 # particles at the pixel
        noise = (1.0 - np.clip(np.asarray(reference_fsc, float).ravel(), 0.0, 1.0)) \
            * pw / np.maximum(count, 1.0)
        axx, axy, ayy = axx - noise * sxx, axy - noise * sxy, ayy - noise * syy
    kx, ky = np.broadcast_arrays(np.asarray(kx_A, float), np.asarray(ky_A, float))
    kx, ky = kx.ravel(), ky.ravel()
    w0 = np.asarray(weight, float).ravel()
    det = axx * ayy - axy * axy
    use = (w0 > 0) & (axx > 0) & (det > 1e-12 * np.maximum(axx * ayy, 1e-300))
    terms = list(DEFOCUS_TERMS)
    if fit_spherical:
        terms.append(SPHERICAL_TERM)
    if fit_tetrafoil:
        terms += list(TETRAFOIL_TERMS)
    if fit_spherical or fit_tetrafoil:
        terms += list(COMA_LIKE_TERMS)
    terms = sorted(terms)
    if use.sum() < 4 * len(terms):
        return EvenFit(np.zeros(N_EVEN), 0.0, np.zeros(2), int(use.sum()))
    axx, axy, ayy, bx, by, det = axx[use], axy[use], ayy[use], bx[use], by[use], det[use]
    u1 = (ayy * bx - axy * by) / det                 # A⁻¹ b
    u2 = (axx * by - axy * bx) / det
    basis = np.stack([even_zernike_basis(kx[use], ky[use])[j] for j in terms], axis=1)
    norm = np.sqrt(np.mean(basis ** 2, axis=0))
    B = basis / norm
    # linear start on the phase, weighted as relion_ctf_refine weights it
    lin_w = np.sqrt(w0[use] * np.sqrt(np.abs(det)))
    start, *_ = np.linalg.lstsq(B * lin_w[:, None], np.arctan2(u2, u1) * lin_w, rcond=None)
    # e^T A e = (L^T e)^2 with A = L L^T: residuals √ω (√axx e1 + axy/√axx e2, √(det/axx) e2)
    sq = np.sqrt(w0[use])
    l11 = np.sqrt(axx)
    l21 = axy / l11
    l22 = np.sqrt(det / axx)

    # the model keeps each pixel's measured |u|: u shrinks where the reference or the
    # envelope is weak, and a unit-length model would then pull δ along A's long axis
    rho = np.hypot(u1, u2)

    def residual(p):
        d = B @ p
        e1, e2 = rho * np.cos(d) - u1, rho * np.sin(d) - u2
        return np.concatenate([sq * (l11 * e1 + l21 * e2), sq * l22 * e2])

    fit = least_squares(residual, start, method="lm", xtol=1e-12, ftol=1e-12)
    # keep a fourth-order term only where the data pin it: |c| above SIGNIFICANCE
    # standard errors (from the Jacobian at the optimum); else drop it and fit again.
    # Below ~4 Å a Cs error or tetrafoil moves the phase by hundredths of a radian,
    # and an unpinned k⁴ term would be extrapolated into the CTF at finer resolution.
    weak = _insignificant(fit, [j for j in terms if j not in DEFOCUS_TERMS], terms)
    if weak:
        keep = [k for k, j in enumerate(terms) if j not in weak]
        terms = [terms[k] for k in keep]
        B, norm = B[:, keep], norm[keep]
        fit = least_squares(residual, fit.x[keep], method="lm", xtol=1e-12, ftol=1e-12)
    c = np.zeros(N_EVEN)
    c[terms] = fit.x / norm
    return EvenFit(c, float(zernike_to_spherical(c[SPHERICAL_TERM], wavelength_A)),
                   c[list(TETRAFOIL_TERMS)].copy(), int(use.sum()))


SIGNIFICANCE = 3.0   # standard errors a fourth-order even term must exceed to be kept


def _insignificant(fit, candidates, terms) -> list:
    """The ``candidates`` (Zernike indices among ``terms``) whose fitted coefficient is
    within SIGNIFICANCE standard errors of zero, the errors from the least-squares
    Jacobian and the residual variance at the optimum."""
    J = fit.jac
    dof = max(1, J.shape[0] - J.shape[1])
    sigma2 = 2.0 * fit.cost / dof
    try:
        cov = np.linalg.inv(J.T @ J) * sigma2
    except np.linalg.LinAlgError:
        return list(candidates)
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    return [j for j in candidates
            if abs(fit.x[terms.index(j)]) < SIGNIFICANCE * se[terms.index(j)]]


def spherical_zernike(delta_cs_mm: float, wavelength_A: float) -> np.ndarray:
    """Even Zernike coefficients of exactly (π/2) ΔCs λ³ k⁴: c Z4⁰ + 3c Z2⁰ + 2c Z0⁰ = 6c k⁴."""
    c = spherical_to_zernike(delta_cs_mm, wavelength_A)
    out = np.zeros(N_EVEN)
    out[0], out[2], out[SPHERICAL_TERM] = 2 * c, 3 * c, c
    return out


class GroupEvenPhase(GroupTable):
    """δ(k) of each optics group's even aberrations on the (n, n // 2 + 1) image grid of
    ``pixel_size_A``: the phase each particle's CTF adds to γ, by its group (0 for
    groups without even aberrations)."""

    def __init__(self, coefficients: dict, n: int, pixel_size_A: float, xp):
        kx_A, ky_A = frequency_grid_A(n, pixel_size_A, xp)
        super().__init__(xp.zeros((n, n // 2 + 1), xp.float64),
                         {int(g): even_phase(c, kx_A, ky_A) for g, c in coefficients.items()}, xp)

    def __call__(self, optics_groups):
        """(B, n, n // 2 + 1) phases of the particles of ``optics_groups`` (B,)."""
        return self.lookup(optics_groups)


def input_even_aberrations(particle_set) -> dict:
    """{optics group: (9,) even Zernike coefficients} from a RELION 3.1+ optics table's
    rlnEvenZernike (added to the CTF's γ, as RELION does); groups without it are left
    out.  Terms beyond fourth order are refused."""
    optics = getattr(particle_set, "_star_optics", None)
    if optics is None or "rlnEvenZernike" not in optics.columns:
        return {}
    out = {}
    groups = np.asarray(particle_set.optics_group)
    for _, row in optics.iterrows():
        g = int(row["rlnOpticsGroup"])
        z = parse_zernike(row["rlnEvenZernike"])
        if np.any(z[N_EVEN:]):
            raise InputError(f"optics group {g}: rlnEvenZernike has terms beyond fourth order "
                             f"({len(z)} coefficients); only the first {N_EVEN} (n <= 4: "
                             "defocus, astigmatism, spherical aberration, tetrafoil) are "
                             "supported yet")
        c = np.zeros(N_EVEN)
        c[:min(len(z), N_EVEN)] = z[:N_EVEN]
        if np.any(c) and np.any(groups == g):
            out[g] = c
    return out
