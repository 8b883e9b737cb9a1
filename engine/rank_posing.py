"""First poses on another rank of a live session (``watch --nproc``, docs/scaling.md "Live: watch --nproc").

Rank 0 refines the whole map: the probe, the ab initio, the class poses and re-posing are
its own. Every other rank gives the passes it takes a first pose only, by rank 0's policy
for a pass in a hurry (:meth:`~cryofastar.engine.streaming_refiner.StreamingRefiner.hurried_mode`),
which rank 0 sends at each sync with its reference map:

- ``own``: the pass goes in at the network's poses (in rank 0's session frame) or at random
  poses, unrefined (``refined`` 0: rank 0 re-poses it first);
- ``coarse``: the global search alone against the reference
  (:meth:`~cryofastar.recon.refinement.RefinementReference.match`, mode ``coarse``), ``refined``
  :data:`~cryofastar.engine.streaming_refiner.COARSE` (re-posed locally by rank 0, first).

A pass rank 0 posed in a hurry gets the same poses by the same code, so where a particle
goes does not change how it is posed.
"""

from __future__ import annotations

import torch
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.refinement import RefinementReference, RefineSettings

from .streaming_refiner import COARSE, RankPolicy, RefinedPoses

__all__ = ["RankPoser", "ReferenceSource"]

ReferenceSource = tuple[torch.Tensor, float, float, int]
"""(half maps `(2, B, B, B)` float32, pixel size Å, FSC resolution Å, map version) of rank 0's reference."""


class RankPoser:
    """A non-zero rank's side of the session's refinement (module docstring).

    Parameters
    ----------
    refine_box: int
        The session's ``refine_box`` (the working box of the reference, as on rank 0).
    device: torch.device
        Where the search runs.
    """

    def __init__(self, refine_box: int, device: torch.device) -> None:
        self.search = RefineSettings(working_box=refine_box)
        self.device = device
        self.policy = RankPolicy()
        self.reference: RefinementReference | None = None
        self.version = 0  # the reference's map version

    def adopt(self, policy: RankPolicy, source: ReferenceSource | None) -> None:
        """Take rank 0's policy, and its reference when one is sent (only when its version changed)."""
        self.policy = policy
        if source is not None and source[3] != self.version:
            halves, apix, resolution, version = source
            self.reference = RefinementReference(halves, apix, resolution, self.search, self.device)
            self.version = version

    def first_poses(self, images: torch.Tensor, half_sets: torch.Tensor, origins_angstrom: torch.Tensor,
                    ctf: CtfParams | None, network: bool) -> RefinedPoses | None:
        """The pass's first poses (``None``: it goes in at its own, unrefined).

        `(n, B, B)` images at the session box, `(n,)` half sets, `(n, 2)` origins (Å) to start from, their CTF;
        ``network``: their poses are the network's (else random).
        """
        if self.policy.mode(network) == "own" or self.reference is None:
            return None
        match, origins = self.reference.match(images, half_sets, None, origins_angstrom, "coarse", ctf)
        return RefinedPoses(match.rotations, origins, match.scores, match.spread_degrees, "coarse", COARSE)
