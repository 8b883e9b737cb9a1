"""Particle-set simulator: structures and procedural molecules -> RELION particle sets (with junk on demand)."""

from .atoms import Atoms, load_structure
from .junk import JunkScale, JunkType, simulate_junk
from .particles import CtfRange, SimulatedParticles, simulate_particles
from .potential import atoms_to_volume
from .procedural import ProceduralSettings, oligomer_order, procedural_molecule
from .ray_views import RayViews, RayVolume, simulate_ray_sets, simulate_ray_views
from .run import SimulateSettings, run_simulation
from .session import write_session

__all__ = [
    "Atoms",
    "CtfRange",
    "JunkScale",
    "JunkType",
    "ProceduralSettings",
    "RayViews",
    "RayVolume",
    "SimulateSettings",
    "SimulatedParticles",
    "atoms_to_volume",
    "load_structure",
    "oligomer_order",
    "procedural_molecule",
    "run_simulation",
    "simulate_junk",
    "simulate_particles",
    "simulate_ray_sets",
    "simulate_ray_views",
    "write_session",
]
