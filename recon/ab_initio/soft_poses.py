"""Soft poses: the best candidate of each particle and all its candidates with their posterior weights."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["SoftPoses"]


@dataclass
class SoftPoses:
    """Poses of particles: the best candidate, and all candidates with their posterior weights.

    Attributes
    ----------
    rotations: torch.Tensor
        `(n, 3, 3)` float64 RELION matrices of the best candidate.
    origins_angstrom: torch.Tensor
        `(n, 2)` float64 rlnOriginX/YAngst of the best candidate.
    scores: torch.Tensor
        `(n,)` float32 normalised cross-correlation of the best candidate (0 for random starts).
    spread_degrees: torch.Tensor
        `(n,)` float32 posterior RMS angle of the candidates around the best (180 for random starts).
    candidate_rotations: torch.Tensor
        `(n, K, 3, 3)` float64 RELION matrices inserted into the internal accumulator.
    candidate_origins_angstrom: torch.Tensor
        `(n, K, 2)` float64 their origins (Å).
    candidate_weights: torch.Tensor
        `(n, K)` float32 their posterior weights (each row sums to 1).
    """

    rotations: torch.Tensor
    origins_angstrom: torch.Tensor
    scores: torch.Tensor
    spread_degrees: torch.Tensor
    candidate_rotations: torch.Tensor
    candidate_origins_angstrom: torch.Tensor
    candidate_weights: torch.Tensor

    def __len__(self) -> int:
        return int(self.rotations.shape[0])

    def __getitem__(self, index: torch.Tensor | slice) -> SoftPoses:
        """The poses of a subset of particles."""
        return SoftPoses(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def cat(cls, parts: list[SoftPoses]) -> SoftPoses:
        """Concatenate along particles (all parts must have the same ``K``)."""
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    @classmethod
    def empty(cls, n: int, k: int) -> SoftPoses:
        """Uninitialised poses for ``n`` particles and ``k`` candidates."""
        return cls(torch.empty(n, 3, 3, dtype=torch.float64), torch.empty(n, 2, dtype=torch.float64),
                   torch.empty(n), torch.empty(n), torch.empty(n, k, 3, 3, dtype=torch.float64),
                   torch.empty(n, k, 2, dtype=torch.float64), torch.empty(n, k))

    def set(self, index: torch.Tensor, other: SoftPoses) -> None:
        """Write ``other`` into the rows ``index`` (in place)."""
        for f in fields(self):
            getattr(self, f.name)[index] = getattr(other, f.name)
