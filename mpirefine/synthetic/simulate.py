"""Synthetic particle datasets with known truth, for the demo and the tests.

Each particle is the volume projected at a uniformly random orientation, multiplied
by its own CTF in Fourier space, shifted by -origin (RELION's convention, docs/architecture.md
§3) and buried in white Gaussian noise.  The SNR is RELION's: the mean over all
particles of the clean image's variance over the whole box, divided by the noise
variance.

Files written to ``out_dir``:
  stack_000.mrcs, ...    the images, ``stack_size`` per stack
  particles.star         optics + CTF per particle, no poses (the refinement input)
  particles_true.star    the same plus the true angles, origins and a half-set split
  truth.mrc              the volume the particles came from
  start_20A.mrc          the truth low-passed to 20 Å (an initial reference)
  simulation.json        every parameter, the random seed and the derived noise level
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from mpirefine import __version__
from mpirefine.errors import InputError
from mpirefine.fourier.filters import lowpass
from mpirefine.fourier.project import extract_slices, project_images, volume_ft
from mpirefine.fourier.transforms import (
    centered_irfft2,
    cut_from_double_box,
    double_box_frequencies,
    freq_grid_2d,
    phase_shift_2d,
)
from mpirefine.geometry.rotations import euler_to_matrix, matrix_to_euler
from mpirefine.io.mrc import write_mrc, write_stack
from mpirefine.io.star import write_relion_star
from mpirefine.physics.aberrations import (
    even_phase,
    format_zernike,
    odd_phase,
    spherical_zernike,
    tilt_to_zernike,
)
from mpirefine.physics.ctf import CTFParams, electron_wavelength_A, evaluate_ctf

START_RESOLUTION_A = 20.0
MIN_BOX = 16
# Projection works on batches of about this many Fourier samples (R · K): the trilinear
# stencil holds 8 int64 indices and 8 float32 weights per sample, ~100 B each.
_SAMPLES_PER_BATCH = 2_000_000


@dataclass
class SimulationParams:
    """Everything that defines a simulated dataset (units in the names)."""

    n_particles: int
    pixel_size_A: float
    snr: float = 0.05
    defocus_range_um: tuple[float, float] = (1.0, 2.5)
    astigmatism_A: float = 500.0      # |DfU - DfV| drawn uniformly in [0, this]
    shift_sigma_A: float = 3.0        # origins ~ N(0, this) per axis
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_A2: float = 0.0           # CTF envelope B-factor
    seed: int = 0
    stack_size: int = 1000
    beam_tilt_mrad: tuple[float, float] = (0.0, 0.0)   # written to particles_true.star only
    trefoil: tuple[float, float] = (0.0, 0.0)          # Z3⁻³, Z3³ (rad·Å³), likewise
    cs_error_mm: float = 0.0                           # the images' Cs above cs_mm, likewise
    tetrafoil: tuple[float, float] = (0.0, 0.0)        # Z4⁻⁴, Z4⁴ (rad·Å⁴), likewise
    ewald_curvature: str | None = None                 # None: a flat Ewald sphere
    mag_matrix: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 1.0)   # rlnMagMat00..11

    def validate(self, box: int) -> None:
        """Raise InputError naming the first bad parameter."""
        lo, hi = self.defocus_range_um
        checks = [
            (box >= MIN_BOX, f"box {box} px is too small; use at least {MIN_BOX}"),
            (self.n_particles >= 1, f"n_particles must be >= 1, got {self.n_particles}"),
            (self.pixel_size_A > 0, f"pixel size must be > 0 Å, got {self.pixel_size_A}"),
            (self.snr > 0, f"SNR must be > 0 (inf for noise-free images), got {self.snr}"),
            (0 <= lo <= hi, f"defocus range must satisfy 0 <= min <= max (µm), got {lo}..{hi}"),
            (self.astigmatism_A >= 0, f"astigmatism must be >= 0 Å, got {self.astigmatism_A}"),
            (self.shift_sigma_A >= 0, f"shift sigma must be >= 0 Å, got {self.shift_sigma_A}"),
            (self.voltage_kV > 0, f"voltage must be > 0 kV, got {self.voltage_kV}"),
            (self.cs_mm >= 0, f"Cs must be >= 0 mm, got {self.cs_mm}"),
            (0 <= self.amplitude_contrast < 1,
             f"amplitude contrast must lie in [0, 1), got {self.amplitude_contrast}"),
            (self.bfactor_A2 >= 0, f"CTF B-factor must be >= 0 Å², got {self.bfactor_A2}"),
            (self.stack_size >= 1, f"stack size must be >= 1, got {self.stack_size}"),
            (lo * 1e4 >= self.astigmatism_A / 2,
             f"astigmatism {self.astigmatism_A} Å exceeds twice the minimum defocus"),
            (self.ewald_curvature in (None, "negative", "positive"),
             f"Ewald curvature must be 'negative' or 'positive', got {self.ewald_curvature!r}"),
            (0.5 < abs(np.linalg.det(np.reshape(self.mag_matrix, (2, 2)))) < 2,
             f"the magnification matrix {self.mag_matrix} is not a small distortion"),
            (self.ewald_curvature is None or self.mag_matrix == (1.0, 0.0, 0.0, 1.0),
             "curved-sphere images with an anisotropic magnification are not simulated yet"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


@dataclass
class SimulationResult:
    """Where a simulation went and its ground truth (RELION conventions)."""

    out_dir: str
    particles_star: str
    particles_true_star: str
    truth_mrc: str
    start_mrc: str
    stacks: list[str]
    rotations: np.ndarray          # (n, 3, 3) RELION matrices A
    angles_deg: np.ndarray         # (n, 3) rot, tilt, psi
    origins_A: np.ndarray          # (n, 2) rlnOriginX/YAngst
    ctf: CTFParams                 # per particle, defocus in Å
    subset: np.ndarray             # (n,) rlnRandomSubset, 1 or 2
    noise_sigma: float             # per-pixel noise standard deviation (0 without noise)
    signal_variance: float         # mean clean-image variance over the box
    params: SimulationParams = field(repr=False, default=None)


def _draw_truth(p: SimulationParams):
    """Poses, CTFs and the half-set split; independent random streams per quantity, so
    changing e.g. the SNR leaves poses and CTFs unchanged."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(p.seed).spawn(5)]
    n = p.n_particles
    # SciPy's uniform rotation is Aᵀ (docs/architecture.md §3); the transpose is uniform too.
    angles = matrix_to_euler(Rotation.random(n, random_state=streams[0]).as_matrix()
                             .transpose(0, 2, 1))
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    origins = streams[1].normal(0.0, p.shift_sigma_A, size=(n, 2))
    lo, hi = p.defocus_range_um
    rng = streams[2]
    mean_df = rng.uniform(lo * 1e4, hi * 1e4, n)
    astig = rng.uniform(0.0, p.astigmatism_A, n)
    ctf = CTFParams(defocus_u_A=mean_df + astig / 2, defocus_v_A=mean_df - astig / 2,
                    defocus_angle_deg=rng.uniform(0.0, 180.0, n), voltage_kV=p.voltage_kV,
                    cs_mm=p.cs_mm, amplitude_contrast=p.amplitude_contrast,
                    phase_shift_deg=0.0, bfactor_A2=p.bfactor_A2)
    subset = np.where(streams[3].permutation(n) < (n + 1) // 2, 1, 2)
    return angles, rotations, origins, ctf, subset, streams[4]


def _aberration_terms(odd_zernike, even_zernike, kx_A, ky_A):
    """(exp(i φ_odd) or 1.0, φ_even[None] or None) on a frequency grid (1/Å): what the
    microscope's odd aberrations multiply the projections by, and what its even ones
    add to the CTF's γ."""
    odd = 1.0
    if odd_zernike is not None and np.any(odd_zernike):
        odd = np.exp(1j * odd_phase(odd_zernike, kx_A, ky_A))
    even = None
    if even_zernike is not None and np.any(even_zernike):
        even = even_phase(even_zernike, kx_A, ky_A)[None]
    return odd, even


def clean_images(vft, rotations, origins_A, ctf: CTFParams, pixel_size_A: float,
                 odd_zernike=None, even_zernike=None, ewald_curvature=None, mag_matrix=None):
    """Noise-free particles (m, n, n) float32: CTF · projection, shifted by -origin.

    rotations: (m, 3, 3) RELION matrices; origins_A: (m, 2); ctf: length m.
    odd_zernike: (6,) odd aberrations (beam tilt, trefoil; physics/aberrations.py) that
    modulate the projections by exp(+i φ), as the microscope does; even_zernike: (9,)
    even ones (Cs error, tetrafoil) added to the CTF's γ.  ewald_curvature: None (a flat
    sphere: CTF · central slice) or "negative" / "positive": each image samples the
    volume on the curved Ewald sphere of its voltage (physics/ewald.py).  mag_matrix:
    (2, 2) RELION's rlnMagMat00..11, or None: the image at frequency k holds the projection
    and CTF (aberrations included) at M k (physics/anisomag.py).
    """
    if ewald_curvature is not None:
        return _curved_images(vft, rotations, origins_A, ctf, pixel_size_A, odd_zernike,
                              even_zernike, ewald_curvature)
    magnified = mag_matrix is not None and not np.allclose(mag_matrix, np.eye(2))
    if magnified:
        return _magnified_images(vft, rotations, origins_A, ctf, pixel_size_A, odd_zernike,
                                 even_zernike, mag_matrix)
    n = vft.n
    ky, kx = freq_grid_2d(n, np)
    kx_A, ky_A = kx / (n * pixel_size_A), ky / (n * pixel_size_A)
    odd, even = _aberration_terms(odd_zernike, even_zernike, kx_A, ky_A)
    batch = max(1, _SAMPLES_PER_BATCH // (n * (n // 2 + 1)))
    out = np.empty((len(rotations), n, n), dtype=np.float32)
    for s in range(0, len(rotations), batch):
        sl = slice(s, s + batch)
        c = evaluate_ctf(ctf.subset(np.arange(len(rotations))[sl]), kx_A, ky_A, gamma_offset=even)
        out[sl] = project_images(vft, rotations[sl], shifts_px=-origins_A[sl] / pixel_size_A,
                                 ctf=c * odd)
    return out


def _magnified_images(vft, rotations, origins_A, ctf: CTFParams, pixel_size_A: float,
                      odd_zernike, even_zernike, mag_matrix):
    """clean_images through a magnification distortion M: each image holds the
    projection and CTF at M k.  The distortion acts on the whole micrograph, so each
    image is made in a box twice the size and its centre cut out, as a particle is cut
    from a micrograph: the CTF's delocalised signal that leaves the box is lost, not
    wrapped around it (a periodic image cannot be warped back: physics/anisomag.py)."""
    from mpirefine.physics.anisomag import observed_frequencies

    n = vft.n
    kx, ky = observed_frequencies(*double_box_frequencies(n, np), mag_matrix)
    kx_A, ky_A = kx / (n * pixel_size_A), ky / (n * pixel_size_A)
    odd, even = _aberration_terms(odd_zernike, even_zernike, kx_A, ky_A)
    batch = max(1, _SAMPLES_PER_BATCH // (2 * n * (n + 1)))
    out = np.empty((len(rotations), n, n), dtype=np.float32)
    for s in range(0, len(rotations), batch):
        sl = slice(s, s + batch)
        c = evaluate_ctf(ctf.subset(np.arange(len(rotations))[sl]), kx_A, ky_A, gamma_offset=even)
        f = extract_slices(vft, rotations[sl], kx.ravel(), ky.ravel()).reshape(-1, 2 * n, n + 1)
        out[sl] = cut_from_double_box(f * c * odd, -origins_A[sl] / pixel_size_A, n)
    return out


def _curved_images(vft, rotations, origins_A, ctf: CTFParams, pixel_size_A: float,
                   odd_zernike, even_zernike, curvature: str):
    """clean_images on a curved Ewald sphere."""
    from mpirefine.physics.ctf import ctf_gamma
    from mpirefine.physics.ewald import curvature_sign, curved_transforms

    n = vft.n
    ky, kx = freq_grid_2d(n, np)
    kx_A, ky_A = kx / (n * pixel_size_A), ky / (n * pixel_size_A)
    odd, even = _aberration_terms(odd_zernike, even_zernike, kx_A, ky_A)
    even = 0.0 if even is None else even
    batch = max(1, _SAMPLES_PER_BATCH // (2 * n * (n // 2 + 1)))
    out = np.empty((len(rotations), n, n), dtype=np.float32)
    k2 = (kx_A ** 2 + ky_A ** 2)[None]
    for s in range(0, len(rotations), batch):
        sl = slice(s, s + batch)
        sub = ctf.subset(np.arange(len(rotations))[sl])
        lam = float(electron_wavelength_A(sub.voltage_kV[0]))
        if np.any(sub.voltage_kV != sub.voltage_kV[0]):
            raise InputError("curved-sphere simulation needs one voltage for all particles")
        envelope = np.exp(-sub.bfactor_A2[:, None, None] * k2 / 4.0) * sub.scale[:, None, None]
        f = curved_transforms(lambda r, a, b, c: extract_slices(vft, r, a, b, c), rotations[sl],
                              n, pixel_size_A, lam, ctf_gamma(sub, kx_A, ky_A) + even, envelope,
                              curvature_sign(curvature))
        f = phase_shift_2d(f * odd, -origins_A[sl] / pixel_size_A, n)
        out[sl] = centered_irfft2(f, n).astype(np.float32)
    return out


def _tables(p: SimulationParams, box: int, names, ctf: CTFParams, micrographs):
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [p.amplitude_contrast], "rlnSphericalAberration": [p.cs_mm],
        "rlnVoltage": [p.voltage_kV], "rlnImagePixelSize": [p.pixel_size_A],
        "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnImageName": names, "rlnMicrographName": micrographs,
        "rlnDefocusU": ctf.defocus_u_A, "rlnDefocusV": ctf.defocus_v_A,
        "rlnDefocusAngle": ctf.defocus_angle_deg,
        "rlnPhaseShift": np.zeros(len(names)),
        "rlnCtfBfactor": np.full(len(names), p.bfactor_A2),
        "rlnCtfScalefactor": np.ones(len(names)),
        "rlnOpticsGroup": np.ones(len(names), dtype=int)})
    return optics, particles


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)   # JSON has no infinity; "inf" reads back with float()
    if isinstance(v, tuple):
        return list(v)
    return v


def simulate_dataset(volume, pixel_size_A: float, n_particles: int, out_dir,
                     snr: float = 0.05, defocus_range_um=(1.0, 2.5), astigmatism_A: float = 500.0,
                     shift_sigma_A: float = 3.0, voltage_kV: float = 300.0, cs_mm: float = 2.7,
                     amplitude_contrast: float = 0.1, bfactor_A2: float = 0.0, seed: int = 0,
                     stack_size: int = 1000, overwrite: bool = False,
                     source: str | None = None, beam_tilt_mrad=(0.0, 0.0),
                     trefoil=(0.0, 0.0), cs_error_mm: float = 0.0,
                     tetrafoil=(0.0, 0.0), ewald_curvature: str | None = None,
                     mag_matrix=(1.0, 0.0, 0.0, 1.0)) -> SimulationResult:
    """Simulate ``n_particles`` images of ``volume`` (n, n, n) [z, y, x] at ``pixel_size_A``.

    snr: signal variance / noise variance over the box (math.inf: no noise).
    defocus_range_um: (min, max) mean defocus, µm, uniform; astigmatism_A: the largest
    |DfU - DfV| (Å), uniform, at a uniform random angle; shift_sigma_A: origin spread (Å).
    ewald_curvature: None (flat) or "negative" / "positive", images on the curved Ewald
    sphere (physics/ewald.py).  mag_matrix: RELION's rlnMagMat00, 01, 10, 11 of
    the microscope (physics/anisomag.py), written to particles_true.star only.
    The same seed gives the same files.  Memory holds one stack (``stack_size`` images)
    at a time.  ``overwrite`` False refuses a non-empty ``out_dir``; ``source`` is a
    note for simulation.json (where the volume came from).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"the volume must be a cube (n, n, n), got shape {volume.shape}")
    box = volume.shape[0]
    p = SimulationParams(int(n_particles), float(pixel_size_A), float(snr),
                         tuple(float(d) for d in defocus_range_um), float(astigmatism_A),
                         float(shift_sigma_A), float(voltage_kV), float(cs_mm),
                         float(amplitude_contrast), float(bfactor_A2), int(seed), int(stack_size),
                         tuple(float(v) for v in beam_tilt_mrad), tuple(float(v) for v in trefoil),
                         float(cs_error_mm), tuple(float(v) for v in tetrafoil), ewald_curvature,
                         tuple(float(v) for v in mag_matrix))
    p.validate(box)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise InputError(f"output folder {out_dir!r} is not empty; choose another or overwrite")
    os.makedirs(out_dir, exist_ok=True)

    angles, rotations, origins, ctf, subset, noise_rng = _draw_truth(p)
    n = p.n_particles
    odd = tilt_to_zernike(*p.beam_tilt_mrad, p.cs_mm, float(electron_wavelength_A(p.voltage_kV)))
    odd[2], odd[5] = p.trefoil
    even = spherical_zernike(p.cs_error_mm, float(electron_wavelength_A(p.voltage_kV)))
    even[4], even[8] = p.tetrafoil
    vft = volume_ft(volume)
    starts = list(range(0, n, p.stack_size))
    stacks = [os.path.join(out_dir, f"stack_{k:03d}.mrcs") for k in range(len(starts))]
    noisy = math.isfinite(p.snr)
    signal_var_sum, sigma = 0.0, 0.0
    with tempfile.TemporaryDirectory(prefix=".clean_", dir=out_dir) as tmp:
        # Pass 1: clean images; with noise they wait on disk until the SNR over all
        # particles fixes the noise level (memory stays one stack).
        for k, s in enumerate(starts):
            idx = np.arange(s, min(s + p.stack_size, n))
            images = clean_images(vft, rotations[idx], origins[idx], ctf.subset(idx),
                                  p.pixel_size_A, odd, even, p.ewald_curvature,
                                  np.reshape(p.mag_matrix, (2, 2)))
            signal_var_sum += float(images.var(axis=(1, 2), dtype=np.float64).sum())
            if noisy:
                np.save(os.path.join(tmp, f"{k}.npy"), images)
            else:
                write_stack(stacks[k], images, p.pixel_size_A)
        signal_var = signal_var_sum / n
        if noisy:
            sigma = math.sqrt(signal_var / p.snr)
            for k in range(len(starts)):
                images = np.load(os.path.join(tmp, f"{k}.npy"))
                images += sigma * noise_rng.standard_normal(images.shape, dtype=np.float32)
                write_stack(stacks[k], images, p.pixel_size_A)

    stack_of = np.arange(n) // p.stack_size
    names = [f"{i % p.stack_size + 1:06d}@{os.path.basename(stacks[k])}"
             for i, k in enumerate(stack_of)]
    micrographs = [f"micrograph_{k:03d}.mrc" for k in stack_of]
    optics, particles = _tables(p, box, names, ctf, micrographs)
    star = os.path.join(out_dir, "particles.star")
    star_true = os.path.join(out_dir, "particles_true.star")
    write_relion_star(star, optics, particles)
    truth = particles.copy()
    for j, label in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        truth[label] = angles[:, j]
    truth["rlnOriginXAngst"] = origins[:, 0]
    truth["rlnOriginYAngst"] = origins[:, 1]
    truth["rlnRandomSubset"] = subset
    true_optics = optics
    if np.any(odd):       # the aberrations are the truth's, not the input's: refine finds them
        true_optics = optics.assign(rlnBeamTiltX=p.beam_tilt_mrad[0], rlnBeamTiltY=p.beam_tilt_mrad[1],
                                    rlnOddZernike=format_zernike([0, 0, p.trefoil[0], 0, 0,
                                                                  p.trefoil[1]]))
    if np.any(even):
        true_optics = true_optics.assign(rlnEvenZernike=format_zernike(even))
    if p.mag_matrix != (1.0, 0.0, 0.0, 1.0):
        true_optics = true_optics.assign(**{f"rlnMagMat{ij}": v for ij, v in
                                            zip(("00", "01", "10", "11"), p.mag_matrix)})
    write_relion_star(star_true, true_optics, truth)

    truth_mrc = os.path.join(out_dir, "truth.mrc")
    start_mrc = os.path.join(out_dir, "start_20A.mrc")
    write_mrc(truth_mrc, volume, p.pixel_size_A)
    write_mrc(start_mrc, lowpass(volume, START_RESOLUTION_A, p.pixel_size_A), p.pixel_size_A)

    record = {k: _json_value(v) for k, v in asdict(p).items()}
    record.update(box=box, source=source, mpirefine_version=__version__,
                  signal_variance=signal_var, noise_sigma=sigma,
                  start_resolution_A=START_RESOLUTION_A,
                  files={"particles": "particles.star", "particles_true": "particles_true.star",
                         "truth": "truth.mrc", "start": "start_20A.mrc",
                         "stacks": [os.path.basename(s) for s in stacks]})
    tmp_json = os.path.join(out_dir, ".simulation.json.tmp")
    with open(tmp_json, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp_json, os.path.join(out_dir, "simulation.json"))

    return SimulationResult(out_dir=out_dir, particles_star=star, particles_true_star=star_true,
                            truth_mrc=truth_mrc, start_mrc=start_mrc, stacks=stacks,
                            rotations=rotations, angles_deg=angles, origins_A=origins, ctf=ctf,
                            subset=subset, noise_sigma=sigma, signal_variance=signal_var,
                            params=p)


__all__ = ["SimulationParams", "SimulationResult", "clean_images", "simulate_dataset"]
