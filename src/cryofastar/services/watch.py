"""Run the daemon as a service: until SIGINT/SIGTERM or idle, with the live dashboard beside it.

This is ``cryofastar-stream watch`` (``--watch DIR``) below its printing: the daemon
(:mod:`cryofastar.daemon.pipeline`) ingests every complete particle stack
(``.mrcs``/``.mrc``) and RELION particle STAR file under the directory, poses the
particles with the network in 128-view passes, inserts them into running half-set
Fourier volumes at the input's own box and pixel size, writes ``volume.mrc`` etc. in
``--out``, publishes maps, poses and status over ZeroMQ (docs/protocol.md) and serves
Prometheus metrics. SIGINT/SIGTERM drain the queues, write everything and exit;
restarting with the same ``--out`` resumes where it stopped.

Its settings are :class:`~cryofastar.daemon.settings.DaemonSettings` and
:class:`~cryofastar.daemon.settings.ServiceSettings` (what only the service adds: idle
exit and the dashboard).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from cryofastar.daemon.pipeline import Daemon
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.monitoring.dashboard_process import DashboardProcess, connectable
from cryofastar.recon.fsc import resolution_text
from cryofastar.services.settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = ["run_service"]


def run_service(settings: DaemonSettings, service: ServiceSettings | None = None,
                echo: Callable[[str], object] = print) -> Daemon:
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

    Returns
    -------
    Daemon
        The daemon, stopped.

    Raises
    ------
    RuntimeError
        A stage of the pipeline failed (after everything was written).
    """
    service = service if service is not None else ServiceSettings()
    daemon = Daemon(settings)
    dashboard = None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        daemon.start()
        echo(f"watching {settings.watch} -> {settings.out}; ZeroMQ {daemon.address}"
             + (f"; metrics {daemon.metrics_url}" if daemon.metrics_url else ""))
        if service.dashboard_port is not None:
            dashboard = DashboardProcess(connectable(daemon.address), service.dashboard_port,
                                         service.dashboard_host)
            echo(f"dashboard {dashboard.url}")
        _wait(daemon, stop, service.idle_exit)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        daemon.stop()
        if dashboard is not None:
            dashboard.stop()
    echo(f"stopped: {daemon.particles_in_map} particles in the map, resolution "
         f"{resolution_text(daemon.resolution_angstrom)}; "
         f"map {settings.out / 'volume.mrc'}")
    if daemon.errors:
        raise RuntimeError(f"the pipeline failed: {daemon.errors[0]}")
    return daemon


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

