"""Anisotropic magnification (physics/anisomag.py): RELION's rlnMagMatrix read from the
optics table, images undistorted as they are read, and the simulator's distorted
images."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from mpirefine.errors import InputError
from mpirefine.physics.anisomag import (
    MAG_COLUMNS,
    anisotropic_matrix,
    input_mag_matrices,
    undistort_images,
)

M = np.array([[1.05, 0.0], [0.0, 0.96]])


def test_anisotropic_matrix_stretches_one_direction():
    m = anisotropic_matrix(0.02, 30.0)
    u = np.array([np.cos(np.radians(30)), np.sin(np.radians(30))])
    np.testing.assert_allclose(m @ u, 1.02 * u)
    np.testing.assert_allclose(m @ np.array([-u[1], u[0]]), [-u[1], u[0]])


def test_undistorting_a_simulated_image_gives_the_undistorted_one():
    """The image the simulator makes with M, undistorted, is the image made without M.
    The warp works on the box: it is exact only for signal that the CTF keeps inside
    it.  Measured (128 Å box): correlation with the undistorted image 0.84 → 0.97 at
    0.5 µm defocus, 0.76 → 0.99 at 0.1 µm, 0.90 → 0.92 at 1.5 µm."""
    from mpirefine.fourier.project import volume_ft
    from mpirefine.geometry.rotations import euler_to_matrix
    from mpirefine.physics.ctf import CTFParams
    from mpirefine.synthetic.models import model_volume
    from mpirefine.synthetic.simulate import clean_images

    n, px = 64, 2.0
    vft = volume_ft(model_volume(n, px))
    rot = euler_to_matrix(np.array([20.0, 70.0]), np.array([40.0, 100.0]), np.array([0.0, 200.0]))
    ctf = CTFParams(defocus_u_A=5000.0, defocus_v_A=4800.0, defocus_angle_deg=30.0,
                    voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    origins = np.zeros((2, 2))
    plain = clean_images(vft, rot, origins, ctf.subset(np.zeros(2, int)), px)
    distorted = clean_images(vft, rot, origins, ctf.subset(np.zeros(2, int)), px, mag_matrix=M)
    fixed = undistort_images(distorted, M)

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert corr(distorted, plain) < 0.9
    assert corr(fixed, plain) > 0.96, corr(fixed, plain)
    assert corr(undistort_images(distorted, np.linalg.inv(M)), plain) < corr(distorted, plain)


def test_mag_matrices_are_read_per_optics_group(tmp_path):
    from mpirefine.io import read_particles
    from mpirefine.synthetic.models import model_volume
    from mpirefine.synthetic.simulate import simulate_dataset

    simulate_dataset(model_volume(32, 4.0), 4.0, 20, tmp_path, snr=np.inf, overwrite=True,
                     mag_matrix=tuple(M.ravel()))
    true = read_particles(str(tmp_path / "particles_true.star"))
    np.testing.assert_allclose(input_mag_matrices(true)[1], M)
    assert input_mag_matrices(read_particles(str(tmp_path / "particles.star"))) == {}
    star = starfile.read(tmp_path / "particles_true.star")
    star["optics"] = star["optics"].drop(columns=[MAG_COLUMNS[1]])
    starfile.write(star, tmp_path / "partial.star", overwrite=True)
    with pytest.raises(InputError, match="rlnMagMatrix"):
        input_mag_matrices(read_particles(str(tmp_path / "partial.star")))


@pytest.fixture(scope="module")
def magnified(tmp_path_factory):
    """Noise-free apoferritin at 2 Å/px with a 5 % / -4 % magnification distortion."""
    from mpirefine.synthetic.models import model_volume
    from mpirefine.synthetic.simulate import simulate_dataset

    folder = tmp_path_factory.mktemp("anisomag")
    simulate_dataset(model_volume(64, 2.0), 2.0, 800, folder, snr=np.inf, seed=2, overwrite=True,
                     mag_matrix=tuple(M.ravel()))
    star = starfile.read(folder / "particles_true.star")
    optics = star["optics"]
    star["optics"] = optics.drop(columns=list(MAG_COLUMNS))
    starfile.write(star, folder / "no_mag.star", overwrite=True)
    inverse = np.linalg.inv(M)
    star["optics"] = optics.assign(**{c: v for c, v in zip(MAG_COLUMNS, inverse.ravel())})
    starfile.write(star, folder / "inverse_mag.star", overwrite=True)
    return folder


def test_reconstruct_applies_the_mag_matrix(magnified, tmp_path):
    """Measured (1500 particles): FSC 0.5 vs truth 4.3 Å with the matrix, 7.0 Å without
    it, 8.1 Å with its inverse (Nyquist 4 Å)."""
    from test_refine import run_cli

    from mpirefine.io import read_volume
    from mpirefine.postprocess.fsc import fsc_curve, resolution_A

    truth = np.asarray(read_volume(str(magnified / "truth.mrc"))[0])
    res = {}
    for name in ("particles_true", "no_mag", "inverse_mag"):
        out = tmp_path / name
        r = run_cli(["reconstruct", str(magnified / f"{name}.star"), "--out", str(out),
                     "--project-dir", str(magnified)])
        assert r.returncode == 0, r.stderr[-2000:]
        vol = np.asarray(read_volume(str(out / "map_unfil.mrc"))[0])
        res[name] = resolution_A(fsc_curve(vol, truth), 64, 2.0, 0.5)
    assert res["particles_true"] < 5.0 < res["no_mag"] < res["inverse_mag"], res
