"""Simulate a particle dataset with known poses, CTFs and noise (for tests and demos).

The particles are projections of a volume at uniformly random orientations, each
multiplied by its own CTF, shifted by a random origin and buried in white Gaussian
noise.  The volume is an MRC map (--volume), the density of a PDB model (--pdb), or
of the shipped apoferritin Cα model (--model, the default when no source is given).

Writes to --out: stack_NNN.mrcs (the images), particles.star (optics and CTF, no
poses: the refinement input), particles_true.star (with the true rlnAngleRot/Tilt/Psi,
rlnOriginX/YAngst and a rlnRandomSubset split), truth.mrc, start_20A.mrc (the truth
low-passed to 20 Å, a starting reference) and simulation.json (every parameter).

Example:
  mpirefine simulate --model --asymmetric --n-particles 5000 --snr 0.05 --out sim/
"""

from __future__ import annotations

import argparse
import math
import os

from mpirefine.errors import InputError

DEFAULT_BOX = 64
DEFAULT_N = 2000


def add_args(parser: argparse.ArgumentParser) -> None:
    from mpirefine.synthetic.models import DEFAULT_PIXEL_SIZE_A, DEFAULT_SIGMA_A

    src = parser.add_argument_group("volume (one of)")
    one = src.add_mutually_exclusive_group()
    one.add_argument("--volume", metavar="MRC",
                     help="cubic MRC map to project; its box and pixel size are used "
                     "(--pixel-size overrides a header without one)")
    one.add_argument("--pdb", metavar="PDB", help="atomic model: Gaussian atoms on the grid, "
                     "centred on the model's centroid")
    one.add_argument("--model", action="store_true",
                     help="the shipped apoferritin Cα model (24 chains, octahedral, 4-folds "
                     "on X, Y, Z); the default when no volume is given")
    src.add_argument("--chains", metavar="A,B,C",
                     help="with --model/--pdb: keep only these chains (default: all)")
    src.add_argument("--asymmetric", action="store_true",
                     help="with --model/--pdb: keep a default set of 3 neighbouring chains "
                     "with no symmetry")
    src.add_argument("--center-on-chains", action="store_true",
                     help="with --chains/--asymmetric: centre the box on the kept chains "
                     "(default: on the whole model, keeping its symmetry axes)")
    src.add_argument("--atom-sigma-A", type=float, default=DEFAULT_SIGMA_A, metavar="Å",
                     help="Gaussian width of each atom, Å (default: %(default)s, for Cα models)")
    src.add_argument("--box", type=int, default=None, metavar="PX",
                     help=f"box side in pixels for --model/--pdb (default: {DEFAULT_BOX}; "
                     "with --volume: the map's box)")
    src.add_argument("--pixel-size", type=float, default=None, metavar="Å",
                     help=f"pixel size in Å (default: {DEFAULT_PIXEL_SIZE_A} for --model/--pdb; "
                     "the map header's for --volume)")

    sim = parser.add_argument_group("particles")
    sim.add_argument("--n-particles", type=int, default=DEFAULT_N, metavar="N",
                     help="number of particles (default: %(default)s)")
    sim.add_argument("--snr", type=float, default=0.05,
                     help="signal-to-noise ratio: mean clean-image variance over the box / "
                     "noise variance; 'inf' for no noise (default: %(default)s)")
    sim.add_argument("--defocus-min-um", type=float, default=1.0, metavar="µm",
                     help="smallest mean defocus (underfocus), µm (default: %(default)s)")
    sim.add_argument("--defocus-max-um", type=float, default=2.5, metavar="µm",
                     help="largest mean defocus, µm (default: %(default)s)")
    sim.add_argument("--astigmatism-A", type=float, default=500.0, metavar="Å",
                     help="largest |DfU - DfV|, Å, drawn uniformly at a random angle "
                     "(default: %(default)s)")
    sim.add_argument("--shift-sigma-A", type=float, default=3.0, metavar="Å",
                     help="standard deviation of the origins along X and Y, Å "
                     "(default: %(default)s)")
    sim.add_argument("--voltage-kV", type=float, default=300.0, metavar="kV",
                     help="accelerating voltage, kV (default: %(default)s)")
    sim.add_argument("--cs-mm", type=float, default=2.7, metavar="mm",
                     help="spherical aberration, mm (default: %(default)s)")
    sim.add_argument("--amplitude-contrast", type=float, default=0.1, metavar="Q0",
                     help="amplitude contrast fraction (default: %(default)s)")
    sim.add_argument("--ctf-bfactor", type=float, default=0.0, metavar="Å²",
                     help="CTF envelope B-factor, Å² (default: %(default)s)")
    sim.add_argument("--beam-tilt", type=float, nargs=2, default=(0.0, 0.0),
                     metavar=("X", "Y"),
                     help="beam tilt of the microscope (mrad), in the images and in "
                          "particles_true.star only (refine --optimize-ctf-global finds it) [0 0]")
    sim.add_argument("--trefoil", type=float, nargs=2, default=(0.0, 0.0), metavar=("A", "B"),
                     help="trefoil: coefficients of RELION's odd Zernike terms Z3⁻³, Z3³ "
                          "(rad·Å³), likewise [0 0]")
    sim.add_argument("--cs-error", type=float, default=0.0, metavar="MM",
                     help="the images' spherical aberration exceeds --cs by this (mm): in "
                          "the images and, as rlnEvenZernike, in particles_true.star only "
                          "(which refine and reconstruct apply to the CTF) [0]")
    sim.add_argument("--tetrafoil", type=float, nargs=2, default=(0.0, 0.0), metavar=("A", "B"),
                     help="tetrafoil: coefficients of RELION's even Zernike terms Z4⁻⁴, Z4⁴ "
                          "(rad·Å⁴), likewise [0 0]")
    sim.add_argument("--ewald-curvature", default=None, choices=["negative", "positive"],
                     help="project onto the curved Ewald sphere of --voltage-kV with this "
                          "curvature sign (refine and reconstruct --ewald-curvature) "
                          "[off: a flat sphere]")
    sim.add_argument("--mag-matrix", type=float, nargs=4, default=(1.0, 0.0, 0.0, 1.0),
                     metavar=("M00", "M01", "M10", "M11"),
                     help="anisotropic magnification of the microscope, RELION's "
                          "rlnMagMat00..11: in the images and particles_true.star only "
                          "(which reconstruct and refine apply) [1 0 0 1]")
    sim.add_argument("--stack-size", type=int, default=1000, metavar="N",
                     help="images per .mrcs stack, also the batch held in memory "
                     "(default: %(default)s)")
    sim.add_argument("--seed", type=int, default=0,
                     help="random seed; the same seed gives the same data (default: %(default)s)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    out.add_argument("--overwrite", action="store_true",
                     help="write into a non-empty output folder (default: refuse)")


def _chains(args, path: str) -> list[str] | None:
    from mpirefine.synthetic.models import asymmetric_chains

    if args.chains and args.asymmetric:
        raise InputError("give either --chains or --asymmetric, not both")
    if args.asymmetric:
        return asymmetric_chains(path=path)
    if args.chains:
        chains = [c.strip() for c in args.chains.split(",") if c.strip()]
        if not chains:
            raise InputError(f"--chains {args.chains!r} names no chain; use e.g. --chains A,B,C")
        return chains
    return None


def load_volume(args) -> tuple:
    """(volume, pixel_size_A, description) from the parsed arguments."""
    from mpirefine.synthetic.models import DEFAULT_PIXEL_SIZE_A, model_volume, shipped_model_path

    if args.volume:
        if args.chains or args.asymmetric or args.center_on_chains:
            raise InputError("--chains/--asymmetric/--center-on-chains need --model or --pdb, "
                             "not --volume")
        from mpirefine.io.mrc import read_volume

        volume, header_px = read_volume(args.volume)
        if args.box is not None and args.box != volume.shape[0]:
            raise InputError(f"--box {args.box} differs from the map's box {volume.shape[0]}; "
                             "resample the map, or leave --box out")
        pixel = args.pixel_size if args.pixel_size is not None else header_px
        if not pixel or pixel <= 0:
            raise InputError(f"{args.volume} has no pixel size in its header; give --pixel-size")
        return volume, float(pixel), f"volume {os.path.abspath(args.volume)}"
    path = args.pdb or shipped_model_path()
    box = DEFAULT_BOX if args.box is None else args.box
    if box < 16:
        raise InputError(f"--box {box} is too small; use at least 16 px")
    pixel = DEFAULT_PIXEL_SIZE_A if args.pixel_size is None else args.pixel_size
    if pixel <= 0:
        raise InputError(f"--pixel-size must be > 0 Å, got {pixel}")
    if args.atom_sigma_A < 0:
        raise InputError(f"--atom-sigma-A must be >= 0 Å, got {args.atom_sigma_A}")
    chains = _chains(args, path)
    if args.center_on_chains and chains is None:
        raise InputError("--center-on-chains needs --chains or --asymmetric")
    volume = model_volume(box, pixel, chains=chains, path=path, sigma_A=args.atom_sigma_A,
                          center_A="chains" if args.center_on_chains else None)
    what = f"model {os.path.abspath(path)}" + (f", chains {','.join(chains)}" if chains else "")
    return volume, float(pixel), what


def main(args: argparse.Namespace) -> int:
    from mpirefine.synthetic.simulate import simulate_dataset

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {args.out!r} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise InputError(f"output folder {args.out!r} is not empty; choose a new --out or "
                         "add --overwrite")
    if not (args.snr > 0):   # also catches NaN
        raise InputError(f"--snr must be > 0 (or inf for no noise), got {args.snr}")
    if args.defocus_min_um > args.defocus_max_um:
        raise InputError(f"--defocus-min-um {args.defocus_min_um} exceeds --defocus-max-um "
                         f"{args.defocus_max_um}")
    volume, pixel, what = load_volume(args)
    result = simulate_dataset(
        volume, pixel, args.n_particles, out, snr=args.snr,
        defocus_range_um=(args.defocus_min_um, args.defocus_max_um),
        astigmatism_A=args.astigmatism_A, shift_sigma_A=args.shift_sigma_A,
        voltage_kV=args.voltage_kV, cs_mm=args.cs_mm,
        amplitude_contrast=args.amplitude_contrast, bfactor_A2=args.ctf_bfactor,
        seed=args.seed, stack_size=args.stack_size, overwrite=True, source=what,
        beam_tilt_mrad=tuple(args.beam_tilt), trefoil=tuple(args.trefoil),
        cs_error_mm=args.cs_error, tetrafoil=tuple(args.tetrafoil),
        ewald_curvature=args.ewald_curvature, mag_matrix=tuple(args.mag_matrix))
    noise = ("no noise" if not math.isfinite(args.snr)
             else f"SNR {args.snr:g}, noise sigma {result.noise_sigma:.4g}")
    print(f"simulated {args.n_particles} particles of {what}\n"
          f"  box {volume.shape[0]} px, {pixel:g} Å/px, {noise}\n"
          f"  images:      {len(result.stacks)} stack(s) in {result.out_dir}\n"
          f"  refine with: {result.particles_star}\n"
          f"  true poses:  {result.particles_true_star}\n"
          f"  truth:       {result.truth_mrc}\n"
          f"  start:       {result.start_mrc}")
    return 0
