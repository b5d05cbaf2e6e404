"""Demo: simulate particles of the shipped apoferritin model and refine them from a
20 Å low-pass start, then compare the result with the truth.

`mpiexec -n 2 mpirefine demo --out demo_out` (what ./launch/demo.sh runs).  Writes
the simulated data to DIR/data and the refinement to DIR/refine.
"""

from __future__ import annotations


def add_args(parser):
    from mpirefine.cli.common import add_device_args

    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder [demo_out]")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    parser.add_argument("--n-particles", type=int, default=2000, help="particles to simulate [2000]")
    parser.add_argument("--box", type=int, default=64, help="box size, px [64]")
    parser.add_argument("--pixel-size", type=float, default=1.8, help="pixel size, Å [1.8]")
    parser.add_argument("--model", choices=["asymmetric", "full"], default="asymmetric",
                        help="three neighbouring apoferritin subunits (no symmetry, refined in "
                             "C1), or the full octahedral 24-mer (refined with --symmetry O) "
                             "[asymmetric]")
    parser.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio over the box [0.05]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation and refinement [0]")
    add_device_args(parser)


def main(args) -> int:
    import os
    import time

    import numpy as np

    from mpirefine.config import RefineConfig
    from mpirefine.io import read_particles, read_volume
    from mpirefine.io.outputs import prepare_out_dir, write_json
    from mpirefine.logs import get_logger
    from mpirefine.parallel import Parallel
    from mpirefine.refinement import refine
    from mpirefine.synthetic.evaluate import compare_with_truth, octahedral_group, pose_errors_deg
    from mpirefine.synthetic.models import asymmetric_chains, model_volume
    from mpirefine.synthetic.simulate import simulate_dataset

    par = Parallel()
    log = get_logger(rank=par.rank)
    out = os.path.abspath(args.out)
    data_dir, refine_dir = os.path.join(out, "data"), os.path.join(out, "refine")
    start = time.time()
    if par.is_root:
        prepare_out_dir(out, args.overwrite)
        log.info(f"demo: simulating {args.n_particles} particles of apoferritin ({args.model}), "
                 f"box {args.box}, {args.pixel_size} Å/px, SNR {args.snr}")
        if args.model == "full":
            volume = model_volume(box=args.box, pixel_size_A=args.pixel_size)
        else:
            volume = model_volume(box=args.box, pixel_size_A=args.pixel_size,
                                  chains=asymmetric_chains(), center_A="chains")
        simulate_dataset(volume, args.pixel_size, args.n_particles, data_dir, snr=args.snr,
                         seed=args.seed, overwrite=True)
        prepare_out_dir(refine_dir, True)
    par.barrier()
    cfg = RefineConfig(particles=os.path.join(data_dir, "particles.star"),
                       volume=os.path.join(data_dir, "start_20A.mrc"), out_dir=refine_dir,
                       device=args.device, seed=args.seed, overwrite=True,
                       symmetry="O" if args.model == "full" else "C1")
    summary = refine.run(cfg, par, log)
    if not par.is_root:
        return 0
    truth, px = read_volume(os.path.join(data_dir, "truth.mrc"))
    refined, _ = read_volume(os.path.join(refine_dir, "map.mrc"))
    half_a, _ = read_volume(os.path.join(refine_dir, "map_half_A.mrc"))
    half_b, _ = read_volume(os.path.join(refine_dir, "map_half_B.mrc"))
    vs_truth = compare_with_truth(refined, truth, px)
    halves_vs_truth = compare_with_truth(0.5 * (half_a + half_b), truth, px)
    true_ps = read_particles(os.path.join(data_dir, "particles_true.star"))
    out_ps = read_particles(os.path.join(refine_dir, "particles.star"))
    group = octahedral_group() if args.model == "full" else None
    errors = pose_errors_deg(out_ps.rotations, true_ps.rotations, group)
    shift_err = np.linalg.norm(out_ps.shifts_A - true_ps.shifts_A, axis=1)
    result = {"gsfsc_resolution_A": summary["final_resolution_A"],
              "fsc_vs_truth_0.5_A": vs_truth["resolution_A_05"],
              "fsc_vs_truth_0.143_A": vs_truth["resolution_A_0143"],
              "half_map_average_fsc_vs_truth_0.5_A": halves_vs_truth["resolution_A_05"],
              "median_angular_error_deg": float(np.median(errors)),
              "median_shift_error_A": float(np.median(shift_err)),
              "wall_seconds": time.time() - start, "n_ranks": par.size}
    write_json(os.path.join(out, "demo_summary.json"), result)
    log.info(f"demo done in {result['wall_seconds']:.0f} s: GSFSC {result['gsfsc_resolution_A']:.2f} Å; "
             f"map vs truth FSC 0.5 at {result['fsc_vs_truth_0.5_A']:.2f} Å; median angular error "
             f"{result['median_angular_error_deg']:.2f}°" + (" (modulo O)" if group is not None else ""))
    log.info(f"map: {os.path.join(refine_dir, 'map.mrc')}   "
             f"summary: {os.path.join(out, 'demo_summary.json')}")
    return 0
