"""Write report.html and plots/ for a refinement's output folder.

`mpirefine report DIR` reads what `mpirefine refine` (or `reconstruct`) wrote into
DIR (summary.json, fsc.csv, map.mrc, particles.star) and writes DIR/plots/*.png and
DIR/report.html: one self-contained page (figures embedded) that opens offline.
Figures whose input is absent are listed as missing, not fatal.
"""

from __future__ import annotations


def add_args(parser):
    parser.add_argument("out_dir", metavar="DIR", help="output folder of a refinement")


def main(args) -> int:
    import os

    from mpirefine.errors import InputError
    from mpirefine.report import write_report

    folder = args.out_dir
    if not os.path.isdir(folder):
        raise InputError(f"{folder!r} is not a folder; give the --out folder of a refinement")
    known = ("summary.json", "fsc.csv", "map.mrc", "particles.star", "particles.cs")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in known):
        raise InputError(f"{folder!r} holds none of {', '.join(known)}; give the --out folder "
                         "of a finished refinement")
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write into {folder!r}; copy the folder somewhere writable "
                         "and run `mpirefine report` on the copy")
    path = write_report(folder)
    print(f"report written to {path}")
    return 0
