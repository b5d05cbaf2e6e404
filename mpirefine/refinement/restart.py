"""Checkpointing a running refinement and resuming it (``refine --continue DIR``).

:func:`save` turns the loop's state after an iteration into a
:class:`~mpirefine.refinement.checkpoint.Checkpoint` (world rank 0, which holds both half maps,
both next references and every particle's result).  :func:`resume` rebuilds a
:class:`~mpirefine.refinement.state.Job` from it on any number of ranks: the half roots read the
file, each broadcasts its half's reference (and mask) within its group, and rank 0
keeps the per-particle results, exactly as after a normal iteration.
"""

from __future__ import annotations

import numpy as np

from mpirefine.errors import InputError
from mpirefine.physics.noise import NoiseModel
from mpirefine.refinement import checkpoint
from mpirefine.refinement.state import Convergence, Job, ParticleState


def save(job: Job, iteration: int, rule: Convergence) -> str:
    """Write the state after ``iteration`` to the output folder (world rank 0 only)."""
    from dataclasses import asdict

    ckpt = checkpoint.Checkpoint(
        config=job.cfg.to_dict(), iteration=iteration, resolution_A=job.resolution_A,
        history=job.history, convergence=asdict(rule), greyscale_factor=job.greyscale_factor,
        half_maps=job.half_maps, regularised_maps=job.regularised_maps,
        references=job.next_references, fsc=job.fsc,
        noise_sigma2=job.noise.sigma2, particles=job.state.as_dict(), split=job.split,
        masks=job.masks)
    return checkpoint.save(job.cfg.out_dir, ckpt)


def resume(job: Job) -> tuple[Convergence, int]:
    """Overwrite what ``job.cfg.out_dir``'s checkpoint holds in a freshly built ``job``
    (:func:`mpirefine.refinement.refine.build_job`); returns (stopping rule, next iteration).

    Collective over ``job.par``'s ranks: the half roots read the file, each shares its
    half's reference (and mask) within its group, and rank 0 keeps the per-particle
    results, exactly as after a normal iteration.
    """
    cfg, par = job.cfg, job.par
    holds_file = any(par.is_half_root(h) for h in par.halves_here)
    ckpt = checkpoint.load(cfg.out_dir) if holds_file else None
    small = None
    if par.is_root:
        if len(ckpt.split) != len(job.particles):
            raise InputError(f"the checkpoint in {cfg.out_dir} is for {len(ckpt.split)} particles "
                             f"but {cfg.particles} has {len(job.particles)}; continue with the "
                             "same particles")
        small = {"iteration": ckpt.iteration, "resolution_A": ckpt.resolution_A,
                 "history": ckpt.history, "convergence": ckpt.convergence,
                 "greyscale_factor": ckpt.greyscale_factor, "noise_sigma2": ckpt.noise_sigma2,
                 "split": ckpt.split, "has_masks": bool(ckpt.masks)}
    small = par.bcast_obj(small, root=0)
    job.split = np.asarray(small["split"])
    job.noise = NoiseModel(np.asarray(small["noise_sigma2"], float))
    job.resolution_A = small["resolution_A"]
    job.history = list(small["history"])
    job.greyscale_factor = small["greyscale_factor"]
    fitted = [h["ctf_global"] for h in job.history if h.get("ctf_global")]
    if fitted:                        # --optimize-ctf-global: the latest fit goes on
        job.set_odd_aberrations({int(g): f["odd_zernike"] for g, f in fitted[-1].items()
                                 if f["pixels"]})
    mag = [h["ctf_anisomag"] for h in job.history if h.get("ctf_anisomag")]
    if mag:                           # --fit-anisomag: the latest matrices go on
        job.set_mag_matrices({**job.mag_matrices,
                              **{int(g): f["matrix"] for g, f in mag[-1].items()}})
    even = [h["ctf_even"] for h in job.history if h.get("ctf_even")]
    if even:                          # --fit-spherical-aberration / --fit-tetrafoil
        job.set_even_aberrations({int(g): f["even_zernike"] for g, f in even[-1].items()
                                  if f["even_pixels"]})
    if ckpt is not None:
        job.half_maps, job.regularised_maps = ckpt.half_maps, ckpt.regularised_maps
        job.fsc, job.next_references = ckpt.fsc, ckpt.references
        job.masks = dict(ckpt.masks)
        if par.is_root:
            job.state = ParticleState(**ckpt.particles)
    job.share_half_volumes(job.next_references or {}, job.masks, small["has_masks"])
    job.share_scales()
    if cfg.optimize_defocus:
        job.share_defocus()
    job.log.info(f"continuing {cfg.out_dir} after iteration {small['iteration']} "
                 f"(GSFSC {small['resolution_A']:.2f} Å)")
    return Convergence(**small["convergence"]), small["iteration"] + 1
