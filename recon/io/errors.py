"""The one exception bad particle input raises (and its one special case)."""

from __future__ import annotations

__all__ = ["NotAParticleStack", "ParticleFileError"]


class ParticleFileError(ValueError):
    """A particle file (STAR, MRC) that cannot be used; the message is one clear line."""


class NotAParticleStack(ParticleFileError):
    """A well-formed MRC file that is a 3D map (header space group not 0), not a particle stack."""
