"""The distributed reconstruction's arithmetic, with the ranks played in one process.

Each function of the slab pipeline (fourier/reconstruct.py, refinement/references.py,
refinement/halfmaps.py) runs here once per slab and the all-to-all between its two
steps is done by slicing, so the whole pipeline can be compared with the one-rank
functions it replaces: reconstruct(), centered_rfft3/irfft3, fsc_curve,
next_references and dynamic_mask. The MPI versions of the same steps are exercised by
tests/test_mpi_refine.py (3 and 4 ranks) and tests/test_parallel.py.
"""

import numpy as np
import pytest

from mpirefine.fourier.backproject import hermitian_complete
from mpirefine.fourier.reconstruct import (
    SlabLayout,
    balanced_edges,
    divide_sphere,
    fold_kx0,
    forward_columns,
    forward_rows,
    inverse_columns,
    inverse_rows,
    pack_sphere,
    padded_inverse_columns,
    padded_inverse_rows,
    reconstruct,
    shell_weight_sums,
    slab_radius,
    slab_regulariser,
    sphere_shells,
)
from mpirefine.fourier.transforms import centered_irfft3, centered_rfft3, radius_3d
from mpirefine.postprocess.fsc import fsc_curve
from mpirefine.postprocess.masks import (
    dynamic_mask,
    dynamic_mask_rows,
    mask_halo_rows,
    soft_dilate,
    threshold_core,
)
from mpirefine.refinement.halfmaps import fsc_from_shell_sums, fsc_shell_sums
from mpirefine.refinement.references import filter_reference_planes, next_references, split_shell

PAD = 2


def accumulator(n, seed, xp=np):
    """Random sums of the accumulator's shape and precision (values that went through
    the single-precision reduction)."""
    rng = np.random.default_rng(seed)
    shape = (PAD * n, PAD * n, n + 1)
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    weight = (rng.random(shape) + 0.2).astype(np.float32)
    return xp.asarray(data.astype(np.complex128)), xp.asarray(weight.astype(np.float64))


def transpose(pieces, edges_of, parts):
    """The all-to-all: slab t receives rows edges_of(t) of every slab's piece, in order."""
    return [np.concatenate([p[slice(*edges_of(t))].ravel() for p in pieces])
            for t in range(parts)]


def slab_reconstruct(data, weight, n, parts, ssnr=None):
    """reconstruct() (no corner masking) as ``parts`` ranks do it: the rows of the map."""
    L = SlabLayout(n, PAD, parts)
    data, weight = data.copy(), weight.copy()
    fold_kx0(data, weight)
    packed = pack_sphere(data, weight, L)
    starts = np.concatenate([[0], np.cumsum(L.voxels)])
    slabs = [packed[starts[s]:starts[s + 1]] for s in range(parts)]
    shells = [sphere_shells(L, s, np) for s in range(parts)]
    sums = sum(shell_weight_sums(slabs[s], shells[s], L.n_shells) for s in range(parts))
    reg = slab_regulariser(sums, ssnr)
    rows = [padded_inverse_rows(divide_sphere(slabs[s], shells[s], reg), L, s)
            for s in range(parts)]
    blocks = transpose(rows, L.rows, parts)
    return L, [padded_inverse_columns(blocks[t], L, t) for t in range(parts)]


def whole(rows):
    """Rows [y, z, x] of every slab → the map [z, y, x]."""
    return np.concatenate(rows, axis=0).transpose(1, 0, 2)


def rows_of(vol, L):
    """Each slab's rows [y, z, x] of a map [z, y, x]."""
    return [np.ascontiguousarray(vol.transpose(1, 0, 2)[slice(*L.rows(s))]) for s in range(L.parts)]


def slab_forward(L, rows):
    pieces = [forward_rows(r) for r in rows]
    blocks = transpose(pieces, L.kplanes, L.parts)
    return [forward_columns(blocks[t], L, t) for t in range(L.parts)]


def slab_inverse(L, planes):
    pieces = [inverse_rows(p, L.n) for p in planes]
    blocks = transpose(pieces, L.rows, L.parts)
    return [inverse_columns(blocks[t], L, t) for t in range(L.parts)]


@pytest.mark.parametrize("n", [16, 17, 20])
def test_sphere_is_the_voxels_reconstruct_uses(n):
    L = SlabLayout(n, PAD, 3)
    shell = np.rint(radius_3d(PAD * n, np) / PAD).astype(int)
    used = shell < n // 2 + 1
    assert np.array_equal(L.in_sphere(0, L.P, np), used)
    assert L.voxels.sum() == used.sum()
    assert np.array_equal(np.concatenate([sphere_shells(L, s, np) for s in range(3)]), shell[used])
    # the sphere is about half of the padded grid: what the reduction saves
    assert 0.45 < used.mean() < 0.65


def test_balanced_edges_cover_every_item_once():
    for weights, parts in [(np.ones(10), 3), (np.arange(7.0), 7), (np.ones(3), 5), ([5, 1, 1, 1], 2)]:
        edges = balanced_edges(weights, parts)
        assert len(edges) == parts + 1 and edges[0] == 0 and edges[-1] == len(weights)
        assert np.all(np.diff(edges) >= 0)
    edges = balanced_edges(np.ones(12), 4)
    assert np.array_equal(np.diff(edges), [3, 3, 3, 3])


def test_fold_kx0_in_place_equals_hermitian_complete():
    data, weight = accumulator(8, 1)
    expected = hermitian_complete(data, weight)
    fold_kx0(data, weight)
    assert np.array_equal(data, expected[0]) and np.array_equal(weight, expected[1])


@pytest.mark.parametrize("n, parts", [(16, 1), (16, 3), (17, 2), (20, 4), (8, 7)])
def test_slab_reconstruction_equals_reconstruct(n, parts):
    data, weight = accumulator(n, n + parts)
    for ssnr in (None, np.linspace(50.0, 0.01, n // 2 + 1)):
        expected = reconstruct(data, weight, n, PAD, ssnr=ssnr, mask_corners=False)
        _, rows = slab_reconstruct(data, weight, n, parts, ssnr)
        got = whole(rows)
        assert got.dtype == np.float32 and got.shape == (n, n, n)
        assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()


@pytest.mark.parametrize("n, parts", [(16, 3), (17, 2), (9, 4)])
def test_slab_transforms_equal_the_whole_map_transforms(n, parts):
    rng = np.random.default_rng(n)
    vol = rng.standard_normal((n, n, n)).astype(np.float32)
    L = SlabLayout(n, PAD, parts)
    planes = slab_forward(L, rows_of(vol, L))
    expected = centered_rfft3(np.asarray(vol, np.float64))
    assert np.allclose(np.concatenate(planes), expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    back = whole(slab_inverse(L, planes))
    assert np.allclose(back, centered_irfft3(expected, n), rtol=0, atol=1e-12)


def test_fsc_from_planes_equals_fsc_curve():
    n, parts = 18, 3
    rng = np.random.default_rng(2)
    a = rng.standard_normal((n, n, n)).astype(np.float32)
    b = (a + 2 * rng.standard_normal((n, n, n))).astype(np.float32)
    L = SlabLayout(n, PAD, parts)
    fa = slab_forward(L, rows_of(a, L))
    fb = slab_forward(L, rows_of(b, L))
    sums = sum(fsc_shell_sums(fa[s], fb[s], slab_radius(n, *L.kplanes(s), np), n) for s in range(parts))
    np.testing.assert_allclose(fsc_from_shell_sums(sums), fsc_curve(a, b), rtol=0, atol=1e-12)


def test_slab_references_equal_next_references():
    n, parts, px, split_A = 20, 3, 2.0, 10.0
    rng = np.random.default_rng(4)
    maps = {h: rng.standard_normal((n, n, n)).astype(np.float32) for h in (0, 1)}
    fsc = np.clip(np.linspace(1.0, -0.1, n // 2 + 1), -1, 1)
    expected = next_references(maps, fsc, split_A, px)
    L = SlabLayout(n, PAD, parts)
    planes = {h: slab_forward(L, rows_of(maps[h], L)) for h in (0, 1)}
    for h in (0, 1):
        filtered = []
        for s in range(parts):
            r = slab_radius(n, *L.kplanes(s), np)
            low = r < split_shell(n, split_A, px)
            shared = 0.5 * (planes[0][s][low] + planes[1][s][low])
            filtered.append(filter_reference_planes(planes[h][s], r, low, shared, fsc, n))
        got = whole(slab_inverse(L, filtered)).astype(np.float32)
        assert np.abs(got - expected[h]).max() <= 1e-6 * np.abs(expected[h]).max()


@pytest.mark.parametrize("absolute, near, far", [(False, 0.5, 1.2), (True, 0.5, 1.2), (False, 1.0, 0.5)])
def test_dynamic_mask_by_rows_equals_dynamic_mask(absolute, near, far):
    """Voxel for voxel, with each slab seeing only the rows within the mask's reach, and
    the whole map's (dynamic_mask), the same as the mask grown with SciPy's exact EDT."""
    from scipy.ndimage import gaussian_filter

    n, parts, px, res = 32, 4, 1.5, 4.0
    rng = np.random.default_rng(5)
    vol = gaussian_filter(rng.standard_normal((n, n, n)), 2.0).astype(np.float32)
    expected = soft_dilate(threshold_core(vol, 0.3, absolute), px, near * res, far * res)
    assert np.array_equal(dynamic_mask(vol, res, px, 0.3, near, far, absolute), expected)
    halo = mask_halo_rows(res, px, near, far)
    assert halo < n // parts + halo < n   # the slabs really miss rows of the map
    rows = vol.transpose(1, 0, 2)
    edges = balanced_edges(np.ones(n), parts)
    got = []
    for s in range(parts):
        lo, hi = max(0, edges[s] - halo), min(n, edges[s + 1] + halo)
        got.append(dynamic_mask_rows(rows[lo:hi], edges[s] - lo, edges[s + 1] - edges[s],
                                     float(vol.max()), res, px, 0.3, near, far, absolute))
    assert np.array_equal(whole(got), expected)
    assert 0 < expected.mean() < 1


def test_bounded_distance_is_exact_within_its_reach():
    """The min-plus distance equals SciPy's exact EDT wherever it is at most h, for
    any run of rows; beyond h it only says "farther than h"."""
    from scipy.ndimage import distance_transform_edt

    from mpirefine.postprocess.masks import _squared_distance_to

    rng = np.random.default_rng(0)
    for _ in range(30):
        shape = tuple(int(v) for v in rng.integers(3, 14, 3))
        core = rng.random(shape) > rng.uniform(0.8, 0.999)
        if not core.any():
            continue
        h = int(rng.integers(1, 8))
        first = int(rng.integers(0, shape[0]))
        count = int(rng.integers(0, shape[0] - first + 1))
        got = np.sqrt(_squared_distance_to(core, h, first, count).astype(np.float64))
        exact = distance_transform_edt(~core)[first:first + count]
        near = exact <= h
        assert np.array_equal(got[near], exact[near])
        assert np.all(got[~near] > h)
