"""Density maps from the shipped apoferritin model: centring, axes, normalisation."""

import numpy as np
import pytest

from mpirefine.errors import InputError
from mpirefine.synthetic.models import (
    asymmetric_chains,
    chain_centroids,
    density_from_atoms,
    model_volume,
    read_pdb,
    shipped_model_path,
)

BOX, PIXEL = 48, 3.2   # 154 Å: the ~135 Å shell fits


def corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def quarter_turn(v, axes):
    """Rotate by 90° about the voxel box // 2: for an even box drop index 0 so that
    the remaining indices 1..n-1 are symmetric about n // 2, as np.rot90 needs."""
    s = v[1:, 1:, 1:]
    return s, np.rot90(s, 1, axes=axes)


@pytest.fixture(scope="module")
def full_map():
    return model_volume(BOX, PIXEL)


def test_read_shipped_model():
    coords, chains, elements = read_pdb(shipped_model_path())
    assert coords.shape == (4080, 3)
    assert len(set(chains.tolist())) == 24
    assert set(elements.tolist()) == {"C"}
    np.testing.assert_allclose(coords.mean(axis=0), 88.76, atol=0.01)


def test_read_pdb_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_pdb(tmp_path / "missing.pdb")
    empty = tmp_path / "empty.pdb"
    empty.write_text("REMARK nothing here\nEND\n")
    with pytest.raises(InputError, match="no ATOM"):
        read_pdb(empty)


def test_voxel_convention():
    # One atom 2 px along +x, 1 px along -y, 3 px along +z from the centre.
    c = np.array([10.0, 20.0, 30.0])
    v = density_from_atoms([c + np.array([2.0, -1.0, 3.0]) * PIXEL, c], 32, PIXEL, center_A=c)
    peaks = np.argsort(v.ravel())[-2:]
    found = {tuple(int(i) for i in np.unravel_index(p, v.shape)) for p in peaks}
    assert found == {(16, 16, 16), (19, 15, 18)}   # [z, y, x]
    assert v.dtype == np.float32 and v.shape == (32, 32, 32)


@pytest.mark.parametrize("axes, name", [((1, 2), "Z"), ((0, 1), "X"), ((0, 2), "Y")])
def test_full_model_four_fold(full_map, axes, name):
    a, b = quarter_turn(full_map, axes)
    assert corr(a, b) > 0.99, f"not 4-fold symmetric about {name}"


def test_full_model_fits_box(full_map):
    assert full_map[[0, -1]].max() < 1e-3 * full_map.max()
    assert full_map[:, :, [0, -1]].max() < 1e-3 * full_map.max()


def test_asymmetric_subset():
    chains = asymmetric_chains()
    assert len(chains) == 3 and len(set(chains)) == 3
    coords, ids, _ = read_pdb(shipped_model_path())
    cent = chain_centroids(coords, ids)
    # Neighbours: every chosen chain lies within 45 Å of another one.
    for c in chains:
        assert min(np.linalg.norm(cent[c] - cent[o]) for o in chains if o != c) < 45.0
    v = model_volume(BOX, PIXEL, chains=chains)
    for axes in ((1, 2), (0, 1)):
        assert corr(*quarter_turn(v, axes)) < 0.9
    centred = model_volume(BOX, PIXEL, chains=chains, center_A="chains")
    z, y, x = np.indices(centred.shape)
    com = [float((g * centred).sum() / centred.sum()) for g in (x, y, z)]
    np.testing.assert_allclose(com, BOX // 2, atol=0.5)


def test_total_proportional_to_atoms(full_map):
    subset = model_volume(BOX, PIXEL, chains=["A", "B"])
    np.testing.assert_allclose(full_map.sum(), 4080, rtol=1e-3)
    np.testing.assert_allclose(subset.sum() / full_map.sum(), 2 / 24, rtol=1e-3)


def test_unknown_chain():
    with pytest.raises(InputError, match="not in the model"):
        model_volume(32, 5.0, chains=["A", "ZZ"])


def test_speed():
    import time

    t = time.perf_counter()
    model_volume(64)
    assert time.perf_counter() - t < 2.0
