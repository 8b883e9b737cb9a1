"""The body of the daemon's status messages: counts, the particle rate, view directions.

:class:`StatusBoard` holds what the pipeline threads count during a run and assembles
the ``status`` message (docs/protocol.md) from it and from what the caller passes in
(the session state, queue depths, the refiner's status). Its pieces:

- :class:`RateWindow`: particles inserted per second over the last :data:`RATE_SECONDS`,
  falling to 0 when nothing arrives;
- :class:`ViewDirections`: the view-direction histogram of the map's particles,
  recomputed by the thread that owns the pose table at most once per status period.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from pathlib import Path

from cryofastar.engine.pose_table import PoseTable
from cryofastar.engine.streaming_refiner import StreamingRefiner
from cryofastar.recon.pose_precision import PosePrecision
from cryofastar.recon.view_directions import view_direction_histogram

from .metrics import DaemonMetrics
from .rejections import RejectionLog
from .state import SessionState

__all__ = ["COUNTS", "RATE_SECONDS", "RateWindow", "StatusBoard", "ViewDirections", "poses_now", "refinement_status"]

RATE_SECONDS = 30.0  # particles_per_second in status messages: over this many seconds
COUNTS = ("particles_ingested", "particles_posed", "particles_rejected", "particles_refined", "particles_reposed")
"""This run's totals in status messages (each also a ``cryofastar_<name>_total`` counter)."""


class RateWindow:
    """Particles inserted per second over the last ``seconds`` (thread-safe).

    Parameters
    ----------
    particles: int
        Particles in the map at the start (the base count).
    now: float | None
        ``time.monotonic()`` of the start (default: now).
    seconds: float
        Length of the window.
    """

    def __init__(self, particles: int, now: float | None = None, seconds: float = RATE_SECONDS) -> None:
        self.seconds = seconds
        # (monotonic time, particles in map) after each insertion, seeded with the start
        self._points: collections.deque[tuple[float, int]] = collections.deque(
            [(time.monotonic() if now is None else now, particles)])
        self._lock = threading.Lock()

    @property
    def started(self) -> float:
        """The monotonic time of the oldest point still held (the start until the window slides)."""
        with self._lock:
            return self._points[0][0]

    @property
    def particles(self) -> int:
        """Particles in the map when last recorded: a settled count, never one read while particles are being
        re-posed (their removal and re-insertion would show as a passing dip)."""
        with self._lock:
            return self._points[-1][1]

    def add(self, now: float, particles: int) -> None:
        """Record that the map held ``particles`` at monotonic time ``now`` (times must not decrease).

        Points older than the window are dropped here too, so the window holds the last
        ``seconds`` of points whether or not :meth:`per_second` is ever called.
        """
        with self._lock:
            self._points.append((now, particles))
            self._prune(now)

    def _prune(self, now: float) -> None:
        window = self._points
        while len(window) >= 2 and window[1][0] <= now - self.seconds:
            window.popleft()  # window[0] stays the last point at or before the horizon: the base count

    def per_second(self, now: float) -> float:
        """Particles per second over the last ``seconds`` before ``now`` (less if the session is younger)."""
        with self._lock:
            self._prune(now)
            window = self._points
            (t0, n0), n1 = window[0], window[-1][1]
        span = min(self.seconds, now - t0)
        return (n1 - n0) / span if span > 0 else 0.0


class ViewDirections:
    """The view-direction histogram of status messages, recomputed only when poses changed.

    Parameters
    ----------
    period_seconds: float
        Recompute at most this often (the status period) unless forced.
    """

    def __init__(self, period_seconds: float) -> None:
        self.period_seconds = period_seconds
        # (edits, monotonic time, histogram), replaced whole: the status thread reads it without a lock
        self._latest: tuple[int, float, dict | None] = (-1, -math.inf, None)

    @property
    def histogram(self) -> dict | None:
        """The latest histogram (:meth:`ViewDirectionHistogram.to_json`), ``None`` before the first."""
        return self._latest[2]

    def update(self, edits: int, poses: PoseTable, now: float | None = None, force: bool = False) -> bool:
        """Recompute from ``poses`` if ``edits`` changed since the last time and the period has passed.

        Parameters
        ----------
        edits: int
            How many times the poses were changed so far (the caller's running count).
        poses: PoseTable
            The map's poses; call from the thread that owns it.
        now: float | None
            ``time.monotonic()`` (default: now).
        force: bool
            Ignore the period (the last update before stopping).

        Returns
        -------
        bool
            Whether the histogram was recomputed.
        """
        last_edits, last_time, _ = self._latest
        now = time.monotonic() if now is None else now
        if edits == last_edits or not (force or now - last_time >= self.period_seconds):
            return False
        angles = poses.column("angles")[poses.in_map()]  # the map's particles (not those taken out as junk)
        self._latest = (edits, now, view_direction_histogram(angles[:, 0], angles[:, 1]).to_json())
        return True


def poses_now(pose_source: str, phase: str) -> str:
    """Where the poses of the map's particles come from in refinement ``phase`` (``poses_from`` of status messages).

    ``network``: the network's poses as they are (refinement off, waiting for
    ``--refine-after`` particles, or probing the network); ``random``: a map-only session
    before refinement starts, or a classes session before its 2D classes have settled (random
    poses, replaced once it does); ``map-only ab initio``:
    the streaming ab initio's global search against the map (``--poses-from map-only``, or a
    network found uninformative); ``refined``: refined locally against the session's own
    half maps, after either.

    Parameters
    ----------
    pose_source: str
        The session's effective source of first poses, ``network``, ``map-only`` or ``classes``
        (:attr:`Daemon.poses_from <cryofastar.daemon.pipeline.Daemon.poses_from>`).
    phase: str
        :attr:`StreamingRefiner.phase <cryofastar.engine.streaming_refiner.StreamingRefiner.phase>`:
        ``off``, ``waiting``, ``probe``, ``classes``, ``ab-initio`` or ``local``.
    """
    if phase == "ab-initio":
        return "map-only ab initio"
    if phase == "local":
        return "refined"
    return "random" if pose_source in ("map-only", "classes") else "network"


def refinement_status(refiner: StreamingRefiner, precision: PosePrecision | None = None,
                      background: str | None = None) -> dict[str, object]:
    """The ``refinement`` field of status messages: the refiner's phase, map version, band, ab initio's verdict,
    what the class poses found (``classes`` sessions), the refined poses' estimated ``precision``
    (:mod:`~cryofastar.recon.pose_precision`) and the step running ``background`` (``ab_initio``,
    ``class_probe``) beside the stream, if any."""
    r = refiner
    return {"active": r.active, "phase": r.phase, "background": background, "reference_version": r.version,
            "network_informative": r.network_informative,
            "working_box": None if r.reference is None else r.reference.work,
            "band_angstrom": None if r.reference is None else r.reference.apix_work / r.reference.local_band,
            "ab_initio": None if r.ab_verdict is None else {**r.ab_verdict.as_dict(),
                                                            "summary": r.ab_verdict.summary()},
            "class_poses": r.class_poses,
            "pose_precision": None if precision is None else {**precision.as_dict(), "summary": precision.summary()}}


class StatusBoard:
    """This run's counts, rate and view directions, and the status message built from them.

    Parameters
    ----------
    metrics: DaemonMetrics
        Counters :meth:`count` increments alongside its own totals.
    rejections: RejectionLog
        Source of ``rejected_recent``.
    watch: Path
        The watched directory.
    device: str
        The torch device the session runs on.
    poses_from: str
        The session's effective source of first poses (``network`` or ``map-only``), sent as
        ``pose_source``; ``poses_from`` in the message says where the map's poses come from in
        the current refinement phase (:func:`poses_now`).
    model: str | None
        File name of the network weights (``None``: no network).
    model_box: int | None
        The network's box (``None``: no network).
    particles_in_map: int
        Particles already in the map at the start (a resumed session).
    status_seconds: float
        The status period (view directions are recomputed at most this often).
    """

    def __init__(self, metrics: DaemonMetrics, rejections: RejectionLog, *, watch: Path, device: str,
                 poses_from: str, model: str | None, model_box: int | None, particles_in_map: int,
                 status_seconds: float) -> None:
        self.metrics = metrics
        self.rejections = rejections
        self.rate = RateWindow(particles_in_map)
        self.views = ViewDirections(status_seconds)
        self._counts: collections.Counter = collections.Counter()
        self._fixed = {"watch": str(watch), "device": device, "poses_from": poses_from, "model": model,
                       "model_box": model_box}
        self._started_at = time.monotonic()  # uptime must not jump with the wall clock

    def count(self, name: str, n: int) -> None:
        """Add ``n`` to this run's ``name`` total and to its ``cryofastar_<name>_total`` counter."""
        if name not in COUNTS:
            raise ValueError(f"unknown count {name!r}; one of {COUNTS}")
        self._counts[name] += n
        getattr(self.metrics, name).inc(n)

    def total(self, name: str) -> int:
        """This run's ``name`` total (0 before the first)."""
        return int(self._counts[name])

    def report(self, state: SessionState, queues: dict[str, int], files_pending: int,
               refinement: dict[str, object], geometry=None, now: float | None = None,  # noqa: ANN001
               classification: dict[str, object] | None = None) -> dict[str, object]:
        """The ``status`` message's body (docs/protocol.md, keys in their documented order).

        Parameters
        ----------
        state: SessionState
            The session (particles in the map, file counters, FSC history, geometry).
        queues: dict[str, int]
            Depth of each pipeline queue.
        files_pending: int
            Files the watcher is waiting on to settle.
        refinement: dict
            :func:`refinement_status` of the session's refiner.
        geometry: SessionGeometry | None
            The reader's geometry, used while the state has none yet.
        now: float | None
            ``time.monotonic()`` for the rate (default: now).
        classification: dict | None
            :meth:`ClassificationLane.status <cryofastar.daemon.classification_lane.ClassificationLane.status>`
            of the 2D lane (``None``: the lane is off, sent as ``{"state": "off"}``).
        """
        st, f = state, self._fixed
        rate = self.rate.per_second(time.monotonic() if now is None else now)
        geometry = st.geometry or geometry
        last = st.fsc_history[-1][2] if st.fsc_history else math.nan
        return {
            "particles_in_map": self.rate.particles,
            "particles_ingested": self._counts["particles_ingested"],
            "particles_posed": self._counts["particles_posed"],
            "particles_rejected": self._counts["particles_rejected"],
            "particles_refined": self._counts["particles_refined"],
            "particles_reposed": self._counts["particles_reposed"],
            "refinement": refinement,
            "particles_per_second": rate,
            "files_seen": st.counters.get("files_seen", 0),
            "files_rejected": st.counters.get("files_rejected", 0),
            "files_pending": files_pending,
            "queues": dict(queues),
            "resolution_angstrom": last if math.isfinite(last) else None,
            "box": None if geometry is None else geometry.box,
            "apix": None if geometry is None else geometry.apix,
            "model_box": f["model_box"],
            "poses_from": poses_now(f["poses_from"], str(refinement.get("phase", "off"))),
            "pose_source": f["poses_from"],
            "model": f["model"],
            "watch": f["watch"],
            "device": f["device"],
            "rejected_recent": self.rejections.recent(),
            "views": self.views.histogram,
            "classification": {"state": "off"} if classification is None else classification,
            "uptime_seconds": time.monotonic() - self._started_at,
        }
