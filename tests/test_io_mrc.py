"""MRC maps and stacks: round trips, headers, memory-mapped reads."""

import os

import mrcfile
import numpy as np
import pytest

from mpirefine.errors import InputError
from mpirefine.io import open_stack, read_volume, stack_info, write_mrc, write_stack


def test_volume_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(12, 12, 12)).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_mrc(path, vol, 1.25)
    out, apix = read_volume(path)
    assert out.dtype == np.float32 and out.shape == (12, 12, 12)
    np.testing.assert_array_equal(out, vol)
    assert apix == pytest.approx(1.25)
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == 2
        assert tuple(mrc.header.origin.tolist()) == (0.0, 0.0, 0.0)
        assert mrc.is_volume()
    # The atomic write leaves no temporary file behind.
    assert sorted(os.listdir(tmp_path)) == ["map.mrc"]


def test_volume_is_indexed_zyx(tmp_path):
    vol = np.zeros((8, 8, 8), np.float32)
    vol[1, 2, 3] = 1.0                      # z=1, y=2, x=3
    write_mrc(tmp_path / "v.mrc", vol, 1.0)
    with mrcfile.open(tmp_path / "v.mrc") as mrc:
        assert mrc.header.nx == 8 and mrc.data[1, 2, 3] == 1.0
    assert read_volume(tmp_path / "v.mrc")[0][1, 2, 3] == 1.0


@pytest.mark.shipped_data
def test_read_real_map(relion_projected):
    vol, apix = read_volume(relion_projected / "ferritin_chainA.mrc")
    assert vol.shape == (48, 48, 48) and vol.dtype == np.float32
    assert apix == pytest.approx(2.0)


def test_zero_pixel_size_is_returned_as_zero(tmp_path):
    path = tmp_path / "nopix.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ones((4, 4, 4), np.float32))
    assert read_volume(path)[1] == 0.0


def test_read_volume_rejects_bad_maps(tmp_path):
    with pytest.raises(InputError, match="missing.mrc"):
        read_volume(tmp_path / "missing.mrc")
    write_mrc(tmp_path / "flat.mrc", np.ones((4, 8, 8), np.float32), 1.0)
    with pytest.raises(InputError, match=r"flat\.mrc.*cubic"):
        read_volume(tmp_path / "flat.mrc")
    vol = np.ones((4, 4, 4), np.float32)
    vol[0, 0, 0] = np.inf
    write_mrc(tmp_path / "inf.mrc", vol, 1.0)
    with pytest.raises(InputError, match=r"inf\.mrc.*NaN/Inf"):
        read_volume(tmp_path / "inf.mrc")
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file" * 10)
    with pytest.raises(InputError, match=r"junk\.mrc"):
        read_volume(tmp_path / "junk.mrc")


def test_write_2d_image(tmp_path):
    img = np.arange(20, dtype=np.float64).reshape(4, 5)
    write_mrc(tmp_path / "img.mrc", img, 3.0)
    with mrcfile.open(tmp_path / "img.mrc") as mrc:
        assert mrc.data.dtype == np.float32 and mrc.data.shape == (4, 5)
        assert mrc.voxel_size.x == pytest.approx(3.0)


def test_stack_round_trip_and_header(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(7, 10, 10)).astype(np.float32)
    path = tmp_path / "s.mrcs"
    write_stack(path, images, 1.5)
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack() and mrc.header.ispg == 0 and mrc.header.mode == 2
    info = stack_info(path)
    assert (info.n, info.ny, info.nx) == (7, 10, 10)
    with open_stack(path) as stack:
        assert stack.shape == (7, 10, 10)
        assert stack.pixel_size_A == pytest.approx(1.5)
        idx = np.array([5, 0, 5, 2])
        np.testing.assert_array_equal(stack.read(idx), images[idx])
        assert stack.read(idx).dtype == np.float32
        assert isinstance(stack._mrc, mrcfile.mrcmemmap.MrcMemmap)


def test_2d_file_is_a_stack_of_one(tmp_path):
    img = np.random.default_rng(2).normal(size=(6, 6)).astype(np.float32)
    write_mrc(tmp_path / "one.mrc", img, 1.0)
    with open_stack(tmp_path / "one.mrc") as stack:
        assert stack.shape == (1, 6, 6)
        np.testing.assert_array_equal(stack.read([0])[0], img)


def test_int16_stack_is_read_as_float32(tmp_path):
    data = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4)
    with mrcfile.new(tmp_path / "i.mrcs") as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
    with open_stack(tmp_path / "i.mrcs") as stack:
        out = stack.read([1])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], data[1])


def test_index_past_end_names_file_and_one_based_index(tmp_path):
    write_stack(tmp_path / "short.mrcs", np.zeros((3, 4, 4), np.float32), 1.0)
    with open_stack(tmp_path / "short.mrcs") as stack:
        with pytest.raises(InputError, match=r"image 4 .*short\.mrcs.*only 3 images"):
            stack.read([0, 3])


def test_header_without_map_tag_is_accepted(tmp_path):
    """Old writers omit the 'MAP ' tag: the permissive retry reads such complete files."""
    images = np.random.default_rng(3).normal(size=(2, 4, 4)).astype(np.float32)
    path = tmp_path / "old.mrcs"
    write_stack(path, images, 1.0)
    with open(path, "r+b") as f:
        f.seek(208)
        f.write(b"\0\0\0\0")
    with open_stack(path) as stack:
        np.testing.assert_array_equal(stack.read([1, 0]), images[[1, 0]])
