"""Minibatch sizes and membership.

The auto batch size follows the coverage argument behind CryoSPARC's "batchsize
epsilon": a central slice covers a band one Fourier pixel wide on the shell of
radius r, a fraction ≈ 1/(2r) of it, so N random slices miss a given voxel with
probability ≈ exp(-N / (2r)).  Asking that this be at most ε gives
N = 2 r ln(1/ε) slices per half map, multiplied by the "snrfactor" to make up for
the noise in each image, and divided by the symmetry order (each particle gives
that many slices).  Membership is a seeded random draw that depends only on the
seed and the iteration, never on the rank layout.
"""

from __future__ import annotations

import math

import numpy as np

from mpirefine.errors import InputError


def auto_minibatch_size(radius_px: float, epsilon: float, snrfactor: float,
                    symmetry_order: int = 1) -> int:
    """Particles per iteration (both half sets together) for an alignment radius
    of ``radius_px`` Fourier pixels."""
    per_half = snrfactor * 2.0 * max(radius_px, 1.0) * math.log(1.0 / epsilon) / symmetry_order
    return int(math.ceil(2 * per_half))


def choose_minibatch(n_particles: int, batch_size: int | None, seed: int, iteration: int) -> np.ndarray:
    """Sorted indices of this iteration's particles (all of them if batch_size is None
    or not smaller than n_particles)."""
    if batch_size is None or batch_size >= n_particles:
        return np.arange(n_particles)
    rng = np.random.default_rng([seed, iteration])
    return np.sort(rng.choice(n_particles, size=batch_size, replace=False))


def random_split(n: int, seed: int) -> np.ndarray:
    """A seeded 50/50 half-set split (0 = A, 1 = B), independent of the rank layout."""
    if seed < 0:
        raise InputError(f"--seed must be 0 or more, got {seed}")
    perm = np.random.default_rng(seed).permutation(n)
    split = np.empty(n, np.int8)
    split[perm[0::2]] = 0
    split[perm[1::2]] = 1
    return split
