"""Point groups (C, D, T, O, I) in CryoSPARC's axis setting, and their use in refinement.

An operator g (3×3 rotation acting on volume coordinates x = (x, y, z)) is a symmetry
of a map V when V(g x) = V(x).  Poses A and A·g then give the same projection, so a
particle seen at A can be inserted at all N poses A·g (enforcement) and the pose search
needs to cover only one pose in N (the asymmetric unit).

Our setting (CryoSPARC's, docs/architecture.md §3), RELION's setting of the same name,
and relion_to_ours(name):

========  =======================================  ===============================  ==================
name      ours                                     RELION                           R (RELION → ours)
========  =======================================  ===============================  ==================
Cn        n-fold on Z                              same                             identity
Dn        n-fold on Z, a 2-fold on Y               n-fold on Z, a 2-fold on X       even n: identity;
                                                                                    odd n: Rz(90°/n)
T         3-fold on Z, a 2-fold in the YZ plane    same                             identity
O         4-folds on X, Y, Z                       same                             identity
I1, I     2-folds on X, Y, Z; top 5-fold in the    I1: same.  I: = RELION's I2     I1: identity;
          YZ plane, top 3-fold in the XZ plane                                      I: 44.5° turn
I2        2-folds on X, Y, Z; top 5-fold in the    I2: same                         identity
          XZ plane, top 3-fold in the YZ plane
—         —                                        I3 (5-fold on Z), I4             onto our I1
========  =======================================  ===============================  ==================

The trap is the plain name "I": ours is I1, RELION's is I2, so a RELION job in "I"
matches ours in "I2" with no rotation.  CryoSPARC states that its T agrees with
RELION's.  :func:`relion_to_ours` builds RELION's group from RELION's own axis list
and returns the smallest R with R·G_relion·Rᵀ = G_ours (a map in RELION's setting,
turned by R, is in ours; Rz(90°) would also do for Dn and for I).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np
from scipy.spatial.transform import Rotation

from mpirefine.backend import array_namespace
from mpirefine.fourier import compiled

_PHI = (1.0 + 5.0 ** 0.5) / 2.0
_NAME = re.compile(r"^(?:([CD])([1-9][0-9]*)|(T|O|I|I1|I2))$")
_RELION_NAME = re.compile(r"^(?:([CD])([1-9][0-9]*)|(T|O|I|I[1-4]))$")

# (fold, axis) generators.  Ours follow CryoSPARC's documented axes.  RELION's are the axes its
# symmetry library lists for each named group (src/symmetries.cpp), written exactly
# where they have a closed form (T: (0, .816496, .577350); I2: 5-fold (.525731, 0,
# .850651), 3-fold (0, .356822, .934172); I1: 5-fold (.850651, 0, -.525731), 3-fold
# (.934172, .356822, 0)) and as listed for I3 and I4.
_OUR_GENERATORS = {
    "T": [(3, (0, 0, 1)), (2, (0, 2 ** 0.5, 1))],
    "O": [(4, (0, 0, 1)), (3, (1, 1, 1))],
    "I1": [(2, (0, 0, 1)), (5, (0, 1, _PHI))],
    "I2": [(2, (0, 0, 1)), (5, (1, 0, _PHI))],
}
_RELION_GENERATORS = {
    "T": [(3, (0, 0, 1)), (2, (0, 2 ** 0.5, 1))],
    "O": [(3, (1, 1, 1)), (4, (0, 0, 1))],
    "I2": [(2, (0, 0, 1)), (5, (1, 0, _PHI)), (3, (0, 1 / _PHI, _PHI))],
    "I1": [(2, (1, 0, 0)), (5, (_PHI, 0, -1)), (3, (_PHI, 1 / _PHI, 0))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0, 0, 1)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)), (5, (0.8944271932547096, 0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}


def canonical_name(name: str) -> str:
    """Upper-case group name with I written as I1; ValueError if it is not a group we know."""
    key = str(name).strip().upper()
    m = _NAME.match(key)
    if not m:
        raise ValueError(f"unknown symmetry group {name!r}: use Cn or Dn (n ≥ 1, e.g. C4, D7), "
                         "T, O, I (= I1) or I2")
    return "I1" if key == "I" else key


def _axis_rotation(fold: int, axis) -> np.ndarray:
    a = np.asarray(axis, float)
    return Rotation.from_rotvec(a / np.linalg.norm(a) * (2.0 * np.pi / fold)).as_matrix()


def _closure(generators, limit: int = 60) -> np.ndarray:
    """All products of the generators (a finite group), identity first.

    Matrices closer than 1e-4 count as one (RELION lists its axes to 6–10 digits).
    """
    found = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for m in frontier:
            for g in generators:
                p = g @ m
                if min(np.abs(p - f).max() for f in found) > 1e-4:
                    found.append(p)
                    new.append(p)
        if len(found) > limit:
            raise RuntimeError("generators do not close into a point group")
        frontier = new
    return np.array(found)


def _cyclic(n: int) -> np.ndarray:
    return Rotation.from_rotvec(np.outer(2 * np.pi * np.arange(n) / n, [0, 0, 1])).as_matrix()


def _dihedral(n: int, two_fold_axis) -> np.ndarray:
    c = _cyclic(n)
    flip = _axis_rotation(2, two_fold_axis)
    return np.concatenate([c, flip @ c])


@lru_cache(maxsize=None)
def _group(name: str) -> np.ndarray:
    m = _NAME.match(name)
    if m.group(1) == "C":
        g = _cyclic(int(m.group(2)))
    elif m.group(1) == "D":
        g = _dihedral(int(m.group(2)), (0, 1, 0))
    else:
        g = _closure([_axis_rotation(f, a) for f, a in _OUR_GENERATORS[name]])
    g = np.where(np.abs(g) < 1e-12, 0.0, g)      # clean zeros: products compare exactly
    g.setflags(write=False)
    return g


def point_group(name: str) -> np.ndarray:
    """The N rotations of a point group in our setting, shape (N, 3, 3), identity first.

    name: C<n>, D<n>, T, O, I (= I1) or I2, any case.  Raises ValueError otherwise.
    """
    return _group(canonical_name(name)).copy()


def group_order(name: str) -> int:
    """Number of rotations N in the group (C5: 5, D7: 14, T: 12, O: 24, I: 60)."""
    return int(_group(canonical_name(name)).shape[0])


def _as_group(group) -> np.ndarray:
    if isinstance(group, str):
        return _group(canonical_name(group))
    return np.asarray(group, float).reshape(-1, 3, 3)


def relion_group(name: str) -> np.ndarray:
    """RELION's setting of the group it calls ``name`` (Cn, Dn, T, O, I, I1–I4), (N, 3, 3)."""
    key = str(name).strip().upper()
    m = _RELION_NAME.match(key)
    if not m:
        raise ValueError(f"unknown RELION point group {name!r} (Cn, Dn, T, O, I, I1, I2, I3, I4)")
    if m.group(1) == "C":
        return _cyclic(int(m.group(2)))
    if m.group(1) == "D":
        return _dihedral(int(m.group(2)), (1, 0, 0))
    key = "I2" if key == "I" else key
    return _closure([_axis_rotation(f, a) for f, a in _RELION_GENERATORS[key]])


def same_group(a, b, tol: float = 1e-5) -> bool:
    """Whether two stacks of rotations hold the same set of matrices."""
    a, b = _as_group(a), _as_group(b)
    if len(a) != len(b):
        return False
    d = np.abs(a[:, None] - b[None]).max(axis=(2, 3))
    return bool(np.all(d.min(axis=1) < tol) and np.all(d.min(axis=0) < tol))


def _axes(group: np.ndarray):
    """Rotation axes (unit, one sign each) and folds of a group's elements."""
    out = []
    for g in group:
        rv = Rotation.from_matrix(g).as_rotvec()
        angle = np.linalg.norm(rv)
        if angle < 1e-6:
            continue
        fold = int(round(2 * np.pi / angle))
        axis = rv / angle
        for i, (a, f) in enumerate(out):
            if abs(abs(a @ axis) - 1) < 1e-6:
                out[i] = (a, max(f, fold))
                break
        else:
            out.append((axis, fold))
    return out


def _conjugators(source, target) -> list:
    """Every rotation R with R·source·Rᵀ = target as sets (for Cn: the two that take
    the axis onto ±Z by the shortest path)."""
    src, dst = _as_group(source), _as_group(target)
    if len(src) != len(dst):
        return []
    a_axes = sorted(_axes(src), key=lambda t: -t[1])
    b_axes = _axes(dst)
    if not a_axes:
        return [np.eye(3)]
    a1, f1 = a_axes[0]
    others = [(a, f) for a, f in a_axes[1:] if abs(a @ a1) < 1 - 1e-6]
    candidates = []
    for b1, fb in b_axes:
        if fb != f1:
            continue
        for s1 in (b1, -b1):
            if not others:   # cyclic: any rotation taking the axis onto the axis
                candidates.append(_align_vectors(a1, s1))
                continue
            a2, f2 = others[0]
            for b2, fb2 in b_axes:
                for s2 in (b2, -b2):
                    if fb2 == f2 and abs(s2 @ s1 - a2 @ a1) < 1e-6:
                        candidates.append(_frame(s1, s2) @ _frame(a1, a2).T)
    good = []
    for r in candidates:
        if same_group(r @ src @ r.T, dst) and not any(np.abs(r - q).max() < 1e-6 for q in good):
            good.append(r)
    return good


def conjugating_rotation(source, target) -> np.ndarray:
    """The smallest rotation R with R·source·Rᵀ = target as sets (ValueError if none)."""
    good = _conjugators(source, target)
    if not good:
        raise ValueError("the groups are not conjugate")
    # smallest angle; among equals (Rz(±θ)) the larger rotation-vector components
    keys = [(round(float(np.linalg.norm(v)), 9), tuple(-np.round(v, 9)))
            for v in Rotation.from_matrix(np.array(good)).as_rotvec()]
    return good[min(range(len(good)), key=keys.__getitem__)]


def normalizer(group) -> np.ndarray:
    """Rotations h with h·G·hᵀ = G, shape (M, 3, 3): turning a G-symmetric map by h
    keeps it G-symmetric in the same setting (e.g. O for D2 and for T, D2n for Dn).
    For Cn every turn about Z also qualifies; those are not listed (returns Dn)."""
    G = _as_group(group)
    if len(_axes(G)) <= 1:
        flip = _axis_rotation(2, (0, 1, 0))
        return np.concatenate([G, flip @ G])
    return np.array(_conjugators(G, G))


def _frame(u, v) -> np.ndarray:
    e1 = u / np.linalg.norm(u)
    e2 = v - (v @ e1) * e1
    e2 /= np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=1)


def _align_vectors(u, v) -> np.ndarray:
    """The smallest rotation taking unit vector u onto unit vector v."""
    c = np.cross(u, v)
    s = np.linalg.norm(c)
    angle = np.arctan2(s, u @ v)
    if s < 1e-12:
        if u @ v > 0:
            return np.eye(3)
        perp = np.cross(u, [1.0, 0, 0] if abs(u[0]) < 0.9 else [0, 1.0, 0])
        c, s, angle = perp, np.linalg.norm(perp), np.pi
    return Rotation.from_rotvec(c / s * angle).as_matrix()


def relion_to_ours(name: str, ours: str | None = None) -> np.ndarray:
    """Rotation R taking RELION's setting of group ``name`` to ours: R·G_relion·Rᵀ = G_ours.

    ours: our group to map onto; default the same name (I1 for RELION's I3 and I4).
    A map symmetric in RELION's setting, rotated by R, is symmetric in ours; poses
    convert as A_ours = A_relion·Rᵀ.  The smallest such rotation is returned.
    """
    key = str(name).strip().upper()
    target = ours or ("I1" if key in ("I3", "I4") else key)
    return conjugating_rotation(relion_group(key), point_group(target))


# --- the asymmetric unit of the pose search ------------------------------------------

# Generic reference directions: on no symmetry axis of any group we build.
_V0 = np.array([0.1234, 0.0567, 0.9907]) / np.linalg.norm([0.1234, 0.0567, 0.9907])
_V1 = np.array([0.9871, -0.0839, 0.1365]) / np.linalg.norm([0.9871, -0.0839, 0.1365])
_TIE = 1e-9


def representative_index(rotations, group) -> np.ndarray:
    """Index of the group element g whose pose A·g is the orbit's representative, (R,).

    The representative is the pose whose viewing direction (third row of A·g, i.e.
    gᵀ applied to A's) is nearest a fixed generic direction v0: a Dirichlet cell on
    the sphere of directions, of area 4π/N (for Cn an azimuth wedge of 2π/n).  Poses
    whose directions tie (an element turning about the viewing direction, e.g. top
    views in Cn) are told apart by their first row against a second direction v1.
    Off those ties the choice depends on the viewing direction alone, so on a
    direction-major grid (so3_grid) a direction keeps all or none of its in-plane angles.
    """
    A = np.asarray(rotations, float).reshape(-1, 3, 3)
    G = _as_group(group)
    u0, u1 = G @ _V0, G @ _V1
    out = np.empty(len(A), np.int64)
    for s in range(0, len(A), 1 << 16):          # (chunk, N) temporaries stay small
        s1 = A[s:s + (1 << 16), 2, :] @ u0.T      # row 3 of A·g dotted with v0
        s2 = A[s:s + (1 << 16), 0, :] @ u1.T
        near_best = s1 >= s1.max(axis=1, keepdims=True) - _TIE
        out[s:s + (1 << 16)] = np.argmax(np.where(near_best, s2, -np.inf), axis=1)
    return out


def asymmetric_unit_mask(rotations, group) -> np.ndarray:
    """True for poses A that represent their orbit {A·g}, shape (R,) bool.

    Exactly one pose of each orbit is kept (apart from measure-zero ties), so a grid
    filtered by this mask covers 1/N of SO(3) and every pose is equivalent to a kept
    one.  group: a name or an (N, 3, 3) stack.
    """
    G = _as_group(group)
    identity = int(np.argmin(np.abs(G - np.eye(3)).sum(axis=(1, 2))))
    return representative_index(rotations, G) == identity


def to_asymmetric_unit(rotations, group) -> np.ndarray:
    """Each pose replaced by its orbit's representative A·g, shape (R, 3, 3)."""
    A = np.asarray(rotations, float).reshape(-1, 3, 3)
    G = _as_group(group)
    return A @ G[representative_index(A, G)]


# --- enforcement: symmetrising the backprojection sums ---------------------------------

# Points whose per-operator temporaries (rotated coordinates, corners, weights, the
# interpolated rows: about 250 bytes a point) are made at once: about 30 MB.
_CHUNK = 1 << 17
# Sphere points per slab of kz planes, whose coordinates, output indices and sums (about
# 80 bytes a point) are made at once: about 20 MB (a slab has at least one plane).
_SLAB_POINTS = 1 << 18


def symmetrize_accumulator(data, weight, group):
    """Σ_g of the accumulator rotated by g: the sums of inserting every slice at all A·g.

    data (P, P, P//2+1) complex, weight (same) real: half-space sums [kz, ky, kx] as
    :class:`~mpirefine.fourier.backproject.Accumulator` holds them, i.e. with the
    kx = 0 plane not yet folded (reconstruct() folds it); the result keeps that form.
    A slice inserted at A·g lands at gᵀ·q where A would put it at q, so the sum is
    S(q) = Σ_g D(g·q), read by trilinear interpolation (a point with kx < 0 reads the
    conjugate at −k), as RELION's BackProjector::symmetrise does.  Only the sphere
    |q| ≤ P/2 + 6 (every shell that reconstruction keeps) is filled; the corners of
    the cube beyond it are zero.  Runs on the arrays' own backend (NumPy or CuPy).

    Memory: besides the inputs and the two outputs (24 bytes a voxel), one framed
    table of the folded sums (24 bytes a voxel, :func:`_framed_table`) and, walking
    the grid in slabs of kz planes (:func:`_slabs`), each slab's coordinates and
    sums: tens of MB, whatever the box and the number of operators.  Each voxel sums
    the operators in the group's order, so the result does not depend on the slabs.
    """
    xp = array_namespace(data)
    G = _as_group(group)
    P, nx = data.shape[0], data.shape[2]
    if data.shape != (P, P, P // 2 + 1) or weight.shape != data.shape:
        raise ValueError(f"expected (P, P, P//2+1) arrays, got {data.shape} and {weight.shape}")
    table = _framed_table(data, weight, xp)
    lengths = _sphere_row_lengths(P, nx)
    if compiled.enabled(xp):                 # NumPy arrays: the compiled loop
        out_d, out_w = compiled.symmetrize(table, G, lengths, P, nx)
    else:
        out_d, out_w = _symmetrize_arrays(table, G, lengths, P, nx, xp)
    # the sum is Hermitian on kx = 0; halve it there so that folding restores it
    out_d[:, :, 0] *= 0.5
    out_w[:, :, 0] *= 0.5
    return out_d, out_w


def _symmetrize_arrays(table, G, lengths, P, nx, xp):
    """The sums of :func:`symmetrize_accumulator` in array code (any namespace)."""
    strides = ((P + 3) * (nx + 2), nx + 2, 1)
    out_d = xp.zeros((P, P, nx), xp.complex128)
    out_w = xp.zeros((P, P, nx), xp.float64)
    flat_d, flat_w = out_d.reshape(-1), out_w.reshape(-1)
    Gx = xp.asarray(G)
    for z0, z1 in _slabs(lengths, _SLAB_POINTS):
        index, q = _slab_points(lengths[z0:z1], z0, P, nx, xp)
        for s in range(0, q.shape[1], _CHUNK):
            qs = q[:, s:s + _CHUNK]
            total = xp.zeros((qs.shape[1], 3), xp.float64)
            for g in Gx:
                total += _trilinear_rows(table, g @ qs, P, nx, strides, xp)
            at = index[s:s + _CHUNK]
            flat_d[at] = total[:, 0] + 1j * total[:, 1]
            flat_w[at] = total[:, 2]
    return out_d, out_w


def _framed_table(data, weight, xp):
    """(re, im, w) rows, float64, of the sums with their kx = 0 plane folded onto its
    Hermitian mates (as :func:`~mpirefine.fourier.backproject.hermitian_complete`
    folds it, in the table itself: no copy of the arrays), framed by zero planes (one
    before and two after in z and y, two after in x) so that every corner of a
    clipped point is a valid row.  Shape ((P + 3)² (nx + 2), 3)."""
    P, nx = data.shape[0], data.shape[2]
    table = xp.zeros((P + 3, P + 3, nx + 2, 3), xp.float64)
    table[1:P + 1, 1:P + 1, :nx, 0] = data.real
    table[1:P + 1, 1:P + 1, :nx, 1] = data.imag
    table[1:P + 1, 1:P + 1, :nx, 2] = weight
    plane = table[1:P + 1, 1:P + 1, 0, :]                  # kx = 0, (P, P, 3), a view
    mate = (P - xp.arange(P)) % P
    mates = plane[mate][:, mate]                           # the plane at -k, a copy
    plane[:, :, 0] += mates[:, :, 0]                       # D(k) + conj(D(-k)), W(k) + W(-k)
    plane[:, :, 1] -= mates[:, :, 1]
    plane[:, :, 2] += mates[:, :, 2]
    return table.reshape(-1, 3)


def _sphere_row_lengths(P: int, nx: int) -> np.ndarray:
    """(P, P) int64 on the host: how many points kx = 0, 1, ... of each row (kz, ky)
    satisfy kx² + ky² + kz² ≤ (P/2 + 6)² (a prefix of the row: the sphere that
    :func:`symmetrize_accumulator` fills)."""
    k = np.arange(P, dtype=np.int64) - P // 2
    rest = int(math.floor((P / 2 + 6) ** 2)) - (k[:, None] ** 2 + k[None, :] ** 2)
    root = np.floor(np.sqrt(np.maximum(rest, 0))).astype(np.int64)
    root += (root + 1) ** 2 <= rest                          # exact integer square root
    root -= root ** 2 > rest
    return np.where(rest >= 0, np.minimum(root + 1, nx), 0)


def _slabs(lengths: np.ndarray, points: int) -> list[tuple[int, int]]:
    """Runs (z0, z1) of kz planes holding at most ``points`` sphere points each (at
    least one plane each; planes without points are skipped)."""
    per_plane = lengths.sum(axis=1)
    out, z0, count = [], 0, 0
    for z in range(len(per_plane)):
        if z > z0 and count + per_plane[z] > points:
            out.append((z0, z))
            z0, count = z, 0
        count += int(per_plane[z])
    out.append((z0, len(per_plane)))
    return [(a, b) for a, b in out if per_plane[a:b].sum() > 0]


def _slab_points(lengths: np.ndarray, z0: int, P: int, nx: int, xp):
    """The sphere points of planes z0 .. z0 + len(lengths), in C order of the grid:
    their flat indices in the (P, P, nx) arrays, (m,) int64, and their coordinates
    q = (kx, ky, kz), (3, m) float64, made on the device from the rows' lengths
    (host, (planes, P)): no mask, no read back."""
    ends = np.cumsum(lengths.reshape(-1))
    m = int(ends[-1])
    p = xp.arange(m, dtype=xp.int64)
    row = xp.searchsorted(xp.asarray(ends), p, side="right")          # row of each point
    kx = p - xp.asarray(ends - lengths.reshape(-1))[row]
    index = (row + z0 * P) * nx + kx
    q = xp.stack([kx, row % P - P // 2, row // P + (z0 - P // 2)]).astype(xp.float64)
    return index, q


def _trilinear_rows(table, p, P, nx, strides, xp):
    """Trilinear (re, im, w) at points p (3, M) = (x, y, z) of the framed table, (M, 3)."""
    flip = p[0] < 0
    sign = xp.where(flip, -1.0, 1.0)
    x = xp.clip(p[0] * sign, 0, nx)
    y = xp.clip(p[1] * sign + (P // 2 + 1), 0, P + 1)
    z = xp.clip(p[2] * sign + (P // 2 + 1), 0, P + 1)
    x0, y0, z0 = xp.floor(x), xp.floor(y), xp.floor(z)
    fx, fy, fz = x - x0, y - y0, z - z0
    base = (z0.astype(xp.int64) * strides[0] + y0.astype(xp.int64) * strides[1]
            + x0.astype(xp.int64))
    out = xp.zeros((p.shape[1], 3), xp.float64)
    for dz, wz in ((0, 1 - fz), (1, fz)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            wzy = wz * wy
            off = dz * strides[0] + dy * strides[1]
            out += table[base + off] * (wzy * (1 - fx))[:, None]
            out += table[base + off + 1] * (wzy * fx)[:, None]
    out[:, 1] = xp.where(flip, -out[:, 1], out[:, 1])
    return out
