"""Fourier shell correlation between two maps: prints the table and the resolution.

`mpirefine fsc A.mrc B.mrc [--mask M.mrc]`.  The resolution is where the curve
first falls below the threshold (0.143 for half maps; use 0.5 against a model).
"""

from __future__ import annotations


def add_args(parser):
    parser.add_argument("map_a", help="first map (.mrc)")
    parser.add_argument("map_b", help="second map (.mrc), same box and pixel size")
    parser.add_argument("--mask", default=None, help="real-space mask applied to both maps")
    parser.add_argument("--threshold", type=float, default=0.143,
                        help="FSC threshold for the reported resolution [0.143]")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the curve as CSV")


def main(args) -> int:
    import numpy as np

    from mpirefine.errors import InputError
    from mpirefine.io import read_volume
    from mpirefine.io.outputs import fsc_table, write_fsc_csv
    from mpirefine.postprocess.fsc import fsc_curve, resolution_A

    a, px_a = read_volume(args.map_a)
    b, px_b = read_volume(args.map_b)
    if a.shape != b.shape:
        raise InputError(f"{args.map_b} has box {b.shape[0]} but {args.map_a} has {a.shape[0]}; "
                         "resample one map to the other's box")
    px = px_a or px_b
    if px_a and px_b and abs(px_a - px_b) > 0.01 * px_a:
        raise InputError(f"pixel sizes differ: {px_a:.4f} Å ({args.map_a}) vs {px_b:.4f} Å "
                         f"({args.map_b}); resample one map")
    if not px:
        raise InputError(f"{args.map_a} and {args.map_b} have no pixel size in their headers; "
                         "set the voxel size (e.g. with mrcfile) and retry")
    mask = None
    if args.mask:
        mask, _ = read_volume(args.mask)
        if mask.shape != a.shape:
            raise InputError(f"mask {args.mask} has box {mask.shape[0]}, maps have {a.shape[0]}; "
                             "use a mask made for these maps")
    if not 0 < args.threshold < 1:
        raise InputError(f"--threshold must lie in (0, 1), got {args.threshold}")
    curve = fsc_curve(a, b, mask)
    n = a.shape[0]
    print(fsc_table(curve, n, px))
    print(f"resolution at FSC {args.threshold}: {resolution_A(curve, n, px, args.threshold):.2f} Å")
    if args.csv:
        write_fsc_csv(args.csv, {"fsc": curve}, n, px)
    return 0 if np.all(np.isfinite(curve)) else 1
