"""Checkpointing a running refinement and resuming it (``refine --continue DIR``).

:func:`save` turns the loop's state after an iteration into a
:class:`~mpirefine.checkpoint.Checkpoint` (world rank 0, which holds both half maps,
both next references and every particle's result).  :func:`resume` rebuilds a
:class:`~mpirefine.state.Job` from it on any number of ranks: the half roots read the
file, each broadcasts its half's reference (and mask) within its group, and rank 0
keeps the per-particle results, exactly as after a normal iteration.
"""

from __future__ import annotations

import numpy as np

from mpirefine import checkpoint
from mpirefine.geometry.symmetry import point_group
from mpirefine.physics.noise import NoiseModel
from mpirefine.state import Convergence, Job, ParticleState


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


def resume(cfg, par, log, inputs) -> tuple[Job, Convergence, int]:
    """(job, stopping rule, next iteration) from ``cfg.out_dir``'s checkpoint.

    ``inputs``: what :func:`mpirefine.refine.open_inputs` returned for ``cfg``.
    Collective over ``par``'s ranks.
    """
    xp, ps, _, static_mask, prep = inputs
    n = prep.box
    holds_file = any(par.is_half_root(h) for h in par.halves_here)
    ckpt = checkpoint.load(cfg.out_dir) if holds_file else None
    small = None
    if par.is_root:
        if len(ckpt.split) != len(ps):
            from mpirefine.errors import InputError

            raise InputError(f"the checkpoint in {cfg.out_dir} is for {len(ckpt.split)} particles "
                             f"but {cfg.particles} has {len(ps)}; continue with the same particles")
        small = {"iteration": ckpt.iteration, "resolution_A": ckpt.resolution_A,
                 "history": ckpt.history, "convergence": ckpt.convergence,
                 "greyscale_factor": ckpt.greyscale_factor, "noise_sigma2": ckpt.noise_sigma2,
                 "split": ckpt.split, "has_masks": bool(ckpt.masks)}
    small = par.bcast_obj(small, root=0)
    references, masks = {}, {}
    for half in par.halves_here:
        root = par.is_half_root(half)
        buf = (np.ascontiguousarray(ckpt.references[half], np.float32) if root
               else np.empty((n, n, n), np.float32))
        par.bcast_half(buf, half)
        references[half] = xp.asarray(buf)
        if small["has_masks"]:
            mbuf = (np.ascontiguousarray(ckpt.masks[half], np.float32) if root
                    else np.empty((n, n, n), np.float32))
            par.bcast_half(mbuf, half)
            masks[half] = mbuf
    state = ParticleState.empty(len(ps), np.ones(len(ps)))
    job = Job(cfg=cfg, par=par, xp=xp, particles=ps, split=np.asarray(small["split"]), prep=prep,
              references=references, noise=NoiseModel(np.asarray(small["noise_sigma2"], float)),
              state=state, static_mask=static_mask, resolution_A=small["resolution_A"], log=log,
              history=list(small["history"]), masks=masks,
              greyscale_factor=small["greyscale_factor"], symmetry=point_group(cfg.symmetry))
    if ckpt is not None:
        job.half_maps, job.regularised_maps = ckpt.half_maps, ckpt.regularised_maps
        job.fsc, job.next_references = ckpt.fsc, ckpt.references
        job.masks = dict(ckpt.masks) if ckpt.masks else masks
        if par.is_root:
            job.state = ParticleState(**ckpt.particles)
    rule = Convergence(**small["convergence"])
    log.info(f"continuing {cfg.out_dir} after iteration {small['iteration']} "
             f"(GSFSC {small['resolution_A']:.2f} Å)")
    return job, rule, small["iteration"] + 1
