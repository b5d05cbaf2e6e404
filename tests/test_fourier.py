"""Physics of the Fourier core: adjointness, exact projections, reconstruction."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.backend import to_numpy
from mpirefine.fourier.backproject import Accumulator
from mpirefine.fourier.project import extract_slices, project_images, volume_ft
from mpirefine.fourier.reconstruct import reconstruct, ssnr_from_fsc
from mpirefine.fourier.transforms import (
    centered_irfft2,
    centered_rfft2,
    freq_grid_2d,
    phase_shift_2d,
)
from mpirefine.geometry.rotations import euler_to_matrix
from mpirefine.physics.ctf import CTFParams, evaluate_ctf
from mpirefine.postprocess.fsc import crossing_shell, fsc_curve, resolution_A


def blob_volume(n, seed=0, n_blobs=12, sigma=2.0):
    """A smooth asymmetric test volume: Gaussian blobs inside a sphere of n/3."""
    rng = np.random.default_rng(seed)
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((n, n, n), np.float32)
    for _ in range(n_blobs):
        p = rng.normal(size=3)
        p = p / np.linalg.norm(p) * rng.uniform(0, n / 3.5)
        r2 = (x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2
        vol += rng.uniform(0.5, 1.5) * np.exp(-r2 / (2 * sigma ** 2))
    return vol


def test_centered_fft_round_trip(rng):
    img = rng.normal(size=(3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(centered_irfft2(centered_rfft2(img), 16), img, atol=1e-5)


def test_phase_shift_moves_image_by_whole_pixels(rng):
    img = rng.normal(size=(1, 16, 16))
    shifted = centered_irfft2(phase_shift_2d(centered_rfft2(img), np.array([[3.0, -2.0]]), 16), 16)
    np.testing.assert_allclose(shifted[0], np.roll(img[0], (-2, 3), axis=(0, 1)), atol=1e-5)


def test_extract_and_insert_are_adjoint(xp, rng):
    n, pad = 16, 2
    size = n * pad
    shape = (size, size, size // 2 + 1)
    V = xp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(xp.complex64)
    from mpirefine.fourier.project import VolumeFT

    vft = VolumeFT(V, n, pad)
    rot = xp.asarray(Rotation.random(7, random_state=3).as_matrix())
    ky, kx = freq_grid_2d(n, np)
    kx, ky = xp.asarray(kx.ravel()), xp.asarray(ky.ravel())
    y = xp.asarray(rng.normal(size=(7, kx.size)) + 1j * rng.normal(size=(7, kx.size)))
    lhs = float((xp.conj(y) * extract_slices(vft, rot, kx, ky)).real.sum())
    acc = Accumulator.zeros(n, pad, xp)
    acc.insert(rot, y, xp.zeros(y.shape, xp.float32), kx, ky)
    rhs = float((xp.conj(V.astype(xp.complex128)) * acc.data).real.sum())
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_projection_along_z_equals_sum(xp):
    vol = xp.asarray(blob_volume(32))
    img = project_images(volume_ft(vol), xp.asarray(euler_to_matrix(0, 0, 0)))[0]
    direct = vol.sum(axis=0)
    c = np.corrcoef(to_numpy(img).ravel(), to_numpy(direct).ravel())[0, 1]
    assert c > 0.999
    # gridding pre-correction trades exactness on grid points for accuracy between them
    assert float(img.sum()) == pytest.approx(float(direct.sum()), rel=0.05)
    exact = project_images(volume_ft(vol, gridding=False), xp.asarray(euler_to_matrix(0, 0, 0)))[0]
    np.testing.assert_allclose(to_numpy(exact), to_numpy(direct), atol=1e-4)


def test_projection_tilt_90_views_along_x():
    # tilt 90: A^T (kx, ky, 0) = (0, ky, -kx), so the projection sums over the
    # volume's x, its y is the volume's y and its x the volume's -z.
    vol = blob_volume(32, seed=2)
    img = project_images(volume_ft(vol), euler_to_matrix(0, 90, 0))[0]
    direct = vol.sum(axis=2).T  # [y, z]
    mirrored = np.roll(direct[:, ::-1], 1, axis=1)  # z -> -z about index n // 2
    assert np.corrcoef(img.ravel(), mirrored.ravel())[0, 1] > 0.999


def _reconstruct_from_projections(vol, n_particles, ctf=True, noise_sigma=0.0, seed=0):
    n, px = vol.shape[0], 2.0
    rng = np.random.default_rng(seed)
    A = Rotation.random(n_particles, random_state=seed).as_matrix()
    shifts = rng.normal(scale=1.5, size=(n_particles, 2))
    ky, kx = freq_grid_2d(n, np)
    vft = volume_ft(vol)
    if ctf:
        params = CTFParams(rng.uniform(8000, 25000, n_particles), rng.uniform(8000, 25000, n_particles),
                           rng.uniform(0, 180, n_particles), 300.0, 2.7, 0.1)
        c = evaluate_ctf(params, kx / (n * px), ky / (n * px))
    else:
        c = np.ones((n_particles, n, n // 2 + 1), np.float32)
    imgs = project_images(vft, A, shifts_px=-shifts, ctf=c)
    imgs += rng.normal(scale=noise_sigma, size=imgs.shape).astype(np.float32) if noise_sigma else 0
    f = phase_shift_2d(centered_rfft2(imgs), shifts, n)
    halves = [Accumulator.zeros(n, 2, np) for _ in range(2)]
    for h in range(2):
        sel = slice(h, None, 2)
        halves[h].insert(A[sel], (f[sel] * c[sel]).reshape(len(A[sel]), -1),
                         (c[sel] ** 2).reshape(len(A[sel]), -1), kx.ravel(), ky.ravel())
    return halves, px


def test_noise_free_reconstruction_matches_truth():
    n = 32
    vol = blob_volume(n, n_blobs=40, sigma=1.0)  # sharp enough to carry power to Nyquist
    halves, px = _reconstruct_from_projections(vol, 1500)
    full = Accumulator.zeros(n, 2, np)
    full.add(halves[0])
    full.add(halves[1])
    rec = reconstruct(full.data, full.weight, n, 2)
    curve = fsc_curve(rec, vol)
    assert np.all(curve[1 : int(0.8 * n / 2) + 1] >= 0.9), curve
    # the real-space scale is right too (projection and insertion are consistent)
    inside = np.abs(vol) > 0.1 * vol.max()
    assert np.median(rec[inside] / vol[inside]) == pytest.approx(1.0, abs=0.05)


def test_regularised_half_maps_from_noisy_data():
    n = 32
    vol = blob_volume(n, seed=4)
    halves, px = _reconstruct_from_projections(vol, 1200, noise_sigma=3.0 * vol.sum(0).std(), seed=1)
    maps = [reconstruct(h.data, h.weight, n, 2) for h in halves]
    fsc0 = fsc_curve(*maps)
    maps = [reconstruct(h.data, h.weight, n, 2, ssnr=ssnr_from_fsc(fsc0)) for h in halves]
    fsc1 = fsc_curve(*maps)
    # the half-map FSC is a sensible curve: high at low resolution, falling later
    assert fsc1[2] > 0.9
    assert 2 < crossing_shell(fsc1) < n // 2
    # and it predicts the agreement with the truth: map-vs-truth ~ sqrt(2F/(1+F))
    truth_curve = fsc_curve(maps[0] + maps[1], vol)
    s = int(crossing_shell(fsc1, 0.5))
    pred = np.sqrt(2 * fsc1[s] / (1 + fsc1[s]))
    assert truth_curve[s] == pytest.approx(pred, abs=0.15)


def test_fsc_of_identical_and_independent_maps(rng):
    a = rng.normal(size=(24, 24, 24))
    assert np.allclose(fsc_curve(a, a), 1.0)
    b = rng.normal(size=(24, 24, 24))
    assert np.abs(fsc_curve(a, b)[3:]).max() < 0.25
    assert resolution_A(fsc_curve(a, a), 24, 1.5) == pytest.approx(3.0)
