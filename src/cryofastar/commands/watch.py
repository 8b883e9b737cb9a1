"""Watch a directory and keep a live 3D map of the particles a session writes there.

Example usage::

    cryofastar-stream --watch /data/session42 --out /data/session42/cryofastar
    cryofastar-stream watch /data/session42 --poll 5          # NFS/SMB/GPFS: poll instead of inotify
    cryofastar-stream subscribe tcp://127.0.0.1:5555 --save maps/

The daemon (:mod:`cryofastar.daemon.pipeline`) ingests every complete particle stack
(``.mrcs``/``.mrc``) and RELION particle STAR file under the directory, poses the
particles with the network in 128-view passes, inserts them into running half-set
Fourier volumes at the input's own box and pixel size, writes ``volume.mrc`` etc. in
``--out``, publishes maps, poses and status over ZeroMQ (docs/protocol.md) and serves
Prometheus metrics. SIGINT/SIGTERM drain the queues, write everything and exit 0;
restarting with the same ``--out`` resumes where it stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from cryofastar.daemon.pipeline import Daemon, DaemonSettings

from .dashboard import DashboardProcess, connectable

logger = logging.getLogger(__name__)

__all__ = ["main"]


def main(settings: DaemonSettings, idle_exit: float | None = None, echo=print,  # noqa: ANN001
         dashboard_port: int | None = None, dashboard_host: str = "127.0.0.1") -> Daemon:
    """Run the daemon until SIGINT/SIGTERM (or ``idle_exit`` seconds without new particles); return it stopped.

    With ``dashboard_port`` the live web dashboard runs beside it in a child process
    (:class:`~cryofastar.commands.dashboard.DashboardProcess`), stopped with it.
    """
    if idle_exit is not None and not idle_exit > 0:
        raise ValueError(f"--idle-exit must be positive, got {idle_exit}")
    if dashboard_port is not None and not 0 <= dashboard_port <= 65535:
        raise ValueError(f"--dashboard-port must be 0..65535, got {dashboard_port}")
    daemon = Daemon(settings)
    dashboard = None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        daemon.start()
        echo(f"watching {settings.watch} -> {settings.out}; ZeroMQ {daemon.address}"
             + (f"; metrics {daemon.metrics_url}" if daemon.metrics_url else ""))
        if dashboard_port is not None:
            dashboard = DashboardProcess(connectable(daemon.address), dashboard_port, dashboard_host)
            echo(f"dashboard {dashboard.url}")
        last_change, last_count = time.monotonic(), -1
        while not stop.wait(0.5):
            if daemon.errors:
                break
            count = daemon.status()["particles_ingested"]
            if count != last_count:
                last_change, last_count = time.monotonic(), count
            if idle_exit is not None and time.monotonic() - last_change >= idle_exit and daemon.wait_idle(0.1):
                logger.info("no new particles for %.0f s: stopping", idle_exit)
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        daemon.stop()
        if dashboard is not None:
            dashboard.stop()
    echo(f"stopped: {daemon.particles_in_map} particles in the map, resolution {daemon.resolution_angstrom:.2f} Å; "
         f"map {settings.out / 'volume.mrc'}")
    if daemon.errors:
        raise RuntimeError(f"the pipeline failed: {daemon.errors[0]}")
    return daemon
