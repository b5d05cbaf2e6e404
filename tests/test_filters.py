"""Raised-cosine low-pass filters."""

import numpy as np
import pytest

from mpirefine.backend import to_numpy
from mpirefine.errors import InputError
from mpirefine.fourier.filters import lowpass, lowpass_images, raised_cosine, resolution_to_shell
from mpirefine.fourier.transforms import centered_rfft2, centered_rfft3, radius_2d, radius_3d


def test_resolution_to_shell():
    assert resolution_to_shell(20.0, 64, 2.5) == pytest.approx(8.0)
    with pytest.raises(InputError):
        resolution_to_shell(0.0, 64, 2.5)


def test_raised_cosine_profile():
    r = np.arange(20, dtype=np.float32)
    f = raised_cosine(r, 10.0, 4.0)
    assert np.all(f[:9] == 1.0) and np.all(f[12:] == 0.0)
    assert f[10] == pytest.approx(0.5)
    assert np.all(np.diff(f) <= 0)
    hard = raised_cosine(r, 10.0, 0.0)
    assert hard[10] == 1.0 and hard[11] == 0.0


def test_lowpass_volume_keeps_and_zeroes_shells(xp):
    n, pixel = 32, 2.0
    vol = np.random.default_rng(1).standard_normal((n, n, n)).astype(np.float32)
    out = lowpass(xp.asarray(vol), 8.0, pixel)      # cut-off at shell 8
    assert out.dtype == xp.float32 and out.shape == vol.shape
    out = to_numpy(out)
    f_in, f_out = centered_rfft3(vol), centered_rfft3(out)
    r = radius_3d(n, np)
    below, beyond = r <= 7.0, r >= 9.0
    np.testing.assert_allclose(f_out[below], f_in[below], rtol=1e-4, atol=1e-3)
    assert np.abs(f_out[beyond]).max() < 1e-3
    edge = (r > 7.5) & (r < 8.5)
    ratio = np.abs(f_out[edge]) / np.abs(f_in[edge])
    assert ratio.min() > 0.1 and ratio.max() < 0.9


def test_lowpass_images(xp):
    n, pixel = 32, 2.0
    imgs = np.random.default_rng(2).standard_normal((3, n, n)).astype(np.float32)
    out = to_numpy(lowpass_images(xp.asarray(imgs), 16.0, pixel, edge_width_shells=2))  # shell 4
    f_in, f_out = centered_rfft2(imgs), centered_rfft2(out)
    r = radius_2d(n, np)
    np.testing.assert_allclose(f_out[:, r <= 3.0], f_in[:, r <= 3.0], rtol=1e-4, atol=1e-3)
    assert np.abs(f_out[:, r >= 5.0]).max() < 1e-3


def test_lowpass_rejects_non_cube():
    with pytest.raises(InputError):
        lowpass(np.zeros((4, 4, 5), np.float32), 10.0, 1.0)
