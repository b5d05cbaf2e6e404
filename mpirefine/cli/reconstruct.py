"""Reconstruct half maps, their FSC and a full map from the poses already in a particle file.

No alignment: the particles' angles and origins are used as they are (like
relion_reconstruct, but gold-standard).  Optics groups of other boxes or pixel sizes are
resampled onto the reference grid (the first group's, or --box / --pixel-size).  Writes
map_half_A.mrc, map_half_B.mrc, map.mrc (all particles, regularised with the SSNR the
half maps' FSC implies, FSC-weighted and cut at the 0.143 resolution), map_unfil.mrc
(all particles, unregularised), fsc.csv and summary.json.
"""

from __future__ import annotations

import os
import time


def add_args(parser):
    from mpirefine.cli.common import add_device_args, add_grid_args, add_output_args, add_particle_args

    add_particle_args(parser)
    add_output_args(parser)
    add_grid_args(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the half-set split when the file has none [0]")
    parser.add_argument("--symmetry", default="C1",
                        help="point group imposed on the reconstruction (Cn, Dn, T, O, I; "
                             "RELION's axis conventions), as relion_reconstruct --sym [C1]")
    parser.add_argument("--window", action="store_true",
                        help="window images with a soft circle (0.85–0.99 of half the box) "
                             "before insertion [off]")
    parser.add_argument("--ewald-correction", action="store_true",
                        help="Ewald sphere correction: insert each image's two side bands on "
                             "the curved sphere of its voltage, as relion_reconstruct --ewald "
                             "[off]")
    parser.add_argument("--ewald-curvature", default=None, choices=["negative", "positive"],
                        help="curvature sign, with --ewald-correction only; negative is "
                             "relion_reconstruct --ewald's default, positive its "
                             "--reverse_curvature [negative]")
    parser.add_argument("--particle-diameter", dest="particle_diameter_A", type=float,
                        default=None, metavar="Å",
                        help="diameter of the disc that separates the side bands, Å, as "
                             "relion_reconstruct --mask_diameter; needed with --ewald-correction")
    add_device_args(parser)


def ewald_option(args):
    """The EwaldCorrection the options ask for, or None; InputError for a bad combination."""
    from mpirefine.errors import InputError
    from mpirefine.physics.ewald import EwaldCorrection

    if not args.ewald_correction:
        for given, flag in ((args.ewald_curvature, "--ewald-curvature"),
                            (args.particle_diameter_A, "--particle-diameter")):
            if given is not None:
                raise InputError(f"{flag} applies only with --ewald-correction")
        return None
    if args.particle_diameter_A is None:
        raise InputError("--ewald-correction needs --particle-diameter (Å): the disc that "
                         "separates the two side bands, a little larger than the particle")
    try:
        return EwaldCorrection(args.ewald_curvature or "negative", args.particle_diameter_A)
    except ValueError as exc:
        raise InputError(f"--particle-diameter: {exc}") from exc


def main(args) -> int:
    import numpy as np

    from mpirefine.backend import backend_name, to_numpy
    from mpirefine.cli.common import quiet_input_warnings
    from mpirefine.errors import InputError
    from mpirefine.geometry.symmetry import point_group
    from mpirefine.io import read_particles, write_mrc
    from mpirefine.io.outputs import fsc_table, prepare_out_dir, write_fsc_csv, write_json
    from mpirefine.logs import get_logger
    from mpirefine.parallel import Parallel
    from mpirefine.postprocess.fsc import crossing_shell, resolution_A
    from mpirefine.refinement.batching import random_split
    from mpirefine.refinement.halfmaps import fsc_filter, full_map, insert_at_poses, reconstruct_half_maps
    from mpirefine.refinement.images import ImagePrep

    start = time.time()
    ewald = ewald_option(args)
    par = Parallel()
    log = get_logger(rank=par.rank)
    quiet_input_warnings(par.rank)
    xp = par.select_device(args.device)
    out = prepare_out_dir(args.out, args.overwrite) if par.is_root else None
    par.barrier()
    ps = read_particles(args.particles, project_dir=args.project_dir, box=args.box_px,
                        pixel_size_A=args.pixel_size_A)
    if ps.rotations is None:
        raise InputError(f"{args.particles} has no poses (rlnAngleRot/Tilt/Psi or "
                         "alignments3D/pose); reconstruct needs aligned particles — run "
                         "`mpirefine refine` first")
    n, px = ps.box, ps.pixel_size_A
    split = ps.split if np.all(ps.split >= 0) else random_split(len(ps), args.seed)
    prep = ImagePrep(box=n, pixel_size_A=px, window=args.window)
    groups = "" if ps.uniform else f" ({len(ps.groups())} grids resampled onto it)"
    log.info(f"reconstruct: {len(ps)} particles, box {n}, {px:.3f} Å/px{groups}, "
             f"{par.size} rank(s), {backend_name(xp)}")
    group = point_group(args.symmetry)
    if ewald is not None:
        log.info(f"Ewald sphere correction: {ewald.curvature} curvature, side bands separated "
                 f"by a {ewald.diameter_A:g} Å disc")
    accs = insert_at_poses(par, ps, split, prep, xp, args.image_batch_size, ewald)
    halves = reconstruct_half_maps(par, accs, n, group if len(group) > 1 else None)
    unfiltered = full_map(par, accs, n)
    fsc = par.bcast_obj(halves.fsc if par.is_root else None, root=0)
    regularised = full_map(par, accs, n, half_fsc=fsc)
    if not par.is_root:
        return 0
    maps = halves.unregularised
    res = resolution_A(fsc, n, px)
    write_mrc(os.path.join(out, "map_half_A.mrc"), maps[0], px)
    write_mrc(os.path.join(out, "map_half_B.mrc"), maps[1], px)
    write_mrc(os.path.join(out, "map.mrc"), fsc_filter(regularised, fsc, crossing_shell(fsc)), px)
    write_mrc(os.path.join(out, "map_unfil.mrc"), to_numpy(unfiltered), px)
    write_fsc_csv(os.path.join(out, "fsc.csv"), {"fsc_halves": fsc}, n, px)
    write_json(os.path.join(out, "summary.json"), {
        "command": "reconstruct", "particles": os.path.abspath(args.particles),
        "n_particles": len(ps), "box": n, "pixel_size_A": px, "symmetry": args.symmetry,
        "ewald": None if ewald is None else {"curvature": ewald.curvature,
                                             "particle_diameter_A": ewald.diameter_A},
        "resolution_A_0143": res, "resolution_A_05": resolution_A(fsc, n, px, 0.5),
        "n_ranks": par.size, "backend": backend_name(xp),
        "wall_seconds": time.time() - start})
    log.info(fsc_table(fsc, n, px))
    log.info(f"GSFSC resolution (0.143): {res:.2f} Å; maps written to {out}")
    return 0
