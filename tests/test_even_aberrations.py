"""Even aberrations (spherical-aberration error, tetrafoil): RELION's Zernike order and
sign, and relion_ctf_refine's fit (physics/aberrations.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.fourier.project import project_images, volume_ft
from mpirefine.fourier.transforms import centered_rfft2, freq_grid_2d
from mpirefine.physics.aberrations import (
    N_EVEN,
    even_aberration_sums,
    even_phase,
    even_zernike_basis,
    fit_even_aberrations,
    spherical_to_zernike,
    zernike_to_spherical,
)
from mpirefine.physics.ctf import CTFParams, ctf_gamma, electron_wavelength_A, evaluate_ctf
from mpirefine.synthetic.models import model_volume

LAMBDA = float(electron_wavelength_A(300.0))


def test_even_zernike_are_relions():
    """RELION's Zernike::Z_cart for the even indices 0–8 (evenIndexToMN: (m, n) =
    (0,0), (−2,2), (0,2), (2,2), (−4,4), (−2,4), (0,4), (2,4), (4,4)): the radial
    polynomial times cos(mφ), or sin(|m|φ) for m < 0."""
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.4, 0.4, (2, 50))
    r, phi = np.hypot(x, y), np.arctan2(y, x)
    radial = {(0, 0): 1 + 0 * r, (2, 2): r ** 2, (0, 2): 2 * r ** 2 - 1, (4, 4): r ** 4,
              (2, 4): 4 * r ** 4 - 3 * r ** 2, (0, 4): 6 * r ** 4 - 6 * r ** 2 + 1}
    mn = [(0, 0), (-2, 2), (0, 2), (2, 2), (-4, 4), (-2, 4), (0, 4), (2, 4), (4, 4)]
    basis = even_zernike_basis(x, y)
    assert len(basis) == N_EVEN
    for (m, n), z in zip(mn, basis):
        angular = np.cos(m * phi) if m >= 0 else np.sin(-m * phi)
        np.testing.assert_allclose(z, radial[abs(m), n] * angular, atol=1e-12)


def test_spherical_error_is_the_z40_term():
    """A Cs change adds (π/2) ΔCs λ³ k⁴ to γ; its Z4⁰ coefficient carries that k⁴ term."""
    kx, ky = np.array([0.1, 0.25, -0.3]), np.array([0.2, -0.1, 0.05])
    base = CTFParams(12000.0, 12000.0, 0.0, 300.0, 2.7, 0.1)
    more = CTFParams(12000.0, 12000.0, 0.0, 300.0, 3.0, 0.1)
    k4 = (kx ** 2 + ky ** 2) ** 2
    dgamma = ctf_gamma(more, kx, ky)[0] - ctf_gamma(base, kx, ky)[0]
    c = spherical_to_zernike(0.3, LAMBDA)
    np.testing.assert_allclose(dgamma, 6 * c * k4, rtol=1e-9)
    assert zernike_to_spherical(c, LAMBDA) == pytest.approx(0.3, rel=1e-12)
    # evaluate_ctf's gamma_offset is that change
    offset = even_phase(np.eye(N_EVEN)[6] * c, kx, ky) - c * (1 - 6 * (kx ** 2 + ky ** 2))
    np.testing.assert_allclose(evaluate_ctf(base, kx, ky, np.float64, offset[None]),
                               evaluate_ctf(more, kx, ky, np.float64), atol=1e-12)


def _images_with(delta_cs_mm, tetrafoil, m=600, noise=2.0, seed=4):
    n, px = 64, 1.0
    vol = model_volume(n, px, chains=["A", "B", "C"])
    vft = volume_ft(vol)
    rng = np.random.default_rng(seed)
    rot = Rotation.random(m, random_state=rng).as_matrix()
    ky, kx = freq_grid_2d(n, np)
    kx_A, ky_A = kx / (n * px), ky / (n * px)
    params = CTFParams(rng.uniform(6000, 16000, m), rng.uniform(6000, 16000, m),
                       rng.uniform(0, 180, m), 300.0, 2.7, 0.1)
    truth = np.zeros(N_EVEN)
    truth[4], truth[8] = tetrafoil
    true_params = CTFParams(params.defocus_u_A, params.defocus_v_A, params.defocus_angle_deg,
                            300.0, 2.7 + delta_cs_mm, 0.1)
    ctf = evaluate_ctf(true_params, kx_A, ky_A, gamma_offset=even_phase(truth, kx_A, ky_A)[None])
    images = project_images(vft, rot, ctf=ctf)
    images += rng.normal(0, images.std() * noise, images.shape).astype(np.float32)
    f = centered_rfft2(images).astype(np.complex64)
    band = (np.hypot(kx_A, ky_A) >= 1 / 10.0) & (np.hypot(kx_A, ky_A) <= 1 / 2.2)
    return vft, f, params, rot, kx_A, ky_A, band.astype(float)


def test_fit_recovers_spherical_error_and_tetrafoil_from_images():
    """Noisy images of a known map at known poses whose Cs is 0.3 mm above the metadata's
    and with tetrafoil (40, −30) rad·Å⁴ (about 1 rad at 2.5 Å): the fit finds both within
    10 %; with the metadata's Cs right and no tetrafoil it finds none."""
    vft, f, params, rot, kx_A, ky_A, band = _images_with(0.3, (40.0, -30.0))
    gamma = ctf_gamma(params, kx_A, ky_A)
    m = len(rot)
    sums = even_aberration_sums(vft, f, gamma, rot, np.zeros((m, 2)), np.ones(m))
    fit = fit_even_aberrations(sums, kx_A, ky_A, band, LAMBDA)
    assert fit.delta_cs_mm == pytest.approx(0.3, rel=0.1), fit
    np.testing.assert_allclose(fit.tetrafoil, [40.0, -30.0], rtol=0.1)
    vft, f, params, rot, kx_A, ky_A, band = _images_with(0.0, (0.0, 0.0))
    sums = even_aberration_sums(vft, f, ctf_gamma(params, kx_A, ky_A), rot, np.zeros((m, 2)),
                                np.ones(m))
    none = fit_even_aberrations(sums, kx_A, ky_A, band, LAMBDA)
    assert abs(none.delta_cs_mm) < 0.03 and np.all(np.abs(none.tetrafoil) < 4.0), none


def test_no_signal_gives_no_even_aberration():
    n = 32
    ky, kx = freq_grid_2d(n, np)
    zeros = tuple(np.zeros((n, n // 2 + 1)) for _ in range(5))
    fit = fit_even_aberrations(zeros, kx / 40.0, ky / 40.0, np.ones((n, n // 2 + 1)), LAMBDA)
    assert fit.delta_cs_mm == 0.0 and fit.pixels == 0


@pytest.fixture(scope="module")
def even_dataset(tmp_path_factory):
    """Three apoferritin chains, box 64 at 1.25 Å/px, 600 particles at SNR 100, imaged
    with Cs 0.4 mm above the metadata's and tetrafoil (40, −30) rad·Å⁴ (about 1.2 and
    1 rad at Nyquist, 2.5 Å); particles.star does not know (particles_true.star does,
    as rlnEvenZernike).  The SNR is high because a Cs error shows only at high
    resolution (0.15 rad at 4 Å here): at SNR 10 the half maps' FSC ends near 4 Å and
    neither relion_ctf_refine nor our fit can pin it (0.21 and 0.26 mm)."""
    from test_refine import run_cli

    out = tmp_path_factory.mktemp("even")
    res = run_cli(["simulate", "--model", "--asymmetric", "--center-on-chains", "--box", "64",
                   "--pixel-size", "1.25", "--n-particles", "600", "--snr", "100", "--seed", "5",
                   "--cs-error", "0.4", "--tetrafoil", "40", "-30",
                   "--out", str(out), "--overwrite"])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _even_fit_at_poses(star, maps, raw=False):
    """Our even fit at the poses ``star`` carries (its CTF without even aberrations),
    each half's particles against the *other* half's map, every frequency from 10 Å to
    2.6 Å weighted by the half maps' FSC, as refine sums and weights them (``raw``:
    without the correction for the maps' noise, as relion_ctf_refine fits)."""
    from relion_ctf import sums_at_true_poses

    def batch(vft, f, params, rot, shifts, _prep, kx_A, ky_A):
        return even_aberration_sums(vft, f, ctf_gamma(params, kx_A, ky_A), rot, shifts,
                                    np.ones(len(rot)))

    sums, kx_A, ky_A, fsc, weight = sums_at_true_poses(star, maps, batch)
    return fit_even_aberrations(sums, kx_A, ky_A, weight, LAMBDA,
                                reference_fsc=None if raw else fsc)


@pytest.mark.skipif(__import__("shutil").which("relion_ctf_refine") is None,
                    reason="relion_ctf_refine not installed (apt-get install relion)")
def test_relion_ctf_refine_finds_our_even_aberrations_and_agrees(even_dataset, tmp_path):
    """relion_ctf_refine --fit_aberr (RELION 3.1) on our simulated particles at their true
    poses, with half maps reconstructed there (by `mpirefine reconstruct`, which applies
    particles_true.star's rlnEvenZernike to the CTF), finds the Cs error and tetrafoil we
    put in, in its own rlnEvenZernike, so our Zernike order and sign are RELION's; our
    fit on the same particles and maps agrees with it within 10 %.

    Measured (truth 0.4 mm, tetrafoil 40 / −30): relion_ctf_refine 0.360 mm, 41.0 /
    −32.3; ours 0.380 mm, 40.6 / −31.0; ours without the correction for the half maps'
    noise, the same estimator as RELION's, 0.355 mm, 38.7 / −30.9 (with the true map
    as the reference instead: 0.408 mm).  The half maps
    reach 3.4 Å (FSC 0.143), where the Cs error is only 0.3 rad, so their noise biases
    an uncorrected fit of it by 10 %."""
    from relion_ctf import relion_ctf_refine_at_true_poses

    from mpirefine.physics.aberrations import SPHERICAL_TERM, TETRAFOIL_TERMS, parse_zernike

    row, maps = relion_ctf_refine_at_true_poses(
        even_dataset, tmp_path, ["rlnEvenZernike"],
        ["--fit_aberr", "--kmin_aberr", "10", "--even_aberr_max_n", "4"])
    theirs = parse_zernike(row["rlnEvenZernike"])
    their_cs = zernike_to_spherical(theirs[SPHERICAL_TERM], LAMBDA)
    their_tetra = theirs[list(TETRAFOIL_TERMS)]
    assert their_cs == pytest.approx(0.4, rel=0.15), theirs
    np.testing.assert_allclose(their_tetra, [40.0, -30.0], rtol=0.1)
    ours = _even_fit_at_poses(even_dataset / "particles_true.star", maps)
    assert ours.delta_cs_mm == pytest.approx(0.4, rel=0.1), ours
    np.testing.assert_allclose(ours.tetrafoil, [40.0, -30.0], rtol=0.1)
    assert ours.delta_cs_mm == pytest.approx(their_cs, rel=0.1), (ours, theirs)
    np.testing.assert_allclose(ours.tetrafoil, their_tetra, rtol=0.1)
    # the same estimator as RELION's (no noise correction) lands where RELION does
    raw = _even_fit_at_poses(even_dataset / "particles_true.star", maps, raw=True)
    assert raw.delta_cs_mm == pytest.approx(their_cs, rel=0.05), (raw, theirs)


def test_reconstruct_and_refine_apply_the_input_even_aberrations(tmp_path):
    """An optics table's rlnEvenZernike goes into the CTF (it was ignored before, a
    silent wrong answer at high resolution): noise-free particles imaged with Cs 1.5 mm
    above the metadata's and tetrafoil (150, −100) rad·Å⁴ (several radians at Nyquist)
    reconstruct at their true poses as well as the same particles without aberrations
    when particles_true.star carries them, and far worse when the column is dropped
    (measured, mean FSC vs truth over 4–2.8 Å: 0.480 with it, 0.479 for the particles
    without aberrations, 0.226 with the column dropped); `info` and `refine` report them."""
    import starfile
    from test_refine import run_cli

    from mpirefine.io import read_volume
    from mpirefine.synthetic.evaluate import compare_with_truth

    common = ["simulate", "--model", "--asymmetric", "--center-on-chains", "--box", "64",
              "--pixel-size", "1.25", "--n-particles", "300", "--snr", "inf", "--seed", "3",
              "--overwrite"]
    for name, extra in (("data", ["--cs-error", "1.5", "--tetrafoil", "150", "-100"]),
                        ("plain", [])):
        res = run_cli(common + extra + ["--out", str(tmp_path / name)])
        assert res.returncode == 0, res.stderr[-2000:]
    data = tmp_path / "data"
    true = starfile.read(data / "particles_true.star")
    assert "rlnEvenZernike" in true["optics"].columns
    starfile.write({"optics": true["optics"].drop(columns=["rlnEvenZernike"]),
                    "particles": true["particles"]}, data / "particles_noeven.star", overwrite=True)
    truth = read_volume(str(data / "truth.mrc"))[0]
    high = slice(20, 29)                                   # 4 Å to 2.8 Å
    fsc = {}
    for name, star in (("even", data / "particles_true.star"),
                       ("dropped", data / "particles_noeven.star"),
                       ("plain", tmp_path / "plain" / "particles_true.star")):
        res = run_cli(["reconstruct", str(star), "--out", str(tmp_path / f"rec_{name}")])
        assert res.returncode == 0, res.stderr[-2000:]
        curve = compare_with_truth(read_volume(str(tmp_path / f"rec_{name}" / "map.mrc"))[0],
                                   truth, 1.25)
        fsc[name] = float(np.mean(np.asarray(curve["fsc_vs_truth"])[high]))
    assert abs(fsc["even"] - fsc["plain"]) < 0.05, fsc
    assert fsc["dropped"] < fsc["even"] - 0.15, fsc
    res = run_cli(["info", str(data / "particles_true.star")])
    assert "even aberrations: Cs change +1.500 mm, tetrafoil (+150.0, -100.0)" in res.stdout
    res = run_cli(["refine", str(data / "particles_true.star"), str(data / "start_20A.mrc"),
                   "--out", str(tmp_path / "refine"), "--max-iterations", "1", "--cpu"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "even aberrations (rlnEvenZernike) of optics group(s) [1]" in res.stdout + res.stderr
