"""The contrast transfer function in RELION's convention (ctf.cpp).

Defocus is positive for underfocus, in Å; the astigmatism angle is the angle of the
defocus-U axis from X.  With k in 1/Å and θ = atan2(ky, kx):

    λ  = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))           (V in volts, λ in Å)
    Δf = DfU cos²(θ - θast) + DfV sin²(θ - θast)
    γ  = -π λ Δf k² + (π/2) Cs λ³ k⁴ - φ - atan(Q0 / sqrt(1 - Q0²))
    CTF = -sin(γ) · exp(-B k² / 4) · scale

Every function takes the frequency grids' array namespace (NumPy or CuPy).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from mpirefine.backend import array_namespace


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Å for an accelerating voltage in kV."""
    v = np.asarray(voltage_kV, float) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters, each a 1-D NumPy array of length n (or a scalar)."""

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray = 0.0
    bfactor_A2: np.ndarray = 0.0
    scale: np.ndarray = 1.0

    def __post_init__(self):
        for f in fields(self):
            value = np.atleast_1d(np.asarray(getattr(self, f.name), dtype=np.float64))
            object.__setattr__(self, f.name, value)
        n = len(self)
        for f in fields(self):
            v = getattr(self, f.name)
            if v.shape[0] not in (1, n):
                raise ValueError(f"CTF parameter {f.name} has {v.shape[0]} values, expected {n}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"CTF parameter {f.name} contains NaN or Inf")
        if np.any(self.voltage_kV <= 0):
            raise ValueError("CTF voltage must be positive (kV)")
        if np.any((self.amplitude_contrast < 0) | (self.amplitude_contrast >= 1)):
            raise ValueError("CTF amplitude contrast must lie in [0, 1)")

    def __len__(self) -> int:
        return max(getattr(self, f.name).shape[0] for f in fields(self))

    def with_defocus_offset(self, offset_A) -> "CTFParams":
        """The same parameters with ``offset_A`` (scalar or per particle) added to both
        defocus U and V: astigmatism and its angle unchanged."""
        return replace(self, defocus_u_A=self.defocus_u_A + offset_A,
                       defocus_v_A=self.defocus_v_A + offset_A)

    def subset(self, index) -> "CTFParams":
        def pick(v):
            return v if v.shape[0] == 1 else v[index]

        return CTFParams(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})


def evaluate_ctf(params: CTFParams, kx_A, ky_A, dtype=None, gamma_offset=None):
    """CTF values for every particle on a frequency grid.

    kx_A, ky_A: frequency grids in 1/Å, same shape S (NumPy or CuPy).
    gamma_offset: optional phase (rad) added to γ, broadcastable to (n, *S): the even
    aberrations of each particle's optics group (physics/aberrations.py), as RELION adds
    its even Zernike terms.
    Returns an array of shape (n, *S) in the grids' namespace, ``dtype`` (default float32).
    """
    xp = array_namespace(kx_A, ky_A)
    dtype = dtype or xp.float32
    gamma = ctf_gamma(params, kx_A, ky_A)
    if gamma_offset is not None:
        gamma = gamma + gamma_offset
    k2 = xp.asarray(kx_A, dtype=xp.float64)[None] ** 2 + xp.asarray(ky_A, dtype=xp.float64)[None] ** 2
    col = _columns(xp, kx_A.ndim)
    ctf = -xp.sin(gamma) * xp.exp(-col(params.bfactor_A2) * k2 / 4.0) * col(params.scale)
    return ctf.astype(dtype)


def _columns(xp, ndim: int):
    def col(v):
        return xp.asarray(v, dtype=xp.float64).reshape((-1,) + (1,) * ndim)

    return col


def ctf_gamma(params: CTFParams, kx_A, ky_A):
    """γ of every particle on a frequency grid (float64, (n, *S)): the CTF's phase from
    defocus, astigmatism, Cs, phase shift and amplitude contrast (RELION's low-order γ),
    without even aberrations."""
    xp = array_namespace(kx_A, ky_A)
    col = _columns(xp, kx_A.ndim)
    lam = col(electron_wavelength_A(params.voltage_kV))
    cs_A = col(params.cs_mm * 1e7)
    q0 = np.clip(params.amplitude_contrast, 0.0, 0.999999)
    k3 = col(np.arctan(q0 / np.sqrt(1.0 - q0 ** 2)))
    phi = col(np.radians(params.phase_shift_deg))
    defocus, k2 = defocus_along_k(params, kx_A, ky_A)
    return -np.pi * lam * defocus * k2 + 0.5 * np.pi * cs_A * lam ** 3 * k2 * k2 - phi - k3


def defocus_along_k(params: CTFParams, kx_A, ky_A):
    """(Δf (n, *S), |k|² (1, *S)), float64: each particle's defocus along the direction
    of each frequency (astigmatism included), and |k|² in 1/Å²."""
    xp = array_namespace(kx_A, ky_A)
    col = _columns(xp, kx_A.ndim)
    kx = xp.asarray(kx_A, dtype=xp.float64)[None]
    ky = xp.asarray(ky_A, dtype=xp.float64)[None]
    theta = xp.arctan2(ky, kx)
    mean = col(0.5 * (params.defocus_u_A + params.defocus_v_A))
    half_diff = col(0.5 * (params.defocus_u_A - params.defocus_v_A))
    defocus = mean + half_diff * xp.cos(2.0 * (theta - col(np.radians(params.defocus_angle_deg))))
    return defocus, kx * kx + ky * ky
