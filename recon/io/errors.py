"""The one exception bad particle input raises."""

from __future__ import annotations

__all__ = ["ParticleFileError"]


class ParticleFileError(ValueError):
    """A particle file (STAR, MRC) that cannot be used; the message is one clear line."""
