"""Particle files by format: read a RELION ``.star`` or CryoSPARC ``.cs`` file into a
:class:`~mpirefine.io.particles.ParticleSet`, and write a refinement's particles in both.

The format modules (:mod:`~mpirefine.io.star`, :mod:`~mpirefine.io.cs`) build on
:mod:`~mpirefine.io.particles`; this module sits above all three.
"""

from __future__ import annotations

import math
import os

import numpy as np

from mpirefine.errors import InputError
from mpirefine.io.cs import read_cs, write_cs
from mpirefine.io.particles import LOG, ParticleSet, check_duplicates, check_stacks
from mpirefine.io.star import read_star, write_star


def read_particles(path: str | os.PathLike, project_dir: str | None = None,
                   require_stacks: bool = True, box: int | None = None,
                   pixel_size_A: float | None = None) -> ParticleSet:
    """Read a RELION ``.star`` or CryoSPARC ``.cs`` particle file and check it against its stacks.

    The reference grid (``ParticleSet.box``, ``pixel_size_A``) is the first optics
    group's, or ``box`` (px) and ``pixel_size_A`` (Å) where given (``--box``,
    ``--pixel-size``); every particle keeps its own grid as well.

    With ``require_stacks=False`` (for diagnostics such as ``mpirefine info``) stacks
    that cannot be found are kept under the path they would have next to the particle
    file, and neither duplicates nor stack headers are checked: call
    :func:`check_duplicates` and :func:`check_stacks` to collect those problems.
    """
    if box is not None and (int(box) != box or box < 2 or box % 2):
        raise InputError(f"--box must be an even number of pixels >= 2, got {box}")
    if pixel_size_A is not None and not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise InputError(f"--pixel-size must be a positive number (Å), got {pixel_size_A}")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".star", ".cs") and not os.path.isfile(path):
        raise InputError(f"particle file {path!r} does not exist; check the path")
    if ext == ".star":
        ps = read_star(path, project_dir=project_dir, require_stacks=require_stacks)
    elif ext == ".cs":
        ps = read_cs(path, project_dir=project_dir, require_stacks=require_stacks)
    else:
        raise InputError(f"particle file {path!r} has extension {ext or '(none)'!r}; give a "
                         "RELION .star or a CryoSPARC .cs file")
    if len(ps) == 0:
        raise InputError(f"particle file {path!r} holds no particles")
    if require_stacks:
        check_duplicates(ps)
        check_stacks(ps)
    if box is not None or pixel_size_A is not None:
        ps.set_reference_grid(box, pixel_size_A)
    if not ps.uniform and ps.box and ps.pixel_size_A > 0:
        LOG.info(grid_summary(ps))
    return ps


def grid_summary(ps: ParticleSet) -> str:
    """One line per optics group: its grid and how image preparation brings it onto
    the reference grid."""
    lines = [f"reference grid {ps.box} px of {ps.pixel_size_A:.4f} Å; optics groups:"]
    for g in ps.groups():
        lines.append(f"  group {g['group']}: {len(g['rows'])} particles of {g['box']} px, "
                     f"{g['pixel_size_A']:.4f} Å: {resampling_steps(g, ps.box)}")
    return "\n".join(lines)


def resampling_steps(group: dict, box: int) -> str:
    """How a group of :meth:`ParticleSet.groups` comes to the reference grid of ``box`` px."""
    if group["on_reference_grid"]:
        return "on the reference grid"
    steps = []
    if group["padded_box"] != group["box"]:
        steps.append(f"padded to {group['padded_box']} px")
    if group["resampled_box"] != group["padded_box"]:
        way = "cropped" if group["resampled_box"] < group["padded_box"] else "padded"
        steps.append(f"Fourier {way} to {group['resampled_box']} px of "
                     f"{group['effective_pixel_size_A']:.4f} Å")
    if group["resampled_box"] != box:
        steps.append(f"{'cut' if group['resampled_box'] > box else 'padded'} to {box} px")
    return ", ".join(steps)


def write_particles(out_dir: str | os.PathLike, particle_set: ParticleSet,
                    rotations: np.ndarray | None, shifts_A: np.ndarray, split: np.ndarray,
                    scale: np.ndarray) -> tuple[str, str]:
    """Write ``particles.star`` and ``particles.cs`` into ``out_dir``; return both paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    star_path = os.path.join(out_dir, "particles.star")
    cs_path = os.path.join(out_dir, "particles.cs")
    write_star(star_path, particle_set, rotations, shifts_A, split, scale)
    write_cs(cs_path, particle_set, rotations, shifts_A, split, scale)
    return star_path, cs_path
