"""The daemon's 2D lane: streaming 2D classification of the session's particles, in a thread of its own.

:class:`ClassificationLane` takes every chunk of particles the reader reads
(:meth:`~ClassificationLane.offer`, called by the reader thread) and classifies it with
a :class:`~cryofastar.recon.classify2d.StreamingClassifier`, following
:class:`~cryofastar.engine.classification.ClassificationPolicy` as the offline
``classify`` job does. It never holds the 3D lane back:

- **never blocking the reader**: :meth:`~ClassificationLane.offer` puts the chunk in a
  bounded queue without waiting; when the queue is full it keeps only the particles'
  locations (stack, 1-based index, half set, CTF: no pixels) and the lane reads their
  images itself later (:meth:`~cryofastar.recon.io.ParticleSource.from_locations`). Nothing
  is lost and the reader never waits.
- **never stopping the session**: anything the lane raises is logged with its traceback,
  counted (``cryofastar_classify_failures_total``) and disables the lane (status
  ``classification.state`` = ``failed``, with the error); the 3D lane goes on. (The 3D
  stages stop the daemon when they fail: a map that cannot be trusted must not go on
  being published; a failed 2D lane leaves nothing wrong behind, its files are simply
  no longer updated.)

The work loop, one step at a time (the thread checks for :meth:`stop` between steps):

1. new particles first (the queue, then particles known by location only): until the
   particle diameter is known (``--diameter``, or measured with
   :func:`~cryofastar.recon.particle_diameter.estimate_particle_diameter` on the first
   :data:`DIAMETER_SAMPLE` particles, or on what there is once no particle came for
   ``classes_every`` seconds) they are held; then
   :meth:`~cryofastar.recon.classify2d.StreamingClassifier.add` with the daemon's half sets;
2. then ``revisits_per_new * n`` due particles re-aligned (``revisits_when_behind * n`` while
   more new particles wait; none while more wait and the 3D lane is busy too: new
   particles first, and the re-alignments come once either lane has time)
   (:meth:`~cryofastar.recon.classify2d.StreamingClassifier.realign`), their images read
   again from their stacks by the lane's location table (one row per classifier row:
   stack, index, CTF, fingerprint of the image added). A stack that vanished or whose
   images changed is skipped with a log line, its rows never re-aligned again;
3. with no new particle, due particles are re-aligned at a modest pace (the lane waits
   as long as each step took) until the session has had ``passes`` alignments per
   particle, so classes keep improving while the microscope pauses; not while the 3D
   lane is busy (particles waiting for it, or its ab initio running: ``map_busy`` of
   :meth:`~ClassificationLane.start`), whose threads that core would slow. A session that holds
   fewer particles than the classifier's random start (``20 K``) and brings no new one for
   ``6 * classes_every`` seconds starts its classes from what there is
   (:meth:`~cryofastar.recon.classify2d.StreamingClassifier.begin`).

Every ``classes_every`` seconds, if the classes changed, and at stop: a ``classes``
message is published (:meth:`~cryofastar.daemon.broadcast.SessionBroadcast.classes`; its ``version``
counts the class sets published in the session, going on after a restart) and written in
``OUT/classes/``: ``class_averages.mrcs`` + ``classes.star``
(:func:`~cryofastar.engine.classification.write_class_set`) and ``particles.star`` (every
classified particle: ``rlnImageName`` exactly as the session's ``particles.star`` names
it, relative to ``--out``, with RELION's Class2D columns, CTF and ``rlnRandomSubset``).
The 2D columns live there and not in the session's ``particles.star``, whose
``rlnAnglePsi`` and ``rlnOriginX/YAngst`` are the particle's 3D pose: one column cannot
hold both meanings.

**Checkpoint** (``OUT/classes/checkpoint.pt``, atomic; every ``checkpoint_seconds`` with
the class files, and at stop): the classifier's state, the location table, the number of
alignments and class sets so far. A restart resumes it exactly. Particles the session's
3D checkpoint holds (the reader will not read them again) but the 2D checkpoint does not
are classified again by location; particles the reader reads again (read but not in the
3D checkpoint) that the 2D checkpoint holds are not added twice (the lane's journal of
what it holds).
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cryofastar.engine.class_posing import ClassViews
from cryofastar.engine.classification import ClassifySettings, classifier_settings, write_class_set
from cryofastar.engine.junk_exclusion import JunkVerdicts
from cryofastar.recon.classify2d import ClassDelta, ClassReferences, StreamingClassifier, class_set, particle_columns
from cryofastar.recon.ctf import CtfParams, ctf_array, ctf_from_array
from cryofastar.recon.io import ParticleChunk, ParticleFileError, ParticleSource
from cryofastar.recon.io.atomic import atomic_path, remove_stale_temporaries
from cryofastar.recon.io.names import printable, relative_image_names
from cryofastar.recon.io.star import write_particles
from cryofastar.recon.particle_diameter import estimate_particle_diameter

from .fingerprints import image_fingerprints
from .journal import IngestJournal
from .metrics import DaemonMetrics
from .reporting import RateWindow
from .thread_limits import limit_this_thread

logger = logging.getLogger(__name__)

__all__ = ["CLASSES_DIR", "DIAMETER_SAMPLE", "ClassificationLane", "ClassifiedRows", "Located", "LocationTable"]

CLASSES_DIR = "classes"
"""The lane's folder in ``--out``."""
CHECKPOINT_NAME = "checkpoint.pt"
DIAMETER_SAMPLE = 1000
"""Particles the diameter is measured on (when ``--diameter`` is not given)."""
_HOLD_BYTES = 256 * 2**20  # or fewer particles, if their images would hold more than this
_BEGIN_IDLE_PERIODS = 6  # classes start from fewer than 20 K particles after this many --classes-every without any
_QUEUE_BYTES = 256 * 2**20  # the queue keeps the pixels of at most this much (and queue_size chunks), then locations
_STATE_VERSION = 1
SETTLED_ALIGNMENTS = 1.5
"""Alignments per particle (session average) before the lane's junk verdicts go to the 3D lane: each particle
then has been aligned again, on average, against classes sharper than those it first met."""
_CTF_COLUMNS = {"rlnDefocusU": 0, "rlnDefocusV": 1, "rlnDefocusAngle": 2, "rlnPhaseShift": 6}


@dataclass
class Located:
    """Particles known by location only: the lane reads their images itself.

    Attributes
    ----------
    stacks, indices: np.ndarray
        `(n,)` resolved stack path (str) and 1-based index.
    half_sets: torch.Tensor
        `(n,)` int64 1/2 (the daemon's).
    ctf: CtfParams | None
        Their CTF (``None``: none).
    optics: dict[str, float]
        Optics values for the output STAR file, where known.
    """

    stacks: np.ndarray
    indices: np.ndarray
    half_sets: torch.Tensor
    ctf: CtfParams | None = None
    optics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @classmethod
    def of(cls, chunk: ParticleChunk) -> Located:
        """The locations of a chunk's particles (its pixels left behind)."""
        return cls(chunk.stacks, chunk.indices, chunk.half_sets, chunk.ctf, dict(chunk.optics))


@dataclass
class ClassifiedRows:
    """Particles another rank of ``watch --nproc`` aligned against the lane's classes (daemon/rank_sync.py): the rows
    of ``delta`` in order.

    ``delta``: a :class:`~cryofastar.recon.classify2d.ClassDelta` without its sums (they travel by the reduce);
    ``stacks`` `(n,)` str, ``indices`` `(n,)` 1-based, ``ctf`` `(n, 9)` (``ctf_array``; NaN: none),
    ``fingerprints`` `(n,)`, ``optics`` of the files they came from.
    """

    delta: ClassDelta
    stacks: np.ndarray
    indices: np.ndarray
    ctf: np.ndarray
    fingerprints: np.ndarray
    optics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @staticmethod
    def merged(parts: list[ClassifiedRows], sums: dict[str, torch.Tensor]) -> ClassifiedRows:
        """The rows of several ranks' ``parts`` in order, with the sums of all of them (the reduce's)."""
        delta = ClassDelta.merged([part.delta for part in parts], sums)
        optics = next((part.optics for part in parts if part.optics), {})
        return ClassifiedRows(delta, *(np.concatenate([getattr(part, name) for part in parts])
                                       for name in ("stacks", "indices", "ctf", "fingerprints")), dict(optics))


class LocationTable:
    """Where each classifier row's particle lives: one row per particle, in the classifier's row order.

    Columns: stack id (into :attr:`stack_names`), 1-based index, CTF (`(9,)`, NaN without),
    fingerprint of the image added (:func:`~cryofastar.daemon.fingerprints.image_fingerprints`),
    and whether the row may be re-read (a stack that vanished or changed: never again).
    """

    def __init__(self) -> None:
        self.stack_names: list[str] = []
        self._ids: dict[str, int] = {}
        self.stack_id = np.zeros(0, np.int64)
        self.index = np.zeros(0, np.int64)
        self.ctf = ctf_array(None, 0)
        self.fingerprint = np.zeros(0, np.int64)
        self.readable = np.zeros(0, bool)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def append(self, stacks: np.ndarray, indices: np.ndarray, ctf: CtfParams | np.ndarray | None,
               fingerprints: np.ndarray) -> None:
        """Rows for `(n,)` particles just added to the classifier (in its order); ``ctf`` as parameters or as a
        `(n, 9)` ``ctf_array`` (NaN rows: none)."""
        names, inverse = np.unique(np.asarray(stacks).astype(str), return_inverse=True)
        for name in names:  # per stack, not per particle
            self._ids.setdefault(str(name), len(self.stack_names))
            if len(self._ids) > len(self.stack_names):
                self.stack_names.append(str(name))
        ids = np.array([self._ids[str(name)] for name in names], np.int64)[inverse.reshape(-1)]
        n = len(ids)
        self.stack_id = np.concatenate([self.stack_id, ids])
        self.index = np.concatenate([self.index, np.asarray(indices, np.int64)])
        self.ctf = np.concatenate([self.ctf, ctf if isinstance(ctf, np.ndarray) else ctf_array(ctf, n)])
        self.fingerprint = np.concatenate([self.fingerprint, np.asarray(fingerprints, np.int64)])
        self.readable = np.concatenate([self.readable, np.ones(n, bool)])

    def stacks(self, rows: np.ndarray) -> np.ndarray:
        """`(k,)` stack paths (str) of ``rows``."""
        return np.asarray(self.stack_names, dtype=object)[self.stack_id[rows]].astype(str)

    def has_ctf(self, rows: np.ndarray) -> np.ndarray:
        """`(k,)` bool: whether each row's particle has a CTF."""
        return ~np.isnan(self.ctf[rows, 0])

    def journal(self) -> IngestJournal:
        """The particles the table holds, as a journal."""
        journal = IngestJournal()
        if len(self):
            journal.add(self.stacks(np.arange(len(self))), self.index)
        return journal

    def image_names(self, out: Path) -> list[str]:
        """``NNNNNN@stack`` of every row, the stack relative to ``out`` (as the session's particles.star names it)."""
        return relative_image_names(self.stack_names, self.stack_id, self.index, out)

    def state_dict(self) -> dict[str, object]:
        """Tensors and a list of names (loadable with ``weights_only=True``)."""
        return {"stack_names": list(self.stack_names), "stack_id": torch.from_numpy(self.stack_id.copy()),
                "index": torch.from_numpy(self.index.copy()), "ctf": torch.from_numpy(self.ctf.copy()),
                "fingerprint": torch.from_numpy(self.fingerprint.copy()),
                "readable": torch.from_numpy(self.readable.copy())}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> LocationTable:
        """Inverse of :meth:`state_dict`."""
        table = cls()
        table.stack_names = [str(s) for s in state["stack_names"]]  # type: ignore[union-attr]
        table._ids = {s: i for i, s in enumerate(table.stack_names)}
        for name in ("stack_id", "index", "ctf", "fingerprint", "readable"):
            setattr(table, name, state[name].numpy().copy())  # type: ignore[union-attr]
        return table


def _to_tensors(value: object) -> object:
    """numpy arrays in a nested state turned into tensors (a ``weights_only`` checkpoint holds no numpy)."""
    if isinstance(value, np.ndarray):
        return {"__numpy__": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    return value


def _from_tensors(value: object) -> object:
    """Inverse of :func:`_to_tensors`."""
    if isinstance(value, dict):
        if set(value) == {"__numpy__"}:
            return value["__numpy__"].numpy().copy()
        return {k: _from_tensors(v) for k, v in value.items()}
    return value


class ClassificationLane:
    """The 2D lane (module docstring): :meth:`start`, :meth:`offer` from the reader, :meth:`stop`.

    Parameters
    ----------
    settings: ClassifySettings
        Classes, diameter, shifts, passes, seed (the ``classify`` command's options).
    out: Path
        The session's ``--out``; the lane writes in ``out / "classes"``.
    metrics: DaemonMetrics
        The daemon's metrics (the lane's gauges and counters).
    classes_every: float
        Seconds between class sets written and published (when they changed).
    checkpoint_seconds: float
        Seconds between checkpoints (written with the class files; also at stop).
    queue_size: int
        Chunks that may wait in the lane's queue, holding at most 256 MiB of pixels (then only
        their locations are kept).
    geometry: tuple[int, float] | None
        The session's box (px) and pixel size (Å) if known (a resumed session); else the first
        :meth:`offer` gives it.
    resume: list[Located]
        The particles of the session's 3D checkpoint: those the lane's checkpoint lacks are
        classified again (the reader will not read them again).
    """

    def __init__(self, settings: ClassifySettings, out: Path, metrics: DaemonMetrics, *, classes_every: float,
                 checkpoint_seconds: float, queue_size: int = 8, geometry: tuple[int, float] | None = None,
                 resume: list[Located] | None = None) -> None:
        self.settings = settings
        self.policy = settings.policy
        self.out = out
        self.folder = out / CLASSES_DIR
        self.metrics = metrics
        self.classes_every = classes_every
        self.checkpoint_seconds = checkpoint_seconds
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._overflow: collections.deque[Located] = collections.deque()
        self._overflow_lock = threading.Lock()
        self._overflow_count = 0
        self._queued = 0  # particles in the queue (these three counts: under _overflow_lock)
        self._queued_bytes = 0  # their pixels' bytes
        self._resume = list(resume or [])
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publish = None  # callable(ClassSet, version), set by start()
        self._map_busy = None  # callable() -> bool, set by start()
        self.geometry = geometry  # (box px, apix Å): the session's
        self.classifier: StreamingClassifier | None = None
        self.table = LocationTable()
        self.held = IngestJournal()  # every particle the lane has taken (classified, held or read)
        self._hold: list[ParticleChunk] = []  # particles waiting for the diameter
        self._hold_count = 0
        self.diameter: float | None = settings.diameter
        self.optics: dict[str, float] = {}
        self.alignments = 0  # in the session (checkpointed)
        self.published = 0  # class sets published in the session (checkpointed): the messages' version
        self._published_state = -1  # classifier.version last written
        self._last_new = time.monotonic()
        self._last_output = -math.inf
        self._last_checkpoint = time.monotonic()
        self._checkpointed: tuple[int, int] = (-1, -1)  # (classifier version, alignments) last checkpointed
        self._rate = RateWindow(0)
        self.state = "waiting"  # waiting (for particles / the diameter), running, failed, stopped
        self.error: str | None = None
        self.last_update: float | None = None  # unix time of the last class set published
        self.junk = 0
        self._verdicts: JunkVerdicts | None = None  # newest, not yet taken by the 3D lane
        self._views: ClassViews | None = None  # newest settled class set, not yet taken (--poses-from classes)
        self._verdicts_lock = threading.Lock()
        self.read_by_lane = 0  # particles whose images the lane read itself (queue full, or a restart)
        self._classified: collections.deque[ClassifiedRows] = collections.deque()  # other ranks', not yet taken
        self._shared: ClassReferences | None = None  # the newest classes for other ranks (shared_references)
        self.from_other_ranks = 0  # particles other ranks aligned, taken in this run
        metrics.classify_enabled.set(1)

    # ------------------------------------------------------------------ public
    def start(self, publish, map_busy=None) -> None:  # noqa: ANN001 - callables (ClassSet, version) and () -> bool
        """Start the lane's thread; ``publish(classes, version)`` sends a class set
        (:meth:`~cryofastar.daemon.broadcast.SessionBroadcast.classes`); while ``map_busy()`` is true (the 3D
        lane has particles waiting or runs its ab initio) the lane re-aligns no old particle while idle."""
        self._publish = publish
        self._map_busy = map_busy
        self._thread = threading.Thread(target=self._run, name="cryofastar-classify", daemon=True)
        self._thread.start()

    def offer(self, chunk: ParticleChunk, box: int, apix: float) -> None:
        """Hand the lane a chunk the reader read, of the session's ``box`` (px) and ``apix`` (Å); never blocks
        (module docstring). Reader thread."""
        if self.state == "failed" or not len(chunk):
            return
        if self.geometry is None:
            self.geometry = (int(box), float(apix))
        size = chunk.images.numel() * chunk.images.element_size()
        with self._overflow_lock:
            queued = self._queued_bytes + size <= _QUEUE_BYTES or self._queued == 0
            if queued:
                try:
                    self._queue.put_nowait(chunk)
                except queue.Full:
                    queued = False
            if queued:
                self._queued += len(chunk)
                self._queued_bytes += size
            else:
                self._overflow.append(Located.of(chunk))
                self._overflow_count += len(chunk)
        self._wake.set()

    def offer_located(self, located: Located, box: int, apix: float) -> None:
        """Hand the lane particles known by location only (another rank of ``watch --nproc`` read them): the lane
        reads their images itself when it comes to them; never blocks."""
        if self.state == "failed" or not len(located):
            return
        if self.geometry is None:
            self.geometry = (int(box), float(apix))
        with self._overflow_lock:
            self._overflow.append(located)
            self._overflow_count += len(located)
        self._wake.set()

    def offer_classified(self, rows: ClassifiedRows) -> None:
        """Hand the lane particles another rank of ``watch --nproc`` aligned against its classes (with the sums
        they add): the lane takes them at its next step (:meth:`~cryofastar.recon.classify2d.StreamingClassifier.take`);
        never blocks. Any thread."""
        if self.state == "failed" or not len(rows):
            return
        with self._overflow_lock:
            self._classified.append(rows)
        self._wake.set()

    def shared_references(self) -> ClassReferences | None:
        """The newest classes for other ranks to align new particles against (``None`` until the classes have
        started, or once the lane failed). Any thread."""
        return None if self.state == "failed" else self._shared

    def request_stop(self) -> None:
        """Ask the thread to stop after the step in progress (returns at once; :meth:`stop` waits)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the step in progress, write the classes and the checkpoint; wait at most ``timeout`` s."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the 2D lane is still in a step after %.0f s; not waiting for it", timeout)
            elif self.state == "stopped" and self._classified:  # handed over by other ranks at their last sync
                while self._take_classified():
                    pass
                self._final_outputs()
        if self.from_other_ranks and self.classifier is not None:
            logger.info("2D lane: %d particles classified; the other ranks aligned %d of them in this run",
                        self.classifier.n_particles, self.from_other_ranks)

    @property
    def waiting(self) -> int:
        """Particles handed to the lane and not yet classified (queued, known by location, held)."""
        return self._queued + self._overflow_count + self._hold_count

    def status(self) -> dict[str, object]:
        """The ``classification`` field of status messages (docs/daemon.md); also sets the waiting gauge."""
        now = time.monotonic()
        waiting = self.waiting
        self.metrics.classify_waiting.set(waiting)
        rate = self._rate.per_second(now)
        self.metrics.classify_rate.set(rate)
        c = self.classifier
        return {"state": self.state, "particles": 0 if c is None else c.n_particles, "waiting": waiting,
                "version": self.published, "classes": self.settings.classes, "junk": self.junk,
                "alignments": self.alignments, "alignments_per_second": rate, "read_by_lane": self.read_by_lane,
                "from_other_ranks": self.from_other_ranks,
                "diameter_angstrom": self.diameter if c is not None else None,
                "last_update": self.last_update, "error": self.error}

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        # one core's worth: the 3D lane keeps its threads (torch.set_num_threads would set MKL's for every lane)
        limit_this_thread(1)
        try:
            self._resume_checkpoint()
            while not self._stop.is_set():
                took = self._step()
                self._share()
                self._maybe_output()
                if took is None:  # nothing to do: wait for particles
                    self._wake.wait(min(1.0, self.classes_every))
                    self._wake.clear()
                elif took > 0:  # idle re-alignment: at a modest pace
                    self._wake.wait(min(took, 2.0))
                    self._wake.clear()
            self._final_outputs()
            self.state = "stopped" if self.state != "failed" else self.state
        except Exception as exc:  # noqa: BLE001 - the 2D lane must never stop the 3D lane (module docstring)
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.error = f"{type(exc).__name__}: {first}"
            self.state = "failed"
            self.metrics.classify_failures.inc()
            self.metrics.classify_enabled.set(0)
            logger.exception("the 2D lane failed and is disabled (the 3D map goes on): %s", self.error)

    def _step(self) -> float | None:
        """One step: new particles (and their re-alignments), else idle re-alignment. Returns ``0`` after new
        particles, the seconds an idle re-alignment took, ``None`` when there was nothing to do."""
        if self._take_classified():
            return 0.0
        new = self._next_new()
        if new is not None:
            self._last_new = time.monotonic()
            self._take(new)
            return 0.0
        if self.classifier is None:
            if self._hold and time.monotonic() - self._last_new >= self.classes_every:
                self._begin()  # no more particles for now: measure the diameter on what there is
                return 0.0
            return None
        c = self.classifier
        if not c.started and c.n_particles >= self.settings.classes and \
                time.monotonic() - self._last_new >= _BEGIN_IDLE_PERIODS * self.classes_every:
            c.begin()  # a session smaller than the random start (or one that paused): classes from what there is
            logger.info("2D lane: no new particle for %.0f s: the classes start from the %d particles there are",
                        _BEGIN_IDLE_PERIODS * self.classes_every, c.n_particles)
            return 0.0
        if self._idle_work_left() and not self._yields():
            t0 = time.perf_counter()
            if self._realign(self.policy.chunk) == 0:
                return None
            return time.perf_counter() - t0
        return None

    def _share(self) -> None:
        """Keep :meth:`shared_references` the classes as they are now (once started; a copy per new version)."""
        c = self.classifier
        if c is not None and c.started and (self._shared is None or self._shared.version != c.version):
            self._shared = c.references()

    def _take_classified(self) -> bool:
        """Take the next particles another rank aligned (rows, sums, noise; then the references are rebuilt), and
        re-align due ones as after the lane's own new particles (:meth:`_revisit`). Returns whether there were
        any."""
        with self._overflow_lock:
            rows = self._classified.popleft() if self._classified else None
        if rows is None:
            return False
        c = self.classifier
        assert c is not None  # other ranks align against the classes only once this lane shared them
        held = self.held.contains(rows.stacks, rows.indices)
        if held.any():  # never expected: each particle reaches the map, hence the lane, once
            logger.error("2D lane: %d of %d particles another rank classified are already held; these %d are not "
                         "taken (their sums cannot be parted)", int(held.sum()), len(rows), len(rows))
            return True
        self.held.add(rows.stacks, rows.indices)
        c.take(rows.delta)
        self.table.append(rows.stacks, rows.indices, rows.ctf, rows.fingerprints)
        if rows.optics and not self.optics:
            self.optics = dict(rows.optics)
        self.from_other_ranks += len(rows)
        self._aligned(len(rows))
        self._revisit(len(rows))
        return True

    def _next_new(self) -> ParticleChunk | None:
        """The next new particles with their images: the queue first, then particles known by location."""
        with self._overflow_lock:
            try:
                chunk = self._queue.get_nowait()
            except queue.Empty:
                chunk = None
            if chunk is not None:
                self._queued -= len(chunk)
                self._queued_bytes -= chunk.images.numel() * chunk.images.element_size()
                return chunk
            located = self._overflow.popleft() if self._overflow else None
        if located is None:
            return None
        try:
            return self._read_located(located)
        finally:
            with self._overflow_lock:
                self._overflow_count -= len(located)

    def _read_located(self, located: Located) -> ParticleChunk | None:
        """The images of particles known by location (those already held left out); ``None`` if none is left."""
        fresh = ~self.held.contains(located.stacks, located.indices)
        if not fresh.any():
            return None
        assert self.geometry is not None  # particles by location come after the first chunk or with a checkpoint
        keep = torch.from_numpy(np.flatnonzero(fresh))
        ctf = None if located.ctf is None else located.ctf[keep]
        box, apix = self.geometry
        source = ParticleSource.from_locations(self.out, located.stacks[fresh], located.indices[fresh], box, apix,
                                               located.half_sets[keep], ctf)
        try:
            chunk = source.images()
        except ParticleFileError as exc:
            logger.warning("2D lane: %d particles not classified: %s", int(fresh.sum()), exc)
            return None
        if len(chunk.skipped):
            logger.warning("2D lane: %s", chunk.skipped.describe(self.out))
        self.read_by_lane += len(chunk)
        return ParticleChunk(chunk.origin, chunk.rows, chunk.stacks, chunk.indices, chunk.images, chunk.half_sets,
                             chunk.ctf, located.optics or chunk.optics)

    def _take(self, chunk: ParticleChunk) -> None:
        """New particles: left out if already held, held until the diameter is known, else classified."""
        fresh = ~self.held.contains(chunk.stacks, chunk.indices)
        if not fresh.all():
            if not fresh.any():
                return
            chunk = chunk.subset(fresh)
        self.held.add(chunk.stacks, chunk.indices)
        if chunk.optics and not self.optics:
            self.optics = dict(chunk.optics)
        if self.classifier is None:
            self._hold.append(chunk)
            self._hold_count += len(chunk)
            if self.diameter is not None or self._hold_count >= DIAMETER_SAMPLE or \
                    self._hold_count * chunk.images[0].numel() * 4 >= _HOLD_BYTES:
                self._begin()
            return
        self._add(chunk)

    def _begin(self) -> None:
        """Create the classifier (measuring the diameter on the held particles if needed) and add them."""
        assert self.geometry is not None
        box, apix = self.geometry
        held, self._hold = self._hold, []
        if self.diameter is None:
            with_ctf = [c for c in held if c.ctf is not None]
            group = with_ctf if 2 * len(with_ctf) >= len(held) else [c for c in held if c.ctf is None]
            images = torch.cat([c.images for c in group])[:DIAMETER_SAMPLE]
            ctf = CtfParams.cat([c.ctf for c in group])[: len(images)] if group[0].ctf is not None else None
            if len(images) < 2:
                self.diameter = 0.8 * box * apix
            else:
                self.diameter = estimate_particle_diameter(images, apix, ctf)
            logger.info("2D lane: particle diameter measured on %d particles: %.0f Å", len(images), self.diameter)
        self.classifier = StreamingClassifier(classifier_settings(self.settings, box, apix, self.diameter), box, apix)
        self.state = "running"
        for chunk in held:
            self._hold_count -= len(chunk)
            self._add(chunk)
            if self._stop.is_set():
                for rest in held[held.index(chunk) + 1:]:  # not classified: read again by location after a restart
                    self._hold_count -= len(rest)
                    self.held.remove(rest.stacks, rest.indices)
                return

    def _add(self, chunk: ParticleChunk) -> None:
        """Classify new particles, then re-align ``revisits_per_new`` as many due ones (the policy)."""
        assert self.classifier is not None
        for start in range(0, len(chunk), self.policy.chunk):
            part = slice(start, start + self.policy.chunk)
            images = chunk.images[part]
            ctf = None if chunk.ctf is None else chunk.ctf[part]
            self.classifier.add(images, ctf, chunk.half_sets[part].to(torch.int64))
            self.table.append(chunk.stacks[part], chunk.indices[part], ctf, image_fingerprints(images))
            self._aligned(len(images))
        self._revisit(len(chunk))

    def _revisit(self, n: int) -> None:
        """After ``n`` new particles (the lane's own, or another rank's): re-align ``revisits_per_new * n`` due
        ones, ``revisits_when_behind * n`` while more new particles wait (queued, by location, or aligned by
        another rank and not yet taken), none while more wait and the 3D lane is busy too."""
        if self._stop.is_set():
            return
        behind = bool(self.waiting or self._classified)
        per_new = self.policy.revisits_when_behind if behind else self.policy.revisits_per_new
        if behind and self._map_is_busy():
            per_new = 0.0  # behind, and the 3D lane too: new particles first, re-alignment once there is time
        self._realign(int(per_new * n))

    def _aligned(self, n: int) -> None:
        self.alignments += n
        self.metrics.classify_alignments.inc(n)
        self._rate.add(time.monotonic(), self.alignments)
        self.metrics.classify_particles.set(0 if self.classifier is None else self.classifier.n_particles)

    def _idle_work_left(self) -> bool:
        """Whether idle re-alignment is worth it: fewer than ``passes`` alignments per particle so far, or a
        particle never aligned (placed at random while the classes started)."""
        c = self.classifier
        if c is None or not c.started or not self.table.readable.any():
            return False
        return self._never_aligned() or self.alignments < self.settings.passes * c.n_particles

    def _never_aligned(self) -> bool:
        """Whether a readable particle was never aligned (placed at random while the classes started)."""
        c = self.classifier
        assert c is not None
        return bool(((c.table.aligned_at[: c.n_particles] < 0) & self.table.readable).any())

    def _map_is_busy(self) -> bool:
        """Whether the 3D lane is busy (``map_busy`` of :meth:`start`; ``False`` without one)."""
        return self._map_busy is not None and bool(self._map_busy())

    def _yields(self) -> bool:
        """Whether idle re-alignment waits for the 3D lane (busy: particles waiting, or its ab initio running).

        On 2 cores the lane's thread takes a core from the 3D lane's threads; its new particles
        never wait, but improving classes that are already there can."""
        if self.classifier is None or not self._map_is_busy():
            return False
        return not self._never_aligned()  # a particle never aligned is aligned at once

    def _realign(self, count: int) -> int:
        """Re-align up to ``count`` due particles (images read again); returns how many were."""
        c = self.classifier
        if c is None or count <= 0:
            return 0
        unreadable = int((~self.table.readable).sum())
        rows = c.due(count + unreadable)
        rows = rows[self.table.readable[rows]][:count]
        if rows.size == 0:
            return 0
        done = 0
        has_ctf = self.table.has_ctf(rows)
        for group in (rows[has_ctf], rows[~has_ctf]):  # the classifier takes a CTF for all of a call or none
            if group.size == 0:
                continue
            images, group = self._read_rows(group)
            if group.size:
                c.realign(group, images, ctf_from_array(self.table.ctf[group]))
                done += int(group.size)
        self._aligned(done)
        return done

    def _read_rows(self, rows: np.ndarray, again: bool = True) -> tuple[torch.Tensor, np.ndarray]:
        """The images of classifier ``rows`` read again, and the rows read: a stack that vanished or changed is
        skipped (a log line; its rows are never re-aligned again)."""
        assert self.geometry is not None
        box, apix = self.geometry
        stacks = self.table.stacks(rows)
        try:
            images = ParticleSource.from_locations(self.out, stacks, self.table.index[rows], box, apix).images()\
                .all_images()
        except ParticleFileError:
            images = None
        if images is not None:
            same = image_fingerprints(images) == self.table.fingerprint[rows]
            if same.all():
                return images, rows
        if not again:  # read stack by stack just now, and now not: the files are changing; later
            return torch.zeros(0, box, box), rows[:0]
        keep = np.zeros(rows.shape, bool)  # the stacks at fault found one read per stack (only when one is)
        for stack in np.unique(stacks):
            mine = stacks == stack
            try:
                read = ParticleSource.from_locations(self.out, stacks[mine], self.table.index[rows[mine]], box,
                                                     apix).images().all_images()
            except ParticleFileError as exc:
                self._unreadable(stack, f"cannot be read again ({exc})")
                continue
            if (image_fingerprints(read) != self.table.fingerprint[rows[mine]]).any():
                self._unreadable(stack, "changed since its particles were classified")
                continue
            keep |= mine
        if not keep.any():
            return torch.zeros(0, box, box), rows[:0]
        return self._read_rows(rows[keep], again=False)

    def _unreadable(self, stack: str, why: str) -> None:
        rows = self.table.stack_id == self.table.stack_names.index(stack)
        self.table.readable[rows] = False
        logger.warning("2D lane: %s %s; its %d particles stay in their classes as they are, never re-aligned",
                       printable(stack), why, int(rows.sum()))

    # ------------------------------------------------------------------ outputs and checkpoint
    def _maybe_output(self) -> None:
        now = time.monotonic()
        if now - self._last_output >= self.classes_every:
            self._output(checkpoint=now - self._last_checkpoint >= self.checkpoint_seconds)

    def _final_outputs(self) -> None:
        self._output(checkpoint=True)

    def _ready(self) -> bool:
        """Whether the classes mean something: the classifier started and aligned a particle."""
        c = self.classifier
        return c is not None and c.started and bool((c.table.aligned_at[: c.n_particles] >= 0).any())

    def _output(self, checkpoint: bool) -> None:
        """Publish and write the classes if they changed; checkpoint if asked (and anything changed)."""
        c = self.classifier
        self._last_output = time.monotonic()
        if c is None:
            return
        if c.version != self._published_state and self._ready():
            self._publish_classes()
        if checkpoint and (c.version, self.alignments) != self._checkpointed:
            self._checkpoint()

    def _publish_classes(self) -> None:
        c = self.classifier
        assert c is not None
        classes = class_set(c)
        columns = particle_columns(c, classes)
        self.published += 1
        self._published_state = c.version
        if self._publish is not None:
            self._publish(classes, self.published)
        self.last_update = time.time()
        self.junk = int(classes.junk.sum())
        self.metrics.classes_version.set(self.published)
        self.metrics.classes_junk.set(self.junk)
        self.metrics.classes_updated.set(self.last_update)
        if self.settled():  # the 3D lane takes these particles out of its map (engine.junk_exclusion)
            n = c.n_particles
            stacks, indices = self.table.stacks(np.arange(n)), self.table.index[:n].copy()
            with self._verdicts_lock:
                self._verdicts = JunkVerdicts(stacks, indices, columns["rlnCryofastarJunk"].astype(bool),
                                              self.published)
                self._views = ClassViews.from_columns(classes.averages, classes.counts, classes.junk, columns,
                                                      stacks=stacks, indices=indices, version=self.published)
        try:
            write_class_set(classes, self.folder)
            self._write_particles(columns)
        except (OSError, ParticleFileError) as exc:  # a full disk, a read-only folder: the session goes on
            logger.error("2D classes not written (%s); the previous files stay; written again with the next "
                         "class set", exc)
        logger.info("2D classes %d: %d particles, %d classes flagged as junk", self.published, classes.particles,
                    self.junk)

    def settled(self) -> bool:
        """Whether the classes are settled enough to judge particles by: on average every particle aligned
        :data:`SETTLED_ALIGNMENTS` times (the classes it was first aligned to have sharpened since)."""
        c = self.classifier
        return c is not None and c.n_particles > 0 and self.alignments >= SETTLED_ALIGNMENTS * c.n_particles

    def junk_verdicts(self) -> JunkVerdicts | None:
        """The newest verdicts on every particle the lane holds, once :meth:`settled` (any thread; each set is
        handed out once: ``None`` until a newer one)."""
        with self._verdicts_lock:
            verdicts, self._verdicts = self._verdicts, None
        return verdicts

    def class_views(self) -> ClassViews | None:
        """The newest settled class set with every particle's 2D alignment, for class poses
        (:mod:`~cryofastar.engine.class_posing`; any thread; each set handed out once: ``None`` until a newer
        one)."""
        with self._verdicts_lock:
            views, self._views = self._views, None
        return views

    def _write_particles(self, columns: dict[str, np.ndarray]) -> None:
        c = self.classifier
        assert c is not None and self.geometry is not None
        box, apix = self.geometry
        n = c.n_particles
        rows = {"rlnImageName": self.table.image_names(self.out), **columns,
                "rlnOpticsGroup": np.ones(n, np.int64), "rlnRandomSubset": c.table.halves[:n].astype(np.int64)}
        if n and self.table.has_ctf(np.arange(n)).all():
            rows.update({name: self.table.ctf[:, k] for name, k in _CTF_COLUMNS.items()})
        optics = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [apix],
                  "rlnImageSize": [box], "rlnImageDimensionality": [2], **{k: [v] for k, v in self.optics.items()}}
        write_particles(self.folder / "particles.star", pd.DataFrame(rows), pd.DataFrame(optics))

    def _checkpoint(self) -> None:
        c = self.classifier
        if c is None:
            return
        assert self.geometry is not None
        state = {"version": _STATE_VERSION, "box": self.geometry[0], "apix": self.geometry[1],
                 "diameter": self.diameter, "classifier": _to_tensors(c.state_dict()),
                 "locations": self.table.state_dict(), "alignments": self.alignments, "published": self.published,
                 "published_state": self._published_state, "optics": dict(self.optics)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / CHECKPOINT_NAME) as tmp, open(tmp, "wb") as handle:
                torch.save(state, handle)
        except OSError as exc:
            logger.error("2D checkpoint not written (%s); the previous one stays", exc)
        else:
            self._checkpointed = (c.version, self.alignments)
        self._last_checkpoint = time.monotonic()

    def _resume_checkpoint(self) -> None:
        """Load ``classes/checkpoint.pt`` if there is one; queue the 3D checkpoint's particles it lacks.

        Raises
        ------
        ValueError
            A checkpoint that cannot be read, or of another box, pixel size or number of
            classes (the lane is then disabled; the file is left as it is).
        """
        path = self.folder / CHECKPOINT_NAME
        if self.folder.is_dir():
            for leaked in remove_stale_temporaries(self.folder):
                logger.info("removed %s (an interrupted write)", leaked.name)
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error
                raise ValueError(f"{path}: not a readable 2D classification checkpoint "
                                 f"({str(exc).splitlines()[0]}); move it away to classify afresh") from None
            if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
                raise ValueError(f"{path}: not a 2D classification checkpoint of version {_STATE_VERSION}")
            box, apix = int(state["box"]), float(state["apix"])
            if self.geometry is not None and (self.geometry[0] != box or abs(self.geometry[1] - apix) > 1e-6 * apix):
                raise ValueError(f"{path}: a 2D checkpoint of box {box} at {apix} Å/px for a session of box "
                                 f"{self.geometry[0]} at {self.geometry[1]} Å/px; move it away to classify afresh")
            self.geometry = (box, apix)
            self.diameter = float(state["diameter"])
            classifier = StreamingClassifier(classifier_settings(self.settings, box, apix, self.diameter), box, apix)
            try:
                classifier.load_state_dict(_from_tensors(state["classifier"]))  # type: ignore[arg-type]
            except ValueError as exc:
                raise ValueError(f"{path}: {exc} (restart with the --classes it was made with, or move "
                                 f"{self.folder} away to classify afresh)") from None
            self.classifier = classifier
            self.table = LocationTable.from_state_dict(state["locations"])
            self.held = self.table.journal()
            self.alignments = int(state["alignments"])
            self.published = int(state["published"])
            self._published_state = int(state["published_state"])
            self.optics = dict(state["optics"])
            self.state = "running"
            self._checkpointed = (classifier.version, self.alignments)
            self.metrics.classes_version.set(self.published)
            self.metrics.classify_particles.set(classifier.n_particles)
            self._rate = RateWindow(self.alignments)
            logger.info("2D lane resumed from %s: %d particles, class set %d", path, classifier.n_particles,
                        self.published)
        missing = 0
        for located in self._resume:  # the map's particles the 2D checkpoint lacks: read by location
            lacking = ~self.held.contains(located.stacks, located.indices)
            if lacking.any():
                keep = torch.from_numpy(np.flatnonzero(lacking))
                with self._overflow_lock:
                    self._overflow.append(Located(located.stacks[lacking], located.indices[lacking],
                                                  located.half_sets[keep],
                                                  None if located.ctf is None else located.ctf[keep],
                                                  located.optics))
                    self._overflow_count += int(lacking.sum())
                missing += int(lacking.sum())
        self._resume = []
        if missing:
            logger.info("2D lane: %d particles of the session's map are not in the 2D checkpoint: classified "
                        "again (read from their stacks)", missing)
