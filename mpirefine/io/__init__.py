"""File formats: MRC maps and stacks, RELION STAR, CryoSPARC .cs, and lazy particle images.

Public API::

    read_volume(path) -> (volume (n, n, n) float32 [z, y, x], pixel_size_A)
    write_mrc(path, data, pixel_size_A);  write_stack(path, images, pixel_size_A)
    open_stack(path) -> MrcStack (.shape, .pixel_size_A, .read(indices))
    read_particles(path, project_dir=None) -> ParticleSet
    write_particles(out_dir, particle_set, rotations, shifts_A, split, scale)
    write_star(...), write_cs(...), write_relion_star(path, optics, particles)
    ImageSource(particle_set).images(indices) / .batches(indices, size)
"""

from mpirefine.io.cs import read_cs, write_cs
from mpirefine.io.formats import read_particles, write_particles
from mpirefine.io.mrc import MrcStack, StackInfo, open_stack, read_volume, stack_info, write_mrc, write_stack
from mpirefine.io.particles import ImageSource, ParticleSet
from mpirefine.io.star import read_star, write_relion_star, write_star

__all__ = [
    "read_volume", "write_mrc", "write_stack", "open_stack", "stack_info", "MrcStack",
    "StackInfo", "ParticleSet", "ImageSource", "read_particles", "write_particles",
    "read_star", "write_star", "write_relion_star", "read_cs", "write_cs",
]
