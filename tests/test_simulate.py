"""Simulated datasets: files, conventions (against our projector and RELION's), SNR, seeds."""

import json
import math
import os

import mrcfile
import numpy as np
import pytest
import starfile

from mpirefine.errors import InputError
from mpirefine.fourier.project import project_images, volume_ft
from mpirefine.fourier.transforms import freq_grid_2d
from mpirefine.geometry.rotations import euler_to_matrix
from mpirefine.physics.ctf import CTFParams, evaluate_ctf
from mpirefine.synthetic.models import model_volume
from mpirefine.synthetic.simulate import clean_images, simulate_dataset

BOX, PIXEL, N = 32, 4.5, 300


@pytest.fixture(scope="module")
def volume():
    return model_volume(BOX, PIXEL, chains=["A", "F", "X"], center_A="chains")


def simulate(volume, out, **kw):
    kw.setdefault("stack_size", 128)          # several stacks, the last one partial
    return simulate_dataset(volume, PIXEL, N, out, **kw)


def corr_rows(a, b):
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(axis=1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def read_images(out_dir, names):
    stacks = {}
    images = []
    for name in names:
        index, path = name.split("@")
        if path not in stacks:
            with mrcfile.open(os.path.join(out_dir, path)) as mrc:
                stacks[path] = np.array(mrc.data)
        images.append(stacks[path][int(index) - 1])
    return np.stack(images)


def expected_images(volume, particles, pixel):
    """Our projector at the STAR file's poses and CTFs, independent of simulate.py."""
    A = euler_to_matrix(particles["rlnAngleRot"], particles["rlnAngleTilt"],
                        particles["rlnAnglePsi"])
    origins = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    ctf = CTFParams(particles["rlnDefocusU"].to_numpy(float),
                    particles["rlnDefocusV"].to_numpy(float),
                    particles["rlnDefocusAngle"].to_numpy(float), 300.0, 2.7, 0.1,
                    bfactor_A2=particles["rlnCtfBfactor"].to_numpy(float))
    n = volume.shape[0]
    ky, kx = freq_grid_2d(n, np)
    c = evaluate_ctf(ctf, kx / (n * pixel), ky / (n * pixel))
    return project_images(volume_ft(volume), A, shifts_px=-origins / pixel, ctf=c)


def test_files_and_clean_images(volume, tmp_path):
    out = tmp_path / "clean"
    res = simulate(volume, out, snr=math.inf)
    for name in ("particles.star", "particles_true.star", "truth.mrc", "start_20A.mrc",
                 "simulation.json", "stack_000.mrcs", "stack_002.mrcs"):
        assert (out / name).is_file(), name
    assert len(res.stacks) == 3
    plain = starfile.read(out / "particles.star")
    true = starfile.read(out / "particles_true.star")
    for star in (plain, true):
        optics = star["optics"]
        assert int(optics["rlnImageSize"][0]) == BOX
        assert float(optics["rlnImagePixelSize"][0]) == pytest.approx(PIXEL)
        assert float(optics["rlnVoltage"][0]) == 300.0
        for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
                    "rlnCtfBfactor", "rlnOpticsGroup", "rlnMicrographName", "rlnImageName"):
            assert col in star["particles"].columns, col
        assert len(star["particles"]) == N
    assert not {"rlnAngleRot", "rlnOriginXAngst"} & set(plain["particles"].columns)
    parts = true["particles"]
    assert parts["rlnImageName"][0] == "000001@stack_000.mrcs"
    assert parts["rlnImageName"][128] == "000001@stack_001.mrcs"
    assert set(parts["rlnRandomSubset"]) == {1, 2}
    assert abs((parts["rlnRandomSubset"] == 1).sum() - N / 2) <= 1
    du = parts["rlnDefocusU"].to_numpy()
    assert du.min() > 0.9e4 and du.max() < 2.6e4

    with mrcfile.open(out / "truth.mrc") as mrc:
        np.testing.assert_allclose(mrc.data, volume)
        assert float(mrc.voxel_size.x) == pytest.approx(PIXEL)
    with mrcfile.open(out / "start_20A.mrc") as mrc:
        assert 0.5 < float(np.corrcoef(mrc.data.ravel(), volume.ravel())[0, 1]) < 0.999
    record = json.loads((out / "simulation.json").read_text())
    assert record["seed"] == 0 and record["snr"] == "inf" and record["n_particles"] == N

    images = read_images(out, parts["rlnImageName"])
    assert images.shape == (N, BOX, BOX)
    assert corr_rows(images, expected_images(volume, parts, PIXEL)).min() > 0.999
    np.testing.assert_allclose(res.rotations, euler_to_matrix(*parts[
        ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().T), atol=1e-6)


def test_snr_and_seed(volume, tmp_path):
    clean = simulate(volume, tmp_path / "clean", snr=math.inf, seed=3)
    noisy = simulate(volume, tmp_path / "noisy", snr=0.1, seed=3)
    again = simulate(volume, tmp_path / "again", snr=0.1, seed=3)
    other = simulate(volume, tmp_path / "other", snr=0.1, seed=4)

    def stack(res):
        return np.concatenate([mrcfile.read(s) for s in res.stacks])

    c, x = stack(clean), stack(noisy)
    noise = x - c
    measured = c.var(axis=(1, 2)).mean() / noise.var()
    assert measured == pytest.approx(0.1, rel=0.2)
    assert abs(noise.mean()) < 0.05 * noise.std()
    np.testing.assert_array_equal(x, stack(again))
    assert not np.allclose(x, stack(other))
    np.testing.assert_array_equal(noisy.rotations, again.rotations)
    assert not np.allclose(noisy.rotations, other.rotations)


def test_bad_parameters(volume, tmp_path):
    for kw, match in ((dict(snr=-1.0), "SNR"), (dict(defocus_range_um=(2.0, 1.0)), "defocus"),
                      (dict(shift_sigma_A=-1.0), "shift")):
        with pytest.raises(InputError, match=match):
            simulate(volume, tmp_path / "bad", **kw)
    with pytest.raises(InputError, match="too small"):
        simulate_dataset(np.zeros((8, 8, 8), np.float32), PIXEL, 10, tmp_path / "small")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        simulate(volume, tmp_path / "full")


@pytest.mark.shipped_data
def test_clean_images_match_relion_project(relion_projected):
    """relion_project --ctf made clean.mrcs from ferritin_chainA.mrc (tests/data/
    relion_projected): our images at the same poses and CTFs must match it
    (conventions: Euler, origin sign, CTF)."""
    RELION = relion_projected
    with mrcfile.open(f"{RELION}/ferritin_chainA.mrc") as mrc:
        truth, pixel = np.array(mrc.data), float(mrc.voxel_size.x)
    star = starfile.read(f"{RELION}/clean.star")
    optics, parts = star["optics"], star["particles"].iloc[:100]
    A = euler_to_matrix(*parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy().T)
    ctf = CTFParams(parts["rlnDefocusU"].to_numpy(float), parts["rlnDefocusV"].to_numpy(float),
                    parts["rlnDefocusAngle"].to_numpy(float), float(optics["rlnVoltage"][0]),
                    float(optics["rlnSphericalAberration"][0]),
                    float(optics["rlnAmplitudeContrast"][0]))
    ours = clean_images(volume_ft(truth), A,
                        parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float), ctf, pixel)
    with mrcfile.open(f"{RELION}/clean.mrcs") as mrc:
        relion = np.array(mrc.data[:100])
    assert corr_rows(ours, relion).min() > 0.995


def test_cli(tmp_path, capsys):
    from mpirefine import cli

    out = tmp_path / "cli"
    args = ["simulate", "--asymmetric", "--center-on-chains", "--box", "24", "--pixel-size",
            "6", "--n-particles", "20", "--snr", "0.2", "--seed", "5", "--out", str(out)]
    assert cli.main(args) == 0
    assert str(out / "particles.star") in capsys.readouterr().out
    record = json.loads((out / "simulation.json").read_text())
    assert record["seed"] == 5 and record["box"] == 24 and "A,F,X" in record["source"]
    assert cli.main(args) == 2                      # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    for bad in (["--snr", "-1"], ["--box", "8"], ["--defocus-min-um", "3"],
                ["--chains", "A", "--asymmetric"]):
        assert cli.main(["simulate", "--out", str(tmp_path / "x")] + bad) == 2
        assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
