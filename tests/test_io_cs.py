"""CryoSPARC .cs particles: conventions, path resolution and round trips with STAR."""

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import starfile

from mpirefine.geometry.rotations import angular_distance_deg, euler_to_matrix, rotvec_to_matrix
from mpirefine.io import read_particles, write_cs, write_relion_star, write_stack, write_star

CS_DTYPE = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
            ("ctf/type", "S1"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
            ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
            ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"),
            ("ctf/bfactor", "<f4"), ("alignments2D/class", "<u4"),
            ("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4"),
            ("alignments3D/error", "<f4"), ("alignments3D/alpha", "<f4")]


def make_cs_project(root, sizes=(4, 3), box=12, apix=1.7, seed=0):
    """A CryoSPARC-like project: J1/imported/*.mrcs and J2/particles.cs (paths project-relative)."""
    rng = np.random.default_rng(seed)
    stacks, paths, idx = [], [], []
    for k, m in enumerate(sizes):
        rel = f"J1/imported/stack{k}.mrcs"
        os.makedirs(os.path.join(root, "J1/imported"), exist_ok=True)
        images = rng.normal(size=(m, box, box)).astype(np.float32)
        write_stack(os.path.join(root, rel), images, apix)
        stacks.append(images)
        # CryoSPARC marks project-relative paths with a leading '>' (not always).
        paths += [(">" if k == 0 else "") + rel] * m
        idx += list(range(m))
    n = len(paths)
    t = np.zeros(n, dtype=CS_DTYPE)
    t["uid"] = rng.integers(1, 2 ** 62, n)
    t["blob/path"] = [p.encode() for p in paths]
    t["blob/idx"] = idx
    t["blob/shape"] = box
    t["blob/psize_A"] = apix
    t["blob/sign"] = -1
    t["ctf/type"] = b"i"
    t["ctf/accel_kv"], t["ctf/cs_mm"], t["ctf/amp_contrast"] = 300, 2.7, 0.07
    t["ctf/df1_A"] = rng.uniform(8000, 20000, n)
    t["ctf/df2_A"] = t["ctf/df1_A"] - rng.uniform(0, 500, n)
    t["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
    t["ctf/phase_shift_rad"] = rng.uniform(0, 0.5, n)
    t["ctf/scale"] = 1
    t["alignments2D/class"] = rng.integers(0, 50, n)
    t["alignments3D/split"] = np.arange(n) % 2
    t["alignments3D/shift"] = rng.normal(0, 2, (n, 2))
    t["alignments3D/pose"] = rng.normal(0, 1.5, (n, 3))
    t["alignments3D/psize_A"] = apix
    t["alignments3D/error"] = rng.uniform(size=n)
    t["alignments3D/alpha"] = rng.uniform(0.8, 1.2, n)
    os.makedirs(os.path.join(root, "J2"), exist_ok=True)
    path = os.path.join(root, "J2", "particles.cs")
    with open(path, "wb") as f:
        np.save(f, t)
    return path, t, stacks


def test_read_cs_conventions(tmp_path):
    path, t, _ = make_cs_project(tmp_path)
    ps = read_particles(path)
    assert len(ps) == 7 and ps.box == 12 and ps.source_format == "cs"
    assert ps.pixel_size_A == pytest.approx(1.7)
    assert ps.stack_paths == [str(tmp_path / "J1/imported/stack0.mrcs"),
                              str(tmp_path / "J1/imported/stack1.mrcs")]
    np.testing.assert_array_equal(ps.stack_index, [0, 1, 2, 3, 0, 1, 2])
    np.testing.assert_allclose(ps.rotations, rotvec_to_matrix(t["alignments3D/pose"]))
    np.testing.assert_allclose(ps.shifts_A, t["alignments3D/shift"] * np.float32(1.7), rtol=1e-6)
    np.testing.assert_array_equal(ps.split, t["alignments3D/split"])
    np.testing.assert_allclose(ps.scale, t["alignments3D/alpha"])
    np.testing.assert_allclose(ps.ctf.defocus_angle_deg, np.degrees(t["ctf/df_angle_rad"]),
                               rtol=1e-6)
    np.testing.assert_allclose(ps.ctf.phase_shift_deg, np.degrees(t["ctf/phase_shift_rad"]),
                               rtol=1e-6)
    np.testing.assert_allclose(ps.ctf.defocus_u_A, t["ctf/df1_A"])
    np.testing.assert_array_equal(ps.ctf.scale, 1.0)


def test_project_dir_resolves_moved_cs(tmp_path):
    path, _, _ = make_cs_project(tmp_path / "P1")
    moved = tmp_path / "elsewhere" / "particles.cs"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    ps = read_particles(moved, project_dir=tmp_path / "P1")
    assert ps.stack_paths[0] == str(tmp_path / "P1/J1/imported/stack0.mrcs")


def test_cs_round_trip_keeps_fields(tmp_path):
    path, t, _ = make_cs_project(tmp_path)
    ps = read_particles(path)
    rng = np.random.default_rng(3)
    n = len(ps)
    rotations = rotvec_to_matrix(rng.normal(0, 1, (n, 3)))
    shifts = rng.normal(0, 3, (n, 2))
    split = (1 - np.arange(n) % 2).astype(np.int8)
    scale = rng.uniform(0.5, 1.5, n)
    out = tmp_path / "J3" / "particles.cs"
    out.parent.mkdir()
    write_cs(out, ps, rotations, shifts, split, scale)
    assert sorted(os.listdir(out.parent)) == ["particles.cs"]      # no .npy, no temp file
    back = read_particles(out)
    assert angular_distance_deg(back.rotations, rotations).max() < 1e-4
    np.testing.assert_allclose(back.shifts_A, shifts, atol=1e-5)
    np.testing.assert_array_equal(back.split, split)
    np.testing.assert_allclose(back.scale, scale, rtol=1e-6)
    assert back.stack_paths == ps.stack_paths
    written = np.load(out)
    assert written.dtype == t.dtype
    changed = {"alignments3D/pose", "alignments3D/shift", "alignments3D/split",
               "alignments3D/alpha"}
    for name in t.dtype.names:
        if name not in changed:
            np.testing.assert_array_equal(written[name], t[name], err_msg=name)


def make_star(root, n=6, box=12, apix=1.7, seed=1):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "Extract"), exist_ok=True)
    write_stack(os.path.join(root, "Extract/a.mrcs"), rng.normal(size=(n, box, box)), apix)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                           "rlnVoltage": [300.0], "rlnImagePixelSize": [apix],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/a.mrcs" for i in range(n)][::-1],
        "rlnDefocusU": np.round(rng.uniform(10000, 20000, n), 2),
        "rlnDefocusV": np.round(rng.uniform(10000, 20000, n), 2),
        "rlnDefocusAngle": np.round(rng.uniform(0, 180, n), 2),
        "rlnPhaseShift": np.round(rng.uniform(0, 20, n), 2),
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(0, 3, n), "rlnOriginYAngst": rng.normal(0, 3, n),
        "rlnOpticsGroup": 1, "rlnRandomSubset": np.arange(n) % 2 + 1,
        "rlnCtfScalefactor": rng.uniform(0.8, 1.2, n)})
    path = os.path.join(root, "particles.star")
    write_relion_star(path, optics, particles)
    return path


def assert_equivalent(a, b):
    """Same particles up to float32 storage in .cs."""
    assert len(a) == len(b) and a.box == b.box
    assert a.pixel_size_A == pytest.approx(b.pixel_size_A, rel=1e-6)
    np.testing.assert_array_equal(np.array(a.stack_paths)[a.stack_id],
                                  np.array(b.stack_paths)[b.stack_id])
    np.testing.assert_array_equal(a.stack_index, b.stack_index)
    for name in ("defocus_u_A", "defocus_v_A", "voltage_kV", "cs_mm", "amplitude_contrast",
                 "phase_shift_deg", "bfactor_A2", "defocus_angle_deg"):
        np.testing.assert_allclose(np.broadcast_to(getattr(a.ctf, name), len(a)),
                                   np.broadcast_to(getattr(b.ctf, name), len(b)),
                                   rtol=1e-6, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(a.rotations, b.rotations, atol=1e-6)
    np.testing.assert_allclose(a.shifts_A, b.shifts_A, atol=1e-5)
    np.testing.assert_array_equal(a.split, b.split)
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)


def test_star_to_cs(tmp_path):
    star = read_particles(make_star(tmp_path))
    out = tmp_path / "out" / "particles.cs"
    write_cs(out, star, star.rotations, star.shifts_A, star.split, star.scale)
    cs = read_particles(out)
    assert_equivalent(star, cs)
    table = np.load(out)
    np.testing.assert_allclose(table["alignments3D/shift"], star.shifts_A / 1.7, rtol=1e-6)
    np.testing.assert_allclose(rotvec_to_matrix(table["alignments3D/pose"]), star.rotations,
                               atol=1e-6)
    assert len(np.unique(table["uid"])) == len(star)


def test_cs_to_star_and_back(tmp_path):
    path, t, _ = make_cs_project(tmp_path)
    cs = read_particles(path).subset(np.array([6, 0, 3, 4]))
    out = tmp_path / "out" / "particles.star"
    write_star(out, cs, cs.rotations, cs.shifts_A, cs.split, cs.scale)
    star = read_particles(out)
    assert_equivalent(cs, star)
    table = starfile.read(out)["particles"]
    assert table["rlnImageName"].iloc[0] == f"000003@{tmp_path}/J1/imported/stack1.mrcs"
    np.testing.assert_allclose(table["rlnRandomSubset"], t["alignments3D/split"][[6, 0, 3, 4]] + 1)
    np.testing.assert_allclose(star.rotations, euler_to_matrix(
        table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"]))


def test_exposure_groups_of_other_pixel_sizes_and_boxes(tmp_path):
    """Particles of several blob/psize_A and blob/shape read (each keeps its own, the
    first particle's set the reference grid) and survive .cs -> .star -> .cs; a shift is
    in pixels of alignments3D/psize_A (a binned refinement's) where that is set."""
    path, t, _ = make_cs_project(tmp_path, sizes=(4, 3), box=12, apix=1.7)
    # the second stack at 20 px of 1.1 Å, refined binned 2x (shifts in 2.2 Å pixels)
    rng = np.random.default_rng(7)
    write_stack(tmp_path / "J1/imported/stack1.mrcs",
                rng.normal(size=(3, 20, 20)).astype(np.float32), 1.1)
    second = np.arange(len(t)) >= 4
    t["blob/shape"][second] = 20
    t["blob/psize_A"][second] = 1.1
    t["alignments3D/psize_A"][second] = 2.2
    with open(path, "wb") as f:
        np.save(f, t)
    ps = read_particles(path)
    assert ps.box == 12 and ps.pixel_size_A == pytest.approx(1.7) and not ps.uniform
    np.testing.assert_array_equal(ps.image_box, np.where(second, 20, 12))
    np.testing.assert_allclose(ps.image_pixel_size_A, np.where(second, 1.1, 1.7), rtol=1e-6)
    np.testing.assert_allclose(ps.shifts_A, t["alignments3D/shift"]
                               * np.where(second, 2.2, 1.7).astype(np.float32)[:, None], rtol=1e-6)

    star_path = tmp_path / "out" / "particles.star"
    write_star(star_path, ps, ps.rotations, ps.shifts_A, ps.split, ps.scale)
    optics = starfile.read(star_path)["optics"]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], [1.7, 1.1], rtol=1e-6)
    assert optics["rlnImageSize"].tolist() == [12, 20]
    star = read_particles(star_path)
    np.testing.assert_allclose(star.shifts_A, ps.shifts_A, atol=1e-5)
    cs_path = tmp_path / "out" / "particles.cs"
    write_cs(cs_path, star, star.rotations, star.shifts_A, star.split, star.scale)
    table = np.load(cs_path)
    np.testing.assert_allclose(table["blob/psize_A"], ps.image_pixel_size_A, rtol=1e-6)
    np.testing.assert_allclose(table["alignments3D/psize_A"], ps.image_pixel_size_A, rtol=1e-6)
    np.testing.assert_array_equal(table["blob/shape"], np.stack([ps.image_box] * 2, axis=1))
    np.testing.assert_allclose(read_particles(cs_path).shifts_A, ps.shifts_A, atol=1e-4)


def test_cs_output_carries_refined_defocus(tmp_path):
    """A .cs input's kept table gets the particles' current defocus (U, V, angle), as
    --optimize-defocus leaves it in the particle set; the other CTF fields stay."""
    import dataclasses

    path, t, _ = make_cs_project(tmp_path)
    ps = read_particles(path)
    n = len(ps)
    offset = np.linspace(-800.0, 800.0, n)
    refined = dataclasses.replace(ps, ctf=ps.ctf.with_defocus_offset(offset))
    out = tmp_path / "J4" / "particles.cs"
    out.parent.mkdir()
    write_cs(out, refined, ps.rotations, ps.shifts_A, ps.split, ps.scale)
    written = np.load(out)
    np.testing.assert_allclose(written["ctf/df1_A"], t["ctf/df1_A"] + offset, rtol=1e-6)
    np.testing.assert_allclose(written["ctf/df2_A"], t["ctf/df2_A"] + offset, rtol=1e-6)
    np.testing.assert_array_equal(written["ctf/df_angle_rad"], t["ctf/df_angle_rad"])
    np.testing.assert_array_equal(written["ctf/cs_mm"], t["ctf/cs_mm"])
    back = read_particles(out)
    np.testing.assert_allclose(back.ctf.defocus_u_A, ps.ctf.defocus_u_A + offset, rtol=1e-6)
