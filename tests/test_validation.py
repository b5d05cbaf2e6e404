"""The final FSC suite: masks from the half maps, phase-randomisation correction, auto-tightening."""

import numpy as np
import pytest

from mpirefine.fourier.filters import lowpass
from mpirefine.fourier.transforms import centered_irfft3, centered_rfft3, radius_3d
from mpirefine.postprocess.fsc import (
    corrected_fsc,
    crossing_shell,
    fsc_curve,
    randomization_shell,
    randomize_phases_beyond,
)
from mpirefine.postprocess.masks import soft_dilate, threshold_core
from mpirefine.postprocess.validation import fsc_suite
from mpirefine.synthetic.models import asymmetric_chains, model_volume

PX = 2.0


@pytest.fixture(scope="module")
def truth():
    return model_volume(box=48, pixel_size_A=PX, chains=asymmetric_chains(),
                        center_A="chains").astype(np.float64)


def _shared_below(volume, shell):
    """The part of a map below a Fourier shell (hard cut)."""
    n = volume.shape[0]
    keep = np.rint(radius_3d(n, np)) < shell
    return centered_irfft3(centered_rfft3(volume) * keep, n)


def test_randomization_shell_and_correction_formula():
    curve = np.array([1.0, 0.99, 0.95, 0.85, 0.79, 0.5, 0.2, 0.1])
    assert randomization_shell(curve) == 4             # first shell below 0.8 (RELION's rule)
    assert randomization_shell(np.ones(8)) == 8        # never: nothing is randomised
    t = np.array([1.0, 0.9, 0.8, 0.6, 0.5, 0.4])
    n_ = np.array([1.0, 0.9, 0.8, 0.2, 0.5, 0.0])
    got = corrected_fsc(t, n_, shell=1, margin_shells=2)
    np.testing.assert_allclose(got[:3], t[:3])        # below shell + margin: the masked FSC
    np.testing.assert_allclose(got[3:], [(0.6 - 0.2) / 0.8, 0.0, 0.4])


def test_phase_randomisation_keeps_amplitudes_and_low_shells(truth, rng):
    n = truth.shape[0]
    out = randomize_phases_beyond(truth, 8, rng)
    fa, fb = centered_rfft3(truth), centered_rfft3(out)
    shells = np.rint(radius_3d(n, np))
    low, high = shells < 8, (shells >= 8) & (shells <= n // 2)
    np.testing.assert_allclose(fb[low], fa[low], atol=1e-9 * np.abs(fa).max())
    # amplitudes survive wherever the kx = 0 plane's Hermitian mates do not collide
    np.testing.assert_allclose(np.abs(fb[:, :, 1:-1][high[:, :, 1:-1]]),
                               np.abs(fa[:, :, 1:-1][high[:, :, 1:-1]]), rtol=1e-6)
    # and the phases are gone: the randomised copy no longer correlates beyond the shell
    assert np.abs(fsc_curve(truth, out)[10:]).max() < 0.15


def test_correction_removes_mask_induced_correlation_of_noise(truth):
    """Half maps share only the molecule below shell 9 and are independent noise beyond:
    the true FSC there is 0.  A tight mask correlates the noise through the shared
    low-resolution signal; the phase-randomised correction takes that back out."""
    n, s0 = truth.shape[0], 9
    shared = _shared_below(truth, s0)
    gen = np.random.default_rng(5)
    sigma = 0.03 * truth.max()
    a = shared + sigma * gen.standard_normal(shared.shape)
    b = shared + sigma * gen.standard_normal(shared.shape)
    suite = fsc_suite(a, b, PX, seed=1)
    r = suite.randomize_shell
    assert s0 - 1 <= r <= s0 + 1
    beyond = slice(r + 2, n // 2 + 1)
    c = suite.curves
    assert abs(c["fsc_no_mask"][beyond].mean()) < 0.03                 # unmasked: no correlation
    assert c["fsc_tight"][beyond].mean() > 0.1                          # tight mask makes some
    assert abs(c["fsc_corrected"][beyond].mean()) < 0.03                # corrected: gone again
    assert np.abs(c["fsc_corrected"][beyond]).max() < 0.2
    assert abs(c["fsc_auto_corrected"][beyond].mean()) < 0.03
    # the correction does not touch the shells below the randomisation edge
    np.testing.assert_allclose(c["fsc_corrected"][: r + 2], c["fsc_tight"][: r + 2])


@pytest.mark.parametrize("noise", [0.15, 0.3])
def test_corrected_resolution_matches_the_truth(truth, noise):
    """Half maps = truth + independent noise.  FSC_halves = 0.143 where the average's FSC
    against the truth is 0.5 (FSC_avg,truth = sqrt(2 FSC / (1 + FSC))).  The noise lies
    inside the molecule's envelope, so a solvent mask removes none of it and the masked,
    corrected curve must agree with the unmasked comparison against the truth."""
    n = truth.shape[0]
    envelope = soft_dilate(threshold_core(lowpass(truth, 8.0, PX), 0.5), PX, 0.0, 4.0)
    gen = np.random.default_rng(7)
    sigma = noise * truth.max()
    a = truth + sigma * envelope * gen.standard_normal(truth.shape)
    b = truth + sigma * envelope * gen.standard_normal(truth.shape)
    suite = fsc_suite(a, b, PX, seed=2)
    got = crossing_shell(suite.curves["fsc_corrected"], 0.143)
    auto = crossing_shell(suite.final_curve, 0.143)
    expected = crossing_shell(fsc_curve(0.5 * (a + b), truth), 0.5)
    assert abs(got - expected) <= 1.0, (got, expected)
    assert abs(auto - expected) <= 1.0, (auto, expected)
    assert suite.final_resolution_A == pytest.approx(n * PX / auto)


def test_masks_follow_the_half_maps_and_nest(truth):
    n = truth.shape[0]
    gen = np.random.default_rng(3)
    a = truth + 0.1 * truth.max() * gen.standard_normal(truth.shape)
    b = truth + 0.1 * truth.max() * gen.standard_normal(truth.shape)
    suite = fsc_suite(a, b, PX, seed=0)
    m = suite.masks
    assert set(m) == {"spherical", "loose", "tight", "auto"}
    for mask in m.values():
        assert mask.shape == (n,) * 3 and mask.dtype == np.float32
        assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert np.all(m["tight"] <= m["loose"] + 1e-6)
    assert np.all(m["auto"] <= m["tight"] + 1e-6) or suite.auto_mask_name in ("loose", "spherical")
    # the tight mask is 1 over (almost) all of the molecule's density and much tighter than loose
    dens = np.clip(truth, 0, None)
    assert (dens * (m["tight"] > 0.999)).sum() > 0.98 * dens.sum()
    assert m["tight"].sum() < 0.5 * m["loose"].sum()
    # derived from the half maps: move the molecule, the mask moves with it
    moved = fsc_suite(np.roll(a, 4, axis=2), np.roll(b, 4, axis=2), PX, seed=0)
    inner = (slice(None), slice(None), slice(8, -8))    # away from where np.roll wraps
    np.testing.assert_allclose(moved.masks["tight"][inner], np.roll(m["tight"], 4, axis=2)[inner],
                               atol=1e-5)
    # every curve per shell 0 .. n // 2, a resolution for each, reproducible with the random seed
    assert all(len(c) == n // 2 + 1 for c in suite.curves.values())
    assert set(suite.resolution_A) == {k[4:] for k in suite.curves}
    again = fsc_suite(a, b, PX, seed=0)
    np.testing.assert_array_equal(again.final_curve, suite.final_curve)


def test_auto_tightening_refuses_masks_that_cut_into_the_density(truth):
    gen = np.random.default_rng(11)
    sigma = 0.2 * truth.max()
    envelope = soft_dilate(threshold_core(lowpass(truth, 8.0, PX), 0.5), PX, 0.0, 4.0)
    a = truth + sigma * envelope * gen.standard_normal(truth.shape)
    b = truth + sigma * envelope * gen.standard_normal(truth.shape)
    suite = fsc_suite(a, b, PX, seed=0)
    by_name = {t.name: t for t in suite.trials}
    # a 1.2 → 2.4 Å mask slices through the molecule: its phase-randomised FSC is large
    assert not by_name["tight_x0.2"].accepted
    assert by_name["tight_x0.2"].randomized_fsc_mean > 0.3
    chosen = by_name[suite.auto_mask_name]
    assert chosen.accepted and chosen.randomized_fsc_mean <= 0.1
    assert chosen.resolution_A == pytest.approx(suite.final_resolution_A)
    # the chosen mask is the best accepted one
    assert chosen.resolution_A <= min(t.resolution_A for t in suite.trials if t.accepted) + 1e-9


def test_dynamic_mask_follows_the_seed():
    """Seed, "Dynamic masking": threshold at a fraction of the map's maximum voxel value,
    1 out to near × resolution from that core, a soft edge reaching 0 at far × resolution;
    with the absolute option the same level is applied to |map|."""
    from mpirefine.geometry.spheres import radial_distance
    from mpirefine.postprocess.masks import dynamic_mask

    n, px, res_A = 32, 2.0, 8.0
    r_A = radial_distance(n, np).astype(np.float64) * px
    vol = np.where(r_A <= 6.0, 1.0, 0.0)                       # core: a 6 Å ball of 1s
    vol[2, 2, 2] = -0.5                                        # a deep negative pocket
    m = dynamic_mask(vol, res_A, px, threshold=0.5, near=0.5, far=1.5)
    # 1 within 0.5 × 8 = 4 Å of the core, 0 from 1.5 × 8 = 12 Å on, in between a cosine
    assert m[r_A <= 6.0 + 4.0 - px].min() == 1.0             # (one voxel for the grid)
    assert m[r_A >= 6.0 + 12.0 + px].max() == 0.0
    mid = (r_A > 6.0 + 6.0) & (r_A < 6.0 + 10.0)
    assert 0.0 < m[mid].min() and m[mid].max() < 1.0
    assert m[2, 2, 2] == 0.0
    # absolute: the level is 0.5 × max = 0.5, so the -0.5 pocket stays out but -0.6 joins
    assert dynamic_mask(vol, res_A, px, 0.5, 0.5, 1.5, absolute=True)[2, 2, 2] == 0.0
    vol[2, 2, 2] = -0.6
    assert dynamic_mask(vol, res_A, px, 0.5, 0.5, 1.5, absolute=True)[2, 2, 2] == 1.0
    # nothing above the threshold: no masking rather than an empty reference
    assert np.all(dynamic_mask(-np.abs(vol), res_A, px, 0.5, 0.5, 1.5) == 1.0)
