"""Particle files by format: read a RELION ``.star`` or CryoSPARC ``.cs`` file into a
:class:`~mpirefine.io.particles.ParticleSet`, and write a refinement's particles in both.

The format modules (:mod:`~mpirefine.io.star`, :mod:`~mpirefine.io.cs`) build on
:mod:`~mpirefine.io.particles`; this module sits above all three.
"""

from __future__ import annotations

import os

import numpy as np

from mpirefine.errors import InputError
from mpirefine.io.cs import read_cs, write_cs
from mpirefine.io.particles import ParticleSet, check_duplicates, check_stacks
from mpirefine.io.star import read_star, write_star


def read_particles(path: str | os.PathLike, project_dir: str | None = None,
                   require_stacks: bool = True) -> ParticleSet:
    """Read a RELION ``.star`` or CryoSPARC ``.cs`` particle file and check it against its stacks.

    With ``require_stacks=False`` (for diagnostics such as ``mpirefine info``) stacks
    that cannot be found are kept under the path they would have next to the particle
    file, and neither duplicates nor stack headers are checked: call
    :func:`check_duplicates` and :func:`check_stacks` to collect those problems.
    """
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
        ps.box = check_stacks(ps)
    return ps


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
