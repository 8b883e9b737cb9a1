"""The refinement of a live session's map: the streaming refiner applied to the particles already in it.

The daemon hands each posed pass here before inserting it, and, between passes and
while idle, lets it re-pose particles already in the map. What is refined and when is
:class:`~cryofastar.engine.streaming_refiner.StreamingRefiner`'s policy
(docs/refinement.md); this class carries it out on the session's map:

- :meth:`refine_pass`: a new pass's poses against the running map (starting the
  streaming ab initio first when the policy asks for it);
- :meth:`repose`: up to ``repose_per_pass`` particles of the map re-posed: their images
  read again, the old contribution removed from the half-set grids and the new one added
  (exactly: the map equals one built from scratch with the new poses), their rows of
  the pose table updated;
- :meth:`pose_from_classes`: (``--poses-from classes``) the map's particles moved to their class
  poses once the 2D lane's classes have settled, and the probe that judges them;
- :meth:`idle_work_left`: whether re-posing is still worth doing while nothing new arrives.

It reads images through the ``read_images`` function it is given and reports timings
and counts through ``record``: it knows no threads, files or metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.io.errors import out_of_descriptors
from cryofastar.recon.rotations import geodesic_degrees

from .background_step import BackgroundStep
from .class_posing import ClassPoser, ClassViews
from .policy import CLASS_PROBE_PARTICLES
from .pose_table import PoseTable
from .streaming_refiner import NEVER, UNREADABLE, RefinedPoses, StreamingRefiner

logger = logging.getLogger(__name__)

__all__ = ["LiveRefinement", "SessionMap"]

ReadImages = Callable[[np.ndarray], torch.Tensor]
"""Pose-table rows -> `(len(rows), B, B)` float32 images read again (raises ParticleFileError or ValueError)."""
Record = Callable[[str, int, float], None]
"""Called with a step (``refine``, ``repose``, ``ab_initio``, ``class_poses``), its particles and its wall time (s)."""
CLASS_POSE_CHUNK = 2048
"""Particles read again and moved to their class poses at a time (bounds memory)."""


@dataclass
class _ClassJob:
    """A settled class set being applied: its particles moved chunk by chunk, then probed in the background."""

    rows: np.ndarray  # pose-table rows to move to their class poses
    rotations: torch.Tensor  # (n, 3, 3) their class poses
    origins: torch.Tensor  # (n, 2) Å their class origins
    version: int  # the map version of the class poses
    record: dict  # what the class poses were (ClassPoses.as_dict, the class set)
    seconds: float  # wall time spent on it so far on the accumulator thread
    next: int = 0  # rows[:next] were tried
    moved: list[np.ndarray] = field(default_factory=list)  # the rows moved, per chunk
    probe: tuple | None = None  # (rows, images, half sets, CTF) the probe runs on


class SessionMap(Protocol):
    """What refinement works on: the half-set grids, the pose of every particle in them, the pixel size."""

    accumulator: HalfSetAccumulator | None
    poses: PoseTable

    @property
    def n_particles(self) -> int: ...


class LiveRefinement:
    """Refinement of one live session's map (module docstring).

    Parameters
    ----------
    refiner: StreamingRefiner
        The session's refinement policy and state.
    session: SessionMap
        The map being refined (the daemon's :class:`~cryofastar.daemon.state.SessionState`).
    read_images: ReadImages
        Reads particles of the map again, by pose-table row.
    record: Record
        Told of each step done, for metrics.
    """

    def __init__(self, refiner: StreamingRefiner, session: SessionMap, read_images: ReadImages,
                 record: Record) -> None:
        self.refiner, self.session = refiner, session
        self._read, self._record = read_images, record
        self.moved = 0
        """Particles of the map moved to new poses so far (the map changed since it was published)."""
        self._background: BackgroundStep = BackgroundStep("refinement")
        self._bootstrap_rows: tuple | None = None  # (rows, images, half sets, CTF) the running bootstrap is on
        self._classes: _ClassJob | None = None  # a class set being applied

    def refine_pass(self, images: torch.Tensor, half_sets: torch.Tensor, rotations: torch.Tensor,
                    origins_angstrom: torch.Tensor, ctf: CtfParams | None, apix: float, network: bool = True,
                    hurry: bool = False) -> RefinedPoses | None:
        """A new pass's poses refined against the running map (``None``: it goes in at its own poses, unrefined:
        before refinement starts, while the ab initio starts in the background, in a hurry with an informative
        network (:meth:`StreamingRefiner.refine`), or on failure).

        `(n, B, B)` images at the session box and pixel size ``apix`` Å, `(n,)` half sets,
        `(n, 3, 3)` RELION matrices and `(n, 2)` origins (Å) to start from; ``network``: those are the network's
        poses (else random); ``hurry``: particles wait behind this pass (first poses only). A failed
        refinement keeps the pass's own poses: particles are never lost.
        """
        if not self.refiner.active:
            return None
        if self.refiner.needs_bootstrap or self.refiner.retry_due(len(self.session.poses)):
            self._start_bootstrap(apix)
        if self.refiner.phase == "ab-initio" and self.refiner.ab is None:
            return None  # the ab initio starts in the background: the pass goes in at its own poses, never refined
        t0 = time.perf_counter()
        try:
            refined = self.refiner.refine(images, half_sets, rotations, origins_angstrom, ctf, network, hurry)
        except Exception:  # noqa: BLE001 - a failed refinement keeps the pass's poses, never loses particles
            logger.exception("refinement failed; this pass keeps its unrefined poses")
            return None
        if refined is not None:
            self._record("refine", len(images), time.perf_counter() - t0)
        return refined

    def idle_work_left(self) -> bool:
        """Whether re-posing while nothing new arrives is worth doing (docs/refinement.md, "While idle")."""
        r = self.refiner
        if r.needs_bootstrap or r.retry_due(len(self.session.poses)):
            return True  # (re-posing starts it)
        if not r.active or r.converged or r.settings.repose_per_pass == 0 or (r.phase == "ab-initio" and r.ab is None):
            return False  # (nothing to re-pose with while the ab initio starts in the background)
        return bool((self._refined() < r.version).any())

    def repose(self, apix: float) -> None:
        """Re-pose up to ``repose_per_pass`` particles already in the map (docs/refinement.md)."""
        if self.refiner.needs_bootstrap or self.refiner.retry_due(len(self.session.poses)):
            self._start_bootstrap(apix)
        if self.refiner.phase == "ab-initio" and self.refiner.ab is None:
            return  # the ab initio starts in the background
        table = self.session.poses
        rows = self._one_ctf_kind(self.refiner.pick_stale(self._refined(), table.column("spread")))
        if len(rows) == 0:
            return
        t0 = time.perf_counter()
        rows = np.sort(rows)
        try:
            images, halves, ctf = self._read_back(rows)
        except ValueError as exc:  # ParticleFileError is a ValueError
            if out_of_descriptors(exc):  # says nothing about the stacks: picked again by a later pass
                logger.warning("cannot re-pose %d particles now (%s); tried again later", len(rows), exc)
                return
            logger.warning("cannot re-pose %d particles (%s); they keep their poses", len(rows), exc)
            table.column("refined")[rows] = UNREADABLE
            return
        origins = torch.from_numpy(table.column("origins")[rows])
        rotations = table.rotations(rows)
        if self.refiner.phase == "ab-initio" or self.refiner.poses_from == "network":
            new = self.refiner.repose(images, halves, rotations, origins, ctf, rows)
            self._replace(rows, images, halves, ctf, new)
        else:  # no network: a particle never refined sits at a random pose, searched globally
            never = table.column("refined")[rows] == NEVER
            for mask, mode in ((never, "global"), (~never, "local")):  # two groups, not a loop over particles
                if mask.any():
                    sel = torch.from_numpy(mask)
                    part_ctf = None if ctf is None else ctf[sel]
                    new = self.refiner.repose(images[sel], halves[sel], rotations[sel], origins[sel], part_ctf,
                                              rows[mask], mode)
                    self._replace(rows[mask], images[sel], halves[sel], part_ctf, new)
        self.refiner.maybe_finish_ab_initio(self._refined())
        self._record("repose", len(rows), time.perf_counter() - t0)

    @property
    def wants_class_views(self) -> bool:
        """Whether the session waits for a settled 2D class set (and none is being applied)."""
        return self.refiner.wants_class_views and self._classes is None

    def pose_from_classes(self, views: ClassViews, poser: ClassPoser, apix: float) -> bool:
        """Start moving the map's particles ``views`` names to their class poses (module docstring).

        The geometric decoder poses the classes at once; the particles are then moved
        :data:`CLASS_POSE_CHUNK` at a time by :meth:`poll`, and the probe (with its confirmation) runs in
        the background, so new particles keep going into the map meanwhile.

        Parameters
        ----------
        views: ClassViews
            A settled class set of the 2D lane, naming particles by stack and index.
        poser: ClassPoser
            The geometric decoder that poses the class averages.
        apix: float
            The session's pixel size (Å).

        Returns
        -------
        bool
            ``False`` when the set names fewer than ``refine_after`` particles of the map (the next set
            is awaited); ``True`` once taken (:meth:`poll` goes on with it; the refiner then ends in ``local``
            or ``ab-initio``). Any failure of the decoder or the probe sends the session to map-only ab
            initio, never loses particles: each chunk is moved whole or not at all.
        """
        table = self.session.poses
        assert self.session.accumulator is not None and views.stacks is not None and views.indices is not None
        at = table.positions_of(views.stacks, views.indices)
        rows = np.flatnonzero((at >= 0) & table.in_map() & (table.column("refined") != UNREADABLE))
        if len(rows) < self.refiner.settings.refine_after:
            logger.info("class set %d names %d particles of the map (fewer than %d): waiting for the next",
                        views.version, len(rows), self.refiner.settings.refine_after)
            return False
        t0 = time.perf_counter()
        try:
            class_poses = poser.pose_particles(views)
            record = {"class_set": views.version, **class_poses.as_dict()}
            if not class_poses.trusted:  # two decoder starts disagree: nothing moves, map-only ab initio
                self.refiner.give_up_classes(class_poses.summary(), record)
                self._record("class_poses", 0, time.perf_counter() - t0)
                return True
            rotations = class_poses.rotations[torch.from_numpy(at[rows])]
            origins = torch.from_numpy(views.origins_angstrom[at[rows]])
            keep = torch.isfinite(rotations).flatten(1).all(1).numpy()  # particles of a class left unposed stay
            self._classes = _ClassJob(rows[keep], rotations[torch.from_numpy(keep)],
                                      origins[torch.from_numpy(keep)], self.refiner.start_class_poses(), record,
                                      time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - the session goes on with map-only ab initio
            self._give_up_classes(exc)
        return True

    def poll(self, apix: float) -> None:
        """Carry the steps that run beside the stream one step on (accumulator thread, between passes): move the
        next chunk of particles to their class poses, start the class poses' probe, or apply what the background
        computation (the ab initio bootstrap, the probe) finished."""
        if self._background.done():
            self._take_background()
        elif self._classes is not None and not self._background.busy:
            self._advance_classes(apix)

    @property
    def background(self) -> str | None:
        """What runs in the background now (``ab_initio``, ``class_probe``), or ``None``."""
        return self._background.label if self._background.busy else None

    def wait_background(self, apix: float, timeout: float) -> bool:
        """Carry the steps beside the stream to their end (:meth:`poll` until none is left, or ``timeout`` s):
        for a caller that has nothing else to do (a test, a session that ended); whether they ended."""
        deadline = time.monotonic() + timeout
        while self._background.busy or self._classes is not None:
            if time.monotonic() > deadline:
                return False
            self._background.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            self.poll(apix)
        return True

    def stop_background(self, timeout: float) -> bool:
        """Stop what runs in the background (at its next step) and forget it: the session is stopping, the map keeps
        the poses it has (a restart starts the step again). Whether it ended within ``timeout`` s."""
        ended = self._background.cancel(timeout)
        if ended:
            self._bootstrap_rows, self._classes = None, None
        return ended

    def _advance_classes(self, apix: float) -> None:
        """Move the next chunk of particles to their class poses; all moved: start the probe in the background."""
        job, table, acc = self._classes, self.session.poses, self.session.accumulator
        assert job is not None and acc is not None
        t0 = time.perf_counter()
        try:
            if job.next < len(job.rows):
                part = slice(job.next, job.next + CLASS_POSE_CHUNK)
                job.moved.append(self._move(job.rows[part], job.rotations[part], job.origins[part], job.version))
                job.next += CLASS_POSE_CHUNK
                job.seconds += time.perf_counter() - t0
                return
            moved = np.concatenate(job.moved) if job.moved else job.rows[:0]
            moved = moved[self.session.poses.in_map()[moved]]  # 2D junk taken out meanwhile is not probed
            moved = self._one_ctf_kind(moved)  # the probe matches particles of one kind (with a CTF or without)
            probe = moved[np.linspace(0, len(moved) - 1, min(CLASS_PROBE_PARTICLES, len(moved))).astype(int)] \
                if len(moved) else moved
            if len(probe) == 0:
                raise ValueError("no particle of the class set could be read again")
            images, halves, ctf = self._read_back(probe)
            self.refiner.update_reference(acc.half_volumes(), apix, acc.resolution_angstrom(), self.session.n_particles)
            job.record["particles"] = len(moved)
            job.probe = (probe, images, halves, ctf)
            self._background.start("class_probe", self.refiner.class_probe_work(
                images, halves, table.rotations(probe), torch.from_numpy(table.column("origins")[probe]), ctf,
                self._background.check))
            job.seconds += time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - the session goes on with map-only ab initio
            self._give_up_classes(exc)

    def _give_up_classes(self, exc: Exception) -> None:
        logger.error("class poses failed", exc_info=exc)
        self._classes = None
        self.refiner.give_up_classes(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def _move(self, rows: np.ndarray, rotations: torch.Tensor, origins: torch.Tensor, version: int) -> np.ndarray:
        """Move map particles ``rows`` to ``rotations`` `(n, 3, 3)` and ``origins`` `(n, 2)` Å (their class poses);
        returns the rows moved (none if their images could not be read: they keep their poses)."""
        table = self.session.poses
        keep = table.in_map()[rows]  # 2D junk taken out since the set was taken stays out
        rows, rotations, origins = rows[keep], rotations[torch.from_numpy(keep)], origins[torch.from_numpy(keep)]
        if len(rows) == 0:
            return rows
        known = table.has_ctf(rows)
        if known.any() and not known.all():  # with a CTF and without: one read and insertion takes one kind
            return np.concatenate([self._move(rows[kind], rotations[torch.from_numpy(kind)],
                                              origins[torch.from_numpy(kind)], version) for kind in (known, ~known)])
        try:
            images, halves, ctf = self._read_back(rows)
        except ValueError as exc:  # ParticleFileError is a ValueError: these keep their poses
            logger.warning("cannot read %d particles again for their class poses (%s); they keep theirs",
                           len(rows), exc)
            return rows[:0]
        n = len(rows)
        self._replace(rows, images, halves, ctf, RefinedPoses(
            rotations, origins, torch.full((n,), float("nan")), torch.full((n,), float("nan")), "classes", version))
        return rows

    def _start_bootstrap(self, apix: float) -> None:
        """Start the streaming ab initio on the map's oldest particles, in the background (:meth:`poll` applies it:
        they are re-inserted at its poses)."""
        table = self.session.poses
        rows = self._one_ctf_kind(np.flatnonzero(table.in_map()))[: self.refiner.seed_particles]  # the oldest
        try:
            images, halves, ctf = self._read_back(rows)
            work = self.refiner.bootstrap_work(images, halves, ctf, apix, self._background.check)
        except Exception:  # noqa: BLE001 - without ab initio the session goes on with global search
            logger.exception("ab initio could not start; new particles are searched globally instead")
            self.refiner.finish_bootstrap(None, rows)
            return
        self._bootstrap_rows = (rows, images, halves, ctf)
        self._background.start("ab_initio", work)
        logger.info("ab initio starts in the background on the map's %d oldest particles; new particles go on "
                    "into the map meanwhile", len(rows))

    def _take_background(self) -> None:
        """Apply what the background computation finished (accumulator thread)."""
        label, seconds = self._background.label, self._background.seconds()
        try:
            result = self._background.take()
        except Exception as exc:  # noqa: BLE001 - handled per step below, the map is untouched
            result, error = None, exc
        else:
            error = None
        if label == "ab_initio":
            rows, images, halves, ctf = self._bootstrap_rows
            self._bootstrap_rows = None
            if error is not None:
                logger.error("ab initio could not start; new particles are searched globally instead", exc_info=error)
            new = self.refiner.finish_bootstrap(result, rows)
            if new is not None:
                self._replace_in_map(rows, images, halves, ctf, new)
                self._record("ab_initio", len(rows), seconds)
            return
        job = self._classes
        assert label == "class_probe" and job is not None and job.probe is not None
        if error is not None:
            self._give_up_classes(error)
            return
        probe, images, halves, ctf = job.probe
        self._classes = None
        new = self.refiner.finish_class_probe(result, job.record)
        self._replace_in_map(probe, images, halves, ctf, new)
        self._record("class_poses", int(job.record["particles"]), job.seconds + seconds)

    def _replace_in_map(self, rows: np.ndarray, images: torch.Tensor, halves: torch.Tensor, ctf: CtfParams | None,
                        new: RefinedPoses) -> None:
        """:meth:`_replace` for those of ``rows`` still in the map (2D junk may have been taken out meanwhile)."""
        keep = self.session.poses.in_map()[rows]
        if not keep.all():
            at = torch.from_numpy(keep)
            rows, images, halves, ctf, new = rows[keep], images[at], halves[at], None if ctf is None else ctf[at], \
                new.subset(at)
        if len(rows):
            self._replace(rows, images, halves, ctf, new)

    def _one_ctf_kind(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` with a CTF, or those without, whichever are more (ties: with), in their order. A session may
        hold both (a stack taken bare, then one named by a STAR file: docs/daemon.md), and one match or ab initio
        step takes particles of one kind; the others are picked by a later step."""
        known = self.session.poses.has_ctf(rows)
        if known.all() or not known.any():
            return rows
        return rows[known] if 2 * int(known.sum()) >= len(rows) else rows[~known]

    def _read_back(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, CtfParams | None]:
        """`(len(rows), B, B)` images of map particles ``rows`` read again, their `(len(rows),)` int64 half sets
        and their CTF (raises what ``read_images`` raises)."""
        table = self.session.poses
        return (self._read(rows), torch.from_numpy(table.column("half_set")[rows].astype(np.int64)),
                table.ctf(rows))

    def _refined(self) -> np.ndarray:
        """`(n,)` map version each particle was last matched against; those out of the map (2D junk) as
        :data:`UNREADABLE`: never picked, and no reason to wait for them."""
        table = self.session.poses
        refined, in_map = table.column("refined"), table.in_map()
        return refined if in_map.all() else np.where(in_map, refined, UNREADABLE)

    def _replace(self, rows: np.ndarray, images: torch.Tensor, halves: torch.Tensor, ctf: CtfParams | None,
                 new: RefinedPoses) -> None:
        """Move particles ``rows`` of the map from their recorded poses to ``new`` (remove, add, record)."""
        table, acc = self.session.poses, self.session.accumulator
        assert acc is not None
        old_rotations = table.rotations(rows)
        old_origins = torch.from_numpy(table.column("origins")[rows])
        # both calls validate the same shapes and values first, so the add cannot fail after the remove
        acc.remove(images, old_rotations, old_origins, halves, ctf)
        acc.add(images, new.rotations, new.origins_angstrom, halves, ctf)
        table.update(rows, new.rotations, new.origins_angstrom, new.scores, new.spread_degrees, new.version)
        self.moved += len(rows)
        self.refiner.note_moves(geodesic_degrees(new.rotations, old_rotations), self.session.n_particles)
