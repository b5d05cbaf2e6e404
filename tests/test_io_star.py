"""RELION STAR particles: reading 3.0 / 3.1+, path resolution, round trips, ImageSource."""

import os

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from mpirefine.geometry.rotations import angular_distance_deg, euler_to_matrix
from mpirefine.io import ImageSource, read_particles, write_relion_star, write_stack, write_star

REPLACED = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
            "rlnRandomSubset", "rlnCtfScalefactor", "rlnImageName"]


def make_dataset(root, sizes=(5, 4), box=16, apix=1.5, seed=0):
    """Stacks under root/Extract and root/particles.star (3.1) naming them project-relative."""
    rng = np.random.default_rng(seed)
    stacks, names = [], []
    for k, m in enumerate(sizes):
        images = rng.normal(size=(m, box, box)).astype(np.float32)
        rel = f"Extract/mic{k}.mrcs"
        os.makedirs(os.path.join(root, "Extract"), exist_ok=True)
        write_stack(os.path.join(root, rel), images, apix)
        stacks.append(images)
        names += [f"{i + 1:06d}@{rel}" for i in range(m)]
    n = len(names)

    def r6(x):
        return np.round(x, 6)

    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                           "rlnVoltage": [300.0], "rlnImagePixelSize": [apix],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnCoordinateX": r6(rng.uniform(0, 4000, n)),
        "rlnImageName": names,
        "rlnMicrographName": [f"mic{k}.mrc" for k, m in enumerate(sizes) for _ in range(m)],
        "rlnDefocusU": r6(rng.uniform(10000, 20000, n)),
        "rlnDefocusV": r6(rng.uniform(10000, 20000, n)),
        "rlnDefocusAngle": r6(rng.uniform(0, 180, n)),
        "rlnAngleRot": r6(rng.uniform(-180, 180, n)),
        "rlnAngleTilt": r6(rng.uniform(0, 180, n)),
        "rlnAnglePsi": r6(rng.uniform(-180, 180, n)),
        "rlnOriginXAngst": r6(rng.normal(0, 3, n)),
        "rlnOriginYAngst": r6(rng.normal(0, 3, n)),
        "rlnClassNumber": np.ones(n, dtype=np.int64),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnRandomSubset": np.arange(n) % 2 + 1,
        "rlnCtfScalefactor": r6(rng.uniform(0.8, 1.2, n)),
    })
    path = os.path.join(root, "particles.star")
    write_relion_star(path, optics, particles)
    return path, stacks


def assert_same_particles(a, b, rot_tol_deg=1e-4):
    assert len(a) == len(b) and a.box == b.box
    assert a.pixel_size_A == pytest.approx(b.pixel_size_A)
    np.testing.assert_array_equal(np.array(a.stack_paths)[a.stack_id],
                                  np.array(b.stack_paths)[b.stack_id])
    np.testing.assert_array_equal(a.stack_index, b.stack_index)
    for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm",
                 "amplitude_contrast", "phase_shift_deg", "bfactor_A2"):
        np.testing.assert_allclose(np.broadcast_to(getattr(a.ctf, name), len(a)),
                                   np.broadcast_to(getattr(b.ctf, name), len(b)),
                                   rtol=1e-6, atol=1e-6, err_msg=name)
    assert angular_distance_deg(a.rotations, b.rotations).max() < rot_tol_deg
    np.testing.assert_allclose(a.shifts_A, b.shifts_A, atol=1e-5)
    np.testing.assert_array_equal(a.split, b.split)
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)


@pytest.mark.shipped_data
def test_read_relion5_clean_star(relion_projected):
    """clean.star as RELION 5.0.1 wrote it (tests/data/relion_projected: its first 200
    particles, rows untouched)."""
    DATA = relion_projected
    ps = read_particles(f"{DATA}/clean.star")
    assert len(ps) == 200 and ps.box == 48 and ps.pixel_size_A == pytest.approx(2.0)
    assert ps.stack_paths == [f"{DATA}/clean.mrcs"]
    np.testing.assert_array_equal(ps.stack_index, np.arange(200))
    assert ps.ctf.defocus_u_A[0] == pytest.approx(16404.72)
    assert ps.ctf.defocus_v_A[0] == pytest.approx(15692.70)
    assert ps.ctf.defocus_angle_deg[0] == pytest.approx(56.17)
    assert ps.ctf.voltage_kV[0] == 300 and ps.ctf.cs_mm[0] == 2.7
    assert ps.ctf.amplitude_contrast[0] == pytest.approx(0.1)
    np.testing.assert_allclose(ps.shifts_A[0], [-1.3365, -1.6488])
    table = starfile.read(f"{DATA}/clean.star")["particles"]
    expected = euler_to_matrix(table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"])
    np.testing.assert_allclose(ps.rotations, expected, atol=1e-12)
    np.testing.assert_allclose(ps.rotations[0], euler_to_matrix(64.4165, 124.3321, 279.4998)[0])
    assert np.all(ps.split == -1) and np.all(ps.scale == 1.0) and ps.source_format == "star"


@pytest.mark.parametrize("pixel_columns", ["image", "detector"])
def test_relion30_equals_relion31(tmp_path, pixel_columns):
    path31, _ = make_dataset(tmp_path, apix=2.0)
    blocks = starfile.read(path31)
    optics, particles = blocks["optics"], blocks["particles"].copy()
    # RELION 3.0: one table, optics on every row, origins in pixels.
    for label in ("rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage"):
        particles[label] = optics[label].iloc[0]
    if pixel_columns == "image":
        particles["rlnImagePixelSize"] = 2.0
    else:
        particles["rlnDetectorPixelSize"] = 5.0      # µm
        particles["rlnMagnification"] = 25000.0      # 5 µm * 1e4 / 25000 = 2 Å
    particles["rlnOriginX"] = particles.pop("rlnOriginXAngst") / 2.0
    particles["rlnOriginY"] = particles.pop("rlnOriginYAngst") / 2.0
    particles = particles.drop(columns=["rlnOpticsGroup"])
    path30 = tmp_path / "relion30.star"
    starfile.write(particles, path30, float_format="%.12g")
    a, b = read_particles(path31), read_particles(path30)
    assert_same_particles(a, b, rot_tol_deg=1e-9)

    # Writing a 3.0 input converts it to the 3.1 layout with an optics table.
    out = tmp_path / "out" / "converted.star"
    write_star(out, b, b.rotations, b.shifts_A, b.split, b.scale)
    written = starfile.read(out)
    assert set(written) == {"optics", "particles"}
    assert written["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(2.0)
    assert written["optics"]["rlnImageSize"].iloc[0] == 16
    assert "rlnOriginX" not in written["particles"].columns
    assert_same_particles(a, read_particles(out))


def test_image_name_index_and_path_resolution(tmp_path, monkeypatch):
    project = tmp_path / "project"
    star_path, _ = make_dataset(project)
    # Move the STAR into a job folder: its names stay relative to the project.
    job = project / "Select" / "job005"
    job.mkdir(parents=True)
    os.replace(star_path, job / "particles.star")
    ps = read_particles(job / "particles.star", project_dir=project)
    assert ps.stack_paths == [str(project / "Extract/mic0.mrcs"), str(project / "Extract/mic1.mrcs")]
    np.testing.assert_array_equal(ps.stack_index, [0, 1, 2, 3, 4, 0, 1, 2, 3])
    monkeypatch.chdir(project)
    assert read_particles(job / "particles.star").stack_paths == ps.stack_paths
    # Output written elsewhere keeps the project-relative names (they resolve from cwd).
    out = tmp_path / "refine" / "particles.star"
    write_star(out, ps, ps.rotations, ps.shifts_A, ps.split, ps.scale)
    assert starfile.read(out)["particles"]["rlnImageName"].iloc[5] == "000001@Extract/mic1.mrcs"


def test_star_round_trip_keeps_columns(tmp_path):
    path, _ = make_dataset(tmp_path)
    ps = read_particles(path)
    rng = np.random.default_rng(5)
    n = len(ps)
    rotations = euler_to_matrix(rng.uniform(-180, 180, n), rng.uniform(0, 180, n),
                                rng.uniform(-180, 180, n))
    shifts = rng.normal(0, 2, (n, 2))
    split = (np.arange(n) % 2)[::-1].astype(np.int8)
    scale = rng.uniform(0.5, 1.5, n)
    out = tmp_path / "out" / "particles.star"
    write_star(out, ps, rotations, shifts, split, scale)
    back = read_particles(out)
    assert angular_distance_deg(back.rotations, rotations).max() < 1e-4
    np.testing.assert_allclose(back.shifts_A, shifts, atol=1e-9)
    np.testing.assert_array_equal(back.split, split)
    np.testing.assert_allclose(back.scale, scale, rtol=1e-11)
    assert back.stack_paths == ps.stack_paths
    np.testing.assert_array_equal(back.stack_index, ps.stack_index)
    before, after = starfile.read(path), starfile.read(out)
    pd.testing.assert_frame_equal(before["optics"], after["optics"])
    assert list(after["particles"].columns) == list(before["particles"].columns)
    keep = [c for c in before["particles"].columns if c not in REPLACED]
    pd.testing.assert_frame_equal(before["particles"][keep], after["particles"][keep])


def test_subset_keeps_rows_in_step(tmp_path):
    path, _ = make_dataset(tmp_path)
    ps = read_particles(path)
    sub = ps.subset(np.array([7, 2, 4]))
    assert len(sub) == 3 and len(sub.ctf) == 3
    write_star(tmp_path / "sub.star", sub, sub.rotations, sub.shifts_A, sub.split, sub.scale)
    back = read_particles(tmp_path / "sub.star")
    assert_same_particles(sub, back)
    table = starfile.read(tmp_path / "sub.star")["particles"]
    np.testing.assert_allclose(table["rlnDefocusU"], ps.ctf.defocus_u_A[[7, 2, 4]])


def test_particle_value_overrides_optics_and_groups(tmp_path):
    path, _ = make_dataset(tmp_path)
    blocks = starfile.read(path)
    optics = pd.concat([blocks["optics"]] * 2, ignore_index=True)
    optics["rlnOpticsGroup"] = [1, 2]
    optics["rlnOpticsGroupName"] = ["opticsGroup1", "opticsGroup2"]
    optics["rlnSphericalAberration"] = [2.7, 0.01]
    particles = blocks["particles"]
    particles["rlnOpticsGroup"] = np.arange(len(particles)) % 2 + 1
    particles["rlnVoltage"] = 200.0
    write_relion_star(tmp_path / "groups.star", optics, particles)
    ps = read_particles(tmp_path / "groups.star")
    np.testing.assert_array_equal(ps.ctf.voltage_kV, 200.0)
    np.testing.assert_array_equal(ps.ctf.cs_mm, np.where(np.arange(len(ps)) % 2, 0.01, 2.7))
    np.testing.assert_array_equal(ps.optics_group, np.arange(len(ps)) % 2 + 1)

    # Groups of other pixel sizes are read (tests/test_optics_groups.py refines them):
    # each particle keeps its own, and the first optics group sets the reference grid.
    optics["rlnImagePixelSize"] = [1.6, 1.5]
    write_relion_star(tmp_path / "mixed.star", optics, particles)
    ps = read_particles(tmp_path / "mixed.star")
    np.testing.assert_array_equal(ps.image_pixel_size_A, np.where(np.arange(len(ps)) % 2, 1.5, 1.6))
    assert ps.pixel_size_A == 1.6 and ps.box == 16 and not ps.uniform
    np.testing.assert_array_equal(ps.on_reference_grid(), np.arange(len(ps)) % 2 == 0)


def test_image_source_matches_mrcfile(tmp_path, monkeypatch):
    path, stacks = make_dataset(tmp_path, sizes=(5, 4, 6))
    ps = read_particles(path)
    truth = np.concatenate(stacks)
    # Reads must go through memory maps: forbid full reads (header-only opens are fine).
    real_open = mrcfile.open

    def header_only_open(*args, **kwargs):
        assert kwargs.get("header_only"), "ImageSource must not read whole stacks"
        return real_open(*args, **kwargs)

    monkeypatch.setattr(mrcfile, "open", header_only_open)
    monkeypatch.setattr(mrcfile, "read", None)
    order = np.array([14, 0, 7, 3, 9, 9, 5, 12, 1])
    for max_open in (1, 64):
        with ImageSource(ps, max_open=max_open) as source:
            images = source.images(order)
            assert images.dtype == np.float32 and images.shape == (9, 16, 16)
            np.testing.assert_array_equal(images, truth[order])
            assert len(source._open) <= max_open
            blocks = list(source.batches(order, 4))
            assert [len(b) for b, _ in blocks] == [4, 4, 1]
            np.testing.assert_array_equal(np.concatenate([im for _, im in blocks]), truth[order])
    monkeypatch.undo()
    with mrcfile.open(tmp_path / "Extract/mic1.mrcs") as mrc:
        np.testing.assert_array_equal(mrc.data[2], truth[7])
