"""Point groups: group laws, CryoSPARC's axes, RELION's settings, the asymmetric unit,
symmetrised backprojection sums and symmetry alignment of a map."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.backend import to_numpy
from mpirefine.fourier.backproject import Accumulator, hermitian_complete
from mpirefine.fourier.project import extract_slices, volume_ft
from mpirefine.fourier.reconstruct import reconstruct
from mpirefine.fourier.transforms import freq_grid_2d, radius_3d
from mpirefine.geometry.grids import so3_grid
from mpirefine.geometry.rotations import angular_distance_deg, euler_to_matrix
from mpirefine.geometry.symmetry import (
    asymmetric_unit_mask,
    group_order,
    point_group,
    relion_group,
    relion_to_ours,
    same_group,
    symmetrize_accumulator,
    to_asymmetric_unit,
)
from mpirefine.geometry.symmetry_align import align_symmetry_axes, apply_alignment, rotate_volume
from mpirefine.synthetic.models import density_from_atoms, model_volume, read_pdb, shipped_model_path

PHI = (1 + 5 ** 0.5) / 2
ORDERS = {"C1": 1, "C5": 5, "c5": 5, "D1": 2, "D7": 14, "T": 12, "O": 24, "I": 60, "I1": 60,
          "i2": 60}
GROUPS = ["C1", "C2", "C5", "D1", "D2", "D7", "T", "O", "I1", "I2"]


def corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def fold(group, axis):
    """Largest n such that the turn by 360°/n about ``axis`` is in the group (1 if none)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    best = 1
    for n in range(2, 8):
        r = Rotation.from_rotvec(axis * 2 * np.pi / n).as_matrix()
        if np.abs(group - r).max(axis=(1, 2)).min() < 1e-9:
            best = n
    return best


def axes_of_fold(group, n):
    """Unit axes (z ≥ 0) of the n-fold rotations of the group."""
    out = []
    for g in group:
        rv = Rotation.from_matrix(g).as_rotvec()
        if abs(np.linalg.norm(rv) - 2 * np.pi / n) < 1e-9:
            a = rv / np.linalg.norm(rv)
            out.append(a if a[2] >= 0 else -a)
    return np.array(out)


# --- the groups --------------------------------------------------------------------------

@pytest.mark.parametrize("name, order", ORDERS.items())
def test_order(name, order):
    assert group_order(name) == order
    assert point_group(name).shape == (order, 3, 3)


@pytest.mark.parametrize("name", GROUPS)
def test_group_laws(name):
    G = point_group(name)
    np.testing.assert_allclose(G[0], np.eye(3))
    np.testing.assert_allclose(G @ G.transpose(0, 2, 1), np.broadcast_to(np.eye(3), G.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(G), 1.0)
    products = (G[:, None] @ G[None]).reshape(-1, 3, 3)
    distance = np.abs(products[:, None] - G[None]).max(axis=(2, 3)).min(axis=1)
    assert distance.max() < 1e-9, "a product of two elements is not in the group"
    assert same_group(G.transpose(0, 2, 1), G), "inverses"
    assert len(np.unique(np.round(G, 6), axis=0)) == len(G), "repeated elements"


@pytest.mark.parametrize("bad", ["X3", "C0", "D", "", "I3", "Oh", "C-2", "T2"])
def test_unknown_names_are_value_errors(bad):
    with pytest.raises(ValueError, match="symmetry group"):
        point_group(bad)


def test_cyclic_and_dihedral_axes():
    assert fold(point_group("C5"), (0, 0, 1)) == 5
    D7 = point_group("D7")
    assert fold(D7, (0, 0, 1)) == 7 and fold(D7, (0, 1, 0)) == 2
    assert fold(D7, (1, 0, 0)) == 1           # odd n: X is not a 2-fold (RELION's is)
    assert fold(point_group("D1"), (0, 1, 0)) == 2


def test_tetrahedral_and_octahedral_axes():
    T = point_group("T")
    assert fold(T, (0, 0, 1)) == 3
    assert len(axes_of_fold(T, 3)) == 8 and len(axes_of_fold(T, 2)) == 3
    assert any(abs(a[0]) < 1e-9 for a in axes_of_fold(T, 2)), "a 2-fold in the YZ plane"
    octahedral = point_group("O")
    for axis in np.eye(3):
        assert fold(octahedral, axis) == 4
    assert fold(octahedral, (1, 1, 1)) == 3 and fold(octahedral, (1, 1, 0)) == 2


@pytest.mark.parametrize("name, five_plane, three_plane", [("I1", 0, 1), ("I2", 1, 0)])
def test_icosahedral_axes(name, five_plane, three_plane):
    """I1 and I2: 2-folds on X, Y, Z; the 5-fold with the greatest Z lies in the YZ
    plane (I1) or XZ plane (I2), the 3-fold with the greatest Z in the other one."""
    G = point_group(name)
    for axis in np.eye(3):
        assert fold(G, axis) == 2
    for n, plane in ((5, five_plane), (3, three_plane)):
        axes = axes_of_fold(G, n)
        top = axes[axes[:, 2] > axes[:, 2].max() - 1e-9]
        # plane 0: YZ (x = 0); plane 1: XZ (y = 0)
        np.testing.assert_allclose(top[:, plane], 0.0, atol=1e-9)
    assert fold(G, (0, 1, PHI) if name == "I1" else (1, 0, PHI)) == 5
    assert same_group(point_group("I"), "I1")


# --- RELION's settings -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["C4", "D2", "D3", "D4", "D5", "T", "O", "I", "I1", "I2",
                                  "I3", "I4"])
def test_relion_to_ours_conjugates_the_groups(name):
    R = relion_to_ours(name)
    target = {"I3": "I1", "I4": "I1"}.get(name, name)
    assert same_group(R @ relion_group(name) @ R.T, point_group(target))
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)


def test_relion_differences():
    assert fold(relion_group("D3"), (1, 0, 0)) == 2              # RELION: 2-fold on X
    for same in ["C7", "D4", "T", "O", "I1", "I2"]:
        np.testing.assert_allclose(relion_to_ours(same), np.eye(3), atol=1e-9)
    # the plain name I: RELION means I2, we mean I1
    assert same_group(relion_group("I"), "I2") and not same_group(relion_group("I"), "I")
    assert angular_distance_deg(relion_to_ours("I"), np.eye(3))[0] > 1
    # odd Dn: a turn about Z (30° for D3 takes RELION's X 2-fold onto one of ours)
    R = relion_to_ours("D3")
    assert abs(Rotation.from_matrix(R).as_rotvec()[2]) == pytest.approx(np.radians(30))


# --- the asymmetric unit -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["C1", "C4", "C5", "D7", "T", "O", "I"])
def test_asymmetric_unit_keeps_one_pose_in_n(name):
    G = point_group(name)
    n_samples = 40000
    A = Rotation.random(n_samples, random_state=7).as_matrix()
    kept = asymmetric_unit_mask(A, name).mean() * len(G)
    assert abs(kept - 1) < 5 * np.sqrt(len(G) / n_samples)
    # every orbit {A·g} has exactly one kept member
    orbits = (A[:300, None] @ G[None]).reshape(-1, 3, 3)
    per_orbit = asymmetric_unit_mask(orbits, G).reshape(300, len(G)).sum(axis=1)
    np.testing.assert_array_equal(per_orbit, 1)
    # to_asymmetric_unit gives an equivalent, kept pose
    rep = to_asymmetric_unit(A[:300], name)
    assert asymmetric_unit_mask(rep, name).all()
    links = np.einsum("rji,rjk->rik", rep, A[:300])          # repᵀ·A must be in G
    assert (np.abs(links[:, None] - G[None]).max(axis=(2, 3)).min(axis=1) < 1e-9).all()


def test_cyclic_unit_is_an_azimuth_wedge_and_top_views_tie_break():
    A = Rotation.random(20000, random_state=3).as_matrix()
    d = A[asymmetric_unit_mask(A, "C4"), 2, :]                # viewing directions kept
    az = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    az = (az - np.median(az) + 180) % 360 - 180
    assert np.ptp(az) < 90.5
    # top views: every g turns about the viewing direction; still one per orbit
    tops = euler_to_matrix(0.0, 0.0, np.arange(0, 360, 7.0))
    orbits = (tops[:, None] @ point_group("C4")[None]).reshape(-1, 3, 3)
    np.testing.assert_array_equal(asymmetric_unit_mask(orbits, "C4").reshape(-1, 4).sum(1), 1)


def test_search_grid_shrinks_by_the_order():
    grid = so3_grid(15.0)
    for name in ["C3", "O"]:
        kept = asymmetric_unit_mask(grid, name).sum()
        assert kept == pytest.approx(len(grid) / group_order(name), rel=0.1)


# --- enforcement: symmetrised backprojection --------------------------------------------

N, PAD, PIXEL = 32, 2, 5.0


@pytest.fixture(scope="module")
def apoferritin():
    return model_volume(box=N, pixel_size_A=PIXEL)


def insert(volume, rotations, xp=np, repeat=1):
    """An accumulator holding the noise-free slices of ``volume`` at ``rotations``;
    with ``repeat`` = N, rotations holds N poses per slice and each slice goes in at
    all of its poses (as enforcement inserts a particle at all A·g)."""
    ky, kx = freq_grid_2d(N, np)
    keep = np.hypot(kx, ky).ravel() <= N // 2
    kx, ky = kx.ravel()[keep], ky.ravel()[keep]
    values = np.repeat(extract_slices(volume_ft(volume, PAD), rotations[::repeat], kx, ky),
                       repeat, axis=0)
    acc = Accumulator.zeros(N, PAD, xp)
    acc.insert(xp.asarray(rotations), xp.asarray(values), xp.ones(values.shape, xp.float32),
               xp.asarray(kx), xp.asarray(ky))
    return acc


@pytest.mark.parametrize("name", ["O", "D7"])
def test_symmetrised_sums_equal_insertion_at_all_poses(apoferritin, name):
    G = point_group(name)
    A = Rotation.random(12, random_state=2).as_matrix()
    once = insert(apoferritin, A)
    data, weight = symmetrize_accumulator(once.data, once.weight, name)
    everywhere = insert(apoferritin, (A[:, None] @ G[None]).reshape(-1, 3, 3), repeat=len(G))
    a = reconstruct(data, weight, N, PAD)
    b = reconstruct(everywhere.data, everywhere.weight, N, PAD)
    assert corr(a, b) > 0.99
    # the sums agree: voxel by voxel for O (its turns map the grid onto itself), in
    # total within the sphere for D7 (interpolation spreads but keeps the weight)
    _, w1 = hermitian_complete(data, weight)
    _, w2 = hermitian_complete(everywhere.data, everywhere.weight)
    inside = radius_3d(PAD * N, np) < N
    assert w1[inside].sum() == pytest.approx(w2[inside].sum(), rel=0.01)
    if name == "O":
        assert np.abs(w1 - w2).sum() / np.abs(w2).sum() < 1e-3


def test_c1_leaves_the_sums_alone(apoferritin):
    acc = insert(apoferritin, Rotation.random(5, random_state=1).as_matrix())
    data, weight = symmetrize_accumulator(acc.data, acc.weight, "C1")
    np.testing.assert_allclose(reconstruct(data, weight, N, PAD),
                               reconstruct(acc.data, acc.weight, N, PAD), atol=1e-5)


def test_map_from_symmetrised_sums_is_symmetric():
    """An asymmetric map seen in 10 views, symmetrised in D5, comes out D5-symmetric."""
    rng = np.random.default_rng(4)
    blobs = rng.normal(size=(30, 3)) * 18.0
    volume = density_from_atoms(blobs, N, PIXEL, center_A=np.zeros(3), sigma_A=6.0)
    acc = insert(volume, Rotation.random(10, random_state=5).as_matrix())
    data, weight = symmetrize_accumulator(acc.data, acc.weight, "D5")
    sym = reconstruct(data, weight, N, PAD)
    for g in point_group("D5")[1:]:
        assert corr(sym, rotate_volume(sym, g, order=3)) >= 0.99
    assert corr(volume, rotate_volume(volume, point_group("D5")[1], order=3)) < 0.8


def test_symmetrise_on_each_backend(xp, apoferritin):
    A = Rotation.random(4, random_state=6).as_matrix()
    acc = insert(apoferritin, A, xp)
    with _device_counts(xp) as counts:
        data, weight = symmetrize_accumulator(acc.data, acc.weight, "C3")
    # on the CuPy stand-in: no read back from the device (no mask indexing, no nonzero)
    assert counts.get("syncs", 0) == 0, counts.get("sync_sites")
    assert type(data) is type(acc.data)
    ref_data, ref_weight = symmetrize_accumulator(to_numpy(acc.data), to_numpy(acc.weight), "C3")
    np.testing.assert_allclose(to_numpy(weight), ref_weight, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(to_numpy(data), ref_data, rtol=1e-9, atol=1e-6)


def _device_counts(xp):
    """The CuPy stand-in's counters over a block (tests/gpu_standin), {} otherwise."""
    import contextlib

    standin = getattr(xp, "_standin", None)
    return standin.counting() if standin is not None else contextlib.nullcontext({})


def _symmetrize_full_grid(data, weight, group, chunk=1 << 17):
    """The symmetrisation as it was before it walked the grid in slabs (kept here as the
    reference): full-grid coordinates, index, sphere mask and sums."""
    from mpirefine.geometry.symmetry import _as_group, _trilinear_rows

    G = _as_group(group)
    P, nx = data.shape[0], data.shape[2]
    data, weight = hermitian_complete(data, weight)
    table = np.zeros((P + 3, P + 3, nx + 2, 3), np.float64)
    table[1:P + 1, 1:P + 1, :nx, 0] = data.real
    table[1:P + 1, 1:P + 1, :nx, 1] = data.imag
    table[1:P + 1, 1:P + 1, :nx, 2] = weight
    table = table.reshape(-1, 3)
    strides = ((P + 3) * (nx + 2), nx + 2, 1)
    kz, ky, kx = np.meshgrid(np.arange(P) - P // 2, np.arange(P) - P // 2, np.arange(nx),
                             indexing="ij")
    inside = (kx * kx + ky * ky + kz * kz).ravel() <= (P / 2 + 6) ** 2
    where = np.nonzero(inside)[0]
    q = np.stack([kx.ravel()[where], ky.ravel()[where], kz.ravel()[where]]).astype(np.float64)
    total = np.zeros((where.shape[0], 3), np.float64)
    for s in range(0, where.shape[0], chunk):
        qs = q[:, s:s + chunk]
        for g in G:
            total[s:s + chunk] += _trilinear_rows(table, g @ qs, P, nx, strides, np)
    out_d = np.zeros(P * P * nx, np.complex128)
    out_w = np.zeros(P * P * nx, np.float64)
    out_d[where] = total[:, 0] + 1j * total[:, 1]
    out_w[where] = total[:, 2]
    out_d, out_w = out_d.reshape((P, P, nx)), out_w.reshape((P, P, nx))
    out_d[:, :, 0] *= 0.5
    out_w[:, :, 0] *= 0.5
    return out_d, out_w


@pytest.mark.parametrize("name", ["O", "C4"])
@pytest.mark.parametrize("slab_points,chunk", [(None, None), (700, 256)])
def test_symmetrise_in_slabs_equals_the_full_grid_walk(monkeypatch, name, slab_points, chunk):
    """Walking the grid in slabs of kz planes gives the very sums of the full-grid
    walk, bit for bit (each voxel adds the operators in the same order), with the
    default slabs and with slabs and chunks far smaller than the grid (the array code,
    which CuPy runs; NumPy runs the compiled loop, compared below)."""
    from mpirefine.geometry import symmetry

    monkeypatch.setenv("MPIREFINE_JIT", "0")
    if slab_points is not None:
        monkeypatch.setattr(symmetry, "_SLAB_POINTS", slab_points)
        monkeypatch.setattr(symmetry, "_CHUNK", chunk)
    rng = np.random.default_rng(7)
    P = 34
    shape = (P, P, P // 2 + 1)
    data = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    weight = rng.random(size=shape)
    got = symmetrize_accumulator(data, weight, name)
    want = _symmetrize_full_grid(data, weight, name)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("name", ["O", "D7", "C4", "C1"])
@pytest.mark.parametrize("P", [34, 33])
def test_compiled_symmetrisation_equals_the_array_code(monkeypatch, name, P):
    """The compiled loop (NumPy's path when Numba imports) gives the array code's sums
    to rounding: the same points, operators, clipping, mirror and stencil."""
    from mpirefine.fourier import compiled

    if not compiled.enabled(np):
        pytest.skip("Numba is not installed")
    rng = np.random.default_rng(8)
    shape = (P, P, P // 2 + 1)
    data = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    weight = rng.random(size=shape)
    got = symmetrize_accumulator(data, weight, name)
    monkeypatch.setenv("MPIREFINE_JIT", "0")
    want = symmetrize_accumulator(data, weight, name)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-12 * np.abs(want[0]).max())
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12 * want[1].max())
    assert np.array_equal(got[1] == 0, want[1] == 0)     # the same sphere is filled


# --- the apoferritin model and symmetry alignment -----------------------------------------

def test_apoferritin_model_is_octahedral():
    volume = model_volume(box=40, pixel_size_A=4.0)
    for g in point_group("O")[1:]:
        assert corr(volume, rotate_volume(volume, g, order=3)) >= 0.99


def misaligned_apoferritin(box, pixel_A, rotation, shift_px):
    """The shipped model turned by ``rotation`` about its centre and moved by
    ``shift_px`` (x, y, z), drawn directly from the atoms (no interpolation)."""
    coords, _, _ = read_pdb(shipped_model_path())
    centre = coords.mean(axis=0)
    moved = (coords - centre) @ rotation.T + centre + np.asarray(shift_px) * pixel_A
    return density_from_atoms(moved, box, pixel_A, center_A=centre)


def test_alignment_brings_the_axes_back():
    box, pixel = 32, 5.0
    axis = np.array([0.48, -0.6, 0.64]) / np.linalg.norm([0.48, -0.6, 0.64])
    Q = Rotation.from_rotvec(np.radians(20.0) * axis).as_matrix()
    shift_px = np.array([2.0, -2.0, 1.0])
    clean = misaligned_apoferritin(box, pixel, Q, shift_px)
    volume = clean + 0.5 * clean.std() * np.random.default_rng(0).normal(size=clean.shape)
    R, shift_A, score = align_symmetry_axes(volume, "O", pixel)
    # W = V(Rᵀx − s) is octahedral in our setting iff R·Q lies in O
    error = min(angular_distance_deg(R @ Q, g)[0] for g in point_group("O"))
    assert error < 1.0
    np.testing.assert_allclose(shift_A / pixel, -shift_px, atol=0.25)
    assert score > 0.8
    aligned = apply_alignment(clean, R, shift_A, pixel)
    assert corr(aligned, model_volume(box=box, pixel_size_A=pixel)) > 0.98


def test_alignment_leaves_an_aligned_map_and_c1_alone():
    volume = model_volume(box=32, pixel_size_A=5.0)
    R, shift_A, _ = align_symmetry_axes(volume, "O", 5.0)
    assert angular_distance_deg(R, np.eye(3))[0] < 1.0
    np.testing.assert_allclose(shift_A, 0.0, atol=0.5)
    R, shift_A, score = align_symmetry_axes(volume, "C1", 5.0)
    np.testing.assert_array_equal(R, np.eye(3))
    assert score == 1.0


@pytest.mark.parametrize("name", ["C4", "T"])
def test_alignment_other_groups(name):
    """Random atoms made symmetric, turned by 20°: the axis comes back (Cn: only the
    n-fold's direction is defined) or the group comes back (T)."""
    G = point_group(name)
    rng = np.random.default_rng(5)
    atoms = rng.normal(size=(30, 3)) * 12.0
    atoms = np.concatenate([atoms @ g.T for g in G])
    Q = Rotation.from_rotvec(np.radians(20.0) * np.array([0.6, 0.0, 0.8])).as_matrix()
    volume = density_from_atoms(atoms @ Q.T, 32, 4.0, center_A=np.zeros(3), sigma_A=3.0)
    R, _, score = align_symmetry_axes(volume, name, 4.0)
    if name.startswith("C"):
        axis = R @ Q @ np.array([0.0, 0.0, 1.0])
        assert np.degrees(np.arccos(min(1.0, abs(axis[2])))) < 1.0
    else:
        assert min(angular_distance_deg(R @ Q, g)[0] for g in G) < 1.0
    assert score > 0.98


def test_cn_alignment_never_moves_the_map_along_its_axis():
    """A Cn map is symmetric under any move along its n-fold: the alignment shifts it
    only across the axis (onto the box centre) and leaves its height in the box."""
    G = point_group("C4")
    rng = np.random.default_rng(8)
    atoms = rng.normal(size=(30, 3)) * 10.0
    atoms = np.concatenate([atoms @ g.T for g in G])
    offset_A = np.array([4.0, -8.0, 12.0])                 # across the axis and along it
    volume = density_from_atoms(atoms + offset_A, 32, 4.0, center_A=np.zeros(3), sigma_A=3.0)
    R, shift_A, score = align_symmetry_axes(volume, "C4", 4.0)
    axis = R.T @ np.array([0.0, 0.0, 1.0])
    assert abs(shift_A @ axis) < 1e-9, shift_A
    np.testing.assert_allclose(shift_A[:2], -offset_A[:2], atol=1.0)
    assert score > 0.98
