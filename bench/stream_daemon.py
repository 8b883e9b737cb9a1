"""One daemon run of bench/bench_stream.py: the daemon end to end on simulated stacks, and its figures.

A :class:`~cryofastar.daemon.pipeline.Daemon` watches ``<root>/watch``; a subscriber notes the
first published map; the stacks are renamed into the watched directory (all at once or at a
rate); ``daemon.particles_in_map`` is polled until every particle is in the map (or the run
stalls); then the daemon stops and :func:`run_daemon` returns the figures bench_stream.py
prints and writes (its docstring says what each one means).
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryofastar.daemon.pipeline import Daemon, DaemonSettings
from cryofastar.monitoring.subscriber import Subscriber
from cryofastar.protocol import ProtocolError, VolumeMessage

STAGES = ("read", "pose", "accumulate", "map", "checkpoint")
POLL_SECONDS = 0.05
SETTLE_SECONDS = 0.2
FLUSH_SECONDS = 1.0
PUBLISH_SECONDS = 10.0


def stage_latencies(daemon: Daemon) -> dict[str, tuple[float, float]]:
    """``{stage: (count, total seconds)}`` from the daemon's latency histogram (0 for a stage not yet run)."""
    observed = daemon.metrics.stage_seconds()
    return {stage: tuple(map(float, observed.get(stage, (0, 0.0)))) for stage in STAGES}


def counter(daemon: Daemon, name: str) -> float:
    return daemon.metrics.total(name)


class VolumeWatch:
    """A subscriber thread noting when the first map arrives (and how many distinct maps came)."""

    def __init__(self, address: str) -> None:
        self.subscriber = Subscriber(address, topics=("volume",))
        self.first_at: float | None = None
        self.first_particles: int | None = None
        self.maps: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-subscriber", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.subscriber.receive(0.05)
            except ProtocolError:
                continue
            if isinstance(message, VolumeMessage):
                if self.first_at is None:
                    self.first_at = time.monotonic()
                    self.first_particles = message.particles
                self.maps.add((message.session, message.seq))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.subscriber.close()


def place(stacks: list[Path], watch: Path, per_stack: list[int], rate: float | None, log: dict) -> None:
    """Rename the stacks into the watched directory, all at once or at ``rate`` particles/s."""
    start = time.monotonic()
    log["first_placed"] = start
    done = 0
    for stack, count in zip(stacks, per_stack, strict=True):
        if rate is not None:
            time.sleep(max(0.0, start + done / rate - time.monotonic()))
        os.rename(stack, watch / stack.name)
        done += count
    log["all_placed"] = time.monotonic()


class DashboardLoad:
    """The live dashboard beside the daemon: ``server`` (its own process, as ``--dashboard-port`` runs it)
    or ``browser`` (plus a headless Debian chromium page showing it, on the same machine)."""

    def __init__(self, mode: str, address: str) -> None:
        from cryofastar.monitoring.dashboard_process import DashboardProcess, connectable

        self.mode, self.page, self._pw, self._browser = mode, None, None, None
        self.server = DashboardProcess(connectable(address), 0)
        if mode == "browser":
            from cryofastar.monitoring.headless_browser import launch_chromium
            from playwright.sync_api import sync_playwright

            self._pw = sync_playwright().start()
            self._browser = launch_chromium(self._pw)
            self.page = self._browser.new_page(viewport={"width": 1400, "height": 1400})
            self.page.goto(self.server.url)

    def close(self) -> dict[str, object]:
        """Stop everything; what the page showed last (particles in its map), if a page was open."""
        shown = None
        if self.page is not None:
            time.sleep(1.0)  # the final map's message
            text = (self.page.text_content("#map-note") or "").split()
            shown = int(text[0]) if text and text[0].isdigit() else 0
            self._browser.close()
            self._pw.stop()
        self.server.stop()
        return {"mode": self.mode, "page_map_particles": shown}



def daemon_settings(root: Path, args: argparse.Namespace, publish_particles: int) -> DaemonSettings:
    """The daemon's settings for a run in ``root``: ``root/watch`` watched, outputs in ``root/out``.

    Parameters
    ----------
    root : Path
        The run's directory.
    args : argparse.Namespace
        bench_stream.py's arguments (device, batch, interpolation, refine, classify, poses_from).
    publish_particles : int
        A map every this many particles.

    Returns
    -------
    DaemonSettings
        Metrics off, ZeroMQ on a free local port, the benchmark's settle, flush and publish periods.
    """
    watch, out = root / "watch", root / "out"
    return DaemonSettings(
        watch=watch, out=out, zmq="tcp://127.0.0.1:0", metrics_port=None, device=args.device, batch=args.batch,
        settle_seconds=SETTLE_SECONDS, flush_seconds=FLUSH_SECONDS, publish_seconds=PUBLISH_SECONDS,
        publish_particles=publish_particles, interpolation=args.interpolation, refine=args.refine,
        classify=getattr(args, "classify", True), poses_from=getattr(args, "poses_from", "network"),
    )


def start_daemon(settings: DaemonSettings, dashboard: str) -> tuple[Daemon, float, DashboardLoad | None, VolumeWatch]:
    """Start the daemon, the dashboard load (unless ``none``) and a subscriber to its maps.

    Parameters
    ----------
    settings : DaemonSettings
        The run's settings.
    dashboard : str
        ``none``, ``server`` or ``browser`` (:class:`DashboardLoad`).

    Returns
    -------
    tuple
        The running daemon, its start-up time (s), the dashboard load or None, the map watch.
    """
    t0 = time.monotonic()
    daemon = Daemon(settings)
    daemon.start()
    startup = time.monotonic() - t0
    assert daemon.address is not None
    load = None if dashboard == "none" else DashboardLoad(dashboard, daemon.address)
    volumes = VolumeWatch(daemon.address)
    time.sleep(0.5)  # let the SUB connection and subscription reach the publisher (ZeroMQ slow joiner)
    return daemon, startup, load, volumes


def start_placing(stacks: list[Path], watch: Path, counts: list[int],
                  rate: float | None) -> tuple[threading.Thread, dict[str, float]]:
    """Start :func:`place` in a thread and wait until it has noted the first placement.

    Parameters
    ----------
    stacks : list of Path
        The stacks in the staging directory, in order.
    watch : Path
        The watched directory.
    counts : list of int
        Particles per stack.
    rate : float or None
        Particles/s, or None for all at once.

    Returns
    -------
    tuple
        The placing thread and its log (``first_placed``, later ``all_placed``: monotonic times).
    """
    placed: dict[str, float] = {}
    placer = threading.Thread(target=place, args=(stacks, watch, counts, rate, placed), daemon=True)
    placer.start()
    while "first_placed" not in placed:
        time.sleep(0.001)
    return placer, placed


@dataclass
class Progress:
    """What polling the daemon saw: (monotonic time, particles) at the first and last change of the map and at
    the first posed pass, the timeline, and why polling ended."""

    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    first_posed: tuple[float, int] | None = None
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (s since first placed, posed, in map)
    phases: list[tuple[float, str, str | None]] = field(default_factory=list)  # (s, refinement phase, background)
    reason: str = "all particles in the map"

    def longest_pause(self) -> tuple[float, float]:
        """The longest time (s) between two increases of the map's particle count while particles were still
        to come (the first accumulation to the last), and when (s since the first stack was placed) it began."""
        rises = [t for (t, _, n), (_, _, m) in zip(self.timeline[1:], self.timeline, strict=False) if n > m]
        gaps = [(b - a, a) for a, b in zip(rises, rises[1:], strict=False)]
        return max(gaps, default=(0.0, 0.0))


def follow(daemon: Daemon, placed: dict[str, float], expected: int, out: Path, stall: float) -> Progress:
    """Poll the daemon every ``POLL_SECONDS`` until all particles are in the map, an error, idleness or a stall.

    Parameters
    ----------
    daemon : Daemon
        The running daemon.
    placed : dict
        :func:`place`'s log (``first_placed`` set; ``all_placed`` once every stack is placed).
    expected : int
        Particles in the session.
    out : Path
        The daemon's output directory (named when it idles short of ``expected``).
    stall : float
        Give up after this many seconds without progress.

    Returns
    -------
    Progress
        The times and counts seen, and why polling stopped.
    """
    t_place = placed["first_placed"]
    progress = Progress()
    n_prev = posed_prev = 0
    while True:
        now = time.monotonic()
        n_now = daemon.particles_in_map
        status = daemon.status()
        posed_now = int(status["particles_posed"])
        if posed_now != posed_prev and progress.first_posed is None:
            progress.first_posed = (now, posed_now)
        if n_now != n_prev:
            if progress.first is None:
                progress.first = (now, n_now)
            progress.last = (now, n_now)
        if n_now != n_prev or posed_now != posed_prev:
            progress.timeline.append((round(now - t_place, 3), posed_now, n_now))
            n_prev, posed_prev = n_now, posed_now
        refinement = status["refinement"]
        phase = (refinement["phase"], refinement.get("background"))
        if not progress.phases or progress.phases[-1][1:] != phase:
            progress.phases.append((round(now - t_place, 3), *phase))
        if n_now >= expected:
            break
        if daemon.errors:
            progress.reason = f"daemon error: {daemon.errors[0]}"
            break
        quiet = now - (progress.last[0] if progress.last else t_place)
        if "all_placed" in placed and quiet > 3.0 and daemon.wait_idle(0.01):
            progress.reason = f"daemon idle with {n_now} of {expected} particles (see {out / 'rejected.tsv'})"
            break
        if quiet > stall:
            progress.reason = f"no progress for {stall:.0f} s at {n_now} of {expected} particles"
            break
        time.sleep(POLL_SECONDS)
    return progress


@dataclass
class Stopped:
    """The daemon's figures just before ``Daemon.stop()`` (the window) and after it."""

    status: dict[str, object]
    in_window: dict[str, tuple[float, float]]
    total: dict[str, tuple[float, float]]
    batches: float
    maps_in_window: float
    t_stop: float
    stop_seconds: float
    shown: dict[str, object]


def stop_run(daemon: Daemon, placer: threading.Thread, volumes: VolumeWatch, load: DashboardLoad | None) -> Stopped:
    """Note the window's figures, stop the daemon (timed), then the map watch and the dashboard load.

    Parameters
    ----------
    daemon : Daemon
        The running daemon.
    placer : threading.Thread
        The placing thread (joined first).
    volumes : VolumeWatch
        The map watch.
    load : DashboardLoad or None
        The dashboard load, if any.

    Returns
    -------
    Stopped
        Status, stage latencies and counters before the stop, the stop's time, latencies after it, and what
        the dashboard showed.
    """
    placer.join()
    status = daemon.status()
    in_window = stage_latencies(daemon)
    batches = counter(daemon, "batches")
    maps_in_window = counter(daemon, "maps_published")
    t_stop = time.monotonic()
    daemon.stop()
    stop_seconds = time.monotonic() - t_stop
    total = stage_latencies(daemon)
    time.sleep(0.2)  # the final map's message
    volumes.close()
    shown = {"mode": "none"} if load is None else load.close()
    return Stopped(status, in_window, total, batches, maps_in_window, t_stop, stop_seconds, shown)


def run_figures(daemon: Daemon, settings: DaemonSettings, expected: int, startup: float, placed: dict[str, float],
                progress: Progress, volumes: VolumeWatch, stopped: Stopped) -> dict[str, object]:
    """The run's figures, from what the steps of :func:`run_daemon` noted.

    Parameters
    ----------
    daemon : Daemon
        The stopped daemon.
    settings : DaemonSettings
        Its settings (written out with the figures).
    expected : int
        Particles in the session.
    startup : float
        Seconds ``Daemon.start()`` took.
    placed : dict
        :func:`place`'s log.
    progress : Progress
        What polling saw.
    volumes : VolumeWatch
        The closed map watch.
    stopped : Stopped
        The figures around the stop.

    Returns
    -------
    dict
        The figures, keys in the order bench_stream.py writes them.
    """
    first, last, first_posed = progress.first, progress.last, progress.first_posed
    assert first is not None and last is not None and first_posed is not None, "no particle was ever accumulated"
    t_place, status, in_window, total = placed["first_placed"], stopped.status, stopped.in_window, stopped.total
    window = last[0] - first[0]
    n_window = last[1] - first[1]
    steady_window = last[0] - first_posed[0]
    n_steady = last[1] - first_posed[1]
    result: dict[str, object] = {
        "finished": progress.reason,
        "particles_expected": expected,
        "particles_in_map": daemon.particles_in_map,
        "particles_rejected": status["particles_rejected"],
        "files_rejected": status["files_rejected"],
        "startup_seconds": startup,
        "placing_seconds": placed["all_placed"] - t_place,
        "first_particle_seconds": first[0] - t_place,
        "first_particle_count": first[1],
        "first_map_seconds": None if volumes.first_at is None else volumes.first_at - t_place,
        "first_map_particles": volumes.first_particles,
        "first_map_at_stop": volumes.first_at is not None and volumes.first_at >= stopped.t_stop,
        "window_seconds": window,
        "window_particles": n_window,
        "sustained_rate": n_window / window if window > 0 else math.nan,
        "first_posed_seconds": first_posed[0] - t_place,
        "first_posed_count": first_posed[1],
        "steady_window_seconds": steady_window,
        "steady_particles": n_steady,
        "steady_rate": n_steady / steady_window if steady_window > 0 else math.nan,
        "run_seconds": last[0] - t_place,
        "end_to_end_rate": last[1] / (last[0] - t_place),
        "max_posed_not_in_map": max((p - m for _, p, m in progress.timeline), default=0),
        "longest_pause_seconds": progress.longest_pause()[0],
        "longest_pause_began_seconds": progress.longest_pause()[1],
        "refinement_phases": progress.phases,
        "daemon_reported_rate": status["particles_per_second"],
        "stop_seconds": stopped.stop_seconds,
        "forward_passes_in_window": stopped.batches,
        "maps_in_window": stopped.maps_in_window,
        "maps_received": len(volumes.maps),
        "stages_in_window": {k: {"count": c, "seconds": s} for k, (c, s) in in_window.items()},
        "stages_at_stop": {k: {"count": total[k][0] - c, "seconds": total[k][1] - s}
                           for k, (c, s) in in_window.items()},
        "timeline_posed_in_map": progress.timeline,
        "dashboard": stopped.shown,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }
    return result


def run_daemon(root: Path, stacks: list[Path], counts: list[int], args: argparse.Namespace,
               publish_particles: int, dashboard: str = "none") -> dict[str, object]:
    """One daemon run on the stacks: start it, place the stacks, follow it until all are in the map, stop it.

    Parameters
    ----------
    root : Path
        The run's directory (``root/watch`` is watched, outputs go to ``root/out``).
    stacks : list of Path
        The stacks in the staging directory, in order.
    counts : list of int
        Particles per stack.
    args : argparse.Namespace
        bench_stream.py's arguments.
    publish_particles : int
        A map every this many particles.
    dashboard : str
        ``none``, ``server`` or ``browser``: what runs beside the daemon.

    Returns
    -------
    dict
        The run's figures (:func:`run_figures`).
    """
    settings = daemon_settings(root, args, publish_particles)
    expected = sum(counts)
    daemon, startup, load, volumes = start_daemon(settings, dashboard)
    placer, placed = start_placing(stacks, root / "watch", counts, args.rate)
    progress = follow(daemon, placed, expected, root / "out", args.stall)
    polish = polish_until_converged(daemon, getattr(args, "polish", 0.0), placed["first_placed"], progress)
    stopped = stop_run(daemon, placer, volumes, load)
    return {**run_figures(daemon, settings, expected, startup, placed, progress, volumes, stopped), **polish}


def polish_until_converged(daemon: Daemon, seconds: float, t_place: float, progress: Progress) -> dict[str, object]:
    """After the last particle is in the map, leave the daemon running until its refinement has caught up
    (``refinement_converged``: no step in the background and a whole re-posing sweep moved the median particle
    by under 1°) or ``seconds`` have passed; the phases seen are added to ``progress``. ``seconds`` 0: not at all.
    """
    if seconds <= 0:
        return {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not daemon.errors:
        refinement = daemon.status()["refinement"]
        phase = (refinement["phase"], refinement.get("background"))
        if progress.phases[-1][1:] != phase:
            progress.phases.append((round(time.monotonic() - t_place, 3), *phase))
        if daemon.refinement_converged and refinement.get("background") is None:
            break
        time.sleep(0.5)
    status = daemon.status()
    return {"polish_seconds": time.monotonic() - t0, "polish_converged": daemon.refinement_converged,
            "polish_phase": status["refinement"]["phase"], "particles_refined": status["particles_refined"],
            "particles_reposed": status["particles_reposed"]}
