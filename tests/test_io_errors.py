"""Every input problem a user can cause gives an InputError naming the file or column."""

import os
import re

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from mpirefine.errors import InputError
from mpirefine.io import ImageSource, open_stack, read_particles, read_volume, write_relion_star, write_stack

BOX = 16


def make_star(root, n=5, names=None, optics_extra=None, drop=(), stack_images=None, **columns):
    """A stack root/stack.mrcs of n images and root/p.star pointing at it; return the STAR path."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, BOX, BOX)).astype(np.float32) if stack_images is None \
        else stack_images
    write_stack(os.path.join(root, "stack.mrcs"), images, 1.0)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7],
                           "rlnVoltage": [300.0], "rlnImagePixelSize": [1.0],
                           "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    for key, value in (optics_extra or {}).items():
        optics[key] = value
    names = names if names is not None else [f"{i + 1:06d}@stack.mrcs" for i in range(n)]
    m = len(names)
    particles = pd.DataFrame({"rlnImageName": names, "rlnDefocusU": np.full(m, 15000.0),
                              "rlnDefocusV": np.full(m, 14000.0),
                              "rlnDefocusAngle": np.full(m, 10.0),
                              "rlnOpticsGroup": np.ones(m, dtype=np.int64), **columns})
    optics = optics.drop(columns=[c for c in drop if c in optics.columns])
    particles = particles.drop(columns=[c for c in drop if c in particles.columns])
    path = os.path.join(root, "p.star")
    write_relion_star(path, optics, particles)
    return path


def test_valid_dataset_reads(tmp_path):
    assert len(read_particles(make_star(tmp_path))) == 5


def test_truncated_stack(tmp_path):
    path = make_star(tmp_path)
    stack = tmp_path / "stack.mrcs"
    size = os.path.getsize(stack)
    with open(stack, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(InputError, match=r"stack\.mrcs.*truncated"):
        read_particles(path)
    with pytest.raises(InputError, match=r"stack\.mrcs.*truncated"):
        open_stack(stack)


def test_complex_mode_mrc(tmp_path):
    path = tmp_path / "fourier.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((8, 8, 8), np.complex64))
    with pytest.raises(InputError, match=r"fourier\.mrc.*complex.*mode 4"):
        read_volume(path)
    with pytest.raises(InputError, match=r"fourier\.mrc.*complex"):
        open_stack(path)


def test_nan_pixel_raises_when_read(tmp_path):
    images = np.random.default_rng(1).normal(size=(5, BOX, BOX)).astype(np.float32)
    images[3, 4, 5] = np.nan
    ps = read_particles(make_star(tmp_path, stack_images=images))   # lazy: no error yet
    with ImageSource(ps) as source:
        np.testing.assert_array_equal(source.images([0, 4]), images[[0, 4]])
        with pytest.raises(InputError, match=r"image 4 of stack .*stack\.mrcs.*NaN.*remove these"):
            source.images([1, 3])


def test_missing_ctf_columns(tmp_path):
    path = make_star(tmp_path, drop=("rlnDefocusV", "rlnVoltage"))
    with pytest.raises(InputError, match=r"p\.star.*rlnDefocusV, rlnVoltage"):
        read_particles(path)


def test_missing_ctf_fields_cs(tmp_path):
    table = np.zeros(3, dtype=[("blob/path", "S10"), ("blob/idx", "<u4"), ("ctf/df1_A", "<f4")])
    with open(tmp_path / "p.cs", "wb") as f:
        np.save(f, table)
    with pytest.raises(InputError, match=r"p\.cs.*ctf/df2_A.*ctf/accel_kv"):
        read_particles(tmp_path / "p.cs")


def test_missing_stack_file(tmp_path):
    path = make_star(tmp_path, names=["000001@Extract/job7/gone.mrcs"])
    with pytest.raises(InputError) as err:
        read_particles(path, project_dir=tmp_path / "proj")
    message = str(err.value)
    for part in ("p.star", "Extract/job7/gone.mrcs", str(tmp_path), os.getcwd(),
                 str(tmp_path / "proj"), "--project-dir"):
        assert part in message


def test_index_past_end_of_stack(tmp_path):
    path = make_star(tmp_path, names=["000001@stack.mrcs", "000009@stack.mrcs"])
    with pytest.raises(InputError, match=r"image 9 of stack .*stack\.mrcs.*only 5 images"):
        read_particles(path)


def test_box_mismatch(tmp_path):
    path = make_star(tmp_path, optics_extra={"rlnImageSize": [24]})
    with pytest.raises(InputError, match=r"stack\.mrcs holds 16x16 images.*box is 24"):
        read_particles(path)


def test_pixel_size_mismatch_with_stack_header(tmp_path):
    """The metadata's pixel size wins over the stack header's (often 1 or 0), with one
    note naming the stack, the file and both values."""
    path = make_star(tmp_path, optics_extra={"rlnImagePixelSize": [1.2]})
    ps = read_particles(path)
    assert ps.pixel_size_A == 1.2 and np.all(ps.image_pixel_size_A == 1.2)
    assert len(ps.notes) == 1
    assert re.search(r"stack\.mrcs says 1 Å/px but .*p\.star says 1\.2 Å/px; using 1\.2",
                     ps.notes[0]), ps.notes


@pytest.mark.parametrize("header, ok", [(1.3, True), (1.0, False), (0.0, False), (80.0, False)])
def test_pixel_size_only_in_stack_header(tmp_path, header, ok):
    """No pixel size in the metadata: a plausible header value is used (with a note);
    1 (a writer's default), 0 or an absurd value is a one-line error naming the file."""
    path = make_star(tmp_path, drop=("rlnImagePixelSize",))
    with mrcfile.open(tmp_path / "stack.mrcs", "r+") as mrc:
        mrc.voxel_size = header
    if ok:
        ps = read_particles(path)
        assert ps.pixel_size_A == pytest.approx(1.3)
        assert any("gives no pixel size; using 1.3 Å/px" in note for note in ps.notes)
    else:
        with pytest.raises(InputError, match=r"p\.star gives no pixel size.*stack\.mrcs.*"
                                             r"add rlnImagePixelSize") as err:
            read_particles(path)
        assert "\n" not in str(err.value)


def test_duplicate_indices(tmp_path):
    names = ["000001@stack.mrcs", "000002@stack.mrcs", "000003@stack.mrcs", "000002@./stack.mrcs"]
    with pytest.raises(InputError, match=r"rows 2 and 4 .*image 2 of .*stack\.mrcs"):
        read_particles(make_star(tmp_path, names=names))


def test_nan_in_numeric_column(tmp_path):
    path = make_star(tmp_path, rlnCtfBfactor=[0.0, 0.0, np.nan, 0.0, 0.0])
    with pytest.raises(InputError, match=r"p\.star.*rlnCtfBfactor.*row 3"):
        read_particles(path)


def test_empty_star(tmp_path):
    path = make_star(tmp_path, names=[])
    with pytest.raises(InputError, match=r"p\.star.*no particles"):
        read_particles(path)
    (tmp_path / "blank.star").write_text("")
    with pytest.raises(InputError, match=r"blank\.star.*no particles"):
        read_particles(tmp_path / "blank.star")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"particles\.txt.*\.star.*\.cs"):
        read_particles(tmp_path / "particles.txt")
    with pytest.raises(InputError, match=r"nothere\.star.*does not exist"):
        read_particles(tmp_path / "nothere.star")


def test_mixed_boxes(tmp_path):
    path = make_star(tmp_path)
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["a", "b"],
                           "rlnAmplitudeContrast": 0.1, "rlnSphericalAberration": 2.7,
                           "rlnVoltage": 300.0, "rlnImagePixelSize": 1.0,
                           "rlnImageSize": [BOX, 2 * BOX], "rlnImageDimensionality": 2})
    particles = starfile.read(path)["particles"]
    particles["rlnOpticsGroup"] = [1, 2, 1, 2, 1]
    write_relion_star(path, optics, particles)
    # one stack cannot hold images of two sizes
    with pytest.raises(InputError, match=r"p\.star.*stack\.mrcs have different boxes \(16, 32 px\)"):
        read_particles(path)
