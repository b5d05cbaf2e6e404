"""What a refinement carries from one iteration to the next, and its stopping rule.

:class:`Job` is the loop's state on one rank (references, noise model, masks,
resolution, history); :class:`ParticleState` the per-particle results that world
rank 0 collects; :class:`Convergence` the rule that ends the loop.  All three are
plain data, so a checkpoint (:mod:`mpirefine.refinement.checkpoint`) can hold them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mpirefine.config import RefineConfig
from mpirefine.physics.noise import NoiseModel
from mpirefine.refinement.images import ImagePrep


@dataclass
class ParticleState:
    """Per-particle results of the latest pass each particle took part in (host)."""

    rotations: np.ndarray         # (N, 3, 3)
    shifts_px: np.ndarray         # (N, 2) RELION origin in pixels
    scale: np.ndarray             # (N,)
    log_likelihood: np.ndarray    # (N,)
    aligned: np.ndarray           # (N,) bool
    defocus_change_A: np.ndarray | None = None   # (N,) added to defocus U and V (--optimize-defocus)

    FIELDS = ("rotations", "shifts_px", "scale", "log_likelihood", "aligned", "defocus_change_A")

    def __post_init__(self):
        if self.defocus_change_A is None:   # also a checkpoint written before the field existed
            self.defocus_change_A = np.zeros(len(self.scale))

    @classmethod
    def empty(cls, n: int, scale) -> "ParticleState":
        return cls(np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 2)), np.asarray(scale, float).copy(),
                   np.full(n, -np.inf), np.zeros(n, bool))

    def update(self, idx, rotations, shifts_px, scale, log_likelihood, defocus_change_A=None) -> None:
        self.rotations[idx] = rotations
        self.shifts_px[idx] = shifts_px
        self.scale[idx] = scale
        self.log_likelihood[idx] = log_likelihood
        self.aligned[idx] = True
        if defocus_change_A is not None:
            self.defocus_change_A[idx] = defocus_change_A

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}


@dataclass
class Job:
    """What the loop carries from one iteration to the next."""

    cfg: RefineConfig
    par: object
    xp: object
    particles: object
    split: np.ndarray
    prep: ImagePrep
    references: dict                  # half → (n, n, n) reference on this rank (xp)
    noise: NoiseModel
    state: ParticleState
    static_mask: np.ndarray | None
    resolution_A: float
    log: object
    history: list = field(default_factory=list)
    masks: dict = field(default_factory=dict)
    fsc: np.ndarray | None = None
    half_maps: dict | None = None          # unregularised pair, on the root pair
    regularised_maps: dict | None = None   # the same with SSNR regularisation
    next_references: dict | None = None   # both halves' references, on the root pair
    greyscale_factor: float = 1.0
    symmetry: np.ndarray | None = None    # (N, 3, 3) point group of the job
    symmetry_alignment: dict | None = None  # how the input volume was turned onto the axes
    extent_mask: np.ndarray | None = None  # GSFSC mask before the dynamic mask (world rank 0)
    ewald: object = None                   # EwaldCorrection (physics/ewald.py) or None
    steering: object = None               # the latest iteration's GSFSC (refinement/gsfsc.py)
    full_map: np.ndarray | None = None     # the last iteration's map of all particles (rank 0)
    # optics group → (6,) odd Zernike coefficients (beam tilt, trefoil; physics/aberrations.py)
    odd_aberrations: dict = field(default_factory=dict)
    _demodulation: object = None           # GroupDemodulation of the current coefficients
    odd_sums: dict | None = None           # this iteration's per-group fit sums (refine.add_odd_sums)
    # optics group → (9,) even Zernike coefficients (spherical aberration, tetrafoil, ...)
    even_aberrations: dict = field(default_factory=dict)
    even_sums: dict | None = None          # this iteration's per-group even-fit sums (refine.add_even_sums)
    even_pending: bool = False             # the next full pass collects the even fit's sums
    _even_phase: dict = field(default_factory=dict)   # box → GroupEvenPhase of the coefficients
    # optics group → (2, 2) magnification matrix M the images are undistorted by as they
    # are read (physics/anisomag.py); updated in place, so the open image source sees it
    mag_matrices: dict = field(default_factory=dict)
    mag_sums: dict | None = None           # this iteration's per-group sums (refine.add_mag_sums)

    @property
    def enforce_symmetry(self) -> bool:
        """Symmetry imposed at reconstruction (relaxation \"none\" and N > 1)."""
        return (self.symmetry is not None and len(self.symmetry) > 1
                and self.cfg.symmetry_relaxation == "none")

    def share_half_volumes(self, references: dict, masks: dict, has_masks: bool) -> None:
        """Each half root's next reference (and mask, with ``has_masks``) to every rank
        of its half group.  ``references`` / ``masks``: half → (n, n, n) array, read on
        the half roots only.  Collective over each half group."""
        n = self.prep.box
        for half in self.par.halves_here:
            root = self.par.is_half_root(half)
            self.references[half] = self.xp.asarray(
                _bcast_volume(self.par, half, references[half] if root else None, n))
            if has_masks:
                self.masks[half] = _bcast_volume(self.par, half, masks[half] if root else None, n)
            else:
                self.masks.pop(half, None)

    def share_scales(self) -> None:
        """World rank 0's per-particle scales to every rank, so that a particle's next
        search and insertion use its latest scale on whichever rank serves it."""
        scale = self.par.bcast_obj(self.state.scale if self.par.is_root else None, root=0)
        self.state.scale[:] = scale

    def share_defocus(self) -> None:
        """World rank 0's per-particle defocus changes to every rank (--optimize-defocus)."""
        change = self.par.bcast_obj(self.state.defocus_change_A if self.par.is_root else None, root=0)
        self.state.defocus_change_A[:] = change

    def ctf_params(self, idx):
        """CTF parameters of particles ``idx`` with their refined defocus."""
        params = self.particles.ctf.subset(idx)
        change = self.state.defocus_change_A[idx]
        if not np.any(change):
            return params
        return params.with_defocus_offset(change)

    def refines_defocus(self) -> bool:
        """--optimize-defocus, once the GSFSC is finer than its start resolution."""
        return (self.cfg.optimize_defocus
                and self.resolution_A <= self.cfg.defocus_start_resolution_A)

    def refines_ctf_global(self) -> bool:
        """--optimize-ctf-global, once the GSFSC is finer than its start resolution."""
        return (self.cfg.optimize_ctf_global
                and self.resolution_A <= self.cfg.ctf_start_resolution_A)

    def fits_odd(self) -> bool:
        """This iteration fits beam tilt or trefoil (refine.fit_ctf_global)."""
        return self.refines_ctf_global() and (self.cfg.ctf_fit_tilt or self.cfg.ctf_fit_trefoil)

    def fits_mag(self) -> bool:
        """This iteration fits the magnification matrices (--fit-anisomag)."""
        return self.refines_ctf_global() and self.cfg.ctf_fit_anisomag

    def set_mag_matrices(self, matrices: dict) -> None:
        """New matrices, in the same dict (the open image source reads it per batch)."""
        new = {int(g): np.asarray(m, float).reshape(2, 2) for g, m in matrices.items()}
        self.mag_matrices.clear()
        self.mag_matrices.update(new)

    def wants_even_fit(self) -> bool:
        """--fit-spherical-aberration or --fit-tetrafoil asked for and not yet done."""
        return (self.cfg.optimize_ctf_global
                and (self.cfg.ctf_fit_spherical or self.cfg.ctf_fit_tetrafoil)
                and not any(h.get("ctf_even") for h in self.history))

    def opposite_references(self) -> dict:
        """half → the *other* half's reference (on xp), on every rank; collective.  The
        --optimize-ctf-global sums compare each particle with the map it did not help
        build: with its own half's map, each image meets its own (already demodulated)
        contribution there, which pulls the fit towards the correction in use (measured:
        beam tilt stuck at −0.25 for a true −0.6 mrad, 300 particles per half).
        relion_ctf_refine 3.1 predicts from the opposite half too."""
        from mpirefine.backend import to_numpy

        out = {}
        for h in (0, 1):
            root = self.par.half_root_world_rank(h)
            mine = self.par.rank == root and h in self.references
            vol = self.par.bcast_obj(to_numpy(self.references[h]) if mine else None, root=root)
            out[1 - h] = self.xp.asarray(vol)
        return out

    def opposite_half_maps(self) -> dict:
        """half → the *other* half's last unregularised half map (on xp), on every rank;
        collective.  The even fit's reference: unfiltered, so that its noise is the
        (1 − FSC) share the fit's noise correction assumes (the next references are
        FSC-weighted)."""
        from mpirefine.backend import to_numpy

        maps = self.par.bcast_obj({h: to_numpy(v) for h, v in self.half_maps.items()}
                                  if self.par.is_root else None, root=0)
        return {1 - h: self.xp.asarray(maps[h]) for h in (0, 1)}

    def set_odd_aberrations(self, coefficients: dict) -> None:
        self.odd_aberrations = {int(g): np.asarray(c, float) for g, c in coefficients.items()}
        self._demodulation = None

    def set_even_aberrations(self, coefficients: dict) -> None:
        self.even_aberrations = {int(g): np.asarray(c, float) for g, c in coefficients.items()}
        self._even_phase = {}

    def ctf_grid(self, idx, params, grid=None, freq_shift=(0.0, 0.0), prep=None):
        """The CTFs of particles ``idx`` with ``params`` (their current CTF parameters),
        their optics groups' even aberrations added to γ (refinement/images.py ctf_grid),
        on the job's grid or on ``prep``'s (the magnification fit's double box)."""
        from mpirefine.refinement.images import ctf_grid

        prep = self.prep if prep is None else prep
        return ctf_grid(params, prep, self.xp, grid, self.even_offsets(idx, prep.box), freq_shift)

    def even_offsets(self, idx, box=None):
        """(B, n, n // 2 + 1) even-aberration phases of particles ``idx`` on the job's
        grid (or a ``box`` of the same pixel size), or None."""
        if not self.even_aberrations:
            return None
        box = self.prep.box if box is None else box
        if box not in self._even_phase:
            from mpirefine.physics.aberrations import GroupEvenPhase

            self._even_phase[box] = GroupEvenPhase(self.even_aberrations, box,
                                                   self.prep.pixel_size_A, self.xp)
        return self._even_phase[box](np.asarray(self.particles.optics_group)[idx])

    def demodulate(self, idx, *images):
        """Each particle's image transforms × exp(−i φ) of its optics group's odd
        aberrations (the same arrays when there are none)."""
        if not self.odd_aberrations:
            return images if len(images) > 1 else images[0]
        if self._demodulation is None:
            from mpirefine.physics.aberrations import GroupDemodulation

            self._demodulation = GroupDemodulation(self.odd_aberrations, self.prep.box,
                                                   self.prep.pixel_size_A, self.xp)
        out = self._demodulation(np.asarray(self.particles.optics_group)[idx], *images)
        return out if len(out) > 1 else out[0]

    def alignment_resolution_A(self) -> float:
        """The current resolution, capped by --max-align-resolution when given."""
        cap = self.cfg.max_align_resolution_A
        return max(self.resolution_A, cap) if cap else self.resolution_A


def _bcast_volume(par, half: int, volume, n: int) -> np.ndarray:
    """``volume`` (on the half root) as float32 on every rank of the half group."""
    buf = (np.ascontiguousarray(volume, np.float32) if par.is_half_root(half)
           else np.empty((n, n, n), np.float32))
    par.bcast_half(buf, half)
    return buf


@dataclass
class Convergence:
    """The stopping rule, as CryoSPARC runs it on stacks of any size.

    Minibatch iterations run while the GSFSC resolution improves on the best so far
    (by more than 0.1 %); the first one that does not switches the job to full passes
    for good (so does a minibatch that already holds every particle).  Convergence is
    judged on full passes only: the first full pass that does not improve on the best
    resolution so far ends the refinement, after ``extra_passes`` more full passes.
    The last iterations therefore always align every particle.
    """

    extra_passes: int
    best_A: float = math.inf           # best resolution of any iteration
    full_passes: bool = False          # minibatches are over
    converged: bool = False
    remaining: int = 0

    def update(self, resolution_A: float, full_pass: bool) -> bool:
        """Record an iteration; True when the refinement should stop."""
        improved = resolution_A < self.best_A * (1 - 1e-3)
        self.best_A = min(self.best_A, resolution_A)
        if not full_pass:
            if not improved:
                self.full_passes = True
            return False
        self.full_passes = True
        if self.converged:
            self.remaining -= 1
        elif not improved:
            self.converged = True
            self.remaining = self.extra_passes
        return self.converged and self.remaining <= 0
