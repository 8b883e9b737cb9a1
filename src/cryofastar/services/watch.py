"""Run the daemon as a service: until SIGINT/SIGTERM or idle, with the live dashboard beside it.

This is ``cryofastar-stream watch`` (``--watch DIR``) below its printing: the daemon
(:mod:`cryofastar.daemon.pipeline`) ingests every complete particle stack
(``.mrcs``/``.mrc``) and RELION particle STAR file under the directory, poses the
particles with the network in 128-view passes, inserts them into running half-set
Fourier volumes at the input's own box and pixel size, writes ``volume.mrc`` etc. in
``--out``, publishes maps, poses and status over ZeroMQ (docs/protocol.md) and serves
Prometheus metrics. SIGINT/SIGTERM drain the queues (for at most
:data:`DRAIN_SECONDS`; a second signal stops after the pass in progress), write everything
and exit; restarting with the same ``--out`` resumes where it stopped. A signal during
startup stops the daemon as soon as its network is loaded, before it reads anything.

Its settings are :class:`~cryofastar.daemon.settings.DaemonSettings` and
:class:`~cryofastar.daemon.settings.ServiceSettings` (what only the service adds: idle
exit and the dashboard).

:func:`run_session` is what the command calls: :func:`run_service` in this process, or, with
``--nproc N`` (or under ``torchrun``), on N ranks (docs/scaling.md "Live: watch --nproc"):
rank 0 runs :func:`run_service` (the daemon, its outputs, the dashboard, the signals), the
others a :class:`~cryofastar.daemon.rank_worker.RankWorker`. A rank that fails or dies ends
the session: the launcher stops the others (SIGTERM; rank 0 then writes what is
consistent), and the command reports which rank failed.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from cryofastar import interrupts
from cryofastar.daemon.pipeline import Daemon
from cryofastar.daemon.preflight import check_settings, probe_port, raise_descriptor_limit
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.engine.distributed import Ranks, in_torchrun_environment, launch, worker_logging
from cryofastar.monitoring.dashboard_process import DashboardProcess, connectable
from cryofastar.recon.fsc import resolution_text
from cryofastar.services.settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = ["DRAIN_SECONDS", "run_service", "run_session"]

DRAIN_SECONDS = 10.0
"""After SIGINT/SIGTERM, queued particles are posed and inserted for at most this long; then the pass in
progress is finished and the rest is left for the next start (read again: nothing is lost)."""


def run_session(settings: DaemonSettings, service: ServiceSettings | None = None,
                echo: Callable[[str], object] = print) -> None:
    """``watch``: :func:`run_service` in this process, on ``settings.nproc`` local ranks, or on this rank of a
    ``torchrun`` group (module docstring).

    Raises
    ------
    OSError
        As :func:`run_service` (checked here, before any rank starts).
    RuntimeError
        A stage failed (:func:`run_service`), or a rank failed or died
        (:class:`~cryofastar.engine.distributed.RankFailed`, naming the rank).
    ValueError
        ``--nproc`` above 1 under ``torchrun``, or impossible settings.
    """
    if in_torchrun_environment():
        if settings.nproc != 1:
            raise ValueError(f"--nproc {settings.nproc} under torchrun: torchrun's --nproc-per-node starts the "
                             "ranks, leave --nproc at 1")
        _rank_main(settings, service, echo, None, False)
        return
    if settings.nproc == 1:
        run_service(settings, service, echo)
        return
    settings.validate()
    check_settings(settings)  # a port in use: said here, before N processes start
    if service is not None and service.dashboard_port is not None:
        probe_port(service.dashboard_host, service.dashboard_port, "--dashboard-port")
    with _signals_to_rank_zero():
        launch(settings.nproc, _rank_main, settings, service, echo, logging.getLogger().getEffectiveLevel(), True,
               signals="SIGHUP,SIGQUIT")


@contextlib.contextmanager
def _signals_to_rank_zero() -> Iterator[None]:
    """While the launcher runs the ranks: a session stops the way one process does, through rank 0.

    The ranks leave this process's group as they start (:func:`_rank_main`), so a Ctrl-C reaches this process
    alone; SIGINT and SIGTERM are passed on to the ranks once each (rank 0 stops the session, or hurries at the
    second; the others ignore them and wait for its ``stop``). The launcher's own handling (it would end every
    rank at once, then wait 30 s for their return values) is left to SIGHUP and SIGQUIT
    (:func:`~cryofastar.engine.distributed.launch`'s ``signals``).
    """
    def forward(signum: int, _frame: object) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)  # type: ignore[arg-type]

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _rank_main(settings: DaemonSettings, service: ServiceSettings | None, echo: Callable[[str], object],
               log_level: int | None, own_group: bool) -> None:
    """One rank of a live session: join the group; rank 0 runs the service, the others a RankWorker; leave.

    ``own_group``: leave the launching process's process group (a terminal's Ctrl-C then reaches the launcher
    alone, which passes it on once: :func:`_signals_to_rank_zero`).
    """
    from cryofastar.daemon.rank_worker import RankWorker

    if own_group:
        os.setpgid(0, 0)
    worker_logging(log_level)
    ranks = Ranks.join(settings.device)
    try:
        if ranks.root:
            run_service(settings, service, echo, ranks)
        else:
            RankWorker(settings, ranks).run()
    finally:
        ranks.leave()


def run_service(settings: DaemonSettings, service: ServiceSettings | None = None,
                echo: Callable[[str], object] = print, ranks: Ranks | None = None) -> Daemon:
    """Run the daemon until SIGINT/SIGTERM (or ``service.idle_exit`` seconds without new particles).

    With ``service.dashboard_port`` the live web dashboard runs beside it in a child
    process (:class:`~cryofastar.monitoring.dashboard_process.DashboardProcess`), stopped
    with it.

    Parameters
    ----------
    settings: DaemonSettings
        The daemon's settings.
    service: ServiceSettings | None
        Idle exit and dashboard (``None``: the defaults, neither).
    echo: Callable[[str], object]
        Prints a line (where it watches, the dashboard's URL, the final figures).
    ranks: Ranks | None
        Rank 0 of a session of several ranks (:func:`run_session`); ``None``: one process.

    Returns
    -------
    Daemon
        The daemon, stopped.

    Raises
    ------
    OSError
        A port is in use or too few files may be opened (before anything is loaded).
    RuntimeError
        A stage of the pipeline failed (after what is consistent was written; the message
        names the stage, the error and what was kept).
    """
    service = service if service is not None else ServiceSettings()
    if service.dashboard_port is not None:  # with the daemon's own ports, before anything slow
        probe_port(service.dashboard_host, service.dashboard_port, "--dashboard-port")
    raise_descriptor_limit()
    stop = threading.Event()
    daemon: Daemon | None = None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        if stopping and daemon is not None:
            logger.warning("%s again: stopping after the pass in progress", signal.Signals(signum).name)
            daemon.hurry()
        elif stop.is_set() and daemon is None:
            raise KeyboardInterrupt  # a second signal while the network is loading: leave at once, nothing written
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    if interrupts.received():  # one that arrived before, its exception swallowed: stop before starting
        stop.set()
    dashboard = None
    try:
        logger.info("loading the session (network, checkpoint); SIGINT/SIGTERM from now on stop it cleanly")
        daemon = Daemon(settings, ranks)
        if not stop.is_set():
            daemon.start()
            echo(f"watching {settings.watch} -> {settings.out}; ZeroMQ {daemon.address}"
                 + (f"; metrics {daemon.metrics_url}" if daemon.metrics_url else ""))
            if service.dashboard_port is not None:
                dashboard = DashboardProcess(connectable(daemon.address), service.dashboard_port,
                                             service.dashboard_host, allow_hosts=service.dashboard_allow_hosts,
                                             allow_origins=service.dashboard_allow_origins)
                echo(f"dashboard {dashboard.url}")
            _wait(daemon, stop, service.idle_exit)
    finally:
        stopping = True  # from here a signal hurries the stop instead of interrupting it
        try:
            if daemon is not None:
                daemon.stop(drain_seconds=DRAIN_SECONDS)
            if dashboard is not None:
                dashboard.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    echo(_summary(daemon))
    if daemon.errors:
        raise RuntimeError(f"{daemon.errors[0]}; {_kept(daemon)}")
    return daemon


def _summary(daemon: Daemon) -> str:
    """The last line: particles, resolution, and the map file only if one was really written."""
    line = (f"stopped: {daemon.particles_in_map} particles in the map, resolution "
            f"{resolution_text(daemon.resolution_angstrom)}; ")
    if daemon.map_path is not None:
        line += f"map {daemon.map_path}"
    elif daemon.particles_in_map == 0:
        line += "no particles yet: no map written"
    else:
        line += "no map written (see the log)"
    if daemon.particles_waiting:
        line += f"; {daemon.particles_waiting} particles read but not inserted are read again at the next start"
    return line


def _kept(daemon: Daemon) -> str:
    """What a failed daemon kept, for its error line."""
    if not daemon.map_consistent:
        return (f"the map in memory is not trusted, so {daemon.out / 'checkpoint.pt'} was left as last written; "
                "restart with the same --out to resume from it (particles after it are read again)")
    if daemon.particles_in_map == 0:
        return "no particle was in the map yet"
    return (f"the map, particles.star and checkpoint were written ({daemon.particles_in_map} particles); restart "
            "with the same --out to resume")


def _wait(daemon: Daemon, stop: threading.Event, idle_exit: float | None) -> None:
    """Until ``stop`` is set, a stage fails, or (with ``idle_exit``) no particle came for that long."""
    last_change, last_count = time.monotonic(), -1
    while not stop.wait(0.5):
        if daemon.errors:
            return
        count = daemon.status()["particles_ingested"]
        if count != last_count:
            last_change, last_count = time.monotonic(), count
        if idle_exit is not None and time.monotonic() - last_change >= idle_exit and daemon.wait_idle(0.1):
            logger.info("no new particles for %.0f s: stopping", idle_exit)
            return

