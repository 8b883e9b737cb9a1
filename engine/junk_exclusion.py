"""Keeping 2D junk out of the live 3D map: particles taken out and put back exactly, by pose-table row.

The daemon's 2D lane judges every particle it classifies: junk when every class it keeps a
weight in is a junk class (:func:`~cryofastar.recon.classify2d.particle_junk`). Once its
classes have settled it hands the verdicts over (:class:`JunkVerdicts`: stack, 1-based
index, junk or not, for every particle it holds), and the owner of the map (the daemon's
accumulator thread) applies them with :class:`JunkExclusion`:

- a particle of the map newly judged junk is **taken out**: its image is read again from
  its stack and removed at its recorded pose, half set and CTF
  (:meth:`~cryofastar.recon.HalfSetAccumulator.remove`), exactly as re-posing removes it,
  and its pose-table row is marked ``excluded``;
- an excluded particle no longer judged junk (the classes moved) is **put back** at its
  recorded pose and marked stale (``refined`` = :data:`~.streaming_refiner.NEVER`), so
  that refinement poses it again against the current map;
- particles the verdicts do not name keep their state; a particle the lane judged before
  the 3D lane inserted it is taken out by a later application (the verdicts are kept and
  applied again once new particles are in the map).

Excluded rows stay in the pose table and the journal (they are accounted for, never read
as new again) and are saved in the same checkpoint as the grids, so a restart resumes
exactly what the map holds. Refinement never picks an excluded row
(:class:`~.live_refinement.LiveRefinement`), and ``particles.star`` lists only the map's
particles (:meth:`~.pose_table.PoseTable.to_star`). The offline path does the same with
``classify``'s ``selected_particles.star``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from cryofastar.recon.io.errors import out_of_descriptors

from .live_refinement import SessionMap
from .pose_table import positions_of
from .streaming_refiner import NEVER, UNREADABLE

logger = logging.getLogger(__name__)

__all__ = ["ExclusionStep", "JunkExclusion", "JunkVerdicts", "rows_to_change"]

MAX_ROWS_PER_STEP = 4096
"""Particles taken out or put back in one step (the rest in the next: the accumulator thread stays responsive)."""


@dataclass(frozen=True)
class JunkVerdicts:
    """The 2D lane's verdict on every particle it classified.

    Attributes
    ----------
    stacks: np.ndarray
        `(n,)` str: resolved stack path, as the session's pose table names it.
    indices: np.ndarray
        `(n,)` int64: 1-based index in the stack.
    junk: np.ndarray
        `(n,)` bool: judged junk.
    version: int
        The class set these verdicts come from (the ``classes`` message version).
    """

    stacks: np.ndarray
    indices: np.ndarray
    junk: np.ndarray
    version: int

    def __post_init__(self) -> None:
        if not len(self.stacks) == len(self.indices) == len(self.junk):
            raise ValueError(f"verdicts of unequal lengths: {len(self.stacks)} stacks, {len(self.indices)} "
                             f"indices, {len(self.junk)} flags")


@dataclass(frozen=True)
class ExclusionStep:
    """What one application changed: particles taken out of the map and put back in."""

    removed: int = 0
    restored: int = 0
    left: int = 0
    """Changes still to do (over :data:`MAX_ROWS_PER_STEP`, or stacks out of descriptors for now)."""


def rows_to_change(stack_names: list[str], stack_id: np.ndarray, index: np.ndarray, excluded: np.ndarray,
                   refined: np.ndarray, verdicts: JunkVerdicts) -> tuple[np.ndarray, np.ndarray]:
    """Pose-table rows to take out and to put back, ``(remove, restore)``, both sorted.

    ``stack_names`` and the `(n,)` columns ``stack_id``, ``index``, ``excluded``, ``refined``
    are the pose table's. A row is taken out when the verdicts call it junk and it is in
    the map; put back when it is excluded and the verdicts name it as not junk; either only
    while its images can be read again (``refined`` != UNREADABLE). Rows the verdicts do
    not name are left alone.
    """
    at = positions_of(stack_names, stack_id, index, verdicts.stacks, verdicts.indices)
    named = at >= 0
    judged_junk = named & np.asarray(verdicts.junk, bool)[np.maximum(at, 0)] if len(verdicts.junk) else named
    excluded = excluded.astype(bool)
    readable = refined != UNREADABLE  # a stack gone or replaced: its particles stay as they are
    remove = np.flatnonzero(judged_junk & ~excluded & readable)
    restore = np.flatnonzero(named & ~judged_junk & excluded & readable)
    return remove, restore


class JunkExclusion:
    """Applies :class:`JunkVerdicts` to a live map (the map's owner thread only; module docstring).

    Parameters
    ----------
    session: SessionMap
        The map: its accumulator and pose table.
    read_images: Callable[[np.ndarray], torch.Tensor]
        `(k, B, B)` images of pose-table rows, read again (raises ParticleFileError, a
        ValueError, when a stack is gone or changed).
    """

    def __init__(self, session: SessionMap, read_images: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.session = session
        self._read = read_images
        self.verdicts: JunkVerdicts | None = None
        self._applied: tuple[int, int] | None = None  # (verdicts version, table length) fully applied

    @property
    def excluded(self) -> int:
        """Particles out of the map now."""
        return int((~self.session.poses.in_map()).sum())

    def offer(self, verdicts: JunkVerdicts) -> None:
        """Newer verdicts (applied by the next :meth:`step`)."""
        self.verdicts = verdicts

    def due(self) -> bool:
        """Whether :meth:`step` has something to do: new verdicts, or particles inserted since the last."""
        if self.verdicts is None:
            return False
        return self._applied != (self.verdicts.version, len(self.session.poses))

    def step(self) -> ExclusionStep:
        """Take out and put back up to :data:`MAX_ROWS_PER_STEP` particles (one read of their images).

        Images that cannot be read again (a stack gone or replaced) leave those particles as
        they are (in the map or out of it), marked unreadable (never re-posed, taken out or
        put back), with a log line.
        """
        verdicts, table, acc = self.verdicts, self.session.poses, self.session.accumulator
        if verdicts is None or acc is None:
            return ExclusionStep()
        state = (verdicts.version, len(table))
        remove, restore = rows_to_change(table.stack_names, table.column("stack_id"), table.column("index"),
                                         table.column("excluded"), table.column("refined"), verdicts)
        total = len(remove) + len(restore)
        if total == 0:
            self._applied = state
            return ExclusionStep()
        remove, restore = remove[:MAX_ROWS_PER_STEP], restore[: max(MAX_ROWS_PER_STEP - len(remove), 0)]
        rows = np.sort(np.concatenate([remove, restore]))
        try:
            images = self._read(rows)
            ctf = table.ctf(rows)
        except ValueError as exc:  # ParticleFileError is a ValueError
            if out_of_descriptors(exc):
                logger.warning("cannot read %d particles to take 2D junk out now (%s); tried again later",
                               len(rows), exc)
                return ExclusionStep(left=total)
            logger.warning("cannot read %d particles again (%s); they stay in the map as they are", len(rows), exc)
            table.set_values("refined", rows, UNREADABLE)
            return ExclusionStep(left=total - len(rows))
        out = np.isin(rows, remove)
        halves = torch.from_numpy(table.column("half_set")[rows].astype(np.int64))
        rotations = table.rotations(rows)
        origins = torch.from_numpy(table.column("origins")[rows])
        if out.any():  # validated before the grids change: the add below then cannot fail half-way
            sel = torch.from_numpy(out)
            acc.remove(images[sel], rotations[sel], origins[sel], halves[sel], _subset(ctf, out))
        if (~out).any():
            sel = torch.from_numpy(~out)
            acc.add(images[sel], rotations[sel], origins[sel], halves[sel], _subset(ctf, ~out))
            table.set_values("refined", rows[~out], NEVER)  # posed again against the current map
        table.set_values("excluded", rows, out)
        done = len(rows)
        if done == total:
            self._applied = state
        logger.info("2D junk (class set %d): %d particles taken out of the map, %d put back; %d out in all",
                    verdicts.version, int(out.sum()), int((~out).sum()), self.excluded)
        return ExclusionStep(removed=int(out.sum()), restored=int((~out).sum()), left=total - done)


def _subset(ctf, keep: np.ndarray):  # noqa: ANN001, ANN202 - CtfParams | None in and out
    return None if ctf is None else ctf[torch.from_numpy(keep)]
