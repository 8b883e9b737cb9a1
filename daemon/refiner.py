"""Streaming pose refinement: each pass's poses finished against the running map, old ones re-posed.

Rules (docs/refinement.md):

- **When.** Refinement starts with the first map published once the map holds at least
  ``refine_after`` particles; from then on every published map becomes the new
  reference (:class:`~cryofastar.recon.refinement.RefinementReference`, working box
  ``refine_box``, band at the map's FSC resolution).
- **New particles.** Each pass is matched before insertion, in one of three modes:
  ``local`` (around the network's poses, each half against its own half map),
  ``global`` (a search of SO(3), then local) or ``best`` (both, the better per
  particle). With ``--poses-from map-only`` it is always ``global``. With the network,
  every ``probe_every``-th refined pass (and the first) is a ``best`` probe: if on the
  last probes the network's neighbourhood won for at least half of the particles, the
  network is informative and passes are refined ``local``; otherwise ``global``.
- **Re-posing.** After each refined pass, up to ``repose_per_pass`` particles already in
  the map are re-posed against the current reference: those never refined first (oldest
  first), then those refined against the oldest maps, least certain (largest angular
  spread) first. Their images are read again from their stacks; the old contribution is
  removed from the accumulator and the new one added, so the map equals one built from
  scratch with the new poses (:meth:`~cryofastar.recon.HalfSetAccumulator.remove`).
- **References.** A map is published (and becomes the reference) as soon as the map
  reaches ``refine_after`` particles, and again whenever it has grown by a quarter or
  been edited by re-posing, at most every ``publish_seconds``.
- **While idle.** When no new particles wait, the daemon keeps re-posing (the map goes on
  improving between bursts and after the session) until a whole sweep over the map has
  moved the median particle by less than ``CONVERGED_DEGREES``; new particles resume it.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import numpy as np
import torch
from cryofastar.model.rotations import geodesic_degrees
from cryofastar.recon.io.mrc import read_images
from cryofastar.recon.refinement import RefinementReference, RefineSettings

from .settings import DaemonSettings

logger = logging.getLogger(__name__)

__all__ = ["NEVER", "UNREADABLE", "RefinedPoses", "StreamingRefiner", "read_stack_rows"]

NEVER = 0
"""``refined`` value of a particle never refined (map versions start at 1)."""
UNREADABLE = np.iinfo(np.int32).max
"""``refined`` value of a particle whose stack could not be read again (never re-posed)."""
CONVERGED_DEGREES = 1.0
"""Idle re-posing stops once a whole sweep moved the median particle by less than this."""


@dataclass
class RefinedPoses:
    """Poses of `n` particles after matching, with the map version they were matched against."""

    rotations: torch.Tensor  # (n, 3, 3) float64 RELION matrices
    origins_angstrom: torch.Tensor  # (n, 2) float64 rlnOriginX/YAngst
    scores: torch.Tensor  # (n,) float32 normalised cross-correlation
    spread_degrees: torch.Tensor  # (n,) float32 posterior angular spread
    mode: str
    version: int


def read_stack_rows(stack_names: list[str], stack_ids: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """`(n, B, B)` images of particles given by stack id and 1-based index (one read per stack).

    Raises
    ------
    ParticleFileError
        A stack is gone, truncated or no longer holds an index.
    """
    images: torch.Tensor | None = None
    for stack_id in np.unique(stack_ids):  # a loop over files, not particles
        where = np.nonzero(stack_ids == stack_id)[0]
        block = read_images(stack_names[int(stack_id)], indices[where])
        if images is None:
            images = torch.empty((len(indices), *block.shape[1:]), dtype=torch.float32)
        images[torch.as_tensor(where)] = block
    assert images is not None
    return images


class StreamingRefiner:
    """The refinement policy of one session (module docstring)."""

    def __init__(self, settings: DaemonSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.reference: RefinementReference | None = None
        self.version = 0
        self._passes = 0
        self._probes: collections.deque[float] = collections.deque(maxlen=4)  # network win fraction per probe
        self.search = RefineSettings(working_box=settings.refine_box)
        self.reference_particles = 0  # particles in the map the reference was made from
        self._sweep: list[torch.Tensor] = []  # how far re-posed particles moved since new particles came
        self._swept = 0
        self.converged = False

    def wants_reference(self, n_particles: int) -> bool:
        """Whether the map should be published now to become a (first or fresher) reference."""
        if not self.settings.refine or n_particles < self.settings.refine_after:
            return False
        return self.reference is None or n_particles >= 1.25 * self.reference_particles

    def note_new_particles(self) -> None:
        """New particles arrived: the map changes, idle re-posing is worth doing again."""
        self._sweep, self._swept, self.converged = [], 0, False

    def note_moves(self, degrees: torch.Tensor, n_particles: int) -> None:
        """Record how far re-posed particles moved; a whole sweep under CONVERGED_DEGREES: converged."""
        self._sweep.append(degrees.float())
        self._swept += len(degrees)
        if self._swept >= n_particles:
            moved = float(torch.cat(self._sweep).median())
            self.converged = moved < CONVERGED_DEGREES
            logger.info("re-posing sweep over %d particles: median move %.2f°%s", self._swept, moved,
                        " (converged)" if self.converged else "")
            self._sweep, self._swept = [], 0
    @property
    def active(self) -> bool:
        """Whether a reference exists (the map reached ``refine_after`` particles)."""
        return self.reference is not None

    @property
    def network_informative(self) -> bool | None:
        """Whether recent probes found the network's poses the better start (``None``: no probe yet)."""
        if not self._probes:
            return None
        return float(np.mean(self._probes)) >= 0.5

    def update_reference(self, half_volumes: torch.Tensor, apix: float, resolution_angstrom: float,
                         n_particles: int) -> None:
        """Take a new map as the reference (``(2, B, B, B)`` half maps), once it holds enough particles."""
        if not self.settings.refine or n_particles < self.settings.refine_after:
            return
        self.reference = RefinementReference(half_volumes, apix, resolution_angstrom, self.search, self.device)
        self.reference_particles = n_particles
        self.version += 1
        logger.info("refinement reference v%d: %d particles, %.1f Å (band %.3f cycles/px at %d px)", self.version,
                    n_particles, resolution_angstrom, self.reference.local_band, self.reference.work)

    def _mode(self, has_network_poses: bool) -> str:
        if not has_network_poses or self.settings.poses_from == "map-only":
            return "global"
        probe = self._passes % self.settings.probe_every == 0
        if probe or self.network_informative is None:
            return "best"
        return "local" if self.network_informative else "global"

    def refine(self, images: torch.Tensor, half_sets: torch.Tensor, rotations: torch.Tensor,
               origins_angstrom: torch.Tensor, network_poses: bool = True) -> RefinedPoses:
        """Match one pass's particles (`(n, B, B)` images at the session box) against the reference."""
        assert self.reference is not None
        mode = self._mode(network_poses)
        self._passes += 1
        match, origins = self.reference.match(images, half_sets, rotations, origins_angstrom, mode)
        if mode == "best":  # which start won: the network's neighbourhood or the global search
            moved = geodesic_degrees(match.rotations, rotations.double())
            won = float((moved <= 1.5 * self.search.local_range_degrees).float().mean())
            self._probes.append(won)
            logger.info("probe: the network's poses were the better start for %.0f%% of %d particles", 100 * won,
                        len(images))
        return RefinedPoses(match.rotations, origins, match.scores, match.spread_degrees, mode, self.version)

    def repose(self, images: torch.Tensor, half_sets: torch.Tensor, rotations: torch.Tensor,
               origins_angstrom: torch.Tensor) -> RefinedPoses:
        """Re-pose particles already in the map: local if the network is informative, else global."""
        assert self.reference is not None
        informative = self.settings.poses_from == "network" and self.network_informative
        mode = "local" if informative else "global"
        match, origins = self.reference.match(images, half_sets, rotations, origins_angstrom, mode)
        return RefinedPoses(match.rotations, origins, match.scores, match.spread_degrees, mode, self.version)

    def pick_stale(self, refined: np.ndarray, spread: np.ndarray) -> np.ndarray:
        """Rows (into the pose table) to re-pose now: at most ``repose_per_pass`` (module docstring).

        ``refined`` `(n,)` map version each particle was last matched against (0: never);
        ``spread`` `(n,)` its angular spread (NaN: unknown, taken as largest).
        """
        stale = np.nonzero(refined < self.version)[0]
        if len(stale) == 0 or self.settings.repose_per_pass == 0:
            return stale[:0]
        uncertainty = np.where(np.isfinite(spread[stale]), spread[stale], np.inf)
        order = np.lexsort((stale, -uncertainty, refined[stale]))  # last key first: oldest map, least sure, oldest
        return stale[order[: self.settings.repose_per_pass]]

