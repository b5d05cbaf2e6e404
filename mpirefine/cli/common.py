"""Options and set-up shared by the subcommands that process particles."""

from __future__ import annotations

import argparse
import logging


def add_device_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="device", action="store_const", const="gpu",
                   help="use a GPU per rank (CuPy); error if none is usable")
    g.add_argument("--cpu", dest="device", action="store_const", const="cpu",
                   help="use NumPy on the CPU even if a GPU is present")
    parser.set_defaults(device="auto")


def add_particle_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particle file: RELION .star (3.0–5.0) or CryoSPARC .cs")
    parser.add_argument("--project-dir", default=None,
                        help="folder that relative stack paths are resolved against "
                             "(default: the particle file's folder, then the current one)")
    # --chunk-size: this option's name before 0.2, still accepted
    parser.add_argument("--image-batch-size", "--chunk-size", dest="image_batch_size", type=int,
                        default=256, metavar="N",
                        help="images processed at once per rank (memory only; no effect "
                             "on results) [256]")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results already in --out")


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    """--pixel-size and --box: the reference grid that maps are made on and every
    optics group's images are resampled onto (default: the first optics group's)."""
    parser.add_argument("--pixel-size", dest="pixel_size_A", type=float, default=None,
                        metavar="Å",
                        help="pixel size of the maps (Å); optics groups of other pixel sizes "
                             "are Fourier cropped or padded to it [the first optics group's]")
    parser.add_argument("--box", dest="box_px", type=int, default=None, metavar="PX",
                        help="box of the maps (px, even); images are cut or padded to it "
                             "after resampling [the first optics group's]")


def quiet_input_warnings(rank: int) -> None:
    """Input warnings (a stack header that disagrees with the metadata, ...) are the same
    on every rank, which all read the particle file: only rank 0 prints them."""
    if rank != 0:
        logging.getLogger("mpirefine.io").setLevel(logging.ERROR)
