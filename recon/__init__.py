"""Fourier-space reconstruction core: grids, insertion, CTF, FSC, RELION I/O, simulation.

Knows Fourier grids and particle files, nothing of daemons or networks.
Conventions: docs/conventions.md.
"""

from .accumulator import HalfSetAccumulator
from .ctf import CtfParams, ctf_rfft
from .euler import euler_to_matrix, matrix_to_euler
from .fsc import fsc, resolution_at_threshold, shell_resolutions_angstrom
from .half_sets import half_sets_for_stack

__all__ = [
    "CtfParams",
    "HalfSetAccumulator",
    "ctf_rfft",
    "euler_to_matrix",
    "fsc",
    "half_sets_for_stack",
    "matrix_to_euler",
    "resolution_at_threshold",
    "shell_resolutions_angstrom",
]
