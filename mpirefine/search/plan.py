"""How hard to search at a given alignment resolution, and the search as the EM loop
calls it.

The final angular step follows the accuracy a resolution needs: features d Å apart
on a particle of diameter D move by d when the particle turns by d / D radians, so
the last level's step is half the alignment resolution over the particle diameter
(taken as the window's inner diameter), so the grid error stays below that bound.  The
frequency cut-off of the last level is the alignment resolution; the first level uses
about 40 % of it (COARSE_RADIUS_FRACTION).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mpirefine.search.poses import SearchParams, SearchResult, prepare_reference, search_poses

COARSE_STEP_DEG = 15.0
MIN_STEP_DEG = 1.0
MIN_COARSE_RADIUS_PX = 6.0
COARSE_RADIUS_FRACTION = 0.4  # the first level's cut-off relative to the alignment resolution's
# Rotations each particle keeps between levels. At 15° the first level ranks the true
# cell among the best 8 for most particles but not for the faintest: on apoferritin
# (O, SNR 0.05) 8 left 9.8 % of the particles over 20° from the truth, 24 left 3.0 %,
# 32 2.05 % (RELION 1.65 %), for about 2.5× the search time (docs/refinement.md).
N_KEEP = 32


@dataclass(frozen=True)
class SearchPlan:
    params: SearchParams
    resolution_A: float

    relaxation: str = "none"

    @property
    def marginalize(self) -> bool:
        """Insert over posterior-weighted candidates (adaptive marginalization, or the
        symmetry copies of symmetry relaxation by marginalization)."""
        return self.params.marginalize or self.relaxation == "marginalization"


def plan_search(resolution_A: float, prep, cfg, marginalize: bool,
                relaxation: str = "none") -> SearchPlan:
    n, px = prep.box, prep.pixel_size_A
    final_radius = min(n * px / resolution_A, n // 2 - 1)
    coarse_radius = min(final_radius, max(MIN_COARSE_RADIUS_PX, COARSE_RADIUS_FRACTION * final_radius))
    diameter_A = prep.window_inner * n * px
    final_step = min(COARSE_STEP_DEG, max(MIN_STEP_DEG, 0.5 * math.degrees(resolution_A / diameter_A)))
    params = SearchParams(coarse_step_deg=COARSE_STEP_DEG, final_step_deg=final_step,
                          coarse_radius_px=coarse_radius, final_radius_px=final_radius,
                          shift_range_px=max(3.0, 0.1 * n), coarse_shift_step_px=2.0,
                          n_keep=N_KEEP, marginalize=marginalize,
                          chunk_size=cfg.image_batch_size)
    return SearchPlan(params=params, resolution_A=resolution_A, relaxation=relaxation)


def lattice_offsets(seed: int, iteration: int, half: int, shift_step_px: float):
    """The random (3, 3) grid rotation and (2,) shift-lattice offset of one half set in
    one iteration (see :func:`mpirefine.search.poses.search_poses`): a function of --seed,
    the iteration and the half only, never of the rank layout."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng([seed, iteration, half, 11])
    rotation = Rotation.random(random_state=rng).as_matrix()
    offset = rng.uniform(-0.5, 0.5, 2) * shift_step_px
    return rotation, offset


def search_reference(vft, plan: SearchPlan, lattice=None, symmetry=None,
                     relaxation: str = "none"):
    """The particle-independent part of the search for one reference, iteration and
    half set (global grid projections, first-level cache), shared by its chunks."""
    rotation, offset = lattice if lattice is not None else (None, None)
    relax = symmetry is not None and len(symmetry) > 1 and relaxation != "none"
    return prepare_reference(vft, plan.params, rotation, offset, None if relax else symmetry)


def run_search(vft, images_ft, ctf, noise, scale, plan: SearchPlan, lattice=None,
               symmetry=None, relaxation: str = "none", reference=None) -> SearchResult:
    """The search as the EM loop runs it.

    lattice: (grid rotation, shift offset) from :func:`lattice_offsets`, or None.
    symmetry: the (N, 3, 3) point group or None.  relaxation "none" searches one
    asymmetric unit (the symmetry is enforced at reconstruction); "maximization" and
    "marginalization" search all of SO(3), then choose among the symmetry-related
    copies of each pose (:mod:`mpirefine.search.symmetry`).  reference: from
    :func:`search_reference` with the same arguments, to share work between calls.
    """
    relax = symmetry is not None and len(symmetry) > 1 and relaxation != "none"
    if reference is None:
        reference = search_reference(vft, plan, lattice, symmetry, relaxation)
    scale = np.asarray(scale, float)
    result = search_poses(vft, images_ft, ctf, noise.sigma2, scale, plan.params,
                          reference=reference)
    if relax:
        from mpirefine.search.symmetry import relax_symmetry

        result = relax_symmetry(vft, images_ft, ctf, noise.sigma2, scale, result, symmetry,
                                plan.params, marginalize=relaxation == "marginalization")
    return result
