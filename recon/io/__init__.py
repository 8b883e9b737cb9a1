"""RELION particle files: MRC stacks and volumes, RELION 3.1 STAR tables."""

from .errors import ParticleFileError
from .mrc import read_images, read_volume, stack_shape, write_stack, write_volume
from .star import ParticleTable, read_particles, write_particles
from .tables import write_fsc_table

__all__ = [
    "ParticleFileError",
    "ParticleTable",
    "read_images",
    "read_particles",
    "read_volume",
    "stack_shape",
    "write_fsc_table",
    "write_particles",
    "write_stack",
    "write_volume",
]
