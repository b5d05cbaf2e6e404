"""The GSFSC that steers each iteration: masked, and corrected for its mask.

After every reconstruction the two unregularised half maps are compared under a
mask and the masked curve is corrected by phase randomisation (Chen et al. 2013;
postprocess/validation.iteration_fsc).  That corrected curve, not the unmasked one,
sets the iteration's resolution, and through it the references' filter, the
alignment resolution, the dynamic mask, the minibatch size and convergence.  The
unmasked curve is solvent-dominated: on a small particle in a large box it trails
the masked one by many ångströms, so a refinement steered by it stops early and
aligns to too low a frequency (docs/refinement.md).

The mask, in order of preference:

  static    the user's ``--mask``;
  dynamic   once the dynamic mask has started (``--dynamic-mask-start-resolution``),
            the mean of the two halves' dynamic masks of the previous iteration; once
            started it stays on, even if the resolution falls back;
  extent    before that, a soft sphere around the particle's extent in the initial
            reference (:func:`extent_mask`).

World rank 0 computes it (it holds both half maps) and broadcasts the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpirefine.backend import to_numpy
from mpirefine.geometry.spheres import radial_distance, soft_sphere
from mpirefine.postprocess.fsc import resolution_A
from mpirefine.postprocess.masks import threshold_core
from mpirefine.postprocess.validation import RANDOM_DRAWS, iteration_fsc


@dataclass(frozen=True)
class Steering:
    """One iteration's GSFSC (curves per shell 0 .. n // 2).

    fsc: the corrected masked curve that steers the job; masked: before correction;
    unmasked: the half maps as they are (kept in the outputs); mask: which mask
    ("static", "dynamic" or "extent"); regularisation: the corrected curve under the
    extent mask, whose SSNR regularises the half maps (see :func:`steering_fsc`)."""

    fsc: np.ndarray
    masked: np.ndarray
    unmasked: np.ndarray
    resolution_A: float
    unmasked_resolution_A: float
    mask: str
    randomize_shell: int
    regularisation: np.ndarray | None = None

    def record(self) -> dict:
        """The iteration's entry for summary.json's history."""
        return {"gsfsc_mask": self.mask,
                "resolution_unmasked_A": self.unmasked_resolution_A,
                "fsc_randomize_shell": self.randomize_shell,
                "fsc_corrected": np.round(self.fsc, 4).tolist(),
                "fsc_unmasked": np.round(self.unmasked, 4).tolist()}


def extent_mask(volume, pixel_size_A: float, resolution_A: float, threshold: float,
                near: float, far: float, outer_fraction: float = 0.99) -> np.ndarray:
    """A soft sphere (float32, (n, n, n)) around the particle in ``volume`` (the
    low-passed initial reference): the core is every voxel above ``threshold`` × the
    maximum, as for the dynamic mask; the sphere reaches the core's farthest voxel
    from the box centre plus ``near`` × resolution and falls to 0 with a raised cosine
    over a further (far - near) × resolution, and never beyond ``outer_fraction`` of
    half the box.  A volume with no positive core gives that outer sphere."""
    n = volume.shape[0]
    limit = outer_fraction * n / 2.0
    reach = core_reach_px(volume, threshold)
    reach = limit if reach is None else reach
    inner = min(reach + near * resolution_A / pixel_size_A, limit)
    width = max((far - near) * resolution_A / pixel_size_A, 1.0)
    outer = min(inner + width, limit)
    inner = min(inner, outer - 1.0)
    return soft_sphere(n, inner, outer - inner, np)


def core_reach_px(volume, threshold: float) -> float | None:
    """The distance (voxels) from the box centre of the farthest voxel above
    ``threshold`` × the maximum of ``volume``; None when no voxel is."""
    v = np.asarray(to_numpy(volume), np.float64)
    core = threshold_core(v, threshold)
    if not core.any():
        return None
    return float(radial_distance(v.shape[0], np).astype(np.float64)[core].max())


def particle_diameter_A(volume, pixel_size_A: float, threshold: float) -> float:
    """The particle's diameter (Å) in ``volume`` (a low-passed reference): twice the
    reach of its core (:func:`core_reach_px`) plus a voxel; the box when no core."""
    reach = core_reach_px(volume, threshold)
    n = volume.shape[0]
    return float(n * pixel_size_A if reach is None else min(2.0 * (reach + 1.0), n) * pixel_size_A)


def randomization_draws(n: int) -> int:
    """Phase-randomised copies averaged for the correction: 4 at box 64 (one draw moved
    the corrected 0.143 crossing by a shell there, enough to end a run early), fewer as
    the shells fill with voxels (their count grows as n²): 1 from box 128 on."""
    return max(1, round(RANDOM_DRAWS * (64.0 / n) ** 2))


def fsc_mask(job) -> tuple[np.ndarray, str]:
    """The mask of this iteration's GSFSC and its name (world rank 0)."""
    if job.static_mask is not None:
        return np.asarray(job.static_mask, np.float32), "static"
    if 0 in job.masks and 1 in job.masks:
        return 0.5 * (np.asarray(job.masks[0], np.float32) + np.asarray(job.masks[1], np.float32)), \
            "dynamic"
    return job.extent_mask, "extent"


def steering_fsc(job, half_maps: dict, iteration: int) -> Steering:
    """The GSFSC of the unregularised ``half_maps`` ({0: A, 1: B}, whole maps, world
    rank 0) under :func:`fsc_mask`, phase randomisation seeded by --seed and the
    iteration (so a restarted job repeats it).

    The regularisation's SSNR comes from the same correction under the extent mask
    (the particle's sphere, as RELION's comes from solvent-flattened half maps): the
    unmasked curve counts the solvent's noise as the particle's and over-smooths the
    maps (map vs truth FSC 0.5 at 7.28 Å instead of 6.89 Å on the apoferritin case,
    docs/refinement.md), while the tight dynamic mask's curve under-regularises them
    enough to break symmetry relaxation (the pseudo-C4 test fell from 7.6 to 13.7 Å).
    With symmetry relaxation the unmasked curve regularises: choosing among symmetry
    copies hangs on small asymmetric features, and even the extent mask's curve let
    noise decide (that test ended at 9.2 Å instead of 8.4 Å)."""
    n, px = job.prep.box, job.prep.pixel_size_A
    mask, kind = fsc_mask(job)
    relaxed = job.cfg.symmetry_relaxation != "none"
    others = ({} if relaxed or kind == "extent" or job.extent_mask is None
              else {"extent": job.extent_mask})
    curves = iteration_fsc(half_maps[0], half_maps[1], mask, seed=job.cfg.seed * 1000 + iteration,
                           draws=randomization_draws(n), others=others, xp=job.xp)
    fsc = np.maximum(np.asarray(curves.corrected, float), -1.0)
    regularisation = np.asarray(curves.also_corrected.get("extent", fsc), float)
    if relaxed:
        regularisation = np.asarray(curves.unmasked, float)
    return Steering(fsc=fsc, masked=np.asarray(curves.masked, float),
                    unmasked=np.asarray(curves.unmasked, float),
                    resolution_A=resolution_A(fsc, n, px),
                    unmasked_resolution_A=resolution_A(curves.unmasked, n, px),
                    mask=kind, randomize_shell=int(curves.randomize_shell),
                    regularisation=np.maximum(regularisation, -1.0))
