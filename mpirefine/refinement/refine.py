"""Homogeneous refinement: the expectation-maximisation loop.

    prepare   read particles and the initial volume, split half sets, low-pass the
              reference, initial noise model, re-estimate the greyscale
    iterate   choose a minibatch → global pose search of each particle against its
              half's reference → backproject into the half-set accumulators →
              reduce, reconstruct half maps, GSFSC → average the halves below the
              split resolution → new noise model → FSC-filtered, masked references
    stop      after the first full pass whose GSFSC resolution does not improve,
              plus the requested extra final passes
    finish    maps, masks, FSC, particles with poses, summary

Ranks: see docs/architecture.md §1 and parallel.py.  Every rank runs this same code; the root
pair (world ranks 0 and 1, or rank 0 alone) does the per-iteration map work.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import threading
import time

import numpy as np

from mpirefine.backend import backend_name, to_numpy
from mpirefine.config import RefineConfig
from mpirefine.errors import InputError
from mpirefine.fourier import compiled
from mpirefine.fourier.backproject import Accumulator
from mpirefine.fourier.filters import lowpass
from mpirefine.fourier.project import volume_ft
from mpirefine.geometry.symmetry import point_group
from mpirefine.io import read_particles, read_volume
from mpirefine.physics.aberrations import input_even_aberrations, input_odd_aberrations
from mpirefine.physics.anisomag import input_mag_matrices
from mpirefine.physics.ewald import EwaldCorrection
from mpirefine.physics.noise import NoiseModel, model_from_sums, residual_power_sums, shell_power_sums
from mpirefine.postprocess.fsc import crossing_shell
from mpirefine.postprocess.masks import dynamic_mask
from mpirefine.ranks import shard_bounds
from mpirefine.refinement import restart
from mpirefine.refinement.batching import auto_minibatch_size, choose_minibatch, random_split
from mpirefine.refinement.gsfsc import extent_mask, particle_diameter_A, steering_fsc
from mpirefine.refinement.halfmaps import (
    PAD,
    HalfMapReduction,
    SlabHalfMaps,
    gather_rows,
    gather_to_rank0,
    insert_particles,
    rank_share,
    reconstruct_root_pair,
    reconstruct_slabs,
    slab_masks,
    slab_references,
)
from mpirefine.refinement.images import ImagePrep, ewald_sidebands, open_images, prepare_images
from mpirefine.refinement.references import next_references
from mpirefine.refinement.state import Convergence, Job, ParticleState
from mpirefine.search.defocus import search_defocus
from mpirefine.search.plan import lattice_offsets, plan_search, run_search, search_reference

# ----------------------------------------------------------------------------- prepare

def open_inputs(cfg: RefineConfig, par):
    """Device, particles, initial volume, static mask and image preparation, checked
    against each other.  Returns (xp, particles, volume, static_mask, prep)."""
    xp = par.select_device(cfg.device)
    ps = read_particles(cfg.particles, project_dir=cfg.project_dir, box=cfg.box_px,
                        pixel_size_A=cfg.pixel_size_A)
    volume, vol_px = read_volume(cfg.volume)
    n, px = ps.box, ps.pixel_size_A
    if volume.shape[0] != n:
        raise InputError(f"initial volume {cfg.volume} has box {volume.shape[0]} but the particles "
                         f"in {cfg.particles} have box {n}; resample the volume to {n} px")
    if vol_px and abs(vol_px - px) > 0.01 * px:
        raise InputError(f"initial volume {cfg.volume} has pixel size {vol_px:.4f} Å but the "
                         f"particles have {px:.4f} Å; resample the volume to the particles' pixel size")
    static_mask = None
    if cfg.mask:
        static_mask, _ = read_volume(cfg.mask)
        if static_mask.shape != volume.shape:
            raise InputError(f"mask {cfg.mask} has box {static_mask.shape[0]}, the volume has {n}; "
                             "use a mask made for this box")
        if static_mask.min() < -1e-3 or static_mask.max() > 1 + 1e-3:
            raise InputError(f"mask {cfg.mask} has values outside [0, 1]; give a soft mask")
        if static_mask.max() <= 0:
            # An empty mask would zero every reference and the search would score noise.
            raise InputError(f"mask {cfg.mask} is empty (no voxel above 0); give a mask that "
                             "is 1 over the particle")
    prep = ImagePrep(box=n, pixel_size_A=px, window=cfg.window,
                     window_inner=cfg.window_inner, window_outer=cfg.window_outer)
    return xp, ps, volume, static_mask, prep


def build_job(cfg: RefineConfig, par, log) -> Job:
    """The job as its inputs and options define it, before any iteration: the one
    place a :class:`Job` is made (``--continue`` then overwrites what the checkpoint
    holds, :func:`mpirefine.refinement.restart.resume`).  Collective over ``par``'s ranks."""
    xp, ps, volume, static_mask, prep = open_inputs(cfg, par)
    group = point_group(cfg.symmetry)
    alignment = None
    if len(group) > 1 and cfg.symmetry_alignment:
        volume, static_mask, alignment = align_input_volume(cfg, par, log, volume, static_mask,
                                                            prep.pixel_size_A)
    split = ps.split.copy() if np.all(ps.split >= 0) else random_split(len(ps), cfg.seed)
    scale = np.ones(len(ps)) if cfg.reset_scale else ps.scale.copy()
    reference = lowpass(xp.asarray(volume), cfg.initial_lowpass_A, prep.pixel_size_A)
    extent = None
    if par.is_root and static_mask is None:
        extent = extent_mask(reference, prep.pixel_size_A, cfg.initial_lowpass_A,
                             cfg.dynamic_mask_threshold, cfg.dynamic_mask_near,
                             cfg.dynamic_mask_far, cfg.window_outer)
    job = Job(cfg=cfg, par=par, xp=xp, particles=ps, split=split, prep=prep,
              references={h: reference for h in (0, 1)}, noise=NoiseModel.constant(1.0, prep.box),
              state=ParticleState.empty(len(ps), scale), static_mask=static_mask,
              resolution_A=cfg.initial_lowpass_A, log=log, symmetry=group,
              symmetry_alignment=alignment, extent_mask=extent)
    if cfg.ewald_correction:
        diameter = cfg.particle_diameter_A or particle_diameter_A(
            reference, prep.pixel_size_A, cfg.dynamic_mask_threshold)
        job.ewald = EwaldCorrection(cfg.ewald_curvature or "negative", diameter)
        log.info(f"Ewald sphere correction: {job.ewald.curvature} curvature, side bands "
                 f"separated by a {diameter:.0f} Å disc"
                 + ("" if cfg.particle_diameter_A else " (the initial volume's extent)"))
    odd = input_odd_aberrations(ps)
    if odd:
        job.set_odd_aberrations(odd)
        log.info(f"odd aberrations (beam tilt, trefoil) of optics group(s) {sorted(odd)} from "
                 f"{cfg.particles} are applied to their images")
    even = input_even_aberrations(ps)
    if even:
        job.set_even_aberrations(even)
        log.info(f"even aberrations (rlnEvenZernike) of optics group(s) {sorted(even)} from "
                 f"{cfg.particles} are applied to their CTFs")
    mag = input_mag_matrices(ps)
    job.set_mag_matrices(mag)
    if mag:
        log.info(f"magnification matrices (rlnMagMat00..11) of optics group(s) {sorted(mag)} from "
                 f"{cfg.particles}: their images are undistorted as they are read")
    return job


def prepare(cfg: RefineConfig, par, log) -> Job:
    """A new job: the initial noise model and, when asked, the reference's greyscale."""
    job = build_job(cfg, par, log)
    job.noise = initial_noise_model(job)
    if cfg.reestimate_greyscale:
        job.greyscale_factor = estimate_greyscale(job)
        job.references = {h: r * job.greyscale_factor for h, r in job.references.items()}
    return job


def align_input_volume(cfg: RefineConfig, par, log, volume, static_mask, px: float):
    """Turn and shift the input volume (and a static mask with it) so that its
    symmetry axes lie on the convention's axes (--symmetry-alignment).  Found on rank
    0 and broadcast, so every rank applies the same transform."""
    from mpirefine.geometry.symmetry_align import align_symmetry_axes, apply_alignment

    found = align_symmetry_axes(volume, cfg.symmetry, px) if par.is_root else None
    rotation, shift_A, score = par.bcast_obj(found, root=0)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))
    log.info(f"symmetry alignment ({cfg.symmetry}): input volume turned by {angle:.2f}° and "
             f"shifted by ({', '.join(f'{v:.2f}' for v in shift_A)}) Å; symmetry score {score:.3f}")
    volume = apply_alignment(volume, rotation, shift_A, px)
    if static_mask is not None:
        static_mask = np.clip(apply_alignment(static_mask, rotation, shift_A, px, order=1), 0, 1)
    info = {"rotation": np.asarray(rotation).tolist(), "angle_deg": angle,
            "shift_A": np.asarray(shift_A).tolist(), "symmetry_score": float(score)}
    return volume, static_mask, info


def _sample(n: int, count: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng([seed, 7]).choice(n, size=min(n, count), replace=False))


def initial_noise_model(job: Job, n_images: int = 1000) -> NoiseModel:
    """White (or, when asked, per-shell) noise level from the images' own power.

    At the start the images are almost all noise, so their mean power per shell is a
    fair first noise estimate; the residual-based update replaces it after the
    first iteration."""
    par, ps, xp = job.par, job.particles, job.xp
    sample = _sample(len(ps), n_images, job.cfg.seed)
    mine = sample[shard_bounds(len(sample), par.rank, par.size)]
    n = ps.box
    sums = np.zeros(n // 2 + 1)
    counts = np.zeros(n // 2 + 1)
    with open_images(ps, job.mag_matrices) as source:
        for idx, images in source.batches(mine, job.cfg.image_batch_size):
            s, c = shell_power_sums(prepare_images(images, job.prep, xp, ps.image_grid(idx)), n)
            sums += s
            counts += c
    sums = par.allreduce_obj(sums)
    counts = par.allreduce_obj(counts)
    return model_from_sums(sums, counts, constant=not job.cfg.noise_from_images)


def estimate_greyscale(job: Job, n_images: int = 300) -> float:
    """Factor that brings the reference's greyscale to the particles': the median of
    the particles' optimal scales at their best poses against the low-passed
    reference (two rounds, since the search itself depends on the scale)."""
    par, ps, xp = job.par, job.particles, job.xp
    sample = _sample(len(ps), n_images, job.cfg.seed + 1)
    mine = sample[shard_bounds(len(sample), par.rank, par.size)]
    factor = 1.0
    plan = plan_search(job.resolution_A, job.prep, job.cfg, marginalize=False)
    for _ in range(2):
        vft = volume_ft(job.references[0] * factor, pad=PAD)
        scales = []
        with open_images(ps, job.mag_matrices) as source:
            for idx, images in source.batches(mine, job.cfg.image_batch_size):
                f = job.demodulate(idx, prepare_images(images, job.prep, xp, ps.image_grid(idx)))
                c = job.ctf_grid(idx, ps.ctf.subset(idx), ps.image_grid(idx))
                res = run_search(vft, f, c, job.noise, np.ones(len(idx)), plan)
                scales.append(np.asarray(res.optimal_scale))
        scales = np.concatenate(scales) if scales else np.zeros(0)
        gathered = par.allgather_obj(scales)
        allscales = np.concatenate(gathered)
        good = allscales[np.isfinite(allscales) & (allscales > 0)]
        if len(good) == 0:
            raise InputError(f"the initial volume {job.cfg.volume} does not correlate positively "
                             f"with the particles in {job.cfg.particles}; check the volume's "
                             "contrast (white protein on black) and the CTF parameters")
        factor *= float(np.median(good))
    job.log.info(f"greyscale of the input reference re-estimated: ×{factor:.4g}")
    return factor


# ----------------------------------------------------------------------------- iterate

def minibatch_for_iteration(job: Job, iteration: int, force_full: bool) -> np.ndarray:
    n_total = len(job.particles)
    if force_full or job.cfg.disable_auto_batchsize:
        return np.arange(n_total)
    radius = job.prep.box * job.prep.pixel_size_A / job.resolution_A
    order = len(job.symmetry) if job.enforce_symmetry else 1
    size = auto_minibatch_size(radius, job.cfg.batchsize_epsilon, job.cfg.batchsize_snrfactor, order)
    return choose_minibatch(n_total, size, job.cfg.seed, iteration)


def align_and_backproject(job: Job, minibatch: np.ndarray, iteration: int, timer,
                          on_accumulator=None, source=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Search every particle of this rank's share of the minibatch against its half's
    reference and insert it; returns (accumulators, noise power sums, counts).

    on_accumulator(half, acc): called as soon as a half's accumulator is complete (the
    hook that starts its reduction, :class:`HalfMapReduction`; it may wait there for the
    other ranks once every half is done).  source: the job's open image source
    (:func:`open_images`), kept across iterations so that it can read ahead; one is
    opened for this call when None."""
    par, ps, xp, cfg = job.par, job.particles, job.xp, job.cfg
    n = ps.box
    plan = plan_search(job.alignment_resolution_A(), job.prep, cfg,
                       marginalize=cfg.adaptive_marginalization,
                       relaxation=cfg.symmetry_relaxation)
    weights = job.noise.pixel_weights(n, xp)
    defocus = job.refines_defocus()
    # --optimize-ctf-global: per optics group, Σ c conj(aP) X and Σ c² |aP|² per pixel
    job.odd_sums = {} if job.fits_odd() else None
    # --fit-spherical-aberration / --fit-tetrafoil: once, on the pass after convergence
    job.even_sums = {} if job.even_pending else None
    # --fit-anisomag: per optics group, the magnification fit's per-pixel sums
    job.mag_sums = {} if job.fits_mag() else None
    fit_refs = (job.opposite_references()
                if job.odd_sums is not None or job.mag_sums is not None else None)
    even_refs = job.opposite_half_maps() if job.even_sums is not None else None
    accs, results = {}, []
    power = np.zeros(n // 2 + 1)
    counts = np.zeros(n // 2 + 1)
    with contextlib.ExitStack() as stack:
        if source is None:
            source = stack.enter_context(open_images(ps, job.mag_matrices))
        for half, mine in rank_share(par, job.split, minibatch):
            acc = Accumulator.zeros(n, PAD, xp)
            ref = job.references[half]
            if job.static_mask is not None:
                ref = ref * xp.asarray(job.static_mask)
            elif half in job.masks:
                ref = ref * xp.asarray(job.masks[half])
            vft = volume_ft(ref, pad=PAD)
            lattice = lattice_offsets(cfg.seed, iteration, half, plan.params.coarse_shift_step_px)
            shared = search_reference(vft, plan, lattice, job.symmetry, cfg.symmetry_relaxation)
            fit_vft = volume_ft(fit_refs[half], pad=PAD) if fit_refs is not None else None
            even_vft = volume_ft(even_refs[half], pad=PAD) if even_refs is not None else None
            batches = source.batches(mine, cfg.image_batch_size)
            while True:
                with timer("reading"):  # waiting for images, which are read one batch ahead
                    batch = next(batches, None)
                if batch is None:
                    break
                idx, images = batch
                with timer("preparation"):
                    grid = ps.image_grid(idx)
                    windowed, plain = prepare_images(images, job.prep, xp, grid, unwindowed=True)
                    f, f_insert = job.demodulate(idx, windowed, plain)
                    params = job.ctf_params(idx)
                    c = job.ctf_grid(idx, params, grid)
                with timer("search"):
                    res = run_search(vft, f, c, job.noise, job.state.scale[idx], plan, lattice,
                                     job.symmetry, cfg.symmetry_relaxation, shared)
                timer.count("search_poses_scored", res.stats.poses_scored)
                timer.count("search_gemm_flops", res.stats.gemm_flops)
                scale = np.clip(res.optimal_scale, 0.05, 20.0) if cfg.minimize_scale else job.state.scale[idx]
                change = job.state.defocus_change_A[idx]
                if defocus:
                    with timer("defocus"):
                        delta = search_defocus(
                            vft, f_insert, params, res.rotations, res.shifts_px, scale, weights,
                            np.full(len(idx), job.prep.pixel_size_A) if grid is None
                            else grid.effective_pixel_size_A(),
                            cfg.defocus_min_resolution_A, job.resolution_A, cfg.defocus_search_range_A,
                            job.even_offsets(idx))
                        change = change + delta
                        params = params.with_defocus_offset(delta)
                        c = job.ctf_grid(idx, params, grid)
                with timer("backprojection"):
                    sidebands = None if job.ewald is None else ewald_sidebands(
                        job.ewald, params, job.prep, xp, grid, job.even_offsets(idx))
                    if plan.marginalize:
                        insert_particles(acc, f_insert, c, weights, res.candidate_rotations,
                                         res.candidate_shifts_px, scale, res.posterior, sidebands)
                    else:
                        insert_particles(acc, f_insert, c, weights, res.rotations, res.shifts_px,
                                         scale, ewald=sidebands)
                    p, k = residual_power_sums(vft, f, c, res.rotations, res.shifts_px, scale)
                    power += p
                    counts += k
                if job.odd_sums is not None:
                    with timer("ctf_global"):
                        add_odd_sums(job, fit_vft, idx, plain, c, res, scale)
                if job.even_sums is not None:
                    with timer("ctf_global"):
                        add_even_sums(job, even_vft, idx, f_insert, params, res, scale)
                if job.mag_sums is not None:
                    with timer("ctf_global"):
                        add_mag_sums(job, fit_vft, idx, f_insert, params, grid, res, scale)
                results.append((idx, res.rotations, res.shifts_px, scale, res.log_likelihood, change))
            accs[half] = acc
            if on_accumulator is not None:
                on_accumulator(half, acc)
    collect_particle_results(job, results)
    return accs, power, counts


def writable_optics(ps, what: str, log=None):
    """A copy of the particle set's RELION optics table for fitted values to go in, or
    None (and a warning that ``what`` in summary.json only) for an input without one."""
    if ps._star_optics is None:
        if log is not None:
            log.warning(f"{what} in summary.json only: the input has no RELION optics table "
                        "to carry them (write a STAR input)")
        return None
    return ps._star_optics.copy()


def with_odd_aberrations(ps, coefficients: dict, log=None):
    """The particle set with its optics table carrying the fitted odd aberrations, as
    relion_ctf_refine writes them: rlnBeamTiltX/Y (mrad) and rlnOddZernike (what is left
    once the tilt is taken out: shift and trefoil)."""
    from mpirefine.physics.aberrations import format_zernike, zernike_to_tilt
    from mpirefine.physics.ctf import electron_wavelength_A

    optics = writable_optics(ps, "the fitted beam tilt and trefoil are", log)
    if optics is None:
        return ps
    for column in ("rlnBeamTiltX", "rlnBeamTiltY"):
        if column not in optics.columns:
            optics[column] = 0.0
    if "rlnOddZernike" not in optics.columns:
        optics["rlnOddZernike"] = format_zernike(np.zeros(6))
    optics["rlnOddZernike"] = optics["rlnOddZernike"].astype(object)
    for i, row in optics.iterrows():
        g = int(row["rlnOpticsGroup"])
        if g not in coefficients:
            continue
        tx, ty, rest = zernike_to_tilt(coefficients[g], float(row["rlnSphericalAberration"]),
                                       float(electron_wavelength_A(float(row["rlnVoltage"]))))
        optics.at[i, "rlnBeamTiltX"] = tx
        optics.at[i, "rlnBeamTiltY"] = ty
        optics.at[i, "rlnOddZernike"] = format_zernike(rest)
    return dataclasses.replace(ps, _star_optics=optics)


def add_odd_sums(job: Job, vft, idx, raw, c, res, scale) -> None:
    """Add a batch to each optics group's odd-aberration sums (the images as they were
    recorded: not demodulated, so the fit gives the group's whole odd phase, and not
    windowed: the window mixes the phases of neighbouring frequencies, which moved the
    fitted tilt by 0.2 mrad and the shift terms far off at the true poses)."""
    from mpirefine.physics.aberrations import odd_aberration_sums

    groups = np.asarray(job.particles.optics_group)[idx]
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        on = job.xp.asarray(rows)
        xy, w = odd_aberration_sums(vft, raw[on], c[on], res.rotations[rows],
                                    res.shifts_px[rows], np.asarray(scale)[rows])
        old = job.odd_sums.get(int(g))
        job.odd_sums[int(g)] = (xy, w) if old is None else (old[0] + xy, old[1] + w)


def add_mag_sums(job: Job, vft, idx, images, params, grid, res, scale) -> None:
    """Add a batch to each optics group's magnification sums (physics/anisomag.py
    magnification_sums): the undistorted images, demodulated of the odd terms and
    unwindowed, against the other half's reference, with their CTFs (even terms
    included) on the double box the predictions are made in."""
    from mpirefine.physics.anisomag import magnification_sums
    from mpirefine.refinement.images import ImagePrep

    xp = job.xp
    double = ImagePrep(box=2 * job.prep.box, pixel_size_A=job.prep.pixel_size_A)
    idx = np.asarray(idx)
    groups = np.asarray(job.particles.optics_group)[idx]
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)

        def ctf_at(sub, dx, dy, rows=rows):
            picked = rows[sub]
            # shifts in cycles of the double box, twice those of the n-box
            return job.ctf_grid(idx[picked], params.subset(picked),
                                None if grid is None else grid.subset(picked),
                                (2.0 * dx, 2.0 * dy), double)

        sums = magnification_sums(vft, images[xp.asarray(rows)], ctf_at, res.rotations[rows],
                                  res.shifts_px[rows], np.asarray(scale)[rows])
        old = job.mag_sums.get(int(g))
        job.mag_sums[int(g)] = sums if old is None else tuple(a + b for a, b in zip(old, sums))


def fit_mag_global(job: Job, iteration: int) -> dict | None:
    """--fit-anisomag after an iteration: every rank's sums summed, each optics group's
    correction I + G fitted on world rank 0 (physics/anisomag.py fit_magnification; the
    odd fit's band and GSFSC weights, and the noise model's 1/σ²) and its matrix
    replaced by (I + G) M on every rank, for the images read from the next iteration
    on.  Collective; returns {group: describe_matrix(M) + pixels} (None: no fit)."""
    from mpirefine.physics.anisomag import describe_matrix, fit_magnification

    par, n = job.par, job.prep.box
    if job.mag_sums is None:
        return None
    groups = sorted({int(g) for g in np.unique(job.particles.optics_group)})
    packed = np.zeros((len(groups), n, n // 2 + 1, 20))
    for k, g in enumerate(groups):
        if g in job.mag_sums:
            A, b = (to_numpy(a) for a in job.mag_sums[g])
            packed[k] = np.concatenate([A.reshape(n, n // 2 + 1, 16), b], axis=-1)
    packed = par.allreduce_obj(packed)
    job.mag_sums = None
    out = None
    if par.is_root:
        weight = global_fit_weight(job) * to_numpy(job.noise.pixel_weights(n, np))
        out = {}
        for j, g in enumerate(groups):
            A = packed[j, ..., :16].reshape(n, n // 2 + 1, 4, 4)
            pixels = int(np.count_nonzero(weight * A[..., 0, 0]))
            if pixels < 8:
                continue
            old = job.mag_matrices.get(g, np.eye(2))
            new = fit_magnification(A, packed[j, ..., 16:], weight) @ old
            out[g] = {**describe_matrix(new), "pixels": pixels}
            d = out[g]
            job.log.info(f"iteration {iteration:3d}  optics group {g}: magnification anisotropy "
                         f"{d['anisotropy_percent']:+.3f} % at {d['anisotropy_angle_deg']:.0f}°, "
                         f"isotropic {d['isotropic_percent']:+.3f} % from {pixels} pixels")
    out = par.bcast_obj(out, root=0)
    job.set_mag_matrices({**job.mag_matrices, **{g: d["matrix"] for g, d in out.items()}})
    return {str(g): d for g, d in out.items()}


def global_fit_weight(job: Job) -> np.ndarray:
    """ω per (n, n // 2 + 1) pixel of the global CTF fits: the GSFSC where it is at least
    0.143, from --ctf-min-resolution to the current resolution (relion_ctf_refine's)."""
    from mpirefine.fourier.transforms import freq_grid_2d

    n = job.prep.box
    ky, kx = freq_grid_2d(n, np)
    k = np.hypot(kx, ky) / (n * job.prep.pixel_size_A)
    fsc = np.asarray(job.steering.fsc, float)
    shell = np.minimum(np.rint(np.hypot(kx, ky)).astype(int), len(fsc) - 1)
    weight = np.where(fsc[shell] >= 0.143, fsc[shell], 0.0)
    return weight * ((k >= 1.0 / job.cfg.ctf_min_resolution_A) & (k <= 1.0 / job.resolution_A))


def with_mag_matrices(ps, matrices: dict, log=None):
    """The particle set with its optics table carrying each group's magnification
    matrix (rlnMagMat00..11; the identity for groups without one)."""
    from mpirefine.physics.anisomag import MAG_COLUMNS

    optics = writable_optics(ps, "the fitted magnification matrices are", log)
    if optics is None:
        return ps
    for c, v in zip(MAG_COLUMNS, (1.0, 0.0, 0.0, 1.0)):
        if c not in optics.columns:
            optics[c] = v
    for i, row in optics.iterrows():
        m = matrices.get(int(row["rlnOpticsGroup"]))
        if m is not None:
            for c, v in zip(MAG_COLUMNS, np.asarray(m, float).ravel()):
                optics.at[i, c] = v
    return dataclasses.replace(ps, _star_optics=optics)


def add_even_sums(job: Job, vft, idx, images, params, res, scale) -> None:
    """Add a batch to each optics group's even-aberration sums: the images demodulated of
    the odd terms and unwindowed, against the other half's reference, with the CTF's
    low-order phase alone (the fit gives the group's whole even phase)."""
    from mpirefine.physics.aberrations import even_aberration_sums, frequency_grid_A
    from mpirefine.physics.ctf import ctf_gamma

    kx_A, ky_A = frequency_grid_A(job.prep.box, job.prep.pixel_size_A, job.xp)
    groups = np.asarray(job.particles.optics_group)[idx]
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        on = job.xp.asarray(rows)
        sums = even_aberration_sums(vft, images[on], ctf_gamma(params.subset(rows), kx_A, ky_A),
                                    res.rotations[rows], res.shifts_px[rows],
                                    np.asarray(scale)[rows])
        old = job.even_sums.get(int(g))
        job.even_sums[int(g)] = sums if old is None else tuple(a + b for a, b in zip(old, sums))


def fit_even_global(job: Job, iteration: int) -> dict | None:
    """--fit-spherical-aberration / --fit-tetrafoil after the pass that collected the
    sums: every rank's sums summed, each optics group's even Zernike terms fitted on world
    rank 0 (physics/aberrations.py fit_even_aberrations, with the half maps' FSC for the
    noise correction; same band and weights as the odd fit) and applied on every rank
    from the next iteration on.  Collective; returns {group: fit} for the history."""
    from mpirefine.fourier.transforms import freq_grid_2d
    from mpirefine.physics.aberrations import fit_even_aberrations
    from mpirefine.physics.ctf import electron_wavelength_A

    if job.even_sums is None:
        return None
    par, n = job.par, job.prep.box
    groups = sorted({int(g) for g in np.unique(job.particles.optics_group)})
    packed = np.zeros((len(groups), 9, n, n // 2 + 1))
    for k, g in enumerate(groups):
        if g in job.even_sums:
            packed[k] = np.stack([to_numpy(a) for a in job.even_sums[g]])
    packed = par.allreduce_obj(packed)
    job.even_sums, job.even_pending = None, False
    fits = None
    if par.is_root:
        from mpirefine.postprocess.fsc import fsc_curve

        ky, kx = freq_grid_2d(n, np)
        kx_A, ky_A = kx / (n * job.prep.pixel_size_A), ky / (n * job.prep.pixel_size_A)
        # the FSC of the unmasked half maps the sums compared the images with
        fsc = np.asarray(fsc_curve(*(to_numpy(job.half_maps[h]) for h in (0, 1))), float)
        shell = np.minimum(np.rint(np.hypot(kx, ky)).astype(int), len(fsc) - 1)
        pixel_fsc = np.clip(fsc[shell], 0.0, 1.0)
        weight = np.where(pixel_fsc >= 0.143, pixel_fsc, 0.0)
        k = np.hypot(kx_A, ky_A)
        weight *= (k >= 1.0 / job.cfg.ctf_min_resolution_A) & (k <= 1.0 / job.resolution_A)
        fits = {}
        for j, g in enumerate(groups):
            rows = np.flatnonzero(job.particles.optics_group == g)
            voltage = float(job.particles.ctf.subset(rows[:1]).voltage_kV[0])
            fit = fit_even_aberrations(packed[j], kx_A, ky_A, weight,
                                       float(electron_wavelength_A(voltage)),
                                       job.cfg.ctf_fit_spherical, job.cfg.ctf_fit_tetrafoil,
                                       reference_fsc=pixel_fsc)
            spread = even_phase_spread(fit.coefficients, kx_A, ky_A, weight)
            if spread > EVEN_MAX_PHASE_SPREAD:
                job.log.warning(f"iteration {iteration:3d}  optics group {g}: even fit rejected "
                                f"(its phase spans {spread:.1f} rad over the fitted band: the "
                                "data do not pin it); the CTF stays as it was")
                fit = dataclasses.replace(fit, pixels=0)
            else:
                job.log.info(f"iteration {iteration:3d}  optics group {g}: Cs change "
                             f"{fit.delta_cs_mm:+.3f} mm, tetrafoil ({fit.tetrafoil[0]:+.1f}, "
                             f"{fit.tetrafoil[1]:+.1f}) rad·Å⁴ from {fit.pixels} pixels "
                             "(terms within 3 standard errors of 0 are dropped)")
            fits[g] = fit
        save_even_sums(os.path.join(job.cfg.out_dir, CTF_EVEN_SUMS), iteration, groups, packed,
                       weight, kx_A, ky_A, fits)
    fits = par.bcast_obj(fits, root=0)
    kept = {g: f.coefficients for g, f in fits.items() if f.pixels}
    job.set_even_aberrations({**job.even_aberrations, **kept})
    return {str(g): f.as_dict() for g, f in fits.items()}


CTF_EVEN_SUMS = "ctf_even_sums.npz"   # the even fit's per-pixel sums, for the report


def save_even_sums(path: str, iteration: int, groups, packed, weight, kx_A, ky_A,
                   fits: dict) -> None:
    """The even fit's per-pixel sums (nine per optics group, physics/aberrations.py
    even_aberration_sums), weights and coefficients, for the report's plot of each
    group's even phase beside its model (written atomically)."""
    from mpirefine.io.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, iteration=iteration, groups=np.asarray(groups), sums=packed, weight=weight,
                 kx_A=kx_A, ky_A=ky_A,
                 coefficients=np.stack([fits[g].coefficients for g in groups]))


#: the even fit needs the refinement this fine: a Cs error of 0.4 mm moves the CTF's
#: phase by 0.3 rad at 3.5 Å but 0.08 rad at 5 Å, and a fit over a narrower band is
#: degenerate with defocus (measured at 7.7 Å: a "Cs change" of −424 mm)
EVEN_FIT_RESOLUTION_A = 4.0
#: a fitted even phase that spans more than this (rad) over the band is rejected
EVEN_MAX_PHASE_SPREAD = 3.0


def even_phase_spread(coefficients, kx_A, ky_A, weight) -> float:
    """max − min of the even phase Σ cⱼ Zⱼ(k) over the pixels with weight > 0."""
    from mpirefine.physics.aberrations import even_phase

    use = np.asarray(weight) > 0
    if not use.any():
        return 0.0
    phase = even_phase(np.asarray(coefficients, float), kx_A[use], ky_A[use])
    return float(np.ptp(phase))


def with_even_aberrations(ps, coefficients: dict):
    """The particle set with its optics table's rlnEvenZernike set to the fitted terms."""
    from mpirefine.physics.aberrations import format_zernike

    optics = writable_optics(ps, "the fitted even aberrations are")
    if optics is None:
        return ps
    if "rlnEvenZernike" not in optics.columns:
        optics["rlnEvenZernike"] = format_zernike(np.zeros(9))
    optics["rlnEvenZernike"] = optics["rlnEvenZernike"].astype(object)
    for i, row in optics.iterrows():
        g = int(row["rlnOpticsGroup"])
        if g in coefficients:
            optics.at[i, "rlnEvenZernike"] = format_zernike(coefficients[g])
    return dataclasses.replace(ps, _star_optics=optics)


def fit_ctf_global(job: Job, iteration: int) -> dict | None:
    """--optimize-ctf-global after an iteration: every rank's odd-aberration sums summed,
    each optics group's beam tilt and trefoil fitted on world rank 0 (frequencies from
    --ctf-min-resolution to this iteration's GSFSC resolution, weighted as
    relion_ctf_refine weights them: by the GSFSC, zero where it is below 0.143), and the
    new coefficients applied on every rank from the next iteration on.  Collective;
    returns {group: fit} for the history (None when there was no fit)."""
    from mpirefine.fourier.transforms import freq_grid_2d
    from mpirefine.physics.aberrations import fit_odd_aberrations
    from mpirefine.physics.ctf import electron_wavelength_A

    par, n = job.par, job.prep.box
    if job.odd_sums is None:
        return None
    groups = sorted({int(g) for g in np.unique(job.particles.optics_group)})
    packed = np.zeros((len(groups), 3, n, n // 2 + 1))
    for k, g in enumerate(groups):
        if g in job.odd_sums:        # summed on the device, copied once per iteration
            xy, w = (to_numpy(a) for a in job.odd_sums[g])
            packed[k] = (xy.real, xy.imag, w)
    packed = par.allreduce_obj(packed)
    job.odd_sums = None
    fits = None
    if par.is_root:
        ky, kx = freq_grid_2d(n, np)
        kx_A, ky_A = kx / (n * job.prep.pixel_size_A), ky / (n * job.prep.pixel_size_A)
        weight = global_fit_weight(job)
        fits = {}
        for j, g in enumerate(groups):
            rows = np.flatnonzero(job.particles.optics_group == g)
            ctf = job.particles.ctf.subset(rows[:1])
            fit = fit_odd_aberrations(packed[j, 0] + 1j * packed[j, 1], packed[j, 2], kx_A, ky_A,
                                      weight, float(ctf.cs_mm[0]),
                                      float(electron_wavelength_A(ctf.voltage_kV[0])),
                                      job.cfg.ctf_fit_tilt, job.cfg.ctf_fit_trefoil)
            fits[g] = fit
            job.log.info(f"iteration {iteration:3d}  optics group {g}: beam tilt "
                         f"({fit.tilt_x_mrad:+.3f}, {fit.tilt_y_mrad:+.3f}) mrad, trefoil "
                         f"({fit.trefoil[0]:+.1f}, {fit.trefoil[1]:+.1f}) rad·Å³ "
                         f"from {fit.pixels} pixels")
        save_ctf_global_sums(os.path.join(job.cfg.out_dir, CTF_GLOBAL_SUMS), iteration, groups,
                             packed, weight, kx_A, ky_A, fits)
    fits = par.bcast_obj(fits, root=0)
    job.set_odd_aberrations({g: f.coefficients for g, f in fits.items() if f.pixels})
    return {str(g): f.as_dict() for g, f in fits.items()}


CTF_GLOBAL_SUMS = "ctf_global_sums.npz"   # the last fit's per-pixel data, for the report


def save_ctf_global_sums(path: str, iteration: int, groups, packed, weight, kx_A, ky_A,
                         fits: dict) -> None:
    """The last --optimize-ctf-global fit's per-pixel sums (xy, w per optics group on the
    (n, n // 2 + 1) grid), its weights and fitted coefficients, for the report's plot of
    each group's odd phase beside its model (written atomically, replaced at each fit)."""
    from mpirefine.io.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, iteration=iteration, groups=np.asarray(groups),
                 xy=packed[:, 0] + 1j * packed[:, 1], w=packed[:, 2], weight=weight,
                 kx_A=kx_A, ky_A=ky_A,
                 coefficients=np.stack([fits[g].coefficients for g in groups]))


CTF_SETTLED_MRAD = 0.05        # beam tilt change between the last two fits
CTF_SETTLED_TREFOIL = 0.05     # relative trefoil change
CTF_SETTLED_PHASE = 0.05       # rad: a trefoil change below this at the resolution is settled


def ctf_global_settled(job: Job) -> bool:
    """True unless --optimize-ctf-global fits beam tilt or trefoil and its fits have not
    settled: none yet while the start resolution is reached, or the last two differ by
    more than 0.05 mrad of beam tilt, or by more than 5 % of trefoil where that change
    moves the phase by 0.05 rad or more at the current resolution, in some optics group.
    (Measured: with no trefoil in the data, fits at 2.7 Å moved by 0.3–0.7 rad·Å³, about
    0.03 rad there, and the old 5 %-of-at-least-1 rule never let the run end.)  The
    magnification matrices of --fit-anisomag must have settled too (:func:`mag_settled`)."""
    cfg = job.cfg
    if not mag_settled(job):
        return False
    if not (cfg.optimize_ctf_global and (cfg.ctf_fit_tilt or cfg.ctf_fit_trefoil)):
        return True
    fits = [h["ctf_global"] for h in job.history if h.get("ctf_global")]
    if not fits:
        return not job.refines_ctf_global()
    if len(fits) < 2:
        return False
    for g, new in fits[-1].items():
        old = fits[-2].get(g)
        if old is None:
            return False
        tilt = np.hypot(new["beam_tilt_x_mrad"] - old["beam_tilt_x_mrad"],
                        new["beam_tilt_y_mrad"] - old["beam_tilt_y_mrad"])
        tre = np.hypot(*np.subtract(new["trefoil"], old["trefoil"]))
        # a trefoil change that moves the phase by less than CTF_SETTLED_PHASE at the
        # current resolution is noise, however small the trefoil itself
        negligible = tre * job.resolution_A ** -3 < CTF_SETTLED_PHASE
        if tilt > CTF_SETTLED_MRAD or (tre > CTF_SETTLED_TREFOIL * max(np.hypot(*new["trefoil"]), 1.0)
                                       and not negligible):
            return False
    return True


MAG_SETTLED = 5e-4    # largest change of a magnification matrix element between fits


def mag_settled(job: Job) -> bool:
    """True unless --fit-anisomag has not fitted yet while the start resolution is
    reached, or its last two fits differ by more than 0.05 % in some element of some
    group's matrix (a tenth of a 0.5 % distortion)."""
    if not (job.cfg.optimize_ctf_global and job.cfg.ctf_fit_anisomag):
        return True
    fits = [h["ctf_anisomag"] for h in job.history if h.get("ctf_anisomag")]
    if not fits:
        return not job.refines_ctf_global()
    if len(fits) < 2:
        return False
    return all(g in fits[-2] and np.max(np.abs(np.subtract(new["matrix"], fits[-2][g]["matrix"])))
               <= MAG_SETTLED for g, new in fits[-1].items())


def collect_particle_results(job: Job, results: list) -> None:
    """Every rank's per-particle results onto world rank 0's ParticleState."""
    packed = None
    if results:
        packed = tuple(np.concatenate([np.asarray(r[i]) for r in results]) for i in range(6))
    gathered = job.par.gather_obj(packed, root=0)
    if job.par.is_root:
        for item in gathered:
            if item is not None:
                job.state.update(*item)
    if job.cfg.minimize_scale:
        job.share_scales()
    if job.cfg.optimize_defocus:
        job.share_defocus()


def update_references(job: Job, halves) -> None:
    """New masks and next references from this iteration's half maps, reconstructed
    with :func:`steer` (which set the job's GSFSC and resolution); collective. The
    unregularised pair is kept as the job's half maps (outputs, final FSC suite) on
    world rank 0, with everything else the checkpoint holds.

    ``halves``: with one rank per half, a :class:`HalfMaps` (the root pair does the map
    work, then broadcasts within its group); with more, this rank's
    :class:`SlabHalfMaps` (every rank makes its rows of the references and masks, and
    the whole maps are gathered for rank 0 only)."""
    if isinstance(halves, SlabHalfMaps):
        _update_from_slabs(job, halves)
        return
    par, cfg, px = job.par, job.cfg, job.prep.pixel_size_A
    found = job.steering
    info = None
    if halves is not None:
        maps, fsc, res = halves.regularised, found.fsc, found.resolution_A
        # each root makes its own half's mask and reference; rank 0 gets the other
        # half's from rank 1 for the checkpoint
        own = [h for h in (0, 1) if par.is_half_root(h)]
        masks = {}
        with par.timer("reconstruction"):   # on the rank's device; the results to the host
            on_device = {h: job.xp.asarray(maps[h]) for h in (0, 1)}
            if _use_dynamic_mask(job, res):
                masks = {h: to_numpy(dynamic_mask(on_device[h], res, px,
                                                  cfg.dynamic_mask_threshold,
                                                  cfg.dynamic_mask_near, cfg.dynamic_mask_far,
                                                  cfg.dynamic_mask_absolute)) for h in own}
            refs = {h: to_numpy(r) for h, r in next_references(
                on_device, fsc, cfg.gsfsc_split_resolution_A, px, own).items()}
        if len(own) == 1:
            other = 1 - own[0]
            refs[other] = par.exchange_roots(refs[own[0]])
            if masks:
                masks[other] = par.exchange_roots(np.ascontiguousarray(masks[own[0]]))
        job.half_maps, job.regularised_maps = halves.unregularised, halves.regularised
        job.masks, job.next_references = masks, refs
        info = bool(masks)
    has_masks = par.bcast_obj(info, root=0)
    job.share_half_volumes(job.next_references or {}, job.masks, has_masks)


def steer(job: Job, iteration: int, half_maps: dict | None) -> np.ndarray:
    """The iteration's GSFSC (refinement/gsfsc.py), computed on world rank 0 from the
    whole unregularised ``half_maps`` and broadcast; sets the job's resolution and
    curves on every rank and returns the curve that sets the regularisation of the
    half maps (the reconstruction calls it between its two passes). Collective."""
    found = None
    if job.par.is_root:
        with job.par.timer("root"):
            found = steering_fsc(job, half_maps, iteration)
    found = job.par.bcast_obj(found, root=0)
    job.steering = found
    job.fsc, job.resolution_A = found.fsc, found.resolution_A
    return found.regularisation


def _use_dynamic_mask(job: Job, resolution: float) -> bool:
    """Dynamic masking applies from --dynamic-mask-start-resolution on and, once
    started, stays on (the same answer on every rank: resolution and masks are)."""
    cfg = job.cfg
    if not cfg.dynamic_mask or cfg.mask is not None:
        return False
    return bool(job.masks) or resolution <= cfg.dynamic_mask_start_resolution_A


def _update_from_slabs(job: Job, maps: SlabHalfMaps) -> None:
    """update_references for a distributed reconstruction: every rank ends with its
    halves' whole next references (and masks); the half roots gather the regularised
    maps, and half B's root sends rank 0 its map, reference and mask for the
    checkpoint (rank 0 has the unregularised pair from the reconstruction)."""
    par, cfg, px = job.par, job.cfg, job.prep.pixel_size_A
    whole = {h: (gather_rows(par, h, maps.layout, maps.regularised[h]),) for h in par.halves_here}
    pair = gather_to_rank0(par, {h: whole[h] for h in par.halves_here if par.is_half_root(h)})
    res = job.resolution_A
    maps = dataclasses.replace(maps, fsc=job.fsc)
    refs = slab_references(par, maps, cfg.gsfsc_split_resolution_A, px)
    masks = {}
    if _use_dynamic_mask(job, res):
        masks = slab_masks(par, maps, res, px, cfg.dynamic_mask_threshold, cfg.dynamic_mask_near,
                           cfg.dynamic_mask_far, cfg.dynamic_mask_absolute)
    for h in par.halves_here:
        job.references[h] = job.xp.asarray(refs[h])
    mine = {h: (to_numpy(refs[h]),) + ((masks[h],) if masks else ())
            for h in par.halves_here if par.is_half_root(h)}
    extra = gather_to_rank0(par, mine)
    job.masks = dict(masks)
    if par.is_root:
        job.half_maps = maps.unregularised_pair
        job.regularised_maps = {h: v[0] for h, v in pair.items()}
        job.next_references = {h: v[0] for h, v in extra.items()}
        if masks:
            job.masks.update({h: v[1] for h, v in extra.items()})


def during_reconstruction(job: Job, iteration: int, source, rule: Convergence) -> None:
    """Work that overlaps the reconstruction: every rank calls it once its accumulators
    are on their way (the reductions started) and before it waits for them.

    It starts reading this rank's first image batch of iteration ``iteration + 1``,
    which the search will ask for first. Which particles those are depends on the
    minibatch size, i.e. on the resolution the reconstruction is about to give: the
    guess uses the current one. Full passes always guess right; a minibatch whose size
    changes is read when it is due instead (the read-ahead is dropped)."""
    if iteration >= job.cfg.max_iterations:
        return
    upcoming = minibatch_for_iteration(job, iteration + 1, force_full=rule.full_passes)
    for _half, mine in rank_share(job.par, job.split, upcoming):
        if len(mine):
            source.read_ahead(mine[:job.cfg.image_batch_size])
            return


def iterate(job: Job, timer, rule: Convergence, first_iteration: int = 1) -> None:
    """Iterations ``first_iteration`` .. until ``rule`` says stop; a checkpoint after each.

    Each half's sums start moving as soon as a rank has inserted its share
    (:class:`HalfMapReduction`), the noise sums travel while the maps are made, and
    rank 0 writes the checkpoint on a thread from a copy of the state, so no rank
    waits for the file (the next write, and the end, wait for the previous one).
    SIGTERM (what SLURM sends before killing a job at its time limit) lets the
    current iteration finish and its checkpoint be written, then ends the job with
    :class:`Preempted`; ``--continue`` goes on from there."""
    cfg, par, log = job.cfg, job.par, job.log
    start = time.time()
    writer = CheckpointWriter(timer)
    source = open_images(job.particles, job.mag_matrices)
    try:
        for iteration in range(first_iteration, cfg.max_iterations + 1):
            t0 = time.time()
            minibatch = minibatch_for_iteration(job, iteration, force_full=rule.full_passes)
            full = len(minibatch) == len(job.particles)
            reduction = HalfMapReduction(par, job.prep.box,
                                         job.symmetry if job.enforce_symmetry else None)
            accs, power, counts = align_and_backproject(job, minibatch, iteration, timer,
                                                        on_accumulator=reduction.begin,
                                                        source=source)
            noise_sums = par.iallreduce(np.concatenate([power, counts]))
            during_reconstruction(job, iteration, source, rule)
            sums = reduction.finish(accs)
            del accs
            gsfsc = functools.partial(steer, job, iteration)
            if reduction.distributed:
                update_references(job, reconstruct_slabs(par, sums, gsfsc))
            else:
                update_references(job, reconstruct_root_pair(
                    par, sums, job.prep.box, job.symmetry if job.enforce_symmetry else None,
                    gsfsc))
            noise_sums = noise_sums.wait()
            job.noise = model_from_sums(noise_sums[:len(power)], noise_sums[len(power):],
                                        constant=False)
            ctf_global = fit_ctf_global(job, iteration)
            ctf_anisomag = fit_mag_global(job, iteration)
            ctf_even = fit_even_global(job, iteration)
            res = job.resolution_A
            seconds = time.time() - t0
            job.history.append({"iteration": iteration, "batch_size": int(len(minibatch)),
                                "full_pass": full, "resolution_A": res, "seconds": seconds,
                                "alignment_resolution_A": job.alignment_resolution_A(),
                                **job.steering.record(),
                                **({"ctf_global": ctf_global} if ctf_global else {}),
                                **({"ctf_anisomag": ctf_anisomag} if ctf_anisomag else {}),
                                **({"ctf_even": ctf_even} if ctf_even else {})})
            stop = rule.update(res, full)
            if stop and not ctf_global_settled(job):
                # the fitted aberrations still move: the refinement is not over (as
                # CryoSPARC, which refines CTF once the poses have converged, then goes on)
                rule.converged, rule.remaining, stop = False, 0, False
            if ctf_even:
                # the map of the pass that fitted them did not use them yet
                rule.converged, rule.remaining, stop = False, 0, False
            elif stop and job.wants_even_fit() and res <= min(EVEN_FIT_RESOLUTION_A,
                                                              cfg.ctf_start_resolution_A):
                # converged: one more full pass collects the even terms' sums (fitted once
                # the poses have settled, as relion_ctf_refine follows a refinement)
                job.even_pending = True
                rule.converged, rule.remaining, stop = False, 0, False
            elif stop and job.wants_even_fit():
                log.warning(f"no even-aberration fit: the refinement converged at {res:.2f} Å, "
                            f"coarser than the {min(EVEN_FIT_RESOLUTION_A, cfg.ctf_start_resolution_A):g} Å "
                            "the fit needs")
            if stop or iteration == cfg.max_iterations:
                job.full_map = final_full_map(job, sums)
            del sums
            eta = _eta_text(job.history, rule.remaining if rule.converged else None)
            log.info(f"iteration {iteration:3d}  batch {len(minibatch):7d}{' (all)' if full else '      '}  "
                     f"GSFSC {res:6.2f} Å ({job.steering.mask} mask; unmasked "
                     f"{job.steering.unmasked_resolution_A:6.2f} Å)  {seconds:7.1f} s  "
                     f"elapsed {time.time() - start:7.1f} s  {eta}")
            if par.is_root:
                writer.save(job, iteration, rule)
            par.barrier()  # the half roots' own work (gathering maps): idle for the others
            if par.allreduce_obj(int(_TERMINATION.requested), op="max"):
                writer.join()
                raise Preempted(f"stopped by SIGTERM after iteration {iteration}; the checkpoint "
                                f"is complete: continue with  mpirefine refine --continue {cfg.out_dir}")
            if stop:
                break
        else:
            log.warning(f"stopped after --max-iterations {cfg.max_iterations} without convergence")
    finally:
        timer.count("image_batches_read_ahead", source.ahead_used)
        source.close()
        writer.join()


def final_full_map(job: Job, sums: dict):
    """The last iteration's map from all particles (halfmaps.full_map), regularised by
    twice the half maps' SSNR (the curve that regularised them); on world rank 0, None
    elsewhere. Collective."""
    from mpirefine.refinement.halfmaps import full_map

    with job.par.timer("reconstruction"):
        return full_map(job.par, sums, job.prep.box,
                        half_fsc=job.steering.regularisation)


class CheckpointWriter:
    """Writes checkpoint.h5 (world rank 0) on a thread, from copies of the arrays taken
    when :meth:`save` is called, so the loop goes on while the file is written. A save
    first waits for the previous one; :meth:`join` waits for the last and re-raises its
    error. Seconds spent copying and waiting count as "checkpoint"; the thread's
    writing time is the counter "checkpoint_write_seconds" (off the critical path)."""

    def __init__(self, timer):
        self.timer = timer
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.write_seconds = 0.0

    def save(self, job: Job, iteration: int, rule: Convergence) -> None:
        with self.timer("checkpoint"):
            self.join()
            snapshot, rule = _snapshot(job), copy.deepcopy(rule)
        self.thread = threading.Thread(target=self._write, args=(snapshot, iteration, rule),
                                       name="mpirefine-checkpoint")
        self.thread.start()

    def _write(self, snapshot, iteration: int, rule: Convergence) -> None:
        t0 = time.perf_counter()
        try:
            restart.save(snapshot, iteration, rule)
        except BaseException as exc:   # handed to the main thread by join()
            self.error = exc
        self.write_seconds = time.perf_counter() - t0

    def join(self) -> None:
        if self.thread is not None:
            with self.timer("checkpoint"):
                self.thread.join()
            self.thread = None
            self.timer.count("checkpoint_write_seconds", self.write_seconds)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _snapshot(job: Job) -> Job:
    """A copy of ``job`` whose checkpointed fields no later iteration can change."""
    def arrays(d):
        return None if d is None else {k: np.array(v, copy=True) for k, v in d.items()}

    return dataclasses.replace(
        job, history=[dict(h) for h in job.history], half_maps=arrays(job.half_maps),
        regularised_maps=arrays(job.regularised_maps), next_references=arrays(job.next_references),
        masks=arrays(job.masks), fsc=None if job.fsc is None else np.array(job.fsc, copy=True),
        noise=copy.deepcopy(job.noise), split=np.array(job.split, copy=True),
        state=ParticleState(**{k: np.array(v, copy=True) for k, v in job.state.as_dict().items()}))


class Preempted(Exception):
    """The job was asked to stop (SIGTERM) and stopped after a complete checkpoint."""


class _Termination:
    """Remembers a SIGTERM until the end of the iteration in progress, where the job
    stops with :class:`Preempted` after its checkpoint. A second SIGTERM, or
    MPIREFINE_TERM_GRACE_S seconds (default 300) after the first, aborts every rank
    instead (status 143), also while this rank waits in a collective (see
    :func:`mpirefine.parallel.defer_sigterm`)."""

    def install(self) -> None:
        from mpirefine.parallel import defer_sigterm

        defer_sigterm()

    @property
    def requested(self) -> bool:
        from mpirefine.parallel import sigterm_requested

        return sigterm_requested()


_TERMINATION = _Termination()


def _eta_text(history: list, remaining: int | None) -> str:
    if remaining is None:
        return "ETA: until the resolution stops improving"
    per = history[-1]["seconds"]
    return f"ETA {remaining * per:6.0f} s ({remaining} more pass{'es' if remaining != 1 else ''})"


# ----------------------------------------------------------------------------- finish

def finish(job: Job, rule: Convergence, wall_start: float, timings) -> dict | None:
    """Write every output on world rank 0; returns the summary there (None elsewhere).

    The reported resolution is the mask-corrected GSFSC of the auto-tightened FSC mask
    (validation.py); map.mrc is filtered by that curve and map_sharp.mrc is map.mrc with
    its Guinier B-factor undone up to that resolution (sharpen.py)."""
    from dataclasses import asdict

    from mpirefine.io import write_mrc, write_particles
    from mpirefine.io.outputs import write_fsc_csv, write_json
    from mpirefine.postprocess.sharpen import MIN_FIT_SHELLS, sharpen_filtered_map
    from mpirefine.postprocess.validation import fsc_suite
    from mpirefine.refinement.halfmaps import fsc_filter
    from mpirefine.report import write_report

    if not job.par.is_root:
        return None
    cfg, out, px, n = job.cfg, job.cfg.out_dir, job.prep.pixel_size_A, job.prep.box
    maps = job.half_maps
    write_mrc(os.path.join(out, "map_half_A.mrc"), maps[0], px)
    write_mrc(os.path.join(out, "map_half_B.mrc"), maps[1], px)
    # FSC masks come from the half maps, never from the user's (alignment-only) mask
    suite = fsc_suite(maps[0], maps[1], px, resolution_A_hint=job.resolution_A,
                      window_inner=cfg.window_inner, window_outer=cfg.window_outer, seed=cfg.seed)
    final_fsc, final_res = suite.final_curve, suite.final_resolution_A
    # the map itself from all particles' sums (halfmaps.full_map), regularised; the FSC
    # above from the unregularised halves (see halfmaps.HalfMaps)
    full = job.full_map
    if full is None:   # resumed after the last iteration: the sums are gone
        job.log.warning("map.mrc is the average of the regularised half maps: the job was "
                        "continued after its last iteration, whose sums the checkpoint lacks")
        full = 0.5 * (job.regularised_maps[0] + job.regularised_maps[1])
    filtered = fsc_filter(full, final_fsc, crossing_shell(final_fsc))
    write_mrc(os.path.join(out, "map.mrc"), filtered, px)
    sharp, guinier, guinier_s2, guinier_curve = sharpen_filtered_map(
        filtered, 0.5 * (maps[0] + maps[1]), final_fsc, final_res, px)
    if guinier.n_shells < MIN_FIT_SHELLS:
        job.log.warning(f"map_sharp.mrc is not sharpened: {guinier.n_shells} shell(s) between "
                        f"{guinier.low_resolution_A:.0f} Å and {final_res:.2f} Å are too few "
                        "for a Guinier fit")
    write_mrc(os.path.join(out, "map_sharp.mrc"), sharp, px)
    write_mrc(os.path.join(out, "mask_fsc.mrc"), suite.masks["tight"], px)
    write_mrc(os.path.join(out, "mask_fsc_auto.mrc"), suite.masks["auto"], px)
    mask = job.static_mask if job.static_mask is not None else job.masks.get(0)
    if mask is not None:
        write_mrc(os.path.join(out, "mask_refine.mrc"), np.asarray(mask, np.float32), px)
    write_fsc_csv(os.path.join(out, "fsc.csv"), suite.curves, n, px)
    job.log.info(f"FSC masks: tight {suite.resolution_A['corrected']:.2f} Å (corrected), auto "
                 f"'{suite.auto_mask_name}' {final_res:.2f} Å; unmasked "
                 f"{suite.resolution_A['no_mask']:.2f} Å; B-factor {guinier.bfactor_A2:.0f} Å²")
    st = job.state
    refined = dataclasses.replace(job.particles, ctf=job.ctf_params(np.arange(len(job.particles))))
    if cfg.optimize_ctf_global and job.odd_aberrations:
        refined = with_odd_aberrations(refined, job.odd_aberrations, log=job.log)
    if any(h.get("ctf_even") for h in job.history):
        refined = with_even_aberrations(refined, job.even_aberrations)
    if any(h.get("ctf_anisomag") for h in job.history):
        refined = with_mag_matrices(refined, job.mag_matrices, log=job.log)
    write_particles(out, refined, st.rotations, st.shifts_px * px, job.split, st.scale)
    summary = {
        "command": "refine",
        "final_resolution_A": final_res,
        "gsfsc_unmasked_resolution_A": job.resolution_A,
        "resolution_by_mask_A": suite.resolution_A,
        "fsc_mask": suite.auto_mask_name,
        "fsc_randomize_from_A": suite.randomize_from_A,
        "fsc_auto_mask_trials": [asdict(t) for t in suite.trials],
        "bfactor_A2": guinier.bfactor_A2,
        "guinier_fit": asdict(guinier),
        "guinier_curve": {"s2_per_A2": guinier_s2.tolist(),
                          "ln_power": [float(v) if np.isfinite(v) else None for v in guinier_curve]},
        "n_particles": len(job.particles),
        "n_particles_aligned": int(st.aligned.sum()),
        "converged": bool(rule.converged),
        "defocus_refinement": defocus_summary(job),
        # --optimize-ctf-global: each optics group's last fit (per iteration: "iterations")
        "ctf_global": next((h["ctf_global"] for h in reversed(job.history)
                            if h.get("ctf_global")), None),
        # --fit-anisomag: each optics group's last magnification matrix
        "ctf_anisomag": next((h["ctf_anisomag"] for h in reversed(job.history)
                              if h.get("ctf_anisomag")), None),
        # --fit-spherical-aberration / --fit-tetrafoil: each optics group's one even fit
        "ctf_even": next((h["ctf_even"] for h in job.history if h.get("ctf_even")), None),
        "n_particles_last_pass": int(job.history[-1]["batch_size"]) if job.history else 0,
        # --ewald-correction: the sign and the side-band disc the half maps were built with
        "ewald": None if job.ewald is None else {"curvature": job.ewald.curvature,
                                                 "particle_diameter_A": job.ewald.diameter_A},
        "box": n, "pixel_size_A": px,
        "n_ranks": job.par.size,
        "backend": backend_name(job.xp),
        "projection_kernel": compiled.kernel_name(job.xp),
        "wall_seconds": time.time() - wall_start,
        "greyscale_factor": job.greyscale_factor,
        "noise_sigma2": job.noise.sigma2,
        "symmetry": job.cfg.symmetry,
        "symmetry_alignment": job.symmetry_alignment,
        "iterations": job.history,
        "timings_per_rank": timings,
        "config": cfg.to_dict(),
    }
    write_json(os.path.join(out, "summary.json"), summary)
    report = write_report(out)
    job.log.info(f"report: {report}")
    return summary


def defocus_summary(job: Job) -> dict | None:
    """--optimize-defocus: how far the particles' defocus moved (Å; U and V move together)."""
    if not job.cfg.optimize_defocus:
        return None
    change = np.asarray(job.state.defocus_change_A, float)
    counts, edges = np.histogram(change, bins=41)
    return {"n_changed": int(np.count_nonzero(change)), "mean_A": float(change.mean()),
            "sd_A": float(change.std()), "rms_A": float(np.sqrt(np.mean(change ** 2))),
            "percentiles_A": {str(q): float(np.percentile(change, q)) for q in (1, 5, 25, 50, 75, 95, 99)},
            "histogram": {"counts": counts.tolist(), "edges_A": edges.tolist()},
            "start_resolution_A": job.cfg.defocus_start_resolution_A,
            "min_resolution_A": job.cfg.defocus_min_resolution_A,
            "search_range_A": job.cfg.defocus_search_range_A}


def run(cfg: RefineConfig, par, log, resume: bool = False) -> dict | None:
    """The whole refinement; collective over ``par``'s ranks.  With ``resume``, go on
    from the checkpoint in ``cfg.out_dir`` (``refine --continue``)."""
    wall_start = time.time()
    cfg.check_supported()
    timer = par.timer
    _TERMINATION.install()
    if resume:
        job = build_job(cfg, par, log)
        rule, first = restart.resume(job)
    else:
        job, rule, first = prepare(cfg, par, log), Convergence(cfg.extra_final_passes), 1
    log.info(f"refine: {len(job.particles)} particles, box {job.prep.box}, "
             f"{job.prep.pixel_size_A:.3f} Å/px, {par.size} rank(s), {backend_name(job.xp)} "
             f"(projections: {compiled.kernel_name(job.xp)}); "
             f"start at {job.resolution_A:.1f} Å")
    finished = rule.converged and rule.remaining <= 0
    if not finished and first <= cfg.max_iterations:
        iterate(job, timer, rule, first)
    timings = par.gather_timings()
    summary = finish(job, rule, wall_start, timings)
    if summary is not None:
        log.info(f"final GSFSC resolution {summary['final_resolution_A']:.2f} Å after "
                 f"{len(job.history)} iterations, {summary['wall_seconds']:.0f} s; "
                 f"results in {cfg.out_dir}")
    return summary
