"""RELION/CryoSPARC conventions pinned against independently computed values."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.geometry.rotations import (
    angular_distance_deg,
    euler_to_matrix,
    matrix_to_euler,
    matrix_to_rotvec,
    rotvec_to_matrix,
)
from mpirefine.physics.ctf import CTFParams, electron_wavelength_A, evaluate_ctf


def relion_euler_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix written out from its published formula."""
    a, b, g = np.radians([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ])


def test_euler_matrix_matches_relion_formula(rng):
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    A = euler_to_matrix(*angles.T)
    for ang, mat in zip(angles, A):
        np.testing.assert_allclose(mat, relion_euler_matrix(*ang), atol=1e-12)


def test_euler_transpose_is_scipy_zyz(rng):
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(20, 3))
    A = euler_to_matrix(*angles.T)
    ref = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()
    np.testing.assert_allclose(A, ref.transpose(0, 2, 1), atol=1e-12)


def test_euler_round_trip(rng):
    angles = rng.uniform([-180, 1, -180], [180, 179, 180], size=(100, 3))
    A = euler_to_matrix(*angles.T)
    back = euler_to_matrix(*matrix_to_euler(A).T)
    assert np.max(angular_distance_deg(A, back)) < 1e-6


def test_cryosparc_rotvec_convention():
    rv = Rotation.random(30, random_state=1).as_rotvec()
    A = rotvec_to_matrix(rv)
    np.testing.assert_allclose(A, Rotation.from_rotvec(rv).as_matrix().transpose(0, 2, 1), atol=1e-12)
    np.testing.assert_allclose(rotvec_to_matrix(matrix_to_rotvec(A)), A, atol=1e-10)


def test_wavelength_300kV():
    # 300 kV electrons: 0.019687 Å (standard value)
    assert electron_wavelength_A(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_A(200.0) == pytest.approx(0.025079, abs=2e-6)


def test_ctf_matches_formula_at_chosen_frequencies():
    du, dv, ang = 15000.0, 14000.0, 30.0
    params = CTFParams(du, dv, ang, 300.0, 2.7, 0.1, phase_shift_deg=20.0, bfactor_A2=50.0, scale=0.8)
    kx = np.array([0.0, 0.05, 0.1, -0.07, 0.2])
    ky = np.array([0.01, 0.0, 0.1, 0.12, -0.15])
    got = evaluate_ctf(params, kx, ky, dtype=np.float64)[0]
    lam = 12.2643247 / np.sqrt(300e3 * (1 + 0.978466e-6 * 300e3))
    for i in range(len(kx)):
        k2 = kx[i] ** 2 + ky[i] ** 2
        theta = np.arctan2(ky[i], kx[i])
        df = du * np.cos(theta - np.radians(ang)) ** 2 + dv * np.sin(theta - np.radians(ang)) ** 2
        gamma = (-np.pi * lam * df * k2 + np.pi / 2 * 2.7e7 * lam ** 3 * k2 ** 2
                 - np.radians(20.0) - np.arctan(0.1 / np.sqrt(1 - 0.01)))
        expect = -np.sin(gamma) * np.exp(-50.0 * k2 / 4) * 0.8
        assert got[i] == pytest.approx(expect, abs=1e-12)


def test_ctf_low_frequency_sign_and_astigmatism_axis():
    # At k → 0 the CTF is +sin(atan(Q0/√(1-Q0²))) = +Q0 (positive contrast).
    p = CTFParams(20000.0, 10000.0, 0.0, 300.0, 2.7, 0.1)
    assert evaluate_ctf(p, np.array([0.0]), np.array([0.0]), dtype=np.float64)[0, 0] == pytest.approx(0.1)
    # Along X (the U axis at angle 0) the first zero comes sooner than along Y.
    k = np.linspace(0.001, 0.1, 600)
    ux = evaluate_ctf(p, k, 0 * k, dtype=np.float64)[0]
    uy = evaluate_ctf(p, 0 * k, k, dtype=np.float64)[0]
    assert k[np.argmax(ux < 0)] < k[np.argmax(uy < 0)]


def test_ctf_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        CTFParams(np.nan, 1.0, 0.0, 300.0, 2.7, 0.1)
