"""Ewald sphere curvature: curved-sphere images, and their correction by single side-band
insertion (docs/refinement.md, "Ewald sphere correction").

Model (weak-phase object).  The sample of an image's transform at the 2-D frequency k
comes from the particle's 3-D transform V on the Ewald sphere, which near the origin is
the paraboloid k_z = ±s(k), s = λ|k|²/2 (1/Å).  With the CTF's phase γ and envelope E
(B-factor and scale), the image is

    X(k) = ½ E(k) [u(k) V(k, σ s) + ū(k) V(k, -σ s)],    u = -sin γ - i cos γ.

|u| = 1 and Re u = -sin γ, so with s = 0 this is the flat model X = CTF · V.  σ = +1 is
"negative" curvature, mpirefine's default and the sign relion_reconstruct --ewald
assumes without --reverse_curvature; σ = -1 is "positive".  Which one a dataset needs
depends on its microscope and on the chain of conventions that made its images:
reconstruct with both and keep the better map.

Correction.  P = ū X = ½ E [V(k, σ s) + ū² V(k, -σ s)].  The second term, the other
side band, is the particle seen through a phase plate e^{-2iγ}: in real space it is
spread over a distance 2λ|k| |Δf - Cs λ² |k|²| around the particle.  Masking the
(complex) image P with a disc of the particle's diameter D keeps the fraction A of it
that still overlaps the particle (the overlap of two discs of diameter D that far
apart), so that on average P ≈ g V(k, σ s) with the gain g = ½ E (1 + A ū²).  Each
image's masked P is inserted at (k, σ s(k)) over the whole plane, as ḡ P with weight
|g|²; V's Friedel symmetry makes P(-k) at (-k, σ s) the other side band's sample at
(k, -σ s).  Where A = 0 (defocus large against the particle) this is the side band
alone; where A = 1 the insertion is exactly the flat one (C X with weight C², at each of
the two points).  Russo & Henderson (2018) and RELION's relion_reconstruct --ewald
separate the side bands in the same way; the weights are written out here.

Every function takes and returns arrays of the caller's namespace (NumPy or CuPy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpirefine.backend import array_namespace
from mpirefine.fourier.transforms import centered_fft2, centered_ifft2, centered_irfft2, freq_grid_2d
from mpirefine.geometry.spheres import soft_sphere
from mpirefine.physics.ctf import CTFParams, ctf_gamma, defocus_along_k, electron_wavelength_A

#: the sign σ of each curvature name (module docstring)
CURVATURE_SIGN = {"negative": 1.0, "positive": -1.0}

#: the soft edge of the disc that separates the side bands, as a fraction of the particle
#: diameter (at least MIN_MASK_EDGE_PX).  A sharp edge leaks the strong low-frequency part
#: of the other side band, which stays inside the disc, into the weak high frequencies:
#: measured at 1.5 Å/px on a 55 Å particle, noise-free, the other side band's power left
#: at 3–4 Å was 3.8× the wanted one's with a 3 px edge, 0.4× with 8 px and 0.14× with 15 px.
MASK_EDGE_FRACTION = 0.25
MIN_MASK_EDGE_PX = 10.0


def mask_edge_px(diameter_A: float, pixel_size_A: float) -> float:
    """Width (px) of the raised-cosine edge of the side-band disc."""
    return max(MIN_MASK_EDGE_PX, MASK_EDGE_FRACTION * diameter_A / pixel_size_A)


def curvature_sign(name: str) -> float:
    try:
        return CURVATURE_SIGN[name]
    except KeyError:
        raise ValueError(f"Ewald curvature must be one of {sorted(CURVATURE_SIGN)}, got {name!r}") from None


def sphere_height(kx, ky, n: int, pixel_size_A, wavelength_A):
    """s = λ |k|² / 2 in cycles per box: the height of the Ewald sphere above the
    central plane at (kx, ky) (cycles per box of an n-pixel image).  ``pixel_size_A`` and
    ``wavelength_A`` broadcast against the grids (per particle: shape (B, 1))."""
    return wavelength_A * (kx * kx + ky * ky) / (2.0 * n * pixel_size_A)


def sideband_phase(gamma):
    """u = -sin γ - i cos γ (unit modulus; Re u is the flat CTF without envelope)."""
    xp = array_namespace(gamma)
    return (-xp.sin(gamma) - 1j * xp.cos(gamma)).astype(xp.complex64)


def overlap_fraction(distance_A, diameter_A: float, box_A: float | None = None):
    """Area shared by two discs of diameter D whose centres are ``distance_A`` apart,
    as a fraction of one disc: (2/π)(acos x - x √(1 - x²)), x = distance / D ≤ 1.
    With ``box_A`` the images are periodic (as their FFTs are): a copy moved by d also
    comes back at box - d."""
    xp = array_namespace(distance_A)

    def one(d):
        x = xp.clip(d / diameter_A, 0.0, 1.0)
        return (2.0 / np.pi) * (xp.arccos(x) - x * xp.sqrt(1.0 - x * x))

    if box_A is None:
        return one(distance_A)
    d = xp.remainder(distance_A, box_A)
    return xp.minimum(one(d) + one(box_A - d), 1.0)


def delocalisation_A(params: CTFParams, kx_A, ky_A):
    """(B, *S) distance (Å) by which the phase plate e^{-2iγ} moves the information at
    frequency k: |∇γ| / π = 2λ|k| |Δf(θ) - Cs λ² |k|²| with the defocus Δf along k."""
    xp = array_namespace(kx_A, ky_A)

    def col(v):
        return xp.asarray(v, dtype=xp.float64).reshape((-1,) + (1,) * kx_A.ndim)

    lam = col(electron_wavelength_A(params.voltage_kV))
    defocus, k2 = defocus_along_k(params, kx_A, ky_A)
    return 2.0 * lam * xp.sqrt(k2) * xp.abs(defocus - col(params.cs_mm * 1e7) * lam ** 2 * k2)


def full_plane_grid(n: int, xp):
    """(ky, kx) in cycles per box on the centred full plane, each (n, n) float32."""
    k = xp.arange(n, dtype=xp.float32) - n // 2
    return xp.broadcast_to(k[:, None], (n, n)), xp.broadcast_to(k[None, :], (n, n))


def full_plane_even(half, n: int):
    """An even real function given on the half plane (..., n, n // 2 + 1) spread over
    the centred full plane (..., n, n): f(-k) = f(k)."""
    xp = array_namespace(half)
    ky, kx = full_plane_grid(n, np)
    iy = np.where(kx >= 0, ky + n // 2, (n - (ky + n // 2)) % n).astype(np.int64)
    ix = np.abs(kx).astype(np.int64)
    return half[..., xp.asarray(iy), xp.asarray(ix)]


def _envelope(params: CTFParams, k2_A, xp):
    col = xp.asarray(params.bfactor_A2, dtype=xp.float64).reshape(-1, 1, 1)
    scale = xp.asarray(params.scale, dtype=xp.float64).reshape(-1, 1, 1)
    return xp.exp(-col * k2_A[None] / 4.0) * scale


@dataclass(frozen=True)
class EwaldCorrection:
    """The reconstruction's Ewald sphere correction: its curvature sign ("negative" or
    "positive") and the particle diameter (Å) that separates the side bands."""

    curvature: str
    diameter_A: float

    def __post_init__(self):
        curvature_sign(self.curvature)
        if not (np.isfinite(self.diameter_A) and self.diameter_A > 0):
            raise ValueError(f"the particle diameter must be a positive number of Å, got {self.diameter_A}")

    def sidebands(self, params: CTFParams, pixel_size_A, n: int, xp, gamma_offset=None,
                  nyquist_px=None) -> "EwaldSidebands":
        return EwaldSidebands.build(params, pixel_size_A, n, curvature_sign(self.curvature),
                                    self.diameter_A, xp, gamma_offset, nyquist_px)


@dataclass
class EwaldSidebands:
    """One batch's operands for curved-sphere insertion (module docstring).

    u_conj: (B, n, n) complex64 ū on the centred full plane; mask: (n, n) the disc that
    separates the side bands; index: (K,) the full-plane pixels inside the Nyquist
    circle (into the flattened (n, n) plane); kx, ky: (K,) their frequencies (cycles per
    box); kz: (B, K) σ s there; gain: (B, K) complex64 g.
    """

    u_conj: object
    mask: object
    index: object
    kx: object
    ky: object
    kz: object
    gain: object
    n: int

    @classmethod
    def build(cls, params: CTFParams, pixel_size_A, n: int, sign: float, diameter_A: float, xp,
              gamma_offset=None, nyquist_px=None) -> "EwaldSidebands":
        """params: the batch's CTFs (length B); pixel_size_A: (B,) each image's pixel
        size (its CTF's); gamma_offset: (B, n, n // 2 + 1) even-aberration phases or None;
        nyquist_px: (B,) a radius (cycles per box) beyond which an image holds nothing
        (Fourier-padded particles), or None."""
        pixel = np.broadcast_to(np.asarray(pixel_size_A, float), (len(params),))
        ky, kx = full_plane_grid(n, np)
        inside = np.flatnonzero(np.hypot(kx, ky).ravel() <= n // 2)
        kxs, kys = kx.ravel()[inside], ky.ravel()[inside]
        offset = None if gamma_offset is None else full_plane_even(gamma_offset, n)
        B = len(params)
        u_conj = xp.empty((B, n, n), xp.complex64)
        gain = xp.empty((B, inside.size), xp.complex64)
        kz = xp.empty((B, inside.size), xp.float32)
        values, which = np.unique(pixel, return_inverse=True)
        for j, p in enumerate(values):
            rows = np.flatnonzero(which.reshape(-1) == j)
            sub = params.subset(rows)
            kx_A = xp.asarray(kx / (n * p))
            ky_A = xp.asarray(ky / (n * p))
            gamma = ctf_gamma(sub, kx_A, ky_A)
            if offset is not None:
                gamma = gamma + offset[xp.asarray(rows)]
            u = sideband_phase(gamma)
            r = xp.asarray(rows)
            u_conj[r] = xp.conj(u)
            envelope = _envelope(sub, kx_A * kx_A + ky_A * ky_A, xp)
            overlap = overlap_fraction(delocalisation_A(sub, kx_A, ky_A),
                                       diameter_A + mask_edge_px(diameter_A, p) * p, n * p)
            g = 0.5 * envelope * (1.0 + overlap * xp.conj(u) ** 2)
            gain[r] = g.reshape(len(rows), -1)[:, xp.asarray(inside)]
            lam = electron_wavelength_A(sub.voltage_kV).reshape(-1, 1)
            kz[r] = xp.asarray(sign * sphere_height(kxs[None], kys[None], n, p, lam), xp.float32)
        if nyquist_px is not None:
            radius = xp.asarray(np.hypot(kxs, kys), xp.float32)
            gain = gain * (radius[None] <= xp.asarray(nyquist_px, xp.float32)[:, None])
        p = float(pixel.min())
        mask = soft_sphere(n, 0.5 * diameter_A / p, mask_edge_px(diameter_A, p), xp, ndim=2)
        return cls(u_conj=u_conj, mask=mask, index=xp.asarray(inside),
                   kx=xp.asarray(kxs, xp.float32), ky=xp.asarray(kys, xp.float32),
                   kz=kz, gain=gain, n=n)

    def sideband(self, images_ft):
        """(B, K) complex64: the masked side band P at the sample pixels of images
        ``images_ft`` ((B, n, n // 2 + 1) centred half-plane transforms, the particle
        centred in the box)."""
        xp = array_namespace(images_ft)
        full = centered_fft2(centered_irfft2(images_ft, self.n))
        separated = centered_fft2(centered_ifft2(full * self.u_conj) * self.mask)
        return separated.reshape(separated.shape[0], -1)[:, self.index].astype(xp.complex64)


def curved_transforms(extract, rotations, n: int, pixel_size_A: float, wavelength_A: float,
                      gamma, envelope, sign: float):
    """(R, n, n // 2 + 1) transforms of curved-sphere images: ½ E [u V(k, σ s) + ū V(k, -σ s)].

    extract(rotations, kx, ky, kz) → (R, K) samples of V at A^T (kx, ky, kz); gamma,
    envelope: (R, n, n // 2 + 1) each image's γ (even aberrations included) and CTF
    envelope on the half plane.
    """
    xp = array_namespace(gamma)
    ky, kx = (k.ravel() for k in freq_grid_2d(n, xp))
    kz = (sign * sphere_height(kx, ky, n, pixel_size_A, wavelength_A)).astype(xp.float32)
    upper = extract(rotations, kx, ky, kz).reshape(-1, n, n // 2 + 1)
    lower = extract(rotations, kx, ky, -kz).reshape(-1, n, n // 2 + 1)
    u = sideband_phase(gamma)
    return (0.5 * envelope * (u * upper + xp.conj(u) * lower)).astype(xp.complex64)
