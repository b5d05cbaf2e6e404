"""Pose search: the dense likelihood equals its definition, and the coarse-to-fine search
finds known poses, shifts and scales of simulated particles."""

import dataclasses

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.backend import to_numpy
from mpirefine.fourier.project import (
    extract_slices,
    prepare_projections,
    project_transforms,
    projection_tables,
    volume_ft,
)
from mpirefine.fourier.transforms import centered_irfft2, centered_rfft2, freq_grid_2d, phase_shift_2d
from mpirefine.geometry.rotations import angular_distance_deg
from mpirefine.physics.ctf import CTFParams, evaluate_ctf
from mpirefine.search.likelihood import (
    log_likelihood,
    noise_weights,
    score_batched,
    score_shared,
    search_frequencies,
    shift_ramps,
    weighted_data,
)
from mpirefine.search.poses import SearchParams, search_poses


def log_likelihood_reference(images_k, ctf_k, weights, scale, shifts_px, projections, kx, ky, n):
    """L (B, T, R) by explicit loops over particles, shifts and rotations (float64).

    The definition the dense scoring must reproduce.
    """
    X, C, w = (np.asarray(v, dtype=np.complex128) for v in (images_k, ctf_k, weights))
    P = np.asarray(projections, dtype=np.complex128)
    kx, ky = np.asarray(kx, np.float64), np.asarray(ky, np.float64)
    out = np.zeros((X.shape[0], len(shifts_px), P.shape[0]))
    for b in range(X.shape[0]):
        for t, (sx, sy) in enumerate(np.asarray(shifts_px, np.float64)):
            ramp = np.exp(-2j * np.pi * (kx * sx + ky * sy) / n)
            for r in range(P.shape[0]):
                cross = np.sum(w * C[b] * X[b] * ramp * np.conj(P[r])).real
                power = np.sum(w * C[b] ** 2 * np.abs(P[r]) ** 2).real
                out[b, t, r] = scale[b] * cross - 0.5 * scale[b] ** 2 * power
    return out


N = 32
PARAMS = SearchParams(coarse_step_deg=20.0, final_step_deg=2.5, coarse_radius_px=6.0,
                      final_radius_px=12.0, shift_range_px=4.0, coarse_shift_step_px=1.0, n_keep=8)


def blob_volume(n, seed=0, n_blobs=40, sigma=1.5):
    """An asymmetric volume of atom-like Gaussian blobs inside a sphere of n/3.5."""
    rng = np.random.default_rng(seed)
    c = np.arange(n, dtype=np.float32) - n // 2
    vol = np.zeros((n, n, n), np.float32)
    for _ in range(n_blobs):
        p = rng.normal(size=3)
        p = p / np.linalg.norm(p) * rng.uniform(0, n / 3.5)
        g = [np.exp(-(c - p[i]) ** 2 / (2 * sigma ** 2)) for i in range(3)]
        vol += rng.uniform(0.5, 1.5) * g[2][:, None, None] * g[1][None, :, None] * g[0][None, None, :]
    return vol


@pytest.fixture(scope="module")
def vft():
    return volume_ft(blob_volume(N))


def simulate(vft, B, seed, noise_rel=0.0, scale=1.0, max_shift=3.0):
    """CTF-modulated projections at random poses, shifted by -origin, with white noise.

    Returns images (B, n, n//2+1), ctf, noise power per shell, rotations, origins (px).
    """
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(B, random_state=seed).as_matrix()
    origins = rng.uniform(-max_shift, max_shift, (B, 2))
    ky, kx = freq_grid_2d(N, np)
    ctf = evaluate_ctf(CTFParams(defocus_u_A=rng.uniform(10000, 25000, B),
                                 defocus_v_A=rng.uniform(10000, 25000, B),
                                 defocus_angle_deg=rng.uniform(0, 180, B), voltage_kV=300.0,
                                 cs_mm=2.7, amplitude_contrast=0.1), kx / (N * 4.0), ky / (N * 4.0))
    images = phase_shift_2d(scale * ctf * project_transforms(vft, rotations), -origins, N)
    sigma = noise_rel * float(centered_irfft2(images, N).std())
    if sigma > 0:
        images = images + centered_rfft2(rng.normal(0, sigma, (B, N, N)))
    noise_var = np.full(N // 2 + 1, max(sigma, 1e-2) ** 2 * N * N)
    return images.astype(np.complex64), ctf, noise_var, rotations, origins


@pytest.fixture(scope="module")
def clean(vft):
    return simulate(vft, 50, seed=1)


@pytest.fixture(scope="module")
def clean_result(vft, clean):
    images, ctf, noise_var, _, _ = clean
    return search_poses(vft, images, ctf, noise_var, params=dataclasses.replace(PARAMS, marginalize=True))


def test_dense_likelihood_equals_direct_loops(xp, rng):
    n, B, T, R = 16, 3, 4, 5
    kx, ky, index, _ = search_frequencies(n, 6.0, xp)
    K = kx.shape[0]
    X = xp.asarray(rng.normal(size=(B, K)) + 1j * rng.normal(size=(B, K))).astype(xp.complex64)
    C = xp.asarray(rng.uniform(-1, 1, (B, K))).astype(xp.float32)
    P = xp.asarray(rng.normal(size=(R, K)) + 1j * rng.normal(size=(R, K))).astype(xp.complex64)
    w = noise_weights(rng.uniform(0.5, 2.0, n // 2 + 1), n, index)
    shifts = rng.uniform(-3, 3, (T, 2))
    a = rng.uniform(0.5, 1.5, B)
    expected = log_likelihood_reference(to_numpy(X), to_numpy(C), to_numpy(w), a, shifts, to_numpy(P),
                                        to_numpy(kx), to_numpy(ky), n)
    wcx, wc2 = weighted_data(X, C, w)
    a_x = xp.asarray(a, dtype=xp.float32)
    g, h = score_shared(wcx, wc2, shift_ramps(kx, ky, shifts, n), *prepare_projections(P))
    np.testing.assert_allclose(to_numpy(log_likelihood(g, h, a_x)), expected, rtol=1e-4, atol=1e-3)
    # per-particle form: every particle gets the same shifts and rotations here
    ramps = shift_ramps(kx, ky, np.broadcast_to(shifts, (B, T, 2)), n)
    stacked, power = prepare_projections(xp.broadcast_to(P, (B, R, K)))
    g, h = score_batched(wcx, wc2, ramps, stacked, power)
    np.testing.assert_allclose(to_numpy(log_likelihood(g, h, a_x)), expected, rtol=1e-4, atol=1e-3)


def test_shift_ramps_match_phase_shift_2d(rng):
    n = 16
    kx, ky, index, _ = search_frequencies(n, 7.0)
    f = centered_rfft2(rng.normal(size=(2, n, n)))
    t = np.array([[1.5, -2.25], [-0.5, 3.0]])
    expected = phase_shift_2d(f, t, n).reshape(2, -1)[:, index]
    np.testing.assert_allclose(f.reshape(2, -1)[:, index] * shift_ramps(kx, ky, t[:, None], n)[:, 0],
                               expected, rtol=1e-4, atol=1e-3)


def test_half_plane_weights_count_hermitian_mates(rng):
    # Σ over the half plane with multiplicities equals Σ over the full plane (no DC)
    n = 16
    _, _, index, _ = search_frequencies(n, n / 2 - 1)
    img = rng.normal(size=(n, n))
    full = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img)))
    r = np.hypot(*np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2))
    w = noise_weights(np.ones(n // 2 + 1), n, index)
    half = np.sum(w * np.abs(centered_rfft2(img).ravel()[index]) ** 2)
    np.testing.assert_allclose(half, np.sum(np.abs(full[(r > 0.5) & (r <= n / 2 - 1)]) ** 2), rtol=1e-5)


def test_clean_particles_are_found(clean, clean_result):
    _, _, _, rotations, origins = clean
    err = angular_distance_deg(clean_result.rotations, rotations)
    shift_err = np.abs(clean_result.shifts_px - origins).max(axis=1)
    assert np.median(err) < 3.0
    assert np.mean((err < 3.0) & (shift_err < 0.5)) >= 0.95
    assert clean_result.stats.poses_scored > 0 and clean_result.stats.gemm_flops > 0


def test_marginal_weights_sum_to_one_and_sit_on_the_truth(clean, clean_result):
    _, _, _, rotations, origins = clean
    r = clean_result
    assert r.posterior.shape == (50, PARAMS.n_posterior)
    np.testing.assert_allclose(r.posterior.sum(axis=1), 1.0, rtol=1e-9)
    assert np.all(np.diff(r.posterior, axis=1) <= 1e-12)  # best first
    np.testing.assert_allclose(r.candidate_rotations[:, 0], r.rotations)
    np.testing.assert_allclose(r.candidate_shifts_px[:, 0], r.shifts_px)
    err = angular_distance_deg(r.candidate_rotations.reshape(-1, 3, 3),
                               np.repeat(rotations, PARAMS.n_posterior, 0))
    mean_err = np.sum(r.posterior * err.reshape(50, -1), axis=1)
    assert np.median(r.posterior[:, 0]) > 0.9
    assert np.mean(mean_err < 3.0) >= 0.95


def test_noisy_particles_are_mostly_found(vft):
    images, ctf, noise_var, rotations, origins = simulate(vft, 50, seed=2, noise_rel=1.0)
    r = search_poses(vft, images, ctf, noise_var, params=PARAMS)
    err = angular_distance_deg(r.rotations, rotations)
    assert np.median(err) < 5.0
    assert np.mean(err < 10.0) >= 0.9
    assert np.mean(np.abs(r.shifts_px - origins).max(axis=1) < 1.0) >= 0.9


def test_optimal_scale_recovers_the_particle_scale(vft):
    # poses ranked by the likelihood maximised over the scale (a fixed a = 1 would
    # favour projections of lower power when the true scale is 0.7)
    images, ctf, noise_var, rotations, _ = simulate(vft, 20, seed=3, scale=0.7)
    r = search_poses(vft, images, ctf, noise_var, params=dataclasses.replace(PARAMS, fit_scale=True))
    assert np.median(angular_distance_deg(r.rotations, rotations)) < 3.0
    assert abs(np.median(r.optimal_scale) - 0.7) < 0.02
    assert np.all(np.abs(r.optimal_scale - 0.7) < 0.07)


def test_chunks_and_cache_do_not_change_results(vft, clean, clean_result):
    images, ctf, noise_var, _, _ = clean
    r = search_poses(vft, images, ctf, noise_var, params=dataclasses.replace(PARAMS, chunk_size=7))
    np.testing.assert_allclose(r.rotations, clean_result.rotations, atol=1e-12)
    np.testing.assert_allclose(r.shifts_px, clean_result.shifts_px, atol=1e-12)
    np.testing.assert_allclose(r.log_likelihood, clean_result.log_likelihood, rtol=1e-5)


def test_shift_grid_follows_a_given_centre(vft):
    images, ctf, noise_var, rotations, origins = simulate(vft, 10, seed=4, max_shift=1.0)
    prior = np.array([7.0, -6.0])
    images = phase_shift_2d(images, -np.broadcast_to(prior, (10, 2)), N).astype(np.complex64)
    params = dataclasses.replace(PARAMS, shift_range_px=2.0)
    r = search_poses(vft, images, ctf, noise_var, params=params,
                     shift_center_px=np.broadcast_to(prior + 0.4, (10, 2)))
    assert np.all(np.abs(r.shifts_px - (origins + prior)).max(axis=1) < 0.5)
    assert np.median(angular_distance_deg(r.rotations, rotations)) < 3.0


def test_global_grid_alone_and_parameter_checks(vft, clean):
    images, ctf, noise_var, rotations, _ = clean
    params = dataclasses.replace(PARAMS, final_step_deg=20.0)
    assert params.n_levels == 0
    r = search_poses(vft, images[:5], None if False else ctf[:5], noise_var, params=params)
    assert np.all(angular_distance_deg(r.rotations, rotations[:5]) < 20.0)
    with pytest.raises(ValueError):
        SearchParams(n_keep=0)
    with pytest.raises(ValueError):
        SearchParams(coarse_step_deg=5.0, final_step_deg=10.0)
    with pytest.raises(ValueError):
        search_poses(vft, images, ctf, noise_var, params=dataclasses.replace(PARAMS, final_radius_px=20.0))
    with pytest.raises(ValueError):
        search_poses(vft, images, ctf, noise_var, scale=-np.ones(50), params=PARAMS)


def test_projection_samples_are_shared_between_particles(vft, clean):
    # twice the same particles: the first level's children come from the search's cache,
    # so they are extracted no more often than for one copy (deeper levels, whose
    # children particles almost never share, are extracted per particle)
    images, ctf, noise_var, _, _ = clean
    params = dataclasses.replace(PARAMS, final_step_deg=PARAMS.coarse_step_deg / 2)
    assert params.n_levels == 1
    one = search_poses(vft, images[:10], ctf[:10], noise_var, params=params).stats
    two = search_poses(vft, np.concatenate([images[:10]] * 2), np.concatenate([ctf[:10]] * 2),
                       noise_var, params=params).stats
    assert two.projection_samples == one.projection_samples
    assert two.poses_scored == 2 * one.poses_scored


def test_extract_slices_is_the_projector(vft):
    # the search's projections are those of the shared projector (central slices)
    kx, ky, index, _ = search_frequencies(N, 10.0)
    rot = Rotation.random(3, random_state=9).as_matrix()
    np.testing.assert_allclose(extract_slices(vft, rot, kx, ky),
                               project_transforms(vft, rot).reshape(3, -1)[:, index], rtol=1e-5, atol=1e-4)


def test_compiled_tables_equal_the_array_code(vft, monkeypatch):
    # the Numba kernel (NumPy path) and the array-namespace code (CuPy path, and NumPy
    # without Numba) are one operator: same samples, flips and clipping, to float32 rounding
    pytest.importorskip("numba")
    from mpirefine.fourier import compiled

    assert compiled.enabled(np)
    kx, ky, _, _ = search_frequencies(N, N // 2 - 1)
    rot = np.concatenate([Rotation.random(200, random_state=4).as_matrix(), np.eye(3)[None],
                          np.diag([-1.0, -1.0, 1.0])[None]])  # kx ≥ 0 and kx ≤ 0 exactly on the grid
    stacked, power = compiled.projection_tables(vft, rot, kx, ky)
    fast_slices = extract_slices(vft, rot, kx, ky)
    monkeypatch.setenv("MPIREFINE_JIT", "0")
    assert not compiled.enabled(np)
    slices = extract_slices(vft, rot, kx, ky)
    ref_stacked, ref_power = prepare_projections(slices)
    scale = np.abs(ref_stacked).max()
    np.testing.assert_allclose(stacked, ref_stacked, atol=2e-6 * scale)
    np.testing.assert_allclose(power, ref_power, atol=4e-6 * scale ** 2)
    np.testing.assert_allclose(fast_slices, slices, atol=2e-6 * scale)
    generic = projection_tables(vft, rot, kx, ky)
    np.testing.assert_allclose(generic[0], ref_stacked, atol=1e-7 * scale)
    # written into given rows of a larger table (the search's first-level cache), both paths
    rows = np.random.default_rng(1).permutation(2 * len(rot))[:len(rot)]
    for jit in ("0", "1"):
        monkeypatch.setenv("MPIREFINE_JIT", jit)
        out = (np.zeros((2 * len(rot), 2 * len(kx)), np.float32),
               np.zeros((2 * len(rot), len(kx)), np.float32))
        projection_tables(vft, rot, kx, ky, out=out, rows=rows)
        np.testing.assert_allclose(out[0][rows], ref_stacked, atol=2e-6 * scale)
        np.testing.assert_allclose(out[1][rows], ref_power, atol=4e-6 * scale ** 2)
        assert not np.delete(out[0], rows, axis=0).any()


def test_search_is_the_same_with_and_without_the_compiled_kernel(vft, clean, monkeypatch):
    pytest.importorskip("numba")
    images, ctf, noise_var, _, _ = clean
    fast = search_poses(vft, images[:20], ctf[:20], noise_var, params=PARAMS)
    monkeypatch.setenv("MPIREFINE_JIT", "0")
    slow = search_poses(vft, images[:20], ctf[:20], noise_var, params=PARAMS)
    assert fast.stats.projection_samples == slow.stats.projection_samples
    assert np.mean(angular_distance_deg(fast.rotations, slow.rotations) < 1e-3) >= 0.95
    np.testing.assert_allclose(fast.log_likelihood, slow.log_likelihood, rtol=1e-3, atol=1e-2)


def test_compiled_insertion_equals_the_array_code(monkeypatch):
    pytest.importorskip("numba")
    from mpirefine.fourier.backproject import Accumulator

    rng = np.random.default_rng(3)
    kx, ky, _, _ = search_frequencies(16, 7)
    rot = np.concatenate([Rotation.random(30, random_state=5).as_matrix(), np.eye(3)[None]])
    values = (rng.standard_normal((31, len(kx)))
              + 1j * rng.standard_normal((31, len(kx)))).astype(np.complex64)
    weights = rng.uniform(0.1, 1.0, (31, len(kx))).astype(np.float32)
    fast = Accumulator.zeros(16, 2, np)
    fast.insert(rot, values, weights, kx, ky)
    monkeypatch.setenv("MPIREFINE_JIT", "0")
    slow = Accumulator.zeros(16, 2, np)
    slow.insert(rot, values, weights, kx, ky)
    assert np.abs(slow.weight).max() > 0
    np.testing.assert_allclose(fast.data, slow.data, atol=1e-5 * np.abs(slow.data).max())
    np.testing.assert_allclose(fast.weight, slow.weight, atol=1e-5 * slow.weight.max())
