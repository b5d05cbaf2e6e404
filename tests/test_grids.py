"""SO(3) and shift grids: sizes, coverage, and subdivisions that stay in their cells."""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpirefine.geometry.grids import (
    ROTATION_STENCILS,
    fibonacci_sphere,
    rotation_children,
    shift_children,
    shift_grid,
    so3_grid,
    unique_shifts,
)
from mpirefine.geometry.rotations import angular_distance_deg


def nearest_distance_deg(queries, grid):
    """Angle from each query rotation to its nearest grid rotation, degrees."""
    trace = np.einsum("qij,gij->qg", queries, grid)
    return np.degrees(np.arccos(np.clip((trace.max(axis=1) - 1.0) / 2.0, -1.0, 1.0)))


def random_rotations(n, seed):
    return Rotation.random(n, random_state=seed).as_matrix()


@pytest.mark.parametrize("step_deg", [30.0, 20.0, 15.0])
def test_so3_grid_size_and_matrices(step_deg):
    grid = so3_grid(step_deg)
    expected = 8 * math.pi ** 2 / math.radians(step_deg) ** 3
    assert abs(len(grid) - expected) < 0.03 * expected
    np.testing.assert_allclose(np.einsum("rij,rkj->rik", grid, grid), np.broadcast_to(np.eye(3), grid.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(grid), 1.0, atol=1e-12)


@pytest.mark.parametrize("step_deg", [30.0, 20.0])
def test_so3_grid_covers_rotation_space(step_deg):
    d = nearest_distance_deg(random_rotations(3000, 1), so3_grid(step_deg))
    assert d.max() < step_deg
    assert d.mean() < 0.6 * step_deg


def test_fibonacci_directions_are_unit_and_balanced():
    v = fibonacci_sphere(500)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-12)
    assert np.linalg.norm(v.mean(axis=0)) < 0.01


def test_octant_children_sit_at_fixed_distance_and_tile_the_cell():
    step = 12.0
    parents = random_rotations(20, 2)
    children = rotation_children(parents, step)
    assert children.shape == (20, 8, 3, 3)
    d = angular_distance_deg(np.repeat(parents, 8, axis=0), children.reshape(-1, 3, 3))
    np.testing.assert_allclose(d, math.sqrt(3) / 4 * step, rtol=1e-9)
    # every rotation exp(u)·A with u in the parent cell (half-diagonal √3/2·step) lies in
    # some child's half-size cell (half-diagonal √3/4·step)
    rng = np.random.default_rng(3)
    u = rng.uniform(-0.5, 0.5, (400, 3)) * math.radians(step)
    inside = Rotation.from_rotvec(u).as_matrix() @ parents[0]
    assert nearest_distance_deg(inside, children[0]).max() <= math.sqrt(3) / 4 * step * 1.02


def test_hopf_children_cover_the_global_grid_cells():
    step = 20.0
    grid = so3_grid(step)
    queries = random_rotations(500, 4)
    assert len(ROTATION_STENCILS["hopf"]) == 18
    worst = 0.0
    for q in queries:
        near = grid[np.argsort(angular_distance_deg(np.broadcast_to(q, grid.shape), grid))[:4]]
        children = rotation_children(near, step, "hopf").reshape(-1, 3, 3)
        worst = max(worst, nearest_distance_deg(q[None], children)[0])
    # the children form a grid of step / 2: each query within about that grid's reach
    assert worst < 0.5 * step
    children = rotation_children(grid[:5], step, "hopf").reshape(-1, 3, 3)
    d = angular_distance_deg(np.repeat(grid[:5], 18, axis=0), children)
    assert d.max() <= 0.75 * step + 1e-9


def test_shift_grid_is_a_disc_of_lattice_points():
    t = shift_grid(4.0, 2.0)
    brute = [(x, y) for x in range(-4, 5, 2) for y in range(-4, 5, 2) if x * x + y * y <= 16]
    assert sorted(map(tuple, t.tolist())) == sorted(map(lambda p: (float(p[0]), float(p[1])), brute))
    assert len(shift_grid(0.0, 1.0)) == 1
    assert np.all(np.hypot(*shift_grid(5.5, 1.0).T) <= 5.5)


def test_shift_children_split_the_cell_and_repeats_are_dropped():
    parents = np.array([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
    children = shift_children(parents, 2.0)
    assert children.shape == (1, 3, 4, 2)
    np.testing.assert_allclose(np.abs(children[0, 0]), 0.5)
    shifts, valid = unique_shifts(children.reshape(1, -1, 2))
    assert valid.sum() == 8  # the third parent repeats the first
    kept = shifts[valid]
    assert len({tuple(s) for s in kept.tolist()}) == 8
