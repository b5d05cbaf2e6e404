"""Homogeneous refinement: global pose search of every particle against an initial
volume, gold-standard half maps, GSFSC-filtered output.

Run under MPI with one rank per GPU: `mpirun -n N mpirefine refine P.star V.mrc --out DIR`
(or `srun mpirefine refine ...`).  Options follow CryoSPARC's Homogeneous Refinement;
options whose behaviour is not built yet are refused with "not supported yet".
"""

from __future__ import annotations

import argparse

from mpirefine.report.memory import OutOfMemory, is_out_of_memory, out_of_memory_message

B = argparse.BooleanOptionalAction


def add_args(parser):
    from mpirefine.cli.common import add_device_args, add_grid_args

    p = parser
    p.add_argument("particles", nargs="?",
                   help="particles with CTF parameters: RELION .star or CryoSPARC .cs")
    p.add_argument("volume", nargs="?",
                   help="initial volume (.mrc) on the reference grid: the first optics "
                        "group's box and pixel size, or --box and --pixel-size")
    p.add_argument("--out", metavar="DIR", help="output folder (required for a new job)")
    p.add_argument("--continue", dest="continue_dir", metavar="DIR", default=None,
                   help="resume the job whose --out was DIR from its last complete iteration "
                        "(checkpoint.h5), on any number of ranks, with its saved parameters; "
                        "only --gpu/--cpu may be given with it")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--mask", default=None, help="static mask (.mrc) used for alignment instead of "
                   "the dynamic mask; the FSC never uses it")
    p.add_argument("--project-dir", default=None,
                   help="folder that relative stack paths are resolved against")
    add_grid_args(p)
    g = p.add_argument_group("window dataset (real space)")
    g.add_argument("--window", action=B, default=True, help="soft circular window on the images [on]")
    g.add_argument("--window-inner", type=float, default=0.85, metavar="F",
                   help="window inner radius, fraction of half the box [0.85]")
    g.add_argument("--window-outer", type=float, default=0.99, metavar="F",
                   help="window outer radius, fraction of half the box [0.99]")
    g = p.add_argument_group("symmetry")
    g.add_argument("--symmetry", default="C1",
                   help="point group: Cn, Dn (n-fold on Z, a 2-fold on Y), T, O, I1 (= I) or "
                        "I2, axes as in docs/symmetry.md [C1]")
    g.add_argument("--symmetry-relaxation", default="none",
                   choices=["none", "maximization", "marginalization"],
                   help="none: enforce the symmetry; maximization / marginalization: align "
                        "without it, then choose among (or weight) the symmetry-related poses "
                        "of each particle [none]")
    g.add_argument("--symmetry-alignment", action=B, default=True,
                   help="turn the input volume so its symmetry axes lie on the convention's "
                        "axes before refining (ignored for C1) [on]")
    g = p.add_argument_group("reference and iterations")
    g.add_argument("--reestimate-greyscale", action=B, default=True,
                   help="rescale the input volume to the particles' greyscale [on]")
    g.add_argument("--extra-final-passes", type=int, default=0, metavar="N",
                   help="full passes after the GSFSC stops improving [0]")
    g.add_argument("--adaptive-marginalization", action=B, default=False,
                   help="insert each particle over its final candidate poses, weighted by "
                        "posterior probability [off: best pose only]")
    g.add_argument("--max-align-resolution", dest="max_align_resolution_A", type=float,
                   default=None, metavar="Å",
                   help="finest resolution used for alignment (Å) [current GSFSC resolution]")
    g.add_argument("--initial-lowpass", dest="initial_lowpass_A", type=float, default=20.0,
                   metavar="Å", help="low-pass of the initial volume (Å) [20]")
    g.add_argument("--gsfsc-split-resolution", dest="gsfsc_split_resolution_A", type=float,
                   default=20.0, metavar="Å",
                   help="half maps are averaged below this resolution (Å) [20]")
    g.add_argument("--max-iterations", type=int, default=30, help="safety cap on iterations [30]")
    g = p.add_argument_group("minibatches")
    g.add_argument("--batchsize-epsilon", type=float, default=0.001,
                   help="tolerated fraction of Fourier voxels a minibatch misses [0.001]")
    g.add_argument("--batchsize-snrfactor", type=float, default=40.0,
                   help="multiplies the automatic batch size [40]")
    g.add_argument("--disable-auto-batchsize", action=B, default=False,
                   help="use all particles in every iteration [off]")
    g = p.add_argument_group("per-particle scale and noise")
    g.add_argument("--minimize-scale", action=B, default=False,
                   help="fit each particle's scale every iteration [off]")
    g.add_argument("--reset-scale", action=B, default=True,
                   help="start every particle's scale at 1 (off: keep the input's) [on]")
    g.add_argument("--noise-from-images", action=B, default=False,
                   help="initial noise model per shell from the images (off: a constant) [off]")
    g = p.add_argument_group("dynamic masking")
    g.add_argument("--dynamic-mask", action=B, default=True, help="dynamic refinement mask [on]")
    g.add_argument("--dynamic-mask-start-resolution", dest="dynamic_mask_start_resolution_A",
                   type=float, default=12.0, metavar="Å",
                   help="mask once the GSFSC resolution reaches this (Å) [12]")
    g.add_argument("--dynamic-mask-threshold", type=float, default=0.2,
                   help="threshold, fraction of the map's maximum (0–1) [0.2]")
    g.add_argument("--dynamic-mask-near", type=float, default=0.5, metavar="×RES",
                   help="mask is 1 this many resolutions beyond the threshold [0.5]")
    g.add_argument("--dynamic-mask-far", type=float, default=1.2, metavar="×RES",
                   help="soft edge reaches 0 this many resolutions out [1.2]")
    g.add_argument("--dynamic-mask-absolute", action=B, default=False,
                   help="threshold the absolute value of the map [off]")
    g = p.add_argument_group("CTF refinement and Ewald sphere")
    g.add_argument("--optimize-defocus", action=B, default=False,
                   help="per-particle defocus refinement: after each particle's alignment, search "
                        "its defocus (astigmatism kept) against its half's reference [off]")
    g.add_argument("--defocus-search-range", dest="defocus_search_range_A", type=float,
                   default=2000.0, metavar="Å",
                   help="defocus searched within ± this of the current value, Å [2000]")
    g.add_argument("--defocus-min-resolution", dest="defocus_min_resolution_A", type=float,
                   default=20.0, metavar="Å",
                   help="lowest resolution used to fit defocus, Å; the highest is the current "
                        "GSFSC resolution [20]")
    g.add_argument("--defocus-start-resolution", dest="defocus_start_resolution_A", type=float,
                   default=8.0, metavar="Å",
                   help="defocus is refined once the GSFSC resolution is finer than this, Å [8]")
    g.add_argument("--optimize-ctf-global", action=B, default=False,
                   help="per-optics-group odd aberrations (beam tilt, trefoil): fitted after "
                        "each iteration from the particles at their poses, as relion_ctf_refine "
                        "--fit_beamtilt --odd_aberr_max_n 3 does, and applied to the images "
                        "from the next iteration on [off]")
    g.add_argument("--fit-tilt", dest="ctf_fit_tilt", action=B, default=True,
                   help="with --optimize-ctf-global: fit beam tilt (rlnBeamTiltX/Y, mrad) [on]")
    g.add_argument("--fit-trefoil", dest="ctf_fit_trefoil", action=B, default=True,
                   help="with --optimize-ctf-global: fit trefoil (rlnOddZernike) [on]")
    g.add_argument("--fit-spherical-aberration", dest="ctf_fit_spherical", action=B,
                   default=False,
                   help="with --optimize-ctf-global: fit a Cs error (rlnEvenZernike), once, "
                        "when the refinement has converged, then go on with it [off]")
    g.add_argument("--fit-tetrafoil", dest="ctf_fit_tetrafoil", action=B, default=False,
                   help="with --optimize-ctf-global: fit tetrafoil (rlnEvenZernike), likewise [off]")
    g.add_argument("--fit-anisomag", dest="ctf_fit_anisomag", action=B, default=False,
                   help="with --optimize-ctf-global: fit each optics group's magnification "
                        "matrix (rlnMagMat00..11, dimensionless) after each iteration, as "
                        "relion_ctf_refine --fit_aniso does, and undistort its images by it "
                        "from the next iteration on [off]")
    g.add_argument("--ctf-min-resolution", dest="ctf_min_resolution_A", type=float,
                   default=10.0, metavar="Å",
                   help="lowest resolution the global CTF fit uses, Å; the highest is the "
                        "current GSFSC resolution [10]")
    g.add_argument("--ctf-start-resolution", dest="ctf_start_resolution_A", type=float,
                   default=8.0, metavar="Å",
                   help="the global CTF fit starts once the GSFSC resolution is finer than "
                        "this, Å [8]")
    g.add_argument("--ewald-correction", action=B, default=False,
                   help="Ewald sphere correction: insert each image's two side bands on the "
                        "curved sphere of its voltage (the alignment stays flat) [off]")
    g.add_argument("--ewald-curvature", default=None, choices=["negative", "positive"],
                   help="Ewald sphere curvature sign, with --ewald-correction only; negative "
                        "is relion_reconstruct --ewald's default, positive its "
                        "--reverse_curvature [negative]")
    g.add_argument("--particle-diameter", dest="particle_diameter_A", type=float, default=None,
                   metavar="Å",
                   help="diameter of the disc that separates the side bands, Å, with "
                        "--ewald-correction only [the particle's extent in the low-passed "
                        "initial volume]")
    g = p.add_argument_group("computation (no effect on results)")
    g.add_argument("--image-batch-size", type=int, default=None, metavar="N",
                   help="images processed at once per rank [256 on the CPU; on a GPU the "
                        "largest power of two up to 1024 that fits its free memory, by the "
                        "memory plan of `mpirefine info PARTICLES --ranks N`]")
    g.add_argument("--seed", type=int, default=0, help="seed for the split and minibatches [0]")
    add_device_args(p)


def config_from_args(args):
    from mpirefine.config import RefineConfig
    from mpirefine.errors import InputError

    if args.particles is None or args.volume is None or args.out is None:
        raise InputError("a new refinement needs PARTICLES, VOLUME and --out DIR "
                         "(or --continue DIR to resume one)")
    values = {k: v for k, v in vars(args).items() if k in RefineConfig.field_names()}
    values["out_dir"] = args.out
    # not given: a GPU rank takes what its memory holds (choose_image_batch), NumPy 256
    values["image_batch_auto"] = values.get("image_batch_size") is None
    if values["image_batch_auto"]:
        values["image_batch_size"] = RefineConfig.image_batch_size
    return RefineConfig(**values)


def continued_config(args):
    """The saved configuration of the job in ``args.continue_dir``; positional inputs
    and --out are refused (the job's own are used), the device may change."""
    import os
    from dataclasses import replace

    from mpirefine.config import RefineConfig
    from mpirefine.errors import InputError
    from mpirefine.refinement.checkpoint import load_config

    if args.particles or args.volume or args.out:
        raise InputError("--continue DIR takes the particles, volume and output folder of the "
                         "job it resumes; give no PARTICLES, VOLUME or --out with it")
    out = os.path.abspath(args.continue_dir)
    return replace(RefineConfig(**load_config(out)), out_dir=out, device=args.device)


def main(args) -> int:
    import os
    from dataclasses import replace

    from mpirefine.cli.common import quiet_input_warnings
    from mpirefine.io.outputs import prepare_out_dir
    from mpirefine.logs import get_logger
    from mpirefine.parallel import EXIT_PREEMPTED, Parallel
    from mpirefine.refinement import refine

    resume = args.continue_dir is not None
    cfg = continued_config(args) if resume else config_from_args(args)
    cfg.check_supported()
    par = Parallel()
    log = get_logger(rank=par.rank)
    quiet_input_warnings(par.rank)
    if par.is_root and not resume:
        prepare_out_dir(cfg.out_dir, cfg.overwrite)
    par.barrier()
    cfg = replace(cfg, out_dir=os.path.abspath(cfg.out_dir))
    cfg = choose_image_batch(cfg, par, log)
    try:
        refine.run(cfg, par, log, resume=resume)
    except refine.Preempted as stop:
        # 75 (EX_TEMPFAIL, "try again later"): stopped cleanly, --continue resumes. Not
        # 143, which says a rank was killed or aborted by SIGTERM without that promise.
        log.warning(str(stop))
        return EXIT_PREEMPTED
    except Exception as exc:
        if is_out_of_memory(exc):
            raise OutOfMemory(out_of_memory_message(exc, cfg, par)) from exc
        raise
    return 0


# --------------------------------------------------------------------- memory

def _box(cfg) -> int | None:
    """The reference box: --box, else the initial volume's (its header only)."""
    if cfg.box_px:
        return int(cfg.box_px)
    try:
        from mpirefine.io.mrc import stack_info

        return int(stack_info(cfg.volume).nx)
    except Exception:  # a missing or broken volume is reported when it is read
        return None


def choose_image_batch(cfg, par, log):
    """``cfg`` with the image batch a GPU rank can hold, when --image-batch-size was not
    given: the largest power of two up to 1024 whose search and insertion fit in 80 % of
    the GPU's free memory (shared by the node's ranks on the same GPU), by the memory
    plan (report/memory.py), the smallest over all GPU ranks so every rank batches
    alike.  NumPy ranks keep 256.  Collective."""
    from dataclasses import replace

    from mpirefine import backend
    from mpirefine.geometry.symmetry import group_order
    from mpirefine.report.memory import choose_gpu_image_batch, gpu_batch_line

    if not cfg.image_batch_auto:
        return cfg
    choice, device, box = None, None, None
    try:
        _xp, device = backend.choose_device(cfg.device, par.local_rank())
    except RuntimeError:   # --gpu without a usable GPU: refine reports it in one line
        device = None
    if device is not None:
        box = _box(cfg)
    if box:
        free, _total = backend.device_memory(device)
        sharing = backend.ranks_per_device(par.local_size(), device, backend.gpu_device_count())
        order = group_order(cfg.symmetry) if cfg.symmetry_relaxation == "none" else 1
        choice = choose_gpu_image_batch(box, par.size, free, order, sharing)
    batch = par.allreduce_obj(choice["image_batch_size"] if choice else 1 << 30, op="min")
    first = par.allreduce_obj(par.rank if choice else par.size, op="min")
    if choice is None:
        return cfg
    if par.rank == first:
        log.info(gpu_batch_line(dict(choice, image_batch_size=batch)))
    return replace(cfg, image_batch_size=int(batch))
