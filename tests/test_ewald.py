"""Ewald sphere curvature (physics/ewald.py): curved-sphere images, the side-band
insertion, and the reconstruction they give against the truth and against
relion_reconstruct --ewald."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.fourier.backproject import Accumulator
from mpirefine.fourier.project import VolumeFT, extract_slices, project_transforms, volume_ft
from mpirefine.fourier.transforms import freq_grid_2d
from mpirefine.physics.ctf import CTFParams, ctf_gamma, electron_wavelength_A, evaluate_ctf
from mpirefine.physics.ewald import (
    EwaldCorrection,
    EwaldSidebands,
    curved_transforms,
    full_plane_even,
    overlap_fraction,
    sideband_phase,
    sphere_height,
)

RELION = shutil.which("relion_reconstruct")

# A case scaled so that curvature limits a 64-px box: a 20 Å particle, 1.5 Å/px, and a
# wavelength (80 V) and defocus (56–72 Å) for which d ≈ √(2λD) ≈ 7 Å and the other side
# band moves by 1–2 particle diameters at 3–5 Å, yet stays inside the box.
BOX, PIXEL_A, VOLTAGE_KV, DEFOCUS_UM, DIAMETER_A, N = 64, 1.5, 0.08, (0.0056, 0.0072), 24.0, 600


def _ctf(n=3, voltage=300.0):
    return CTFParams(defocus_u_A=np.array([9000.0, 15000.0, 21000.0])[:n],
                     defocus_v_A=np.array([8500.0, 14000.0, 21000.0])[:n],
                     defocus_angle_deg=np.array([10.0, 70.0, 0.0])[:n], voltage_kV=voltage,
                     cs_mm=2.7, amplitude_contrast=0.1, bfactor_A2=np.array([0.0, 50.0, 120.0])[:n],
                     scale=np.array([1.0, 0.8, 1.2])[:n])


def test_sideband_phase_is_the_flat_ctf_with_its_quadrature():
    """Re(E·u) is the CTF, |u| = 1: without curvature the model is the flat one."""
    n, px = 32, 1.2
    ky, kx = freq_grid_2d(n, np)
    kx_A, ky_A = kx / (n * px), ky / (n * px)
    params = _ctf()
    u = sideband_phase(ctf_gamma(params, kx_A, ky_A))
    k2 = kx_A ** 2 + ky_A ** 2
    envelope = np.exp(-params.bfactor_A2[:, None, None] * k2 / 4) * params.scale[:, None, None]
    np.testing.assert_allclose(np.abs(u), 1.0, atol=1e-6)
    np.testing.assert_allclose(envelope * u.real, evaluate_ctf(params, kx_A, ky_A), atol=2e-6)


def test_sphere_height_is_half_lambda_k_squared():
    n, px, lam = 128, 1.1, float(electron_wavelength_A(300.0))
    kx, ky = np.array([0.0, 10.0, -30.0]), np.array([5.0, -20.0, 40.0])
    s = sphere_height(kx, ky, n, px, lam)                # cycles per box
    k_A2 = (kx ** 2 + ky ** 2) / (n * px) ** 2
    np.testing.assert_allclose(s / (n * px), 0.5 * lam * k_A2)


def test_overlap_fraction_of_two_discs():
    d = np.array([0.0, 5.0, 10.0, 20.0, 30.0])
    a = overlap_fraction(d, 20.0)
    assert a[0] == pytest.approx(1.0) and a[3] == 0 and a[4] == 0
    assert np.all(np.diff(a[:4]) < 0)
    # a disc moved by its radius shares (2/π)(π/3 − √3/4) of its area
    assert a[2] == pytest.approx(2 / np.pi * (np.pi / 3 - np.sqrt(3) / 4))
    # periodic images: a copy moved by (box − 5) overlaps as one moved by 5
    assert overlap_fraction(np.array([95.0]), 20.0, 100.0)[0] == pytest.approx(a[1])


def test_full_plane_even_mirrors_the_half_plane():
    n = 8
    ky, kx = freq_grid_2d(n, np)
    half = np.cos(0.3 * kx) * (1 + 0.1 * ky ** 2) + 0.01 * kx * ky     # even: f(-k) = f(k)
    full = full_plane_even(half, n)
    k = np.arange(n) - n // 2
    expect = np.cos(0.3 * k[None, :]) * (1 + 0.1 * k[:, None] ** 2) + 0.01 * k[None, :] * k[:, None]
    np.testing.assert_allclose(full[1:, 1:], expect[1:, 1:], rtol=1e-6)


def test_curved_extraction_and_insertion_are_adjoint(rng):
    """Samples off the central plane (kz per rotation and frequency) keep extraction
    and insertion adjoint, in the compiled and in the array code."""
    n, pad = 16, 2
    size = n * pad
    shape = (size, size, size // 2 + 1)
    V = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    vft = VolumeFT(V, n, pad)
    rot = Rotation.random(7, random_state=3).as_matrix()
    kx, ky = rng.uniform(-8, 8, (2, 300)).astype(np.float32)
    kz = rng.uniform(-2, 2, (7, 300)).astype(np.float32)
    y = rng.normal(size=(7, 300)) + 1j * rng.normal(size=(7, 300))
    samples = extract_slices(vft, rot, kx, ky, kz)
    lhs = float((np.conj(y) * samples).real.sum())
    scale = float(np.linalg.norm(y) * np.linalg.norm(samples))     # the sum cancels to ~1e-3 of this
    for jit in ("1", "0"):
        os.environ["MPIREFINE_JIT"] = jit
        try:
            acc = Accumulator.zeros(n, pad, np)
            acc.insert(rot, y, np.zeros(y.shape, np.float32), kx, ky, kz)
        finally:
            os.environ.pop("MPIREFINE_JIT")
        rhs = float((np.conj(V.astype(np.complex128)) * acc.data).real.sum())
        assert lhs == pytest.approx(rhs, abs=1e-6 * scale), jit


def test_flat_limit_of_curved_images_and_of_side_band_insertion(rng):
    """With no curvature (σ = 0) a curved image is CTF · projection, and the side-band
    insertion without a mask (overlap 1) is the flat insertion counted over the whole
    plane: twice the half plane's, less the kx = 0 column, which the half plane already
    holds with its Hermitian mates."""
    from mpirefine.fourier.transforms import centered_rfft2
    from mpirefine.refinement.halfmaps import insert_particles

    n, px = 24, 2.0
    vol = rng.normal(size=(n, n, n)).astype(np.float32)
    vft = volume_ft(vol)
    rot = Rotation.random(4, random_state=5).as_matrix()
    params = _ctf(3).subset(np.array([0, 1, 2, 0]))
    ky, kx = freq_grid_2d(n, np)
    kx_A, ky_A = kx / (n * px), ky / (n * px)
    gamma = ctf_gamma(params, kx_A, ky_A)
    k2 = kx_A ** 2 + ky_A ** 2
    envelope = np.exp(-params.bfactor_A2[:, None, None] * k2 / 4) * params.scale[:, None, None]
    curved = curved_transforms(lambda r, a, b, c: extract_slices(vft, r, a, b, c), rot, n, px,
                               0.02, gamma, envelope, 0.0)
    flat = project_transforms(vft, rot) * evaluate_ctf(params, kx_A, ky_A)
    np.testing.assert_allclose(curved, flat, atol=1e-4 * np.abs(flat).max())

    images = centered_rfft2(rng.normal(size=(4, n, n)).astype(np.float32))
    inner = np.hypot(kx, ky) < n // 2 - 1              # the Nyquist row has no mate in view
    ctf = evaluate_ctf(params, kx_A, ky_A) * inner
    sb = EwaldSidebands.build(params, px, n, 0.0, 30.0, np)
    sb.mask = np.ones_like(sb.mask)
    u_conj = sb.u_conj.reshape(4, -1)[:, sb.index]
    envelope_full = full_plane_even(envelope, n).reshape(4, -1)[:, sb.index]
    sb.gain = (0.5 * envelope_full * (1 + u_conj ** 2)
               * (np.hypot(sb.kx, sb.ky) < n // 2 - 1)).astype(np.complex64)
    shifts = rng.normal(size=(4, 2))
    weight = np.ones((n, n // 2 + 1), np.float32)
    a, a0, b = (Accumulator.zeros(n, 2, np) for _ in range(3))
    insert_particles(a, images, ctf, weight, rot, shifts, np.ones(4))
    insert_particles(a0, images, ctf * (kx == 0), weight, rot, shifts, np.ones(4))
    insert_particles(b, images, ctf, weight, rot, shifts, np.ones(4), ewald=sb)
    np.testing.assert_allclose(b.weight, 2 * a.weight - a0.weight, atol=1e-5 * a.weight.max())
    np.testing.assert_allclose(b.data, 2 * a.data - a0.data, atol=1e-5 * np.abs(a.data).max())


def test_ewald_correction_checks_its_arguments():
    with pytest.raises(ValueError, match="curvature"):
        EwaldCorrection("sideways", 100.0)
    with pytest.raises(ValueError, match="diameter"):
        EwaldCorrection("negative", 0.0)


# ------------------------------------------------------------------ reconstruction


@pytest.fixture(scope="module")
def curved_dataset(tmp_path_factory):
    """Noise-free images on the negatively curved sphere of a 20 Å particle (module
    constants), at known poses."""
    from mpirefine.synthetic.models import density_from_atoms
    from mpirefine.synthetic.simulate import simulate_dataset

    rng = np.random.default_rng(3)
    atoms = rng.normal(size=(400, 3))
    atoms *= (10.0 * rng.uniform(0, 1, 400) ** (1 / 3) / np.linalg.norm(atoms, axis=1))[:, None]
    volume = density_from_atoms(atoms, BOX, PIXEL_A, center_A=np.zeros(3))
    folder = tmp_path_factory.mktemp("ewald_data")
    simulate_dataset(volume, PIXEL_A, N, folder, snr=np.inf, defocus_range_um=DEFOCUS_UM,
                     astigmatism_A=0.0, voltage_kV=VOLTAGE_KV, cs_mm=0.0, shift_sigma_A=2.0,
                     overwrite=True, ewald_curvature="negative")
    return folder


def _reconstruct(dataset, out, *extra):
    from test_refine import run_cli

    res = run_cli(["reconstruct", str(dataset / "particles_true.star"), "--out", str(out),
                   "--project-dir", str(dataset), "--overwrite", *extra])
    assert res.returncode == 0, res.stderr[-2000:]
    return out / "map_unfil.mrc"


def _vs_truth(path, dataset):
    from mpirefine.io import read_volume
    from mpirefine.postprocess.fsc import fsc_curve

    return fsc_curve(np.asarray(read_volume(str(path))[0]),
                     np.asarray(read_volume(str(dataset / "truth.mrc"))[0]))


@pytest.fixture(scope="module")
def reconstructions(curved_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ewald_rec")
    maps = {"flat": _reconstruct(curved_dataset, out / "flat")}
    for sign in ("negative", "positive"):
        maps[sign] = _reconstruct(curved_dataset, out / sign, "--ewald-correction",
                                  "--ewald-curvature", sign, "--particle-diameter", str(DIAMETER_A))
    return maps


def test_right_curvature_improves_the_map_and_the_wrong_one_does_not(curved_dataset, reconstructions):
    from mpirefine.postprocess.fsc import resolution_A

    fsc = {k: _vs_truth(p, curved_dataset) for k, p in reconstructions.items()}
    res = {k: resolution_A(f, BOX, PIXEL_A, 0.5) for k, f in fsc.items()}
    # measured: flat 3.66 Å, negative 3.19 Å, positive 5.05 Å (Nyquist 3.0 Å)
    assert res["negative"] < res["flat"] - 0.25, res
    assert res["positive"] > res["flat"] + 0.5, res
    band = slice(BOX // 4, int(BOX * PIXEL_A / 3.4))               # 6 Å to 3.4 Å
    assert fsc["negative"][band].mean() > fsc["flat"][band].mean() + 0.05
    summary = json.loads((reconstructions["negative"].parent / "summary.json").read_text())
    assert summary["ewald"] == {"curvature": "negative", "particle_diameter_A": DIAMETER_A}


def test_reconstruct_refuses_ewald_options_without_the_correction(curved_dataset, tmp_path):
    from test_refine import run_cli

    star = str(curved_dataset / "particles_true.star")
    res = run_cli(["reconstruct", star, "--out", str(tmp_path / "a"), "--ewald-curvature", "positive"])
    assert res.returncode == 2 and "applies only with --ewald-correction" in res.stderr
    res = run_cli(["reconstruct", star, "--out", str(tmp_path / "b"), "--ewald-correction"])
    assert res.returncode == 2 and "--particle-diameter" in res.stderr


@pytest.mark.skipif(RELION is None, reason="relion_reconstruct (Debian's relion) not installed")
def test_corrected_map_agrees_with_relion_reconstruct_ewald(curved_dataset, reconstructions, tmp_path):
    """relion_reconstruct --ewald (no --reverse_curvature: our "negative") with the same
    disc and soft edge.  Measured: FSC ≥ 0.99 from 48 Å to 4 Å and ≥ 0.9 to 3.55 Å; both
    maps reach FSC 0.5 vs truth at 3.2 Å.  Shell 1 (96 Å) differs (0.73): RELION's own
    Ewald and flat maps differ there by as much, ours agree with each other."""
    from mpirefine.io import read_volume
    from mpirefine.physics.ewald import mask_edge_px
    from mpirefine.postprocess.fsc import fsc_curve

    out = tmp_path / "relion_ewald.mrc"
    subprocess.run([RELION, "--i", "particles_true.star", "--o", str(out), "--ctf", "--ewald",
                    "--mask_diameter", str(DIAMETER_A), "--width_mask_edge",
                    str(round(mask_edge_px(DIAMETER_A, PIXEL_A)))],
                   cwd=curved_dataset, capture_output=True, text=True, timeout=600)
    assert out.exists(), "relion_reconstruct wrote no map"
    ours = np.asarray(read_volume(str(reconstructions["negative"]))[0])
    theirs = np.asarray(read_volume(str(out))[0])
    f = fsc_curve(ours, theirs)
    upto = int(BOX * PIXEL_A / 3.6)
    assert f[2:upto + 1].min() >= 0.9, np.round(f, 3)
    vs_truth = _vs_truth(out, curved_dataset)
    ours_vs_truth = _vs_truth(reconstructions["negative"], curved_dataset)
    assert abs(vs_truth[2:upto].mean() - ours_vs_truth[2:upto].mean()) < 0.03


def test_refine_runs_the_correction_and_schedules_the_even_fit(refine_dataset, tmp_path):
    """refine --ewald-correction inserts the side bands in every iteration; without
    --particle-diameter the disc is the low-passed initial volume's extent (here the
    whole 96 Å box of this small dataset).  At 300 kV and ~60 Å the curvature is
    negligible: the run matches a flat one's resolution (measured 7.30 against 7.49 Å
    after 4 iterations, the cost 0.2 s per iteration for 700 particles of 40 px).

    The same run asks for the even-aberration fit, which waits for convergence and
    needs 4 Å: this refinement converges near 7.6 Å, so it says so and fits nothing
    (fitted there, the band from 10 to 7.7 Å gave a "Cs change" of −424 mm)."""
    from refine_data import refine_args
    from test_refine import run_cli

    out = tmp_path / "r"
    res = run_cli(refine_args(refine_dataset, str(out), "--ewald-correction",
                              "--optimize-ctf-global", "--no-fit-tilt", "--no-fit-trefoil",
                              "--fit-spherical-aberration", "--fit-tetrafoil"))
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stderr + res.stdout
    assert "Ewald sphere correction: negative curvature" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ewald"]["curvature"] == "negative"
    assert 0 < summary["ewald"]["particle_diameter_A"] <= 96.0
    assert summary["config"]["ewald_correction"] is True
    assert summary["final_resolution_A"] < 15.0
    if summary["converged"]:
        assert "no even-aberration fit" in log
    assert summary["ctf_even"] is None
    assert not any("ctf_global" in h for h in summary["iterations"])   # no odd terms asked
