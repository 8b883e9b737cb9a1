"""The streaming daemon: watcher -> reader -> poser -> accumulator -> publishers.

Threads and the bounded queues between them (``put`` blocks when a queue is full, so
a slow stage holds the earlier ones back; nothing is dropped)::

    StackWatcher --files--> reader --chunks--> poser --posed--> accumulator --> Publisher (ZeroMQ)
                                                                      \\--> --out files, checkpoint
    status thread: status messages and gauges every second;  /metrics: prometheus-client

- **reader** (:mod:`~cryofastar.daemon.ingest`): checks each complete file, lists its
  particles the session has not taken, and reads their images ``read_chunk`` at a time.
  A bad file gets one log line, a metric and a row in ``rejected.tsv``.
- **poser**: gathers particles until one forward pass is full (``batch`` views: the
  session reference, its anchors, and ``batch - 1 - anchors`` new particles), or
  ``flush_seconds`` after the first waiting particle; Fourier-crops them to the model
  box and poses them in the session frame
  (:class:`~cryofastar.model.session_frame.SessionFrame`). The first particles choose
  the session reference (:func:`~cryofastar.model.reference.select_reference`).
- **accumulator**: inserts each posed particle at the input's own box and pixel size
  into the half-set volumes (:class:`~cryofastar.daemon.state.SessionState`),
  publishes its poses, writes and publishes the map after the first pass and then every
  ``publish_seconds`` or ``publish_particles``; every ``checkpoint_seconds`` writes ``particles.star`` and the
  checkpoint.

The poser and the accumulator run at the same time: the next pass is posed while the
last one is inserted (and while a map is computed), with ``queue_size`` posed passes of
slack between them. (Making them take turns on a 2-core CPU was measured slower.)

Stopping (:meth:`Daemon.stop`, SIGINT/SIGTERM in the CLI): the watcher stops, the
reader stops between chunks, whatever is queued is posed and accumulated, then the map,
``particles.star`` and the checkpoint are written. Particles read but never accumulated
are not in the checkpoint's journal, so a restart reads them again: nothing is lost and
nothing is counted twice, also after ``kill -9``.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryofastar.model.preprocess import model_pixel_size, to_model_box
from cryofastar.model.reference import select_reference
from cryofastar.model.session_frame import PoseBatch, SessionFrame
from cryofastar.model.weights import DEFAULT_WEIGHTS, WeightsError, load_model
from cryofastar.protocol import POSE_COLUMNS, PosesMessage, StatusMessage, VolumeMessage
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.device import resolve_device
from cryofastar.recon.euler import matrix_to_euler
from cryofastar.recon.fsc import shell_resolutions_angstrom
from cryofastar.recon.io import ParticleChunk, ParticleFileError, ParticleSource, SkippedImages
from cryofastar.recon.rotations import geodesic_degrees, random_rotations
from cryofastar.recon.view_directions import view_direction_histogram

from .ingest import NotParticles, Rejected, plan_particle_file
from .metrics import DaemonMetrics, serve_metrics
from .publisher import Publisher
from .refiner import UNREADABLE, StreamingRefiner
from .settings import DaemonSettings
from .state import CHECKPOINT_NAME, SessionState
from .watcher import StackWatcher

logger = logging.getLogger(__name__)

__all__ = ["Daemon", "DaemonSettings"]  # DaemonSettings re-exported from .settings

_STOP = object()
HISTORY_ROWS = 1000  # published maps (time, particles, resolution) re-sent with every map, for late subscribers
RATE_SECONDS = 30.0  # particles_per_second in status messages: over this many seconds
RECENT_REJECTIONS = 20  # rejected files listed in status messages (all of them are in rejected.tsv)


@dataclass
class _Posed:
    chunks: list[ParticleChunk]
    batch: PoseBatch
    apix_model: float
    frame_state: dict


def _take(chunks: list[ParticleChunk], k: int) -> tuple[list[ParticleChunk], list[ParticleChunk]]:
    """The first ``k`` particles of ``chunks`` and the rest (a chunk is split where needed)."""
    head: list[ParticleChunk] = []
    for i, chunk in enumerate(chunks):
        if k <= 0:
            return head, chunks[i:]
        if len(chunk) <= k:
            head.append(chunk)
            k -= len(chunk)
        else:
            first, rest = chunk.split(k)
            return [*head, first], [rest, *chunks[i + 1 :]]
    return head, []


class Daemon:
    """One streaming session (see module docstring). Use :meth:`start`, then :meth:`stop`."""

    def __init__(self, settings: DaemonSettings) -> None:
        settings.validate()
        self.settings = s = settings
        self.out = s.out
        self.device = resolve_device(s.device)
        self._sets_per_pass = 4 if self.device.type == "cuda" else 1  # passes per forward call
        self.model = self._load_model()
        self.refiner = StreamingRefiner(s, self.device)
        self._random = torch.Generator().manual_seed(0)  # poses before refinement starts, map-only sessions
        self.metrics = DaemonMetrics()
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint = self.out / CHECKPOINT_NAME
        if checkpoint.exists():
            self.state = SessionState.load(checkpoint, self.device)
            logger.info("resuming %s: %d particles in the map", checkpoint, self.state.n_particles)
        else:
            self.state = SessionState()
        if s.refine and self.state.counters.get("refinement_local"):
            self.refiner.phase = "local"  # a restart of a session past its ab initio: no second bootstrap
        self.taken = self.state.journal.copy()  # reader's view: accumulated + in flight
        self.geometry = self.state.geometry
        self.frame: SessionFrame | None = None
        if self.state.frame is not None and self.model is not None:
            self.frame = SessionFrame.from_state_dict(self.model, self.state.frame,
                                                      sets_per_pass=self._sets_per_pass)
        self.files: queue.Queue = queue.Queue(s.queue_size)
        self.chunks: queue.Queue = queue.Queue(s.queue_size)
        self.posed: queue.Queue = queue.Queue(s.queue_size)
        self._reading = threading.Event()
        self._reading.set()
        self._done = threading.Event()
        self._status_stop = threading.Event()
        self._rejected_lock = threading.Lock()
        self._rejected_recent = _recent_rejections(self.out / "rejected.tsv", RECENT_REJECTIONS)
        # (edits, monotonic time, histogram): view directions for status messages, made by the accumulator thread
        self._views: tuple[int, float, dict | None] = (-1, -math.inf, None)
        self._threads: list[threading.Thread] = []
        self._batch_counter = 0
        # (monotonic time, particles in map) after each insertion, seeded with the start: particles/s over
        # the last RATE_SECONDS, falling to 0 when nothing arrives
        self._rate_window: collections.deque[tuple[float, int]] = collections.deque(
            [(time.monotonic(), self.state.n_particles)])
        self._rate_lock = threading.Lock()
        self._started_at = time.time()
        self._last_map = (time.monotonic(), self.state.n_particles)
        self._edits = self._edits_at_map = 0  # particles inserted or re-posed: the map changed since it was published
        self._last_checkpoint = time.monotonic()
        self._errors: list[str] = []
        self._counts = collections.Counter()  # this run's totals, for status messages
        self._buffered = 0  # particles waiting in the poser for a full pass
        self.publisher: Publisher | None = None
        self.watcher: StackWatcher | None = None
        self._metrics_server = None
        self.metrics.particles_in_map.set(self.state.n_particles)
        if self.state.fsc_history:
            self.metrics.set_resolution_angstrom(self.state.fsc_history[-1][2])

    def _load_model(self):  # noqa: ANN202 - CryoFastAR | None
        """The network, or ``None`` for map-only sessions (also when the shipped weights cannot be loaded)."""
        s = self.settings
        if s.poses_from == "map-only":
            return None
        try:
            return load_model(s.weights, self.device)
        except WeightsError as exc:
            if s.weights is not None:
                raise ValueError(str(exc)) from None  # weights the user named must load
            logger.warning("%s: the network is unavailable, poses come from the map only (--poses-from map-only)",
                           exc)
            s.poses_from = "map-only"
            return None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind the publisher and metrics server, start the stages, then the watcher."""
        s = self.settings
        self.publisher = Publisher(s.zmq, republish_seconds=s.republish_seconds)
        try:
            if s.metrics_port is not None:
                self._metrics_server = serve_metrics(self.metrics, s.metrics_port, s.metrics_host)
        except OSError:
            self.publisher.close()
            raise
        for name, target in (("reader", self._reader), ("poser", self._poser), ("accumulator", self._accumulator),
                             ("status", self._status)):
            thread = threading.Thread(target=self._guard(target), name=f"cryofastar-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.state.n_particles and self.state.geometry is not None:
            self._publish_map()  # a restarted session shows its map at once
        self.watcher = StackWatcher(s.watch, self._on_file, poll_seconds=s.poll_seconds,
                                    settle_seconds=s.settle_seconds, ignore=[s.out])
        self.watcher.start()
        logger.info("watching %s (%s); outputs in %s; publishing on %s%s", s.watch,
                    f"polling every {s.poll_seconds} s" if s.poll_seconds else "inotify", s.out,
                    self.publisher.address,
                    f"; metrics on http://{s.metrics_host}:{self.metrics_port}/metrics" if self._metrics_server else "")

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (the chosen one if 0 was asked)."""
        return None if self._metrics_server is None else int(self._metrics_server.server_port)

    def stop(self, timeout: float = 600.0) -> None:
        """Stop watching, drain what is queued, write the map and the checkpoint."""
        self._reading.clear()  # the reader skips what is still queued (read again after a restart)
        if self.watcher is not None:
            self.watcher.stop()
        self.files.put(_STOP)
        self._done.wait(timeout)
        self._status_stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._publish_status()
        if self.publisher is not None:
            self.publisher.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        logger.info("stopped: %d particles in the map", self.state.n_particles)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queue is empty and nothing is in flight (tests, demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.files.unfinished_tasks == 0 and self.chunks.unfinished_tasks == 0 and self._buffered == 0
                    and self.posed.unfinished_tasks == 0 and self.watcher is not None and self.watcher.pending == 0
                    and self.watcher.queued == 0):
                return True
            time.sleep(0.05)
        return False

    @property
    def errors(self) -> list[str]:
        """Unexpected failures of pipeline threads (each also logged)."""
        return list(self._errors)

    # ------------------------------------------------------------------ stages
    def _guard(self, target):  # noqa: ANN001, ANN202 - thread wrapper
        def run() -> None:
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - a dying stage must be visible, and must not hang stop()
                logger.exception("pipeline thread failed")
                self._errors.append(f"{type(exc).__name__}: {exc}")
                self._done.set()
        return run

    def _on_file(self, path: Path) -> None:
        self.metrics.files_seen.inc()
        self.state.counters["files_seen"] = self.state.counters.get("files_seen", 0) + 1
        self.files.put(path)  # blocks when the reader is behind: back-pressure on the watcher

    def _reader(self) -> None:
        while True:
            item = self.files.get()
            try:
                if item is _STOP:
                    self.chunks.put(_STOP)
                    return
                if self._reading.is_set():
                    self._read(item)
            finally:
                self.files.task_done()

    def _read(self, path: Path) -> None:
        s = self.settings
        t0 = time.perf_counter()
        try:
            source, geometry = plan_particle_file(path, s.watch, self.geometry, self.taken, s.apix)
        except NotParticles as exc:
            logger.info("skipped: %s", exc)
            return
        except Rejected as exc:
            self._reject(path, str(exc))
            return
        self.geometry = geometry
        if len(source) == 0:
            return
        skipped: list[SkippedImages] = []
        try:
            for chunk in source.chunks(s.read_chunk):
                skipped.append(chunk.skipped)
                if len(chunk):
                    self.taken.add(chunk.stacks, chunk.indices)
                    self._count("particles_ingested", len(chunk))
                    self.chunks.put(chunk)
                if not self._reading.is_set():
                    break  # stopping: the rest is read again after a restart
        except ParticleFileError as exc:  # a stack became unreadable since the file was checked
            self._reject(path, str(exc))
        dropped = SkippedImages.concat(skipped)
        if len(dropped):
            self._count("particles_rejected", len(dropped))
            self._reject(path, f"{dropped.describe(path)}; the file's other images were taken", count_file=False)
        self.metrics.latency.labels("read").observe(time.perf_counter() - t0)

    def _poser(self) -> None:
        s = self.settings
        waiting: list[ParticleChunk] = []
        first_at: float | None = None
        stopping = False
        while True:
            # one forward call holds sets_per_pass passes of batch - 1 - anchors new particles each
            unit = (s.batch - 1 - s.anchors) * self._sets_per_pass
            wanted = unit if self.frame is not None else max(s.batch - 1, s.candidates)
            n = sum(len(c) for c in waiting)
            due = first_at is not None and time.monotonic() - first_at >= s.flush_seconds
            if waiting and (n >= wanted or due or stopping):
                # full calls only; the remainder waits for more particles (or the flush timeout)
                take = n if (due or stopping or self.frame is None) else (n // unit) * unit
                batch, waiting = _take(waiting, take)
                self._pose(batch)
                self._buffered = sum(len(c) for c in waiting)
                first_at = time.monotonic() if waiting else None
                continue
            if stopping:
                self.posed.put(_STOP)
                return
            timeout = None if first_at is None else max(0.01, s.flush_seconds - (time.monotonic() - first_at))
            try:
                item = self.chunks.get(timeout=timeout)
            except queue.Empty:
                continue
            self.chunks.task_done()
            if item is _STOP:
                stopping = True
                continue
            waiting.append(item)
            self._buffered += len(item)
            first_at = first_at or time.monotonic()

    def _pose(self, chunks: list[ParticleChunk]) -> None:
        s = self.settings
        assert self.geometry is not None
        images = torch.cat([c.images for c in chunks])
        t0 = time.perf_counter()
        if self.model is None:  # map-only: random poses, which refinement replaces
            n = len(images)
            batch = PoseBatch(random_rotations(n, self._random), torch.zeros(n, 2, dtype=torch.float64),
                              torch.zeros(n), torch.empty(0), torch.zeros(0, dtype=torch.bool))
            self._count("particles_posed", n)
            self.posed.put(_Posed(chunks, batch, self.geometry.apix, {}))
            return
        try:
            small = to_model_box(images, self.model.config.box)
            if self.frame is None:
                candidates = small[: s.candidates]
                best, _ = select_reference(self.model, candidates) if len(candidates) >= 2 else (0, None)
                self.frame = SessionFrame(self.model, candidates[best], views=s.batch, anchors=s.anchors,
                                          sets_per_pass=self._sets_per_pass)
                logger.info("session reference chosen among %d particles by confidence", len(candidates))
            batch = self.frame.pose(small)
        except Exception as exc:  # noqa: BLE001 - a failed pass loses its particles, never the session
            logger.exception("forward pass failed")
            for chunk in chunks:
                self._forget(chunk)
                self._reject(chunk.origin, f"{chunk.origin}: pose estimation failed ({exc})", count_file=False)
            self._count("particles_rejected", len(images))
            return
        self._batch_counter += 1
        self.metrics.batches.inc(max(1, math.ceil(len(images) / max(1, s.batch - 1 - s.anchors))))
        self._count("particles_posed", len(images))
        self.metrics.latency.labels("pose").observe(time.perf_counter() - t0)
        apix_model = model_pixel_size(self.geometry.box, self.geometry.apix, self.model.config.box)
        self.posed.put(_Posed(chunks, batch, apix_model, self.frame.state_dict()))

    def _accumulator(self) -> None:
        try:
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
                    self._accumulate(item)
                    self._maybe_publish_and_checkpoint()
                finally:
                    self.posed.task_done()
            self._update_views(force=True)
            if self.state.n_particles and (self._edits != self._edits_at_map or not self.state.fsc_history):
                self._publish_map()
            self._checkpoint()
        finally:
            self._done.set()

    def _accumulate(self, posed: _Posed) -> None:
        s, st = self.settings, self.state
        assert self.geometry is not None
        t0 = time.perf_counter()
        if st.accumulator is None:
            st.geometry = self.geometry
            st.accumulator = HalfSetAccumulator(self.geometry.box, self.geometry.apix,
                                                interpolation=s.interpolation, device=self.device)  # type: ignore[arg-type]
        pass_rotations = posed.batch.rotations
        pass_origins = posed.batch.origins_px * posed.apix_model
        refined = self._refine_pass(posed.chunks, pass_rotations, pass_origins)
        start = 0
        for chunk in posed.chunks:  # a few chunks (files) per pass, not particles
            n = len(chunk)
            rows = slice(start, start + n)
            rotations, origins = pass_rotations[rows], pass_origins[rows]
            confidence = posed.batch.confidence[rows]
            score = spread = None
            if refined is not None:
                rotations, origins = refined.rotations[rows], refined.origins_angstrom[rows]
                score, spread = refined.scores[rows], refined.spread_degrees[rows]
            start += n
            try:
                st.accumulator.add(chunk.images, rotations, origins, chunk.half_sets, chunk.ctf)
            except ValueError as exc:
                self._forget(chunk)
                self._reject(chunk.origin, f"{chunk.origin}: insertion failed ({exc})", count_file=False)
                self._count("particles_rejected", n)
                continue
            st.journal.add(chunk.stacks, chunk.indices)
            first_row = len(st.poses)
            st.poses.append(chunk.stacks, chunk.indices, rotations, origins, confidence, chunk.half_sets, chunk.ctf,
                            score, spread, 0 if refined is None else refined.version)
            if refined is not None and refined.soft is not None:
                self.refiner.record_soft(np.arange(first_row, first_row + n), refined.soft[rows])
            if chunk.optics and not st.optics:
                st.optics = dict(chunk.optics)
            self.metrics.particles_accumulated.inc(n)
            self._publish_poses(chunk, rotations, origins, confidence)
        if posed.frame_state:
            st.frame = posed.frame_state
        self._edits += len(pass_rotations)
        self.refiner.note_new_particles()
        if refined is not None:
            self._repose()
        if self._last_map[1] == 0 and not st.fsc_history:
            self._last_map = (time.monotonic(), 0)  # the map clock starts with the session's first particles
        self.metrics.particles_in_map.set(st.n_particles)
        self._rate_window.append((time.monotonic(), st.n_particles))
        self.metrics.latency.labels("accumulate").observe(time.perf_counter() - t0)

    def _refine_pass(self, chunks: list[ParticleChunk], rotations: torch.Tensor, origins: torch.Tensor):  # noqa: ANN202
        """The pass's poses refined against the running map (``None`` before refinement starts or on failure)."""
        if not self.refiner.active:
            return None
        if self.refiner.needs_bootstrap:
            self._bootstrap_ab_initio()
        t0 = time.perf_counter()
        images = torch.cat([c.images for c in chunks])
        halves = torch.cat([c.half_sets for c in chunks])
        ctf = None
        if all(c.ctf is not None for c in chunks):
            ctf = CtfParams.cat([c.ctf for c in chunks])
        try:
            refined = self.refiner.refine(images, halves, rotations, origins, ctf)
        except Exception:  # noqa: BLE001 - a failed refinement keeps the network's poses, never loses particles
            logger.exception("refinement failed; this pass keeps its unrefined poses")
            return None
        self._count("particles_refined", len(images))
        self.metrics.latency.labels("refine").observe(time.perf_counter() - t0)
        return refined

    def _bootstrap_ab_initio(self) -> None:
        """Start the streaming ab initio on the map's oldest particles and re-insert them at its poses."""
        st, table = self.state, self.state.poses
        rows = np.arange(min(self.refiner.seed_particles, len(table)))
        t0 = time.perf_counter()
        try:
            images = self._read_again(rows)
            ctf = table.ctf(rows)
            halves = torch.from_numpy(table.column("half_set")[rows].astype(np.int64))
            new = self.refiner.bootstrap(images, halves, ctf, st.geometry.apix, rows)
        except Exception:  # noqa: BLE001 - without ab initio the session goes on with global search
            logger.exception("ab initio could not start; new particles are searched globally instead")
            self.refiner.phase = "local"
            return
        self._replace_poses(rows, images, halves, ctf, new)
        self.metrics.latency.labels("ab_initio").observe(time.perf_counter() - t0)

    def _replace_poses(self, rows: np.ndarray, images: torch.Tensor, halves: torch.Tensor, ctf, new) -> None:  # noqa: ANN001
        """Move particles ``rows`` of the map from their recorded poses to ``new`` (remove, add, record)."""
        st, table = self.state, self.state.poses
        old_rotations = table.rotations(rows)
        old_origins = torch.from_numpy(table.column("origins")[rows])
        assert st.accumulator is not None
        # both calls validate the same shapes and values first, so the add cannot fail after the remove
        st.accumulator.remove(images, old_rotations, old_origins, halves, ctf)
        st.accumulator.add(images, new.rotations, new.origins_angstrom, halves, ctf)
        table.update(rows, new.rotations, new.origins_angstrom, new.scores, new.spread_degrees, new.version)
        self._edits += len(rows)
        self.refiner.note_moves(geodesic_degrees(new.rotations, old_rotations), st.n_particles)

    def _read_again(self, rows: np.ndarray) -> torch.Tensor:
        """`(len(rows), B, B)` float32 images of map particles ``rows``, read again (one read per stack).

        Raises ParticleFileError (naming the images) if a stack is gone or an image is no longer finite.
        """
        table, geometry = self.state.poses, self.state.geometry
        source = ParticleSource.from_locations(self.out, table.stack_paths(rows), table.column("index")[rows],
                                               geometry.box, geometry.apix,
                                               torch.from_numpy(table.column("half_set")[rows].astype(np.int64)))
        return source.images().all_images()

    def _idle_work_left(self) -> bool:
        """Whether re-posing while idle is worth doing (docs/refinement.md, "While idle")."""
        r = self.refiner
        if not r.active or r.converged or self.settings.repose_per_pass == 0 or not self._reading.is_set():
            return False
        return bool((self.state.poses.column("refined") < r.version).any())

    def _repose(self) -> None:
        """Re-pose up to ``repose_per_pass`` particles already in the map (docs/refinement.md)."""
        if self.refiner.needs_bootstrap:
            self._bootstrap_ab_initio()
            return
        table = self.state.poses
        rows = self.refiner.pick_stale(table.column("refined"), table.column("spread"))
        if len(rows) == 0:
            return
        t0 = time.perf_counter()
        rows = np.sort(rows)
        try:
            images = self._read_again(rows)
            ctf = table.ctf(rows)
        except (ParticleFileError, ValueError) as exc:
            logger.warning("cannot re-pose %d particles (%s); they keep their poses", len(rows), exc)
            table.column("refined")[rows] = UNREADABLE
            return
        halves = torch.from_numpy(table.column("half_set")[rows].astype(np.int64))
        origins = torch.from_numpy(table.column("origins")[rows])
        new = self.refiner.repose(images, halves, table.rotations(rows), origins, ctf, rows)
        self._replace_poses(rows, images, halves, ctf, new)
        self.refiner.maybe_finish_ab_initio(table.column("refined"))
        self._count("particles_reposed", len(rows))
        self.metrics.latency.labels("repose").observe(time.perf_counter() - t0)

    def _publish_poses(self, chunk: ParticleChunk, rotations: torch.Tensor, origins: torch.Tensor,
                       confidence: torch.Tensor) -> None:
        rot, tilt, psi = matrix_to_euler(rotations.double())
        table = torch.stack([rot, tilt, psi, origins[:, 0], origins[:, 1], confidence.double()], -1)
        names = [self._particle_id(stack, index) for stack, index in zip(chunk.stacks, chunk.indices, strict=True)]
        assert self.publisher is not None and len(POSE_COLUMNS) == table.shape[1]
        self.publisher.publish(PosesMessage(table.float().numpy(), names, self._batch_counter,
                                            chunk.half_sets.tolist()))

    def _particle_id(self, stack: str, index: int) -> str:
        try:
            name = Path(stack).relative_to(self.settings.watch.resolve()).as_posix()
        except ValueError:
            name = stack
        return f"{int(index):06d}@{name}"

    def _maybe_publish_and_checkpoint(self) -> None:
        s, st = self.settings, self.state
        self._update_views()
        now = time.monotonic()
        last_t, last_n = self._last_map
        first = not st.fsc_history  # the first map goes out with the first pass: something to look at at once
        changed = self._edits != self._edits_at_map
        if st.n_particles and changed and (first or now - last_t >= s.publish_seconds
                                           or st.n_particles - last_n >= s.publish_particles
                                           or self.refiner.wants_reference(st.n_particles)):
            self._publish_map()
        if now - self._last_checkpoint >= s.checkpoint_seconds and st.accumulator is not None:
            self._checkpoint()

    def _publish_map(self) -> None:
        st = self.state
        assert st.geometry is not None and st.accumulator is not None
        t0 = time.perf_counter()
        volume, curve, resolution, halves = st.write_maps(self.out)
        self.refiner.update_reference(halves, st.geometry.apix, resolution, st.n_particles)
        shells = shell_resolutions_angstrom(st.geometry.box, st.geometry.apix)
        assert self.publisher is not None
        self.publisher.publish(VolumeMessage(volume.float().cpu().numpy(), st.geometry.apix, st.n_particles,
                                             resolution if math.isfinite(resolution) else None,
                                             shells.float().numpy(), curve.float().cpu().numpy(),
                                             history=np.asarray(st.fsc_history[-HISTORY_ROWS:], dtype=np.float64)))
        self._last_map = (time.monotonic(), st.n_particles)
        self._edits_at_map = self._edits
        self.metrics.maps_published.inc()
        self.metrics.set_resolution_angstrom(resolution)
        self.metrics.latency.labels("map").observe(time.perf_counter() - t0)
        logger.info("map: %d particles, %.2f Å", st.n_particles, resolution)

    def _checkpoint(self) -> None:
        if self.state.accumulator is None:
            return
        t0 = time.perf_counter()
        self.state.counters["refinement_local"] = int(self.refiner.phase == "local")
        self.state.write_particles(self.out)
        self.state.save(self.out / CHECKPOINT_NAME)
        self._last_checkpoint = time.monotonic()
        self.metrics.latency.labels("checkpoint").observe(time.perf_counter() - t0)

    def _status(self) -> None:
        while not self._status_stop.wait(self.settings.status_seconds):
            self._publish_status()

    def status(self) -> dict[str, object]:
        """Counts, rates and queue depths (the ``status`` message's body)."""
        st = self.state
        rate = self._particles_per_second(time.monotonic())
        geometry = st.geometry or self.geometry
        queues = {"files": self.files.qsize(), "chunks": self.chunks.qsize(), "posed": self.posed.qsize()}
        for name, depth in queues.items():
            self.metrics.queue_depth.labels(name).set(depth)
        return {
            "particles_in_map": st.n_particles,
            "particles_ingested": self._counts["particles_ingested"],
            "particles_posed": self._counts["particles_posed"],
            "particles_rejected": self._counts["particles_rejected"],
            "particles_refined": self._counts["particles_refined"],
            "particles_reposed": self._counts["particles_reposed"],
            "refinement": self._refinement_status(),
            "particles_per_second": rate,
            "files_seen": st.counters.get("files_seen", 0),
            "files_rejected": st.counters.get("files_rejected", 0),
            "files_pending": 0 if self.watcher is None else self.watcher.pending,
            "queues": queues,
            "resolution_angstrom": st.fsc_history[-1][2] if st.fsc_history and math.isfinite(
                st.fsc_history[-1][2]) else None,
            "box": None if geometry is None else geometry.box,
            "apix": None if geometry is None else geometry.apix,
            "model_box": None if self.model is None else self.model.config.box,
            "poses_from": self.settings.poses_from,
            "model": None if self.model is None else (self.settings.weights or DEFAULT_WEIGHTS).name,
            "watch": str(self.settings.watch),
            "device": str(self.device),
            "rejected_recent": list(self._rejected_recent),
            "views": self._views[2],
            "uptime_seconds": time.time() - self._started_at,
        }

    def _particles_per_second(self, now: float) -> float:
        """Particles inserted per second over the last ``RATE_SECONDS`` (less if the session is younger)."""
        with self._rate_lock:
            window = self._rate_window
            while len(window) >= 2 and window[1][0] <= now - RATE_SECONDS:
                window.popleft()  # window[0] stays the last point at or before the horizon: the base count
            (t0, n0), n1 = window[0], window[-1][1]
        span = min(RATE_SECONDS, now - t0)
        return (n1 - n0) / span if span > 0 else 0.0

    def _update_views(self, force: bool = False) -> None:
        """Recompute the view-direction histogram of status messages (accumulator thread: it owns the pose table).

        At most once per ``status_seconds`` unless ``force``, and only when poses changed.
        """
        edits, (last_edits, last_time, _) = self._edits, self._views
        now = time.monotonic()
        if edits != last_edits and (force or now - last_time >= self.settings.status_seconds):
            angles = self.state.poses.column("angles")
            self._views = (edits, now, view_direction_histogram(angles[:, 0], angles[:, 1]).to_json())

    def _refinement_status(self) -> dict[str, object]:
        r = self.refiner
        return {"active": r.active, "phase": r.phase, "reference_version": r.version,
                "network_informative": r.network_informative,
                "working_box": None if r.reference is None else r.reference.work,
                "band_angstrom": None if r.reference is None else r.reference.apix_work / r.reference.local_band}

    def _publish_status(self) -> None:
        if self.publisher is not None and not self.publisher.closed:
            self.publisher.publish(StatusMessage(self.status()))

    def _count(self, name: str, n: int) -> None:
        self._counts[name] += n
        getattr(self.metrics, name).inc(n)

    # ------------------------------------------------------------------ bad input
    def _forget(self, chunk: ParticleChunk) -> None:
        self.taken.remove(chunk.stacks, chunk.indices)

    def _reject(self, path: Path, reason: str, count_file: bool = True) -> None:
        logger.warning("rejected: %s", reason)
        if count_file:
            self.metrics.files_rejected.inc()
            self.state.counters["files_rejected"] = self.state.counters.get("files_rejected", 0) + 1
        now, reason = time.time(), reason.replace(chr(9), " ").replace(chr(10), " ")
        line = f"{now:.3f}\t{path}\t{reason}\n"
        with self._rejected_lock:
            self._rejected_recent.append({"time": round(now, 3), "path": str(path), "reason": reason})
            target = self.out / "rejected.tsv"
            new = not target.exists()
            with open(target, "a", encoding="utf-8") as handle:
                if new:
                    handle.write("unix_time\tpath\treason\n")
                handle.write(line)


def _recent_rejections(path: Path, keep: int) -> collections.deque:
    """The last ``keep`` rows of a session's ``rejected.tsv`` as status entries (empty if none)."""
    recent: collections.deque = collections.deque(maxlen=keep)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
    except (OSError, UnicodeDecodeError):
        return recent
    for line in lines[-keep:]:
        fields = line.split("\t", 2)
        try:
            recent.append({"time": float(fields[0]), "path": fields[1], "reason": fields[2]})
        except (ValueError, IndexError):
            continue  # a torn last line after a crash: the rest still shows
    return recent
