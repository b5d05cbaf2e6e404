"""Guinier B-factor fit and sharpening: sign convention, units, and the band limit."""

import numpy as np
import pytest

from mpirefine.fourier.transforms import (
    centered_irfft3,
    centered_rfft3,
    half_space_multiplicity,
    radius_3d,
    shell_sums,
)
from mpirefine.postprocess.sharpen import (
    apply_bfactor,
    fit_bfactor,
    relion_bfactor,
    sharpen,
    sharpen_filtered_map,
)
from mpirefine.synthetic.models import asymmetric_chains, model_volume

N, PX = 48, 2.0
MODEL = dict(box=N, pixel_size_A=PX, chains=asymmetric_chains(), center_A="chains")


def _shell_index(n):
    return np.minimum(np.rint(radius_3d(n, np)).astype(int), n // 2)


def _whitening(volume):
    """Per-voxel factor 1 / sqrt(mean power of the voxel's shell): flattens the spectrum."""
    n = volume.shape[0]
    f = centered_rfft3(np.asarray(volume, np.float64))
    r, mult = radius_3d(n, np), half_space_multiplicity(n, np)
    power = shell_sums((f * np.conj(f)).real, r, n // 2 + 1, weights=mult)
    count = shell_sums(np.ones(r.shape), r, n // 2 + 1, weights=mult)
    return 1.0 / np.sqrt(power / count)[_shell_index(n)]


def _band_limit(volume, resolution_A, pixel_size_A):
    n = volume.shape[0]
    keep = radius_3d(n, np) / (n * pixel_size_A) <= 1.0 / resolution_A
    return centered_irfft3(centered_rfft3(np.asarray(volume, np.float64)) * keep, n)


@pytest.mark.parametrize("bfactor_A2", [50.0, 100.0, 200.0])
def test_bfactor_of_a_blurred_atomic_model_is_recovered(bfactor_A2):
    """The model built with atoms blurred by B (models.py adds B / 8π² to each atom's
    variance: an independent route to exp(-B s² / 4)), with the spectrum of the
    unblurred model divided out so that only the B-factor shapes the Guinier plot."""
    sharp = model_volume(**MODEL)
    blurred = model_volume(bfactor_A2=bfactor_A2, **MODEL)
    white = centered_irfft3(centered_rfft3(blurred.astype(np.float64)) * _whitening(sharp), N)
    fit = fit_bfactor(white, PX, resolution_A=5.0)
    assert fit.bfactor_A2 == pytest.approx(bfactor_A2, rel=0.10)
    assert fit.correlation < -0.99 and fit.n_shells >= 5
    # the unwhitened difference measures the same B: the fit reads only the slope
    diff = fit_bfactor(blurred, PX, 5.0).bfactor_A2 - fit_bfactor(sharp, PX, 5.0).bfactor_A2
    assert diff == pytest.approx(bfactor_A2, rel=0.10)


def test_apply_bfactor_sign_and_units():
    """B > 0 blurs: the fitted B of a whitened map blurred by apply_bfactor is +B, and
    sharpening it flattens the Guinier plot again."""
    sharp = model_volume(**MODEL)
    white = centered_irfft3(centered_rfft3(sharp.astype(np.float64)) * _whitening(sharp), N)
    blurred = apply_bfactor(white, 120.0, PX)
    assert fit_bfactor(blurred, PX, 5.0).bfactor_A2 == pytest.approx(120.0, rel=0.02)
    assert abs(fit_bfactor(sharpen(blurred, 120.0, 5.0, PX), PX, 5.0).bfactor_A2) < 2.0
    # a pixel size twice as large halves s, so the same map reads as 4x the B-factor
    assert fit_bfactor(blurred, 2 * PX, 10.0 * 0.999, 20.0).bfactor_A2 == pytest.approx(
        4 * 120.0, rel=0.05)


def test_sharpen_then_blur_gives_back_the_map_within_the_resolution():
    vol = model_volume(**MODEL)
    res_A, b = 6.0, 150.0
    round_trip = apply_bfactor(sharpen(vol, b, res_A, PX), b, PX)
    expected = _band_limit(vol, res_A, PX)
    assert np.abs(round_trip - expected).max() < 1e-4 * np.abs(expected).max()
    # and nothing survives beyond the resolution
    f = centered_rfft3(sharpen(vol, b, res_A, PX).astype(np.float64))
    beyond = radius_3d(N, np) / (N * PX) > 1.0 / res_A
    assert np.abs(f[beyond]).max() < 1e-6 * np.abs(f).max()


def test_no_fit_without_enough_shells():
    vol = model_volume(**MODEL)
    fit = fit_bfactor(vol, PX, resolution_A=11.0)          # nothing between 10 and 11 Å
    assert fit.bfactor_A2 == 0.0 and fit.n_shells < 3
    n = vol.shape[0]
    fsc = (np.arange(n // 2 + 1) <= n * PX / 11.0).astype(float)   # zero beyond 11 Å
    out, fit, _, _ = sharpen_filtered_map(vol, vol, fsc, 11.0, PX)
    assert fit.bfactor_A2 == 0.0
    np.testing.assert_allclose(out, _band_limit(vol, 11.0, PX), atol=1e-6)


def test_relion_style_fit_recovers_a_known_blur():
    # the FSC-weighted fit sees the map's own fall-off when the FSC is high throughout
    sharp = model_volume(**MODEL)
    white = centered_irfft3(centered_rfft3(sharp.astype(np.float64)) * _whitening(sharp), N)
    blurred = apply_bfactor(white, 100.0, PX)
    fsc = np.full(N // 2 + 1, 0.999)
    fit, _, _ = relion_bfactor(blurred, fsc, PX, resolution_A=2 * PX * 1.25)
    assert fit.bfactor_A2 == pytest.approx(100.0, rel=0.1), fit
