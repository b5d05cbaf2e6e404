"""Odd aberrations (beam tilt, trefoil): RELION's conventions and their fit
(physics/aberrations.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.fourier.project import project_images, volume_ft
from mpirefine.fourier.transforms import centered_rfft2, freq_grid_2d
from mpirefine.physics.aberrations import (
    coma_scale,
    demodulation,
    fit_odd_aberrations,
    odd_aberration_sums,
    odd_phase,
    tilt_to_zernike,
    zernike_to_tilt,
)
from mpirefine.physics.ctf import CTFParams, electron_wavelength_A, evaluate_ctf
from mpirefine.synthetic.models import model_volume

LAMBDA = float(electron_wavelength_A(300.0))


def test_beam_tilt_phase_is_relions():
    """φ = −2π Cs λ² 10⁻³ |k|² (τ·k) (RELION's selfApplyBeamTilt: 0.360 Cs 10⁷ λ² / L³ degrees
    per (px²·px·mrad), applied to the image with the opposite sign)."""
    kx, ky = np.array([0.1, 0.2, -0.05]), np.array([0.05, -0.1, 0.3])
    c = tilt_to_zernike(0.7, -0.4, 2.7, LAMBDA)
    expected = -2 * np.pi * 2.7e7 * LAMBDA ** 2 * 1e-3 * (kx ** 2 + ky ** 2) * (0.7 * kx - 0.4 * ky)
    np.testing.assert_allclose(odd_phase(c, kx, ky), expected, rtol=1e-12)
    # RELION's legacy formula, in degrees, for a 200 Å box: image gets +delta_phase
    L, ip, jp = 200.0, ky * 200.0, kx * 200.0
    delta_deg = 0.360 * 2.7 * 1e7 * LAMBDA ** 2 / L ** 3 * (ip ** 2 + jp ** 2) * (ip * -0.4 + jp * 0.7)
    np.testing.assert_allclose(np.deg2rad(delta_deg), -expected, rtol=1e-12)
    tx, ty, rest = zernike_to_tilt(c, 2.7, LAMBDA)
    assert (tx, ty) == pytest.approx((0.7, -0.4), rel=1e-12)
    np.testing.assert_allclose(rest, 0.0, atol=1e-15)
    assert coma_scale(2.7, LAMBDA) == pytest.approx(2 * np.pi * 2.7e7 * LAMBDA ** 2)


@pytest.mark.parametrize("fit_trefoil", [False, True])
def test_fit_recovers_beam_tilt_and_trefoil_from_images(fit_trefoil):
    """Noisy images of a known map at known poses, with beam tilt (and trefoil): the fit
    finds the tilt within 0.1 mrad and the trefoil within 10 %; demodulating the images
    by the fit leaves no odd phase."""
    n, px = 64, 1.25
    vol = model_volume(n, px, chains=["A", "B", "C"])
    vft = volume_ft(vol)
    rng = np.random.default_rng(4)
    m = 600
    rot = Rotation.random(m, random_state=rng).as_matrix()
    ky, kx = freq_grid_2d(n, np)
    kx_A, ky_A = kx / (n * px), ky / (n * px)
    params = CTFParams(rng.uniform(8000, 20000, m), rng.uniform(8000, 20000, m),
                       np.zeros(m), 300.0, 2.7, 0.1)
    ctf = evaluate_ctf(params, kx_A, ky_A)
    truth = tilt_to_zernike(0.8, -0.5, 2.7, LAMBDA)
    if fit_trefoil:
        truth[2], truth[5] = 60.0, -40.0                    # rad·Å³: ~1 rad at 2.5 Å
    phase = np.exp(1j * odd_phase(truth, kx_A, ky_A))
    images = project_images(vft, rot, ctf=ctf * phase[None])
    images += rng.normal(0, images.std() * 2.0, images.shape).astype(np.float32)
    f = centered_rfft2(images).astype(np.complex64)
    xy, w = odd_aberration_sums(vft, f, ctf, rot, np.zeros((m, 2)), np.ones(m))
    band = (np.hypot(kx_A, ky_A) >= 1 / 10.0) & (np.hypot(kx_A, ky_A) <= 1 / 2.6)
    fit = fit_odd_aberrations(xy, w, kx_A, ky_A, band.astype(float), 2.7, LAMBDA,
                              fit_tilt=True, fit_trefoil=fit_trefoil)
    assert abs(fit.tilt_x_mrad - 0.8) < 0.1 and abs(fit.tilt_y_mrad + 0.5) < 0.1, fit
    if fit_trefoil:
        np.testing.assert_allclose(fit.trefoil, [60.0, -40.0], rtol=0.1)
    # demodulated by the fit, the images' sums carry (almost) no odd phase
    demod = demodulation(fit.coefficients, kx_A, ky_A, np)
    xy2, w2 = odd_aberration_sums(vft, f * demod[None], ctf, rot, np.zeros((m, 2)), np.ones(m))
    again = fit_odd_aberrations(xy2, w2, kx_A, ky_A, band.astype(float), 2.7, LAMBDA,
                                fit_trefoil=fit_trefoil)
    assert np.hypot(again.tilt_x_mrad, again.tilt_y_mrad) < 0.05, again


def test_no_signal_gives_no_aberration():
    n = 32
    ky, kx = freq_grid_2d(n, np)
    fit = fit_odd_aberrations(np.zeros((n, n // 2 + 1), complex), np.zeros((n, n // 2 + 1)),
                              kx / 40.0, ky / 40.0, np.ones((n, n // 2 + 1)), 2.7, LAMBDA)
    assert fit.tilt_x_mrad == 0.0 and fit.pixels == 0


@pytest.fixture(scope="module")
def tilted_dataset(tmp_path_factory):
    """Three apoferritin chains, box 64 at 1.25 Å/px, 600 particles at SNR 10, imaged
    with 1.0 / −0.6 mrad of beam tilt and trefoil (40, −25) rad·Å³; particles.star does
    not know (particles_true.star does)."""
    from test_refine import run_cli

    out = tmp_path_factory.mktemp("tilted")
    res = run_cli(["simulate", "--model", "--asymmetric", "--center-on-chains", "--box", "64",
                   "--pixel-size", "1.25", "--n-particles", "600", "--snr", "10", "--seed", "5",
                   "--beam-tilt", "1.0", "-0.6", "--trefoil", "40", "-25",
                   "--out", str(out), "--overwrite"])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _fsc_vs_truth_at(path, truth, shell):
    from mpirefine.io import read_volume
    from mpirefine.synthetic.evaluate import compare_with_truth

    return float(np.asarray(compare_with_truth(read_volume(str(path))[0], truth, 1.25)
                            ["fsc_vs_truth"])[shell])


def test_simulated_tilt_is_in_the_truth_star_and_reconstruct_removes_it(tilted_dataset, tmp_path):
    """relion_reconstruct's behaviour: the optics table's beam tilt and odd Zernike terms
    are taken out of the images before insertion; at the true poses that map is closer
    to the truth at 3 Å than the one built without them."""
    import starfile
    from test_refine import run_cli

    from mpirefine.io import read_volume

    optics = starfile.read(tilted_dataset / "particles_true.star")["optics"]
    assert optics["rlnBeamTiltX"][0] == pytest.approx(1.0)
    assert optics["rlnBeamTiltY"][0] == pytest.approx(-0.6)
    assert "rlnBeamTiltX" not in starfile.read(tilted_dataset / "particles.star")["optics"]
    truth = read_volume(str(tilted_dataset / "truth.mrc"))[0]
    plain = starfile.read(tilted_dataset / "particles_true.star")
    plain["optics"] = plain["optics"].drop(columns=["rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike"])
    starfile.write(plain, tmp_path / "no_tilt.star", overwrite=True)
    scores = {}
    for name, star in (("corrected", tilted_dataset / "particles_true.star"),
                       ("plain", tmp_path / "no_tilt.star")):
        res = run_cli(["reconstruct", str(star), "--out", str(tmp_path / name),
                       "--project-dir", str(tilted_dataset)])
        assert res.returncode == 0, res.stderr[-2000:]
        scores[name] = _fsc_vs_truth_at(tmp_path / name / "map_unfil.mrc", truth, 27)  # 3 Å
    assert scores["corrected"] > scores["plain"] + 0.05, scores


def test_refine_optimize_ctf_global_finds_tilt_and_trefoil(tilted_dataset, tmp_path):
    """--optimize-ctf-global: the fitted beam tilt lands within 0.1 mrad of the truth and
    the trefoil within 10 % (measured: 0.99 / −0.60 mrad, 42.3 / −25.0 rad·Å³; summed
    over windowed images it had stalled at 1.00 / −0.48 and 38 / −20.5); the values go
    to the optics table and summary.json, and the map beats the run without the option."""
    import json

    import starfile
    from test_refine import run_cli

    from mpirefine.io import read_volume

    truth = read_volume(str(tilted_dataset / "truth.mrc"))[0]
    runs = {}
    for name, extra in (("on", ["--optimize-ctf-global", "--ctf-start-resolution", "10"]),
                        ("off", [])):
        out = tmp_path / name
        res = run_cli(["refine", str(tilted_dataset / "particles.star"),
                       str(tilted_dataset / "start_20A.mrc"), "--out", str(out),
                       "--max-iterations", "8", "--max-align-resolution", "6", "--cpu", *extra])
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.load(open(out / "summary.json"))
    fit = runs["on"]["ctf_global"]["1"]
    assert abs(fit["beam_tilt_x_mrad"] - 1.0) < 0.1 and abs(fit["beam_tilt_y_mrad"] + 0.6) < 0.1, fit
    np.testing.assert_allclose(fit["trefoil"], [40.0, -25.0], rtol=0.1)
    assert runs["off"]["ctf_global"] is None
    optics = starfile.read(tmp_path / "on" / "particles.star")["optics"]
    assert optics["rlnBeamTiltX"][0] == pytest.approx(fit["beam_tilt_x_mrad"], abs=1e-6)
    assert "rlnBeamTiltX" not in starfile.read(tmp_path / "off" / "particles.star")["optics"]
    on, off = (_fsc_vs_truth_at(tmp_path / r / "map.mrc", truth, 16) for r in ("on", "off"))
    assert on > off, (on, off)
    assert runs["on"]["final_resolution_A"] < runs["off"]["final_resolution_A"]
    # the report shows the last fit's measured odd phase beside the model
    sums = np.load(tmp_path / "on" / "ctf_global_sums.npz")
    assert list(sums["groups"]) == [1] and sums["xy"].shape == (1,) + sums["weight"].shape
    assert (tmp_path / "on" / "plots" / "ctf_odd_phase.png").exists()
    assert "Odd aberrations per optics group" in (tmp_path / "on" / "report.html").read_text()
    assert not (tmp_path / "off" / "plots" / "ctf_odd_phase.png").exists()


def test_info_shows_each_groups_aberrations(tilted_dataset):
    from test_refine import run_cli

    res = run_cli(["info", str(tilted_dataset / "particles_true.star")])
    assert res.returncode == 0, res.stderr
    assert "beam tilt (+1.000, -0.600) mrad, trefoil (+40.0, -25.0)" in res.stdout
    res = run_cli(["info", str(tilted_dataset / "particles.star")])
    assert "beam tilt" not in res.stdout


def _fit_at_poses(star, maps):
    """Our fit at the poses ``star`` carries, each half's particles against the *other*
    half's map (as refine sums them), every frequency from 10 Å to 2.6 Å."""
    from relion_ctf import sums_at_true_poses

    from mpirefine.refinement.images import ctf_grid

    def batch(vft, f, params, rot, shifts, prep, _kx_A, _ky_A):
        return odd_aberration_sums(vft, f, ctf_grid(params, prep, np), rot, shifts,
                                   np.ones(len(rot)))

    (xy, w), kx_A, ky_A, _, weight = sums_at_true_poses(star, maps, batch)
    return fit_odd_aberrations(xy, w, kx_A, ky_A, weight, 2.7, LAMBDA)


@pytest.mark.skipif(shutil.which("relion_ctf_refine") is None,
                    reason="relion_ctf_refine not installed (apt-get install relion)")
def test_relion_ctf_refine_reads_our_conventions_and_agrees(tilted_dataset, tmp_path):
    """relion_ctf_refine (RELION 3.1) on our simulated particles at their true poses, with
    half maps reconstructed there, finds the beam tilt and trefoil we put in, in its own
    rlnBeamTiltX/Y and rlnOddZernike (measured: 1.003 / −0.609 mrad, 40.4 / −24.6 rad·Å³),
    so our signs, axes and Zernike order are RELION's; our fit on the same particles and
    maps agrees with it within 0.1 mrad and 10 % (measured: 0.968 / −0.605, 40.3 / −25.4)."""
    from relion_ctf import relion_ctf_refine_at_true_poses

    from mpirefine.physics.aberrations import parse_zernike

    theirs, maps = relion_ctf_refine_at_true_poses(
        tilted_dataset, tmp_path, ["rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike"],
        ["--fit_beamtilt", "--kmin_tilt", "10", "--odd_aberr_max_n", "3"])
    tilt = (float(theirs["rlnBeamTiltX"]), float(theirs["rlnBeamTiltY"]))
    trefoil = parse_zernike(theirs["rlnOddZernike"])[[2, 5]]
    assert tilt == pytest.approx((1.0, -0.6), abs=0.05), tilt
    np.testing.assert_allclose(trefoil, [40.0, -25.0], rtol=0.05)
    ours = _fit_at_poses(tilted_dataset / "particles_true.star", maps)
    assert abs(ours.tilt_x_mrad - tilt[0]) < 0.1 and abs(ours.tilt_y_mrad - tilt[1]) < 0.1, ours
    np.testing.assert_allclose(ours.trefoil, trefoil, rtol=0.1)
