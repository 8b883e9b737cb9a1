"""RELION particle files: MRC stacks and volumes, RELION 3.1 STAR tables, and the one particle-reading layer."""

from .errors import NotAParticleStack, ParticleFileError
from .mrc import read_images, read_volume, stack_shape, write_stack, write_volume
from .source import ParticleChunk, ParticleSource, SkippedImages, image_keys
from .star import ParticleTable, path_inside, read_particles, write_particles
from .tables import write_fsc_table

__all__ = [
    "NotAParticleStack",
    "ParticleChunk",
    "ParticleFileError",
    "ParticleSource",
    "ParticleTable",
    "SkippedImages",
    "image_keys",
    "path_inside",
    "read_images",
    "read_particles",
    "read_volume",
    "stack_shape",
    "write_fsc_table",
    "write_particles",
    "write_stack",
    "write_volume",
]
