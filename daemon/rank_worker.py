"""A rank other than 0 of a live session (``watch --nproc``; docs/scaling.md "Live: watch --nproc").

It watches the same directory as rank 0 and takes its own share of every file's particles
(:func:`~cryofastar.engine.distributed.owners`): the reader plans each file as rank 0 does
(:func:`~cryofastar.daemon.ingest.plan_particle_file`, with rank 0's box and pixel size and
the particles already taken left out) and reads its share ``read_chunk`` at a time; the
poser gives each chunk its first poses (:class:`~cryofastar.engine.rank_posing.RankPoser`:
the network in rank 0's frame or random poses, then rank 0's hurried policy) and inserts it
into grids that hold only what this rank inserted since the last sync. With the 2D lane on,
once rank 0 has sent its 2D classes, a classifier thread aligns each chunk read against
them (a follower :class:`~cryofastar.recon.classify2d.StreamingClassifier`, :data:`PIECE`
particles per step, one core) into class sums that hold only what it aligned since the last
sync; chunks it does not classify (no classes yet, its queue full, stopping, its classifier
failed) go to rank 0's lane by location. Its main thread answers rank 0's syncs
(:mod:`~cryofastar.daemon.rank_sync`): it adopts rank 0's newest classes and hands over the
rows, grids and class sums, under the locks the insertions and the alignments take, so all
of them hold the same particles.

It writes no file, publishes nothing and serves no metrics: rank 0 records everything it
hands over (the journal, ``particles.star``, ``rejected.tsv``, the ZeroMQ messages). Files
rank 0's reader refuses it refuses too, silently (rank 0 reports them).

Signals: SIGINT and SIGTERM are ignored once it runs (a Ctrl-C reaches every rank, and
``watch --nproc`` passes its SIGTERM on to every rank: rank 0 stops the session and sends
``stop``). When rank 0 is gone, the next collective fails and the rank ends (what it had
not handed over is read again at the next start). A failure of one of its threads ends it
after its next handover, so that rank 0 stops the session (the launcher stops every rank).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from cryofastar.engine.distributed import Ranks, owners
from cryofastar.engine.posing import NetworkPoser, RandomPoser
from cryofastar.engine.rank_posing import RankPoser
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.classify2d import ClassReferences, StreamingClassifier
from cryofastar.recon.ctf import ctf_array
from cryofastar.recon.io import ParticleChunk, ParticleFileError, SkippedImages

from .classification_lane import ClassifiedRows, Located
from .fingerprints import image_fingerprints
from .ingest import NotParticles, Rejected, SessionGeometry, plan_particle_file
from .journal import IngestJournal
from .pose_source import load_network
from .rank_sync import Command, Handover, InsertedChunk, hand_over, receive
from .settings import DaemonSettings
from .thread_limits import limit_this_thread
from .watcher import StackWatcher

logger = logging.getLogger(__name__)

__all__ = ["RankWorker"]

_POLL = 0.2  # s: how often waiting threads look at the stop flag
PIECE = 64
"""Particles the classifier thread aligns per step (a sync waits for at most one step: about 0.2 s on one core)."""


class RankWorker:
    """Rank ``ranks.rank`` (> 0) of a live session (module docstring). :meth:`run` until rank 0 says ``stop``.

    Parameters
    ----------
    settings: DaemonSettings
        The session's settings (the same on every rank).
    ranks: Ranks
        This process's place in the group (joined).

    The constructor waits for rank 0's ``start`` (the journal of a restarted session).
    """

    def __init__(self, settings: DaemonSettings, ranks: Ranks) -> None:
        if ranks.root:
            raise ValueError("rank 0 runs the daemon itself, not a RankWorker")
        self.settings, self.ranks = settings, ranks
        self.device = ranks.device
        model, _ = load_network(settings, self.device)
        self.network = None if model is None else NetworkPoser(model, views=settings.batch, anchors=settings.anchors)
        self.random = RandomPoser(seed=1 + ranks.rank)
        self.first = RankPoser(settings.refine_box, self.device)
        self.files: queue.Queue[Path] = queue.Queue(settings.queue_size)
        self.chunks: queue.Queue[tuple[ParticleChunk, np.ndarray]] = queue.Queue(settings.queue_size)  # + fingerprints
        self.lock = threading.Lock()  # taken by each insertion and by each handover
        self.handover = Handover()
        self.accumulator: HalfSetAccumulator | None = None
        self.geometry: SessionGeometry | None = None
        self._known = threading.Event()  # the geometry is known
        self._stopping = threading.Event()
        self._held = 0  # particles read and not yet inserted
        self._errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._watcher: StackWatcher | None = None
        # the 2D part: a follower of rank 0's classes (its sums and table: what it aligned since the last sync)
        self.classes: StreamingClassifier | None = None
        self.class_lock = threading.Lock()  # taken by each alignment step and by each handover
        self.to_classify: queue.Queue[tuple[ParticleChunk, np.ndarray]] = queue.Queue(settings.classify_queue)
        self._classified: list[tuple[Located, np.ndarray]] = []  # the follower's rows, in order, and fingerprints
        self._classify = False  # rank 0 runs a 2D lane that takes particles (its last command)
        self._class_failed = False
        start = receive(ranks)
        if start.op != "start" or start.journal is None:
            raise RuntimeError(f"rank 0 sent {start.op!r} before 'start'")
        self.taken = IngestJournal.from_state_dict(start.journal)
        self._adopt(start)

    # ------------------------------------------------------------------ the sync loop
    def run(self) -> None:
        """Read, pose and insert this rank's share until rank 0 sends ``stop``; hand over at every sync.

        Raises
        ------
        RanksLost
            Rank 0 is gone.
        RuntimeError
            A thread of this rank failed (after its last handover).
        """
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        s = self.settings
        stages = [("reader", self._reader), ("poser", self._poser)]
        if s.classify:
            stages.append(("classifier", self._classifier))
        for name, target in stages:
            thread = threading.Thread(target=self._guard(name, target), name=f"cryofastar-rank-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._watcher = StackWatcher(s.watch, self._on_file, poll_seconds=s.poll_seconds,
                                     settle_seconds=s.settle_seconds, ignore=[s.out])
        self._watcher.start()
        try:
            while True:
                command = receive(self.ranks)
                self._adopt(command)
                if command.op == "stop":
                    self._stop_pipeline()
                with self.class_lock, self.lock:
                    self._follow(command)
                    handover, self.handover = self.handover, Handover()
                    handover.waiting = self._waiting()
                    handover.classified = self._classified_rows()
                    hand_over(self.ranks, handover, self.accumulator, None if self.classes is None else
                              self.classes.sums)
                if self._errors:
                    raise RuntimeError(f"rank {self.ranks.rank}: {self._errors[0]}")
                if command.op == "stop":
                    return
        finally:
            self._stop_pipeline()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _adopt(self, command: Command) -> None:
        """Take what rank 0 sent: its policy and reference, its network frame, the session's geometry."""
        self.first.adopt(command.policy, command.reference)
        if command.frame and self.network is not None and not self.network.has_reference:
            self.network.adopt_frame(command.frame)
        if command.geometry is not None and self.geometry is None:
            self.geometry = g = command.geometry
            self.accumulator = HalfSetAccumulator(g.box, g.apix, interpolation=self.settings.interpolation,
                                                  device=self.device)  # type: ignore[arg-type]
            self._known.set()

    def _follow(self, command: Command) -> None:
        """Rank 0's 2D classes (under both locks): the newest to align against (what the follower holds moves to
        their frame), or, when rank 0's lane takes no more particles, stop classifying."""
        self._classify = command.classify and self.settings.classify
        if command.classes is not None and not self._class_failed:
            self._adopt_classes(command.classes)
        if not self._classify:
            self._give_up_classes()

    def _adopt_classes(self, references: ClassReferences) -> None:
        try:
            if self.classes is None:
                self.classes = StreamingClassifier(references.settings, references.box,  # type: ignore[arg-type]
                                                   references.apix)
            self.classes.adopt(references)
        except ValueError as exc:  # never expected: rank 0's classes are those of the session's geometry
            logger.error("rank %d: rank 0's 2D classes cannot be followed (%s); its particles go to rank 0's lane "
                         "by location", self.ranks.rank, exc)
            self._class_failed = True
            self._give_up_classes()

    def _classifying(self) -> bool:
        return self._classify and self.classes is not None and not self._class_failed

    def _classified_rows(self) -> ClassifiedRows | None:
        """What the follower aligned since the last sync (its sums are handed over by the reduce)."""
        if self.classes is None or not self._classified:
            return None
        delta = self.classes.hand_over(with_sums=False)
        parts, self._classified = self._classified, []
        located = [part for part, _ in parts]
        rows = ClassifiedRows(delta, np.concatenate([p.stacks for p in located]),
                              np.concatenate([p.indices for p in located]),
                              np.concatenate([ctf_array(p.ctf, len(p)) for p in located]),
                              np.concatenate([fingerprints for _, fingerprints in parts]),
                              dict(next((p.optics for p in located if p.optics), {})))
        if len(rows) != len(delta):
            raise RuntimeError(f"rank {self.ranks.rank}: {len(delta)} rows classified for {len(rows)} particles")
        return rows

    def _give_up_classes(self) -> None:
        """Classify nothing more here (under both locks): what was aligned and not handed over, and what waits,
        goes to rank 0's lane by location."""
        pending, self._classified = self._classified, []
        self.handover.to_classify.extend(located for located, _ in pending)
        if self.classes is not None:
            self.classes.clear()
        self._drain_classes_queue()

    def _drain_classes_queue(self) -> None:
        """The chunks waiting for the classifier, to rank 0's lane by location (under :attr:`lock`)."""
        while True:
            try:
                chunk, _ = self.to_classify.get_nowait()
            except queue.Empty:
                return
            self.handover.to_classify.append(Located.of(chunk))

    def _waiting(self) -> int:
        """Particles this rank holds and has not inserted (a file not read yet counts as one)."""
        files = self.files.qsize() + (0 if self._watcher is None else self._watcher.pending + self._watcher.queued)
        return self._held + files

    def _stop_pipeline(self) -> None:
        """Stop watching and reading; the pass in progress is finished (what is still queued is not inserted: it
        is not in the journal, the next start reads it again)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.stop()
        for thread in self._threads:
            thread.join(timeout=60.0)
        with self.lock:  # not classified here: rank 0's lane reads them (or the next start, by location)
            self._drain_classes_queue()

    # ------------------------------------------------------------------ threads
    def _guard(self, name: str, target):  # noqa: ANN001, ANN202 - thread wrapper
        def run() -> None:
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - ends this rank after its next handover
                logger.exception("rank %d: the %s stage failed", self.ranks.rank, name)
                first = str(exc).splitlines()[0] if str(exc) else ""
                self._errors.append(f"the {name} stage failed ({type(exc).__name__}: {first})")
        return run

    def _on_file(self, path: Path) -> None:
        while not self._stopping.is_set():
            try:
                self.files.put(path, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _reader(self) -> None:
        while not self._stopping.is_set():
            if not self._known.wait(_POLL):
                continue  # files wait until rank 0 has fixed the session's box and pixel size
            try:
                path = self.files.get(timeout=_POLL)
            except queue.Empty:
                continue
            self._read(path)

    def _read(self, path: Path) -> None:
        s = self.settings
        assert self.geometry is not None
        try:
            source, _ = plan_particle_file(path, s.watch, self.geometry, self.taken, s.apix)
        except (NotParticles, Rejected):
            return  # rank 0 plans the same file and reports it
        source = source.select(owners(source.stacks, source.indices, self.ranks.world) == self.ranks.rank)
        source = replace(source, left_out=SkippedImages())  # repeated rows: rank 0 reports them
        try:
            for chunk in source.chunks(s.read_chunk):
                if len(chunk.skipped):
                    with self.lock:
                        self.handover.count("particles_rejected", len(chunk.skipped))
                        self.handover.rejections.append(
                            (str(path), f"{chunk.skipped.describe(path)}; the file's other images were taken"))
                if not len(chunk):
                    continue
                self.taken.add(chunk.stacks, chunk.indices)
                fingerprints = image_fingerprints(chunk.images)  # once, for the map's rows and for 2D
                self._to_classes(chunk, fingerprints)
                with self.lock:
                    self._held += len(chunk)
                    self.handover.count("particles_ingested", len(chunk))
                while True:
                    try:
                        self.chunks.put((chunk, fingerprints), timeout=_POLL)
                        break
                    except queue.Full:
                        if self._stopping.is_set():
                            return
                if self._stopping.is_set():
                    return
        except ParticleFileError as exc:  # a stack became unreadable since it was planned
            with self.lock:
                self.handover.rejections.append((str(path), str(exc)))

    def _poser(self) -> None:
        while not self._stopping.is_set():
            try:
                chunk, fingerprints = self.chunks.get(timeout=_POLL)
            except queue.Empty:
                continue
            network = self._wait_for_frame()
            if network is None:
                return  # stopping before rank 0's network frame came: read again at the next start
            self._insert(chunk, fingerprints, network)

    def _classifier(self) -> None:
        """Align each queued chunk against rank 0's classes, :data:`PIECE` particles per step (one core)."""
        limit_this_thread(1)
        while not self._stopping.is_set():
            try:
                chunk, fingerprints = self.to_classify.get(timeout=_POLL)
            except queue.Empty:
                continue
            for start in range(0, len(chunk), PIECE):
                with self.class_lock:
                    rest = np.arange(start, len(chunk))
                    if self._stopping.is_set() or not self._classifying():
                        with self.lock:
                            self.handover.to_classify.append(Located.of(chunk.subset(rest)))
                        break
                    piece = chunk.subset(rest[:PIECE])
                    try:
                        assert self.classes is not None
                        self.classes.add(piece.images, piece.ctf, piece.half_sets.to(torch.int64))
                    except Exception:  # noqa: BLE001 - as rank 0's lane: 2D fails alone, the session goes on
                        logger.exception("rank %d: 2D classification failed; this rank's particles go to rank 0's "
                                         "lane by location from now on", self.ranks.rank)
                        self._class_failed = True
                        with self.lock:
                            self.handover.to_classify.append(Located.of(chunk.subset(rest)))
                            self._give_up_classes()
                        break
                    self._classified.append((Located.of(piece), fingerprints[rest[:PIECE]]))

    def _wait_for_frame(self) -> bool | None:
        """Whether to pose with the network now; while rank 0 wants network poses and its frame has not come, wait
        (``None``: stopping meanwhile)."""
        while True:
            network = self.first.policy.network and self.network is not None
            if not network or self.network.has_reference:  # type: ignore[union-attr]
                return network
            if self._stopping.wait(_POLL):
                return None

    def _insert(self, chunk: ParticleChunk, fingerprints: np.ndarray, network: bool) -> None:
        """First poses of one chunk (``fingerprints`` `(n,)` of its images), then into the grids and the next
        handover (one lock)."""
        assert self.geometry is not None and self.accumulator is not None
        apix = self.geometry.apix
        t0 = time.perf_counter()
        try:
            poses = (self.network.pose(chunk.images, apix) if network and self.network is not None
                     else self.random.pose(chunk.images, apix))
            refined = self.first.first_poses(chunk.images, chunk.half_sets, poses.origins_angstrom, chunk.ctf,
                                             network)
        except Exception as exc:  # noqa: BLE001 - as on rank 0: the chunk is rejected, the session goes on
            logger.exception("rank %d: posing %s failed", self.ranks.rank, chunk.origin)
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.taken.remove(chunk.stacks, chunk.indices)
            with self.lock:
                self.handover.count("particles_rejected", len(chunk))
                self.handover.rejections.append(
                    (str(chunk.origin), f"{chunk.origin}: pose estimation failed ({type(exc).__name__}: {first})"))
                self._held -= len(chunk)
            return
        rotations, origins = poses.rotations, poses.origins_angstrom
        scores = spread = None
        if refined is not None:
            rotations, origins, scores, spread = (refined.rotations, refined.origins_angstrom, refined.scores,
                                                  refined.spread_degrees)
        with self.lock:
            try:
                self.accumulator.add(chunk.images, rotations, origins, chunk.half_sets, chunk.ctf)
            except ValueError as exc:  # refused before the grids are touched
                self.taken.remove(chunk.stacks, chunk.indices)
                self.handover.count("particles_rejected", len(chunk))
                self.handover.rejections.append((str(chunk.origin), f"{chunk.origin}: insertion failed ({exc})"))
            else:
                self.handover.chunks.append(InsertedChunk(
                    chunk.stacks, chunk.indices, chunk.half_sets, rotations, origins, poses.confidence, chunk.ctf,
                    dict(chunk.optics), scores, spread, 0 if refined is None else refined.version, fingerprints,
                    str(chunk.origin)))
                self.handover.count("particles_posed", len(chunk))
                if refined is not None:
                    self.handover.count("particles_refined", len(chunk))
            self._held -= len(chunk)
        logger.debug("rank %d: %d particles in %.2f s", self.ranks.rank, len(chunk), time.perf_counter() - t0)

    def _to_classes(self, chunk: ParticleChunk, fingerprints: np.ndarray) -> None:
        """A chunk just read (``fingerprints`` of its images), to 2D (reader thread; never waits, as rank 0's
        reader's offer to its lane): to the classifier thread, or, with no classes yet or its queue full, to rank
        0's lane by location."""
        if not self.settings.classify:
            return
        if self._classifying():
            try:
                self.to_classify.put_nowait((chunk, fingerprints))
                return
            except queue.Full:
                pass
        with self.lock:
            self.handover.to_classify.append(Located.of(chunk))
