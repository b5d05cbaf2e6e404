"""Comparing a refinement with a known truth (simulated data): map FSC and pose errors."""

from __future__ import annotations

import numpy as np

from mpirefine.geometry.rotations import angular_distance_deg
from mpirefine.geometry.symmetry import point_group
from mpirefine.postprocess.fsc import fsc_curve, resolution_A


def octahedral_group() -> np.ndarray:
    """The 24 rotations of O with 4-folds on X, Y, Z (alias of point_group("O"))."""
    return point_group("O")


def pose_errors_deg(estimated, true, group=None) -> np.ndarray:
    """Angle between estimated and true RELION matrices for each particle, the
    smallest over the map's symmetry operators g (poses A and A·g give the same
    projection of a g-invariant map)."""
    est = np.asarray(estimated, float).reshape(-1, 3, 3)
    tru = np.asarray(true, float).reshape(-1, 3, 3)
    if group is None:
        return angular_distance_deg(est, tru)
    errs = [angular_distance_deg(est, tru @ g) for g in np.asarray(group)]
    return np.min(errs, axis=0)


def compare_with_truth(map_, truth, pixel_size_A: float) -> dict:
    """FSC of a map against the truth and where it crosses 0.5 and 0.143."""
    curve = fsc_curve(np.asarray(map_), np.asarray(truth))
    n = truth.shape[0]
    return {"fsc_vs_truth": curve,
            "resolution_A_05": resolution_A(curve, n, pixel_size_A, 0.5),
            "resolution_A_0143": resolution_A(curve, n, pixel_size_A, 0.143)}
