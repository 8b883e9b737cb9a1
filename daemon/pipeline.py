"""The streaming daemon's wiring: watcher -> reader -> poser -> accumulator -> publishers.

:class:`Daemon` owns the threads, the bounded queues between them and their I/O
(``put`` blocks when a queue is full, so a slow stage holds the earlier ones back;
nothing is dropped)::

    StackWatcher --files--> reader --chunks--> poser --posed--> accumulator --> SessionBroadcast (ZeroMQ)
                                                                      \\--> --out files, checkpoint
    status thread: status messages and gauges every second;  /metrics: prometheus-client

- **reader**: checks each complete file, lists its new particles and reads their images
  ``read_chunk`` at a time (:mod:`~cryofastar.daemon.ingest`); a bad file gets a log
  line, a metric and a row in ``rejected.tsv`` (:mod:`~cryofastar.daemon.rejections`).
- **poser**: gathers forward passes (:mod:`~cryofastar.daemon.batching`), Fourier-crops
  them to the model box and poses them in the session frame
  (:class:`~cryofastar.engine.posing.NetworkPoser`, the same recipe as the offline job;
  the first particles choose its reference); without a network (:mod:`~cryofastar.daemon.pose_source`) poses are random
  until refinement starts.
- **accumulator**: refines each pass against the running map (:mod:`~cryofastar.engine.streaming_refiner`),
  inserts it at the input's own box and pixel size (:class:`~cryofastar.daemon.state.SessionState`),
  publishes its poses (:mod:`~cryofastar.daemon.broadcast`), and the map and checkpoint
  when :mod:`~cryofastar.daemon.schedule` says so.
- **status**: the status message (:mod:`~cryofastar.daemon.reporting`) every ``status_seconds``.
- **2D lane** (``--classify``, :mod:`~cryofastar.daemon.classification_lane`): the reader also hands
  each chunk to it, never waiting (a full queue keeps the particles' locations only); it
  classifies them, publishes and writes its class sets in ``--out/classes`` and checkpoints
  itself. Its failure disables it and never stops the daemon; :meth:`Daemon.stop` asks it to
  stop first and waits for its last files at the end. With ``--poses-from classes`` its first
  settled class set gives the map's particles their class poses (the accumulator applies it,
  :meth:`~cryofastar.engine.live_refinement.LiveRefinement.pose_from_classes`); its failure
  then sends the session to map-only ab initio.

The poser and the accumulator run at the same time, ``queue_size`` posed passes apart
(making them take turns on a 2-core CPU was measured slower). :meth:`Daemon.stop`: the
watcher stops, the reader stops between chunks, whatever is queued is posed and
accumulated (for at most ``drain_seconds``; then, or after :meth:`Daemon.hurry`, only the
pass in progress is finished), then the map, ``particles.star`` and the checkpoint are
written. Particles read but never accumulated are not in the checkpoint's journal, so a
restart reads them again: nothing is lost and nothing is counted twice, also after ``kill -9``.

Faults (docs/daemon.md, "When something fails"): a file the readers refuse, a forward
pass that fails (posed again file by file: only the file that fails is rejected) or an
insertion that fails is rejected in ``rejected.tsv`` and the session goes on; a file that
cannot be opened because the process is out of file descriptors is read again later, not
rejected; a failed status message is skipped. Anything else a stage raises stops it, and
with it the daemon (:attr:`Daemon.errors` names the stage): :meth:`Daemon.stop` then ends
the other stages without waiting on the dead one and writes what is consistent (the map,
``particles.star`` and the checkpoint; if the stage failed while changing the map, the last
checkpoint is kept instead, see :attr:`Daemon.map_consistent`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryofastar.engine.class_posing import ClassPoser
from cryofastar.engine.distributed import Ranks, owners
from cryofastar.engine.junk_exclusion import JunkExclusion
from cryofastar.engine.live_refinement import LiveRefinement
from cryofastar.engine.policy import CLASS_POSES_WAIT_SECONDS
from cryofastar.engine.posing import NetworkPoser, Poses, RandomPoser, sets_per_pass
from cryofastar.engine.streaming_refiner import UNREADABLE, StreamingRefiner
from cryofastar.model.session_frame import SessionFrame
from cryofastar.model.weights import DEFAULT_WEIGHTS, WeightsError
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.classify2d import ClassReferences
from cryofastar.recon.classify2d.class_sums import ClassSums
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.device import resolve_device
from cryofastar.recon.fsc import resolution_text
from cryofastar.recon.io import ParticleChunk, ParticleFileError, ParticleSource, SkippedImages
from cryofastar.recon.io.atomic import remove_stale_temporaries
from cryofastar.recon.io.names import printable
from cryofastar.recon.pose_precision import pose_precision

from .batching import PassGatherer
from .broadcast import SessionBroadcast
from .classification_lane import ClassificationLane, ClassifiedRows, Located
from .fingerprints import ChangedImages, image_fingerprints
from .ingest import NotParticles, Rejected, SessionGeometry, plan_particle_file
from .memory import release_free_memory
from .metrics import DaemonMetrics, serve_metrics
from .pose_source import load_network
from .preflight import check_settings, descriptor_usage, out_of_descriptors
from .publisher import Publisher
from .rank_sync import SYNC_SECONDS, Command, Handover, InsertedChunk, RanksLost, announce, lead
from .rejections import RejectionLog
from .reporting import StatusBoard, refinement_status
from .schedule import OutputSchedule
from .settings import DaemonSettings
from .state import CHECKPOINT_NAME, SessionState
from .watcher import StackWatcher

logger = logging.getLogger(__name__)

__all__ = ["Daemon", "DaemonSettings"]  # DaemonSettings re-exported from .settings

_STOP = object()
_STAGES = ("reader", "poser", "accumulator")  # in pipeline order: each one's input queue, then the next
_BACKGROUND_STOP_SECONDS = 60.0  # stop() waits at most this for the ab initio's or the probe's step in progress
_LANE_STOP_SECONDS = 30.0  # stop() waits at most this for the 2D lane's step in progress and its last files


@dataclass
class _Posed:
    chunks: list[ParticleChunk]
    poses: Poses
    frame_state: dict
    network: bool = True  # the poses are the network's (else random: the network's would not be used)


class Daemon:
    """One streaming session (see module docstring). Use :meth:`start`, then :meth:`stop`.

    Callers (the CLI, the demo, benchmarks) use only the public, read-only API:
    :meth:`start`, :meth:`stop`, :meth:`wait_idle`, :meth:`status`, :attr:`errors`,
    :attr:`settings` (as the caller gave them; never modified), :attr:`out`,
    :attr:`device`, :attr:`poses_from`, :attr:`address`, :attr:`metrics_port`,
    :attr:`metrics_url`, :attr:`metrics` (read its samples, e.g.
    :meth:`DaemonMetrics.stage_seconds`), :attr:`particles_in_map`,
    :attr:`resolution_angstrom`, :attr:`refinement_phase` and
    :attr:`refinement_converged`. The other attributes (``state``, ``refiner``,
    ``model``, ``frame``, the queues) are shared by the pipeline's threads and belong
    to them.

    Parameters
    ----------
    settings: DaemonSettings
        What the user set; validated here.
    ranks: Ranks | None
        This process's place in a session of several ranks (``watch --nproc``; it must be rank 0, the others
        run :class:`~cryofastar.daemon.rank_worker.RankWorker`): it then reads only its share of the
        particles and takes the others' at each sync (:mod:`~cryofastar.daemon.rank_sync`). ``None``: one
        process.

    Raises
    ------
    ValueError
        Impossible settings, or weights the user named that cannot be loaded.
    OSError
        The ZeroMQ or ``/metrics`` port is in use, or the process may open too few files
        (:mod:`~cryofastar.daemon.preflight`): raised before the network or checkpoint is loaded.
    """

    def __init__(self, settings: DaemonSettings, ranks: Ranks | None = None) -> None:
        settings.validate()
        check_settings(settings)  # ports and file descriptors: in milliseconds, before anything slow
        self.settings = s = settings
        self.ranks = ranks if ranks is not None else Ranks.single()
        if not self.ranks.root:
            raise ValueError("the daemon runs on rank 0; the other ranks run RankWorker")
        self._device = self.ranks.device if self.ranks.distributed else resolve_device(s.device)
        self._sets_per_pass = sets_per_pass(self._device)  # passes per forward call
        self.model, self._poses_from = load_network(s, self._device)
        self.class_poser = _load_class_poser(s.class_weights, self._device) if self._poses_from == "classes" else None
        # the refiner works with the effective source of poses; the caller's settings stay as given
        self.refiner = StreamingRefiner(s, self._device, poses_from=self._poses_from)
        self.metrics = DaemonMetrics()
        s.out.mkdir(parents=True, exist_ok=True)
        for leaked in remove_stale_temporaries(s.out):  # writes a kill -9 interrupted
            logger.info("removed %s (an interrupted write)", leaked.name)
        checkpoint = s.out / CHECKPOINT_NAME
        if checkpoint.exists():
            self.state = SessionState.load(checkpoint, self._device)
            logger.info("resuming %s: %d particles in the map", checkpoint, self.state.n_particles)
        else:
            self.state = SessionState()
        if s.refine and self.state.counters.get("refinement_local"):
            self.refiner.phase = "local"  # a restart of a session past its ab initio: no second bootstrap
        if len(self.state.poses):  # map versions go on from the newest a particle was posed against: re-posing resumes
            refined = self.state.poses.column("refined")
            self.refiner.version = int(refined[refined != UNREADABLE].max(initial=0))
        self.taken = self.state.journal.copy()  # reader's view: accumulated + in flight
        self.geometry = self.state.geometry
        # map-only: random poses before refinement starts, which refinement replaces
        self.poser: NetworkPoser | RandomPoser = RandomPoser(seed=0) if self.model is None else NetworkPoser(
            self.model, views=s.batch, anchors=s.anchors, frame_state=self.state.frame)
        self.files: queue.Queue = queue.Queue(s.queue_size)
        self.chunks: queue.Queue = queue.Queue(s.queue_size)
        self.posed: queue.Queue = queue.Queue(s.queue_size)
        self._reading = threading.Event()
        self._reading.set()
        self._stopping = threading.Event()  # stop() was called
        self._hurry = threading.Event()  # finish the pass in progress, leave what is queued for the next start
        self._status_stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}  # stage -> thread, once started
        self._stop_sent: set[str] = set()  # stages _STOP was put in front of
        self._changing_map = False  # the accumulator is between the first and last write of a change to the map
        self._map_consistent = True
        self._outputs_written = False  # the accumulator wrote its final outputs (it ended normally)
        self._stopped = False
        self._batch_counter = 0
        self._pose_calls = 0  # poser calls so far (the network is asked for every probe_every-th when unused)
        self._random_poser = self.poser if isinstance(self.poser, RandomPoser) else RandomPoser(seed=1)
        self._rejections = RejectionLog(s.out)
        self._board = StatusBoard(
            self.metrics, self._rejections, watch=s.watch, device=str(self._device), poses_from=self._poses_from,
            model=None if self.model is None else (s.weights or DEFAULT_WEIGHTS).name,
            model_box=None if self.model is None else self.model.config.box,
            particles_in_map=self.state.n_particles, status_seconds=s.status_seconds)
        self._schedule = OutputSchedule(s.publish_seconds, s.publish_particles, s.checkpoint_seconds,
                                        self.state.n_particles)
        self._inserted = 0  # particles inserted by this run (with refinement.moved: the map's changes)
        self.refinement = LiveRefinement(self.refiner, self.state, self._read_again, self._record_refinement)
        self.exclusion = JunkExclusion(self.state, self._read_again)  # the 2D lane's junk out of the map
        self._exclusion_edits = 0  # particles taken out or put back by this run
        self._errors: list[str] = []
        self._star_error: str | None = None  # why particles.star was last not written
        self._status_error: str | None = None  # why the last status message was not sent
        self._buffered = 0  # particles waiting in the poser for a full pass
        self._broadcast: SessionBroadcast | None = None
        self._watcher: StackWatcher | None = None
        self._metrics_server = None
        self.classification: ClassificationLane | None = None  # the 2D lane (daemon/classification_lane.py)
        if s.classify:
            self.classification = ClassificationLane(
                s.classification, s.out, self.metrics, classes_every=s.classes_every,
                checkpoint_seconds=s.checkpoint_seconds, queue_size=s.classify_queue,
                geometry=None if self.geometry is None else (self.geometry.box, self.geometry.apix),
                resume=self._map_locations())
        else:
            self.metrics.classify_enabled.set(0)
        self._accounted = 0  # in the map or taken out as junk, as last recorded by the accumulator thread
        self._ranks_waiting = 0  # particles the other ranks held at the last sync
        self._from_ranks = 0  # particles the other ranks handed over in this run
        self._ranks_done = False  # the other ranks were told to stop, or are gone
        self._last_sync = -math.inf  # time.monotonic() of the last sync
        self._reference_sent = 0  # map version of the reference last sent to the other ranks
        self._frame_sent = False
        self._classes_sent: ClassReferences | None = None  # the 2D classes last sent to the other ranks
        self._record_map_counts()
        if self.state.fsc_history:
            self.metrics.set_resolution_angstrom(self.state.fsc_history[-1][2])
        if self.ranks.distributed:  # the other ranks read nothing before this (a restart's journal)
            announce(self.ranks, Command("start", self.refiner.rank_policy(), frame=self._frame_to_send(),
                                         geometry=self.geometry, journal=self.state.journal.state_dict()))

    # ------------------------------------------------------------------ public, read-only
    @property
    def out(self) -> Path:
        """The output directory (``settings.out``)."""
        return self.settings.out

    @property
    def device(self) -> torch.device:
        """The torch device the session runs on (``settings.device`` resolved)."""
        return self._device

    @property
    def poses_from(self) -> str:
        """Where poses come from: ``network``, ``map-only`` (asked for, or the shipped weights did not load) or
        ``classes``."""
        return self._poses_from

    @property
    def address(self) -> str | None:
        """The ZeroMQ address maps, poses and status are published on (``None`` before :meth:`start`)."""
        return None if self._broadcast is None else self._broadcast.address

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (the chosen one if 0 was asked; ``None``: not served)."""
        return None if self._metrics_server is None else int(self._metrics_server.server_port)

    @property
    def metrics_url(self) -> str | None:
        """``http://HOST:PORT/metrics`` while metrics are served, else ``None``."""
        port = self.metrics_port
        return None if port is None else f"http://{self.settings.metrics_host}:{port}/metrics"

    @property
    def particles_in_map(self) -> int:
        """Particles in the running map (as last recorded by the accumulator thread: never a count read while
        particles are being re-posed)."""
        return self._board.rate.particles

    @property
    def particles_accounted(self) -> int:
        """Particles the accumulator thread has dealt with: in the map, or taken out of it as 2D junk
        (``--exclude-junk``). A session has taken everything written once this reaches it."""
        return self._accounted

    @property
    def resolution_angstrom(self) -> float:
        """Half-map FSC 0.143 resolution (Å) of the last published map; NaN before the first."""
        history = self.state.fsc_history
        return history[-1][2] if history else math.nan

    @property
    def refinement_phase(self) -> str:
        """``off``, ``waiting``, ``probe``, ``ab-initio`` or ``local`` (docs/refinement.md)."""
        return self.refiner.phase

    @property
    def refinement_converged(self) -> bool:
        """Whether the last re-posing sweep moved particles too little to go on (docs/refinement.md)."""
        return self.refiner.converged

    @property
    def errors(self) -> list[str]:
        """Unexpected failures of pipeline stages, ``"the <stage> stage failed (<error>)"`` (each also logged with its
        traceback).

        A stage that fails stops; the caller should then :meth:`stop` the daemon (the CLI does at once).
        """
        return list(self._errors)

    @property
    def map_consistent(self) -> bool:
        """False once a stage failed while changing the map: the map in memory is not trusted, :meth:`stop`
        writes no checkpoint over the last one (a restart resumes from that, reading later particles again)."""
        return self._map_consistent

    @property
    def map_path(self) -> Path | None:
        """``volume.mrc`` in :attr:`out` if this session has written a map (in this run or before a restart)."""
        path = self.out / "volume.mrc"
        return path if self.state.fsc_history and path.is_file() else None

    @property
    def particles_waiting(self) -> int:
        """Particles read by this run and not (yet) in the map: in flight, or, after :meth:`stop`, left for the
        next start (they are not in the checkpoint's journal, so a restart reads them again)."""
        return max(0, len(self.taken) - len(self.state.journal))

    def _map_locations(self) -> list[Located]:
        """The particles of the checkpoint's map by location (for the 2D lane: those its own checkpoint lacks are
        classified again, the reader will not read them again), ``read_chunk`` at a time; before any thread runs."""
        table = self.state.poses
        n = len(table)
        if n == 0:
            return []
        stacks, indices = table.stack_paths(np.arange(n)), table.column("index")
        halves = torch.from_numpy(table.column("half_set").astype(np.int64))
        known = table.has_ctf()
        located = []
        for rows in (np.flatnonzero(known), np.flatnonzero(~known)):  # with a CTF, without
            for start in range(0, rows.size, self.settings.read_chunk):
                part = rows[start:start + self.settings.read_chunk]
                try:
                    ctf = table.ctf(part)
                except ValueError:  # a checkpoint older than the CTF's optics: classified without
                    ctf = None
                located.append(Located(stacks[part], indices[part], halves[torch.from_numpy(part)], ctf,
                                       dict(self.state.optics)))
        return located

    def status(self) -> dict[str, object]:
        """Counts, rates and queue depths (the ``status`` message's body); also sets the queue gauges."""
        queues = {"files": self.files.qsize(), "chunks": self.chunks.qsize(), "posed": self.posed.qsize()}
        for name, depth in queues.items():
            self.metrics.queue_depth.labels(name).set(depth)
        precision = pose_precision(self.state.poses.snapshot(("spread",))[1]["spread"])  # NaN: never refined
        self.metrics.pose_precision.set(math.nan if precision is None else precision.estimated_median_error_degrees)
        classification = None
        if self.classification is not None:  # with the map's side of it: particles out of the map as junk
            classification = {**self.classification.status(), "exclude_junk": self.settings.exclude_junk,
                              "excluded": self.exclusion.excluded}
        report = self._board.report(self.state, queues, 0 if self._watcher is None else self._watcher.pending,
                                    refinement_status(self.refiner, precision, self.refinement.background),
                                    self.geometry, classification=classification)
        report["ranks"] = {"world": self.ranks.world, "waiting": self._ranks_waiting,
                           "from_other_ranks": self._from_ranks}
        return report

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind the publisher and metrics server, start the stages, then the watcher."""
        s = self.settings
        publisher = Publisher(s.zmq, republish_seconds=s.republish_seconds)
        try:
            if s.metrics_port is not None:
                self._metrics_server = serve_metrics(self.metrics, s.metrics_port, s.metrics_host)
        except OSError:
            publisher.close()
            raise
        self._broadcast = SessionBroadcast(publisher, s.watch)
        if self.state.n_particles and self.state.geometry is not None:
            # a restarted session shows its map at once; before the stages start, so that the accumulator
            # thread (which may re-pose at once) stays the only writer of the map files
            self._publish_map()
        for name, target in (("reader", self._reader), ("poser", self._poser), ("accumulator", self._accumulator),
                             ("status", self._status)):
            thread = threading.Thread(target=self._guard(name, target), name=f"cryofastar-{name}", daemon=True)
            self._threads[name] = thread
            thread.start()
        if self.classification is not None:
            self.classification.start(self._broadcast.classes, map_busy=self._map_busy)
        self._watcher = StackWatcher(s.watch, self._on_file, poll_seconds=s.poll_seconds,
                                     settle_seconds=s.settle_seconds, ignore=[s.out])
        self._watcher.start()
        logger.info("watching %s (%s); outputs in %s; publishing on %s%s", s.watch,
                    f"polling every {s.poll_seconds} s" if s.poll_seconds else "inotify", s.out,
                    self._broadcast.address, f"; metrics on {self.metrics_url}" if self._metrics_server else "")

    def stop(self, drain_seconds: float = math.inf) -> None:
        """Stop watching, drain what is queued, write the map and the checkpoint; never waits on a dead stage.

        Parameters
        ----------
        drain_seconds: float
            Pose and insert what is queued for at most this long; then only the pass in
            progress is finished and the rest is left for the next start (:meth:`hurry`;
            it is not in the checkpoint's journal: a restart reads it again).

        A daemon never started, or whose stages have failed, stops at once: the stages still
        alive are told to stop directly, none is waited on once it is dead. If the
        accumulator failed, the outputs are written here, unless it failed while changing
        the map (:attr:`map_consistent`).
        """
        if self._stopped:
            return
        self._stopping.set()
        self._reading.clear()  # the reader skips what is still queued (read again after a restart)
        if self.classification is not None:
            self.classification.request_stop()  # its step in progress ends while the 3D lane drains
        if self._watcher is not None:
            self._watcher.stop()
        if self._threads:
            self._drain(time.monotonic() + drain_seconds)
            if not self.refinement.stop_background(timeout=_BACKGROUND_STOP_SECONDS):
                logger.warning("the refinement step in the background did not stop within %.0f s",
                               _BACKGROUND_STOP_SECONDS)
            if not self._outputs_written and self._map_consistent and self.state.accumulator is not None:
                self._final_outputs_after_failure()
            self._status_stop.set()
            for name in ("status", "poser", "reader"):  # a pass in progress ends, a dead stage is not waited on
                self._threads[name].join(timeout=2.0)
        self._release_ranks()  # the others end once told (a session never started, or whose accumulator failed)
        if self.classification is not None:
            self.classification.stop(timeout=_LANE_STOP_SECONDS)  # its classes and checkpoint written
        self._stopped = True
        self._status_stop.set()
        self._publish_status()
        if self._broadcast is not None:
            self._broadcast.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        logger.info("stopped: %d particles in the map%s", self.state.n_particles,
                    f"; {self.particles_waiting} read but not inserted (read again at the next start)"
                    if self.particles_waiting else "")

    def hurry(self) -> None:
        """While stopping: finish only the pass in progress; what is still queued is left for the next start."""
        self._hurry.set()

    def _drain(self, deadline: float) -> None:
        """Until the accumulator has ended: hand _STOP to each live stage whose upstream ended without passing
        it on (failed or never fed), and hurry once ``deadline`` (monotonic) has passed."""
        accumulator = self._threads["accumulator"]
        started, said = time.monotonic(), 0
        while True:
            for i, name in enumerate(_STAGES):
                upstream_ended = i == 0 or not self._threads[_STAGES[i - 1]].is_alive() or not accumulator.is_alive()
                if name not in self._stop_sent and upstream_ended and self._threads[name].is_alive():
                    with contextlib.suppress(queue.Full):  # full: tried again in 0.1 s
                        self._queue_of(name).put_nowait(_STOP)
                        self._stop_sent.add(name)
            if not accumulator.is_alive():
                return
            accumulator.join(0.1)
            waited = time.monotonic() - started
            if time.monotonic() > deadline and not self._hurry.is_set():
                logger.warning("stopping: finishing the pass in progress; %d particles still queued are left for "
                               "the next start", self.particles_waiting)
                self._hurry.set()
            if waited >= 10 * (said + 1):
                said += 1
                logger.info("stopping: the accumulator is finishing its pass (%.0f s so far)", waited)

    def _queue_of(self, stage: str) -> queue.Queue:
        """The queue ``stage`` reads."""
        return {"reader": self.files, "poser": self.chunks, "accumulator": self.posed}[stage]

    def _put(self, item: object, stage: str) -> bool:
        """Put ``item`` on ``stage``'s queue, blocking while it is full (back-pressure) but only as long as
        ``stage`` is alive; False if it is not (the item is then dropped: the daemon is stopping)."""
        target = self._queue_of(stage)
        while True:
            try:
                target.put(item, timeout=0.2)
            except queue.Full:
                thread = self._threads.get(stage)
                if thread is not None and not thread.is_alive():
                    return False
                continue
            if item is _STOP:
                self._stop_sent.add(stage)
            return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queue is empty and nothing is in flight (CLI ``--idle-exit``, demo, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.files.unfinished_tasks == 0 and self.chunks.unfinished_tasks == 0 and self._buffered == 0
                    and self.posed.unfinished_tasks == 0 and self._watcher is not None and self._watcher.pending == 0
                    and self._watcher.queued == 0 and self._ranks_waiting == 0):
                return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ stages
    def _guard(self, name: str, target):  # noqa: ANN001, ANN202 - thread wrapper
        """``target`` in a thread: what it raises is logged, named in :attr:`errors`, and ends the stage."""
        def run() -> None:
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - a dying stage must be visible, and must not hang stop()
                torn = name == "accumulator" and self._changing_map
                if torn:
                    self._map_consistent = False
                if isinstance(exc, RanksLost):  # not a bug here: one line (the launcher names the rank that died)
                    logger.error("%s; the daemon stops%s", exc, " (the last checkpoint is kept)" if torn else "")
                else:
                    logger.exception("the %s stage failed%s; the daemon stops", name,
                                     " while changing the map (the last checkpoint is kept)" if torn else "")
                first = str(exc).splitlines()[0] if str(exc) else ""
                self._errors.append(f"the {name} stage failed ({type(exc).__name__}: {first})")
        return run

    def _on_file(self, path: Path) -> None:
        self.metrics.files_seen.inc()
        self.state.counters["files_seen"] = self.state.counters.get("files_seen", 0) + 1
        self._put(path, "reader")  # blocks when the reader is behind: back-pressure on the watcher

    def _reader(self) -> None:
        while True:
            item = self.files.get()
            try:
                if item is _STOP:
                    self._put(_STOP, "poser")
                    return
                if self._reading.is_set():
                    self._read_or_reject(item)
            finally:
                self.files.task_done()

    def _read_or_reject(self, path: Path) -> None:
        """:meth:`_read`; should anything but the readers' documented errors escape, the file is rejected.

        One file must never stop the session: the readers raise ParticleFileError for bad
        input (a rejection); anything else is a bug, logged with its traceback, and the
        reader goes on with the next file.

        A file that cannot be opened because the process is out of file descriptors is not
        rejected: the reader waits (0.5 s, doubling to 30 s, with a warning each time) and
        reads it again; on stop it is left for the next start.
        """
        delay = 0.5
        while True:
            try:
                self._read(path)
                return
            except Exception as exc:  # noqa: BLE001 - the last resort that keeps the session alive
                if out_of_descriptors(exc):
                    opened, limit = descriptor_usage()  # opened is None when even /proc/self/fd cannot be opened
                    logger.warning("cannot open %s: too many open files (%s of the limit of %d in use); not "
                                   "rejected: read again in %.1f s. Raise the limit (ulimit -n) or close what holds "
                                   "descriptors (subscribers, /metrics connections)", printable(str(path)),
                                   "all" if opened is None else opened, limit, delay)
                    if self._stopping.wait(delay):
                        return  # left for the next start: its particles not read are not in the journal
                    delay = min(2 * delay, 30.0)
                    continue
                logger.exception("unexpected error while reading %s", printable(str(path)))
                first = str(exc).splitlines()[0] if str(exc) else ""
                self._reject(path, f"{path}: unexpected error while reading it ({type(exc).__name__}: {first})")
                return

    def _read(self, path: Path) -> None:
        s = self.settings
        t0 = time.perf_counter()
        try:
            source, geometry = plan_particle_file(path, s.watch, self.geometry, self.taken, s.apix)
        except NotParticles as exc:
            logger.info("skipped: %s", exc)
            return
        except Rejected as exc:
            if out_of_descriptors(exc):
                raise  # not the file's fault: read again later (_read_or_reject)
            self._reject(path, str(exc))
            return
        if len(source) == 0:
            return
        if self.ranks.distributed:  # this rank's share; the file fixes the session's geometry for every rank
            self.geometry = geometry
            source = source.select(owners(source.stacks, source.indices, self.ranks.world) == self.ranks.rank)
        skipped: list[SkippedImages] = []
        try:
            for chunk in source.chunks(s.read_chunk):
                skipped.append(chunk.skipped)
                if len(chunk):
                    self.geometry = geometry  # fixed by the first file that brings a particle, not one rejected
                    self.taken.add(chunk.stacks, chunk.indices)
                    self._count("particles_ingested", len(chunk))
                    if self.classification is not None:  # never blocks: a full queue keeps locations only
                        self.classification.offer(chunk, geometry.box, geometry.apix)
                    if not self._put(chunk, "poser"):
                        break  # the poser failed: the daemon stops, the rest is read again after a restart
                if not self._reading.is_set():
                    break  # stopping: the rest is read again after a restart
        except ParticleFileError as exc:  # a stack became unreadable since the file was checked
            if out_of_descriptors(exc):
                raise  # the chunks already queued stay taken; the rest is read again later
            self._reject(path, str(exc))
        dropped = SkippedImages.concat(skipped)
        if len(dropped):
            self._count("particles_rejected", len(dropped))
            self._reject(path, f"{dropped.describe(path)}; the file's other images were taken", count_file=False)
        self.metrics.latency.labels("read").observe(time.perf_counter() - t0)

    def _poser(self) -> None:
        s = self.settings
        gather = PassGatherer(s.flush_seconds)
        stopping = False
        while True:
            # one forward call holds sets_per_pass passes of batch - 1 - anchors new particles each
            unit = (s.batch - 1 - s.anchors) * self._sets_per_pass
            framed = isinstance(self.poser, NetworkPoser) and self.poser.has_reference
            wanted = unit if framed else max(s.batch - 1, s.candidates)
            hurry = self._hurry.is_set()
            batch = gather.next_call(unit, wanted, whole_calls=framed, flush=stopping or hurry)
            if batch:
                if not hurry:
                    self._pose(batch)  # when hurried, not posed: left for the next start (not in the journal)
                self._buffered = gather.waiting  # only now: wait_idle() must not see the pass as done before
                gather.restart_clock()
                continue
            if stopping:
                self._put(_STOP, "accumulator")
                return
            try:
                item = self.chunks.get(timeout=gather.timeout())
            except queue.Empty:
                continue
            self.chunks.task_done()
            if item is _STOP:
                stopping = True
                continue
            gather.add(item)
            self._buffered += len(item)

    def _pose(self, chunks: list[ParticleChunk]) -> None:
        """Pose one forward call's particles and hand them to the accumulator.

        A failed call with particles of several files is posed again file by file, so only a
        file whose particles fail on their own is rejected (``rejected.tsv``: "pose estimation
        failed"); the others go into the map.
        """
        s = self.settings
        assert self.geometry is not None
        images = torch.cat([c.images for c in chunks])
        t0 = time.perf_counter()
        self._pose_calls += 1
        if isinstance(self.poser, RandomPoser) or (self.poser.has_reference
                                                   and not self.refiner.wants_network_poses(self._pose_calls)):
            # map-only, or the network's poses would not be used now: random poses, which refinement replaces
            self._count("particles_posed", len(images))
            self._put(_Posed(chunks, self._random_poser.pose(images, self.geometry.apix), {}, network=False),
                      "accumulator")
            return
        try:
            poses = self._network_poses(chunks)
        except Exception as exc:  # noqa: BLE001 - a failed pass loses no other file's particles, never the session
            first = str(exc).splitlines()[0] if str(exc) else ""
            by_file: dict[Path, list[ParticleChunk]] = {}
            for chunk in chunks:
                by_file.setdefault(chunk.origin, []).append(chunk)
            if len(by_file) > 1:
                logger.warning("a forward pass of %d particles from %d files failed (%s: %s); posing each file on "
                               "its own", len(images), len(by_file), type(exc).__name__, first)
                for group in by_file.values():
                    self._pose(group)
                return
            logger.exception("forward pass failed")
            origin = chunks[0].origin
            for chunk in chunks:
                self._forget(chunk)
            self._reject(origin, f"{origin}: pose estimation failed ({type(exc).__name__}: {first})", count_file=False)
            self._count("particles_rejected", len(images))
            return
        self._batch_counter += 1
        self.metrics.batches.inc(max(1, math.ceil(len(images) / max(1, s.batch - 1 - s.anchors))))
        self._count("particles_posed", len(images))
        self.metrics.latency.labels("pose").observe(time.perf_counter() - t0)
        self._put(_Posed(chunks, poses, self.poser.state_dict()), "accumulator")

    def _network_poses(self, chunks: list[ParticleChunk]) -> Poses:
        """The network's poses of ``chunks``' particles in the session frame (the first call chooses its reference)."""
        assert isinstance(self.poser, NetworkPoser) and self.geometry is not None
        images = torch.cat([c.images for c in chunks])
        if not self.poser.has_reference:
            self.poser.choose_reference(images[: self.settings.candidates])
        return self.poser.pose(images, self.geometry.apix)

    def _accumulator(self) -> None:
        while True:
            idle_work = self._idle_work_left()
            timeout = 0.0 if idle_work else self.settings.publish_seconds / 4
            try:
                item = self.posed.get(timeout=timeout) if timeout else self.posed.get_nowait()
            except queue.Empty:
                if idle_work:
                    self._repose()  # nothing new waits: go on improving the map
                self._maybe_publish_and_checkpoint()
                continue
            try:
                if item is _STOP:
                    break
                if self._hurry.is_set():
                    continue  # stopping in a hurry: left for the next start (not in the journal)
                self._accumulate(item)
                self._maybe_publish_and_checkpoint()
            finally:
                self.posed.task_done()
        self._final_outputs()
        self._outputs_written = True

    def _final_outputs(self) -> None:
        """At stop: the other ranks' last particles, the view directions, the map if it changed since last published,
        particles.star and checkpoint."""
        try:
            self._sync_ranks(final=True)
        except RanksLost as exc:  # the map holds what was handed over before: written; what was not is read again
            if exc.torn:
                raise
            self._errors.append(f"the last sync of the ranks failed ({exc})")
            logger.error("the last sync of the ranks failed (%s); the map, particles.star and checkpoint hold the "
                         "particles handed over before, the others are read again at the next start", exc)
        if self.ranks.distributed:
            logger.info("ranks: the other %d posed and inserted %d of the %d particles this run added",
                        self.ranks.world - 1, self._from_ranks, self._inserted)
        self._update_views(force=True)
        if self.state.n_particles and (self._schedule.changed(self._edits) or not self.state.fsc_history):
            self._publish_map()
        self._checkpoint()

    def _final_outputs_after_failure(self) -> None:
        """:meth:`_final_outputs` from :meth:`stop` once a stage failed (the map is consistent): the accumulator
        has ended, so nothing else touches the state; a failure here is logged, the last checkpoint stays."""
        if self._threads["accumulator"].is_alive():
            return  # still in a pass: the state is not touched from here
        try:
            self._final_outputs()
        except Exception:  # noqa: BLE001 - stopping after a failure: what can be written is, the rest is logged
            logger.exception("the outputs could not all be written at stop; the last checkpoint is kept")

    @contextlib.contextmanager
    def _map_change(self):  # noqa: ANN202 - a context manager
        """Marks a change to the map (grids, journal, poses written together): a stage failing inside it leaves
        the map in memory untrusted (:attr:`map_consistent`)."""
        self._changing_map = True
        yield
        self._changing_map = False

    def _accumulate(self, posed: _Posed) -> None:
        st = self.state
        assert self.geometry is not None and self._broadcast is not None
        t0 = time.perf_counter()
        if st.accumulator is None:
            self._make_accumulator()
        pass_rotations = posed.poses.rotations
        pass_origins = posed.poses.origins_angstrom
        hurry = self._behind()
        with self._map_change():  # finishing the ab initio's start re-inserts the map's oldest particles
            refined = self._refine_pass(posed.chunks, pass_rotations, pass_origins, posed.network, hurry)
        start = 0
        for chunk in posed.chunks:  # a few chunks (files) per pass, not particles
            n = len(chunk)
            rows = slice(start, start + n)
            rotations, origins = pass_rotations[rows], pass_origins[rows]
            confidence = posed.poses.confidence[rows]
            score = spread = None
            if refined is not None:
                rotations, origins = refined.rotations[rows], refined.origins_angstrom[rows]
                score, spread = refined.scores[rows], refined.spread_degrees[rows]
            start += n
            with self._map_change():  # the grids, the journal and the poses: all of them or (ValueError) none
                try:
                    st.accumulator.add(chunk.images, rotations, origins, chunk.half_sets, chunk.ctf)
                except ValueError as exc:  # refused before the grids are touched
                    self._forget(chunk)
                    self._reject(chunk.origin, f"{chunk.origin}: insertion failed ({exc})", count_file=False)
                    self._count("particles_rejected", n)
                    continue
                first_row = self._record_inserted(InsertedChunk(
                    chunk.stacks, chunk.indices, chunk.half_sets, rotations, origins, confidence, chunk.ctf,
                    chunk.optics, score, spread, 0 if refined is None else refined.version,
                    image_fingerprints(chunk.images), str(chunk.origin)))
                if refined is not None and refined.soft is not None:
                    self.refiner.record_soft(np.arange(first_row, first_row + n), refined.soft[rows])
        if posed.frame_state:
            st.frame = posed.frame_state
        self._note_inserted(len(pass_rotations))
        if refined is not None and not hurry:  # behind the stream: re-posing waits until particles stop waiting
            self._repose()
        self.metrics.latency.labels("accumulate").observe(time.perf_counter() - t0)

    def _make_accumulator(self) -> None:
        """The session's grids, at the geometry the first file fixed."""
        assert self.geometry is not None
        self.state.geometry = self.geometry
        self.state.accumulator = self._new_grids(self.geometry)

    def _new_grids(self, geometry: SessionGeometry) -> HalfSetAccumulator:
        """Empty half-set grids of ``geometry`` with the session's interpolation, on its device."""
        return HalfSetAccumulator(geometry.box, geometry.apix, interpolation=self.settings.interpolation,
                                  device=self.device)  # type: ignore[arg-type]

    def _record_inserted(self, rows: InsertedChunk) -> int:
        """Record particles just inserted into the grids (by this rank or, at a sync, another): the journal, the
        fingerprints, the pose table, the optics, the count and their ZeroMQ poses. Returns their first row."""
        st = self.state
        assert self._broadcast is not None
        st.journal.add(rows.stacks, rows.indices)
        st.fingerprints.add(rows.stacks, rows.indices, rows.fingerprints)
        first_row = len(st.poses)
        st.poses.append(rows.stacks, rows.indices, rows.rotations, rows.origins, rows.confidence, rows.half_sets,
                        rows.ctf, rows.scores, rows.spread, rows.version)
        if rows.optics and not st.optics:
            st.optics = dict(rows.optics)
        self.metrics.particles_accumulated.inc(len(rows))
        self._broadcast.poses(rows.stacks, rows.indices, rows.half_sets, rows.rotations, rows.origins,
                              rows.confidence, self._batch_counter)
        return first_row

    def _note_inserted(self, n: int) -> None:
        """``n`` new particles are in the map: it changed, refinement's sweep starts again, the output schedule,
        the map's counts and the rate hear of them."""
        self._inserted += n
        self.refiner.note_new_particles()
        self._schedule.particles_arrived(has_map=bool(self.state.fsc_history))
        self._record_map_counts()
        self._board.rate.add(time.monotonic(), self.state.n_particles)

    # ------------------------------------------------------------------ refinement (engine.live_refinement)
    @property
    def _edits(self) -> int:
        """Changes to the map so far: particles inserted or moved to new poses (the map changed since published)."""
        return self._inserted + self.refinement.moved + self._exclusion_edits

    def _refine_pass(self, chunks: list[ParticleChunk], rotations: torch.Tensor, origins: torch.Tensor,  # noqa: ANN202
                     network: bool, hurry: bool):
        """The pass's poses refined against the running map (``None``: it goes in unrefined; before refinement
        starts, while the ab initio starts, when behind with an informative network, or on failure)."""
        ctf = CtfParams.cat([c.ctf for c in chunks]) if all(c.ctf is not None for c in chunks) else None
        return self.refinement.refine_pass(torch.cat([c.images for c in chunks]),
                                           torch.cat([c.half_sets for c in chunks]), rotations, origins, ctf,
                                           self.state.geometry.apix, network=network, hurry=hurry)

    def _behind(self) -> bool:
        """Whether particles wait behind the pass in hand (files, chunks or posed passes queued): refinement then
        gives new passes first poses only and leaves re-posing for later (docs/refinement.md, "Keeping up")."""
        return any(q.qsize() for q in (self.files, self.chunks, self.posed))

    def _idle_work_left(self) -> bool:
        """Whether re-posing while idle is worth doing (not while stopping)."""
        return self._reading.is_set() and self.refinement.idle_work_left()

    def _repose(self) -> None:
        with self._map_change():  # particles are taken out of the map and put back at new poses
            self.refinement.repose(self.state.geometry.apix)

    def _read_again(self, rows: np.ndarray) -> torch.Tensor:
        """`(len(rows), B, B)` float32 images of map particles ``rows``, read again (one read per stack).

        Raises ParticleFileError (naming the images) if a stack is gone, an image is no longer finite, or
        a stack was replaced since its particles went into the map (their fingerprints differ: subtracting
        other images would corrupt the map; the stack gets a rejected.tsv row).
        """
        table, geometry = self.state.poses, self.state.geometry
        stacks, indices = table.stack_paths(rows), table.column("index")[rows]
        source = ParticleSource.from_locations(self.out, stacks, indices, geometry.box, geometry.apix,
                                               torch.from_numpy(table.column("half_set")[rows].astype(np.int64)))
        images = source.images().all_images()
        try:
            self.state.fingerprints.verify(stacks, indices, images)
        except ChangedImages as exc:
            changed = np.isin(table.column("stack_id"), [table.stack_names.index(name) for name in exc.changed])
            table.column("refined")[changed] = UNREADABLE  # all of each changed stack: never picked again
            for stack in exc.changed:
                self._reject(Path(stack), exc.reason(stack), count_file=False)
            raise
        return images

    def _record_refinement(self, step: str, n: int, seconds: float) -> None:
        """Metrics of a refinement step (``refine``, ``repose``, ``ab_initio``, ``class_poses``)."""
        if step in ("refine", "repose"):
            self._count("particles_refined" if step == "refine" else "particles_reposed", n)
        if step == "ab_initio" and self.refiner.ab_verdict is not None:
            self.metrics.ab_initio_converged.set(float(self.refiner.ab_verdict.converged))
        self.metrics.latency.labels(step).observe(seconds)

    # ------------------------------------------------------------------ outputs
    def _maybe_publish_and_checkpoint(self) -> None:
        """Write and publish the map, and checkpoint, when :class:`OutputSchedule` says so (accumulator thread)."""
        st = self.state
        self._sync_ranks()
        self._exclude_junk()
        self._pose_from_classes()
        if st.accumulator is not None:
            with self._map_change():  # a chunk moved to class poses, or a finished ab initio's poses applied
                self.refinement.poll(st.geometry.apix)
        self._update_views()
        now = time.monotonic()
        if self._schedule.map_due(st.n_particles, self._edits, first=not st.fsc_history,
                                  wants_reference=self.refiner.wants_reference(st.n_particles), now=now):
            self._publish_map()
        if self._schedule.checkpoint_due(now) and st.accumulator is not None:
            self._checkpoint()

    # ------------------------------------------------------------------ ranks (watch --nproc; daemon/rank_sync.py)
    def _sync_ranks(self, final: bool = False) -> None:
        """Lead a sync of the ranks when :data:`SYNC_SECONDS` have passed since the last (``final``: now, the last
        one: the others then end) and record the particles they hand over (accumulator thread, or :meth:`stop`'s
        once it has ended).

        Raises
        ------
        RanksLost
            A rank is gone: no sync is tried again (``torn``: during the reduce; the map is then not trusted).
        """
        if not self.ranks.distributed or self._ranks_done:
            return
        now = time.monotonic()
        if not final and now - self._last_sync < SYNC_SECONDS:
            return
        st = self.state
        if st.accumulator is None and self.geometry is not None:  # the others may insert before rank 0 does
            self._make_accumulator()
        policy = self.refiner.rank_policy()
        # the reference only when the others search it (the ab initio makes a new one at every step, unused there)
        reference = self._reference_to_send() if "coarse" in (policy.network_mode, policy.random_mode) else None
        lane = self.classification
        classify = lane is not None and lane.state != "failed"
        command = Command("stop" if final else "sync", policy, reference, self._frame_to_send(), self.geometry,
                          classes=self._classes_to_send(), classify=classify)
        self._last_sync = now
        if final:
            self._ranks_done = True
        t0 = time.perf_counter()
        sent = self._classes_sent  # the others' 2D sums are in the frame of these classes
        class_sums = None if sent is None else ClassSums(sent.settings.n_classes, sent.images.shape[-1], 1.0)
        self._changing_map = True  # a failure during the reduce leaves the grids torn (RanksLost.torn)
        try:
            handovers = lead(self.ranks, command, st.accumulator, class_sums)
        except RanksLost as exc:
            self._ranks_done = True
            self._changing_map = exc.torn
            raise
        self._changing_map = False
        self._take_handovers(handovers, class_sums)
        self.metrics.latency.labels("sync").observe(time.perf_counter() - t0)

    def _release_ranks(self) -> None:
        """:meth:`stop` of a session whose accumulator did not end normally (never started, failed): the other
        ranks are told to stop; what they hand over is not recorded (not in the journal: read again at the next
        start)."""
        if not self.ranks.distributed or self._ranks_done:
            return
        self._ranks_done = True
        g = self.geometry
        try:
            lead(self.ranks, Command("stop", geometry=g), None if g is None else self._new_grids(g))
        except RanksLost as exc:
            logger.warning("the other ranks could not be told to stop (%s)", exc)

    def _take_handovers(self, handovers: list[Handover], class_sums: ClassSums | None) -> None:
        """Record what the other ranks handed over (their grids are already in rank 0's, their 2D sums in
        ``class_sums``): rows, counts, rejections; to the 2D lane, the particles they classified and, by location,
        those they read and did not classify."""
        n = 0
        lane, g = self.classification, self.geometry
        for handover in handovers:
            for name, count in handover.counts.items():
                self._count(name, count)
            for path, reason in handover.rejections:
                self._reject(Path(path), reason, count_file=False)
            for rows in handover.chunks:
                self.taken.add(rows.stacks, rows.indices)
                self._record_inserted(rows)
                n += len(rows)
            for located in handover.to_classify:
                if lane is not None and g is not None:
                    lane.offer_located(located, g.box, g.apix)
        classified = [handover.classified for handover in handovers if handover.classified is not None]
        if classified and lane is not None and class_sums is not None:
            lane.offer_classified(ClassifiedRows.merged(classified, class_sums.state_dict()))
        self._ranks_waiting = sum(handover.waiting for handover in handovers)
        self._from_ranks += n
        if n:
            self._note_inserted(n)

    def _classes_to_send(self) -> ClassReferences | None:
        """The 2D lane's classes for the other ranks, when their version changed since last sent."""
        lane = self.classification
        shared = None if lane is None else lane.shared_references()
        if shared is None or (self._classes_sent is not None and shared.version == self._classes_sent.version):
            return None
        self._classes_sent = shared
        return shared

    def _reference_to_send(self):  # noqa: ANN202 - ReferenceSource | None
        """Rank 0's reference for the other ranks, when its version changed since last sent (a sync whose policy
        has them search it)."""
        source = self.refiner.reference_source
        if source is None or self.refiner.version == self._reference_sent:
            return None
        self._reference_sent = self.refiner.version
        return (*source, self.refiner.version)

    def _frame_to_send(self) -> dict | None:
        """The network's session frame for the other ranks, once complete (its anchors chosen), sent once."""
        frame = self.state.frame
        if self._frame_sent or self.model is None or not SessionFrame.complete(frame):
            return None
        self._frame_sent = True
        return frame

    def _map_busy(self) -> bool:
        """Whether the 3D lane has work in hand: files, chunks or posed passes queued, or its ab initio running
        (the 2D lane then does no idle re-alignment; any thread)."""
        return self.refiner.phase == "ab-initio" or self._behind()

    def _exclude_junk(self) -> None:
        """Apply the 2D lane's newest junk verdicts to the map (--exclude-junk; engine/junk_exclusion.py)."""
        if self.classification is None or not self.settings.exclude_junk or self.state.accumulator is None:
            return
        verdicts = self.classification.junk_verdicts()
        if verdicts is not None:
            self.exclusion.offer(verdicts)
        if not self.exclusion.due():
            return
        t0 = time.perf_counter()
        with self._map_change():  # particles taken out of the grids or put back, their rows marked
            step = self.exclusion.step()
        if step.removed or step.restored:
            self._exclusion_edits += step.removed + step.restored
            self._record_map_counts()
            self.metrics.latency.labels("exclude_junk").observe(time.perf_counter() - t0)

    def _pose_from_classes(self) -> None:
        """--poses-from classes: once the 2D lane hands over a settled class set, move the map's particles to
        their class poses and probe them (engine/live_refinement.py); a failed lane, or none settled within
        CLASS_POSES_WAIT_SECONDS: map-only ab initio."""
        if not self.refinement.wants_class_views or self.state.accumulator is None:
            return
        lane = self.classification
        assert lane is not None  # settings refuse --poses-from classes with --no-classify
        if lane.state == "failed":
            self.refiner.give_up_classes(f"the 2D lane failed ({lane.error})")
            return
        if self.refiner.classes_overdue():
            self.refiner.give_up_classes(f"no settled 2D classes within {CLASS_POSES_WAIT_SECONDS:.0f} s")
            return
        views = lane.class_views()
        if views is None:
            return
        assert self.class_poser is not None and self.state.geometry is not None
        with self._map_change():  # particles are taken out of the map and put back at their class poses
            self.refinement.pose_from_classes(views, self.class_poser, self.state.geometry.apix)

    def _record_map_counts(self) -> None:
        """Particles in the map and taken out of it as junk: the two gauges and :attr:`particles_accounted`."""
        in_map, excluded = self.state.n_particles, self.exclusion.excluded
        self.metrics.particles_in_map.set(in_map)
        self.metrics.particles_excluded.set(excluded)
        self._accounted = in_map + excluded

    def _publish_map(self) -> None:
        st = self.state
        assert st.geometry is not None and st.accumulator is not None and self._broadcast is not None
        t0 = time.perf_counter()
        volume, curve, resolution, halves = st.write_maps(self.out)
        self.refiner.update_reference(halves, st.geometry.apix, resolution, st.n_particles)
        self._broadcast.volume(volume, st.geometry.apix, st.n_particles, resolution, curve, st.fsc_history)
        self._schedule.map_published(st.n_particles, self._edits)
        self.metrics.maps_published.inc()
        self.metrics.set_resolution_angstrom(resolution)
        self.metrics.latency.labels("map").observe(time.perf_counter() - t0)
        logger.info("map: %d particles, %s", st.n_particles, resolution_text(resolution))
        release_free_memory()  # with each map: RSS stays flat over days instead of creeping (daemon/memory.py)

    def _checkpoint(self) -> None:
        if self.state.accumulator is None:
            return
        t0 = time.perf_counter()
        self.state.counters["refinement_local"] = int(self.refiner.phase == "local")
        try:
            self.state.save(self.out / CHECKPOINT_NAME)  # first: whatever particles.star meets, nothing is lost
            self.state.write_particles(self.out)
        except OSError as exc:  # a full disk, a read-only folder: the previous files stay, the session goes on
            logger.error("output not written (%s); the previous file is kept, particles read since the last checkpoint "
                         "are read again after a restart; retrying in %.0f s", exc, self.settings.checkpoint_seconds)
        except ParticleFileError as exc:  # a name no STAR file can hold (ingest refuses those; an old checkpoint)
            if str(exc) != self._star_error:  # once, not at every checkpoint
                logger.error("particles.star not written (the map and the checkpoint are): %s", exc)
                self._star_error = str(exc)
        self._schedule.checkpoint_written()
        self.metrics.latency.labels("checkpoint").observe(time.perf_counter() - t0)

    def _update_views(self, force: bool = False) -> None:
        """Recompute the status messages' view directions (accumulator thread: it owns the pose table)."""
        self._board.views.update(self._edits, self.state.poses, force=force)

    def _status(self) -> None:
        while not self._status_stop.wait(self.settings.status_seconds):
            self._publish_status()

    def _publish_status(self) -> None:
        """Publish a status message; one that cannot be made is skipped (logged once per distinct error)."""
        if self._broadcast is None:
            return
        try:
            self._broadcast.status(self.status())
        except Exception as exc:  # noqa: BLE001 - status messages are best effort, the map is not
            text = f"{type(exc).__name__}: {exc}"
            if text != self._status_error:
                logger.exception("status message not sent")
                self._status_error = text

    def _count(self, name: str, n: int) -> None:
        self._board.count(name, n)

    # ------------------------------------------------------------------ bad input
    def _forget(self, chunk: ParticleChunk) -> None:
        self.taken.remove(chunk.stacks, chunk.indices)

    def _reject(self, path: Path, reason: str, count_file: bool = True) -> None:
        """Log, count (a whole file unless ``count_file`` is false) and record a rejection in ``rejected.tsv``."""
        logger.warning("rejected: %s", reason)
        if count_file:
            self.metrics.files_rejected.inc()
            self.state.counters["files_rejected"] = self.state.counters.get("files_rejected", 0) + 1
        self._rejections.record(path, reason)


def _load_class_poser(weights: str, device: torch.device) -> ClassPoser:
    """The geometric decoder of a ``classes`` session (ValueError naming --class-weights if it cannot load)."""
    try:
        return ClassPoser.load(weights, device)
    except WeightsError as exc:
        raise ValueError(f"--class-weights {weights}: {exc}") from None
