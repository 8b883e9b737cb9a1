"""Run the live dashboard of a running daemon: in this process, or in a child process.

The page (monitoring/static/, :mod:`~cryofastar.monitoring.dashboard_server`) shows the
map's slices, projections and isosurface, the half-map FSC and the resolution over time,
throughput, queues, rejected files, the angular distribution of views and the session's
parameters, and warns when the daemon goes silent. It is a ZeroMQ subscriber like any
other (docs/protocol.md); everything it loads is served locally, so it works with no
internet. See docs/monitoring.md.

:func:`serve_dashboard` serves it until SIGINT/SIGTERM (``cryofastar-stream dashboard``);
:class:`DashboardProcess` runs that command in a child process (``watch
--dashboard-port`` and ``demo``), so drawing the page never takes CPU time from the
daemon's threads.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryofastar.options import option

logger = logging.getLogger(__name__)

__all__ = ["READY", "DashboardProcess", "DashboardSettings", "connectable", "serve_dashboard"]

READY = "dashboard: "  # the line a started dashboard prints first, followed by its URL


@dataclass
class DashboardSettings:
    """Where the dashboard listens and which daemon it follows.

    Attributes
    ----------
    connect: str
        ZeroMQ endpoint of the daemon.
    port: int
        HTTP port of the page (0: any free port).
    host: str
        Address the page is served on.
    stale_seconds: float
        Silence (s) after which the page warns.
    allow_hosts: tuple[str, ...]
        Host names the page answers to besides ``localhost``, IP addresses, ``host`` and
        (served beyond loopback) the machine's name; ``*``: any (docs/monitoring.md).
    allow_origins: tuple[str, ...]
        Origins of other pages whose WebSockets are accepted (e.g. a proxy's); ``*``: any.

    Raises
    ------
    ValueError
        ``connect`` is not a ZeroMQ address, ``stale_seconds`` is not positive,
        ``port`` is out of range, or an allowed host or origin is malformed.
    """

    connect: str = option("tcp://127.0.0.1:5555", help="ZeroMQ endpoint of a running daemon (its --zmq).")
    port: int = option(8080, help="HTTP port of the page (0: any free port).")
    host: str = option("127.0.0.1", help="Address the page is served on; 0.0.0.0 for every interface (no "
                       "authentication: use a trusted network or an SSH tunnel).")
    stale_seconds: float = option(12.0, flags=("--stale-after",),
                                  help="Warn on the page when the daemon has been silent this many seconds.")
    allow_hosts: tuple[str, ...] = option((), flags=("--allow-host",), cli_type=list[str], parse=tuple,
                                          metavar="NAME",
                                          help="Also answer to this host name (repeat for more; * for any). "
                                          "Requests naming another host get 421, against DNS rebinding.")
    allow_origins: tuple[str, ...] = option((), flags=("--allow-origin",), cli_type=list[str], parse=tuple,
                                            metavar="ORIGIN",
                                            help="Also accept the WebSocket of pages from this origin, e.g. "
                                            "https://proxy.example (repeat for more; * for any); others get 403.")

    def __post_init__(self) -> None:
        if "://" not in self.connect:
            raise ValueError(f"--connect {self.connect!r}: expected a ZeroMQ address such as tcp://127.0.0.1:5555")
        if not self.stale_seconds > 0:
            raise ValueError(f"--stale-after must be positive, got {self.stale_seconds}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        self.allow_hosts, self.allow_origins = tuple(self.allow_hosts), tuple(self.allow_origins)
        self.guard()  # a malformed name or origin: a ValueError now, not at the first request

    def guard(self):  # noqa: ANN201 - RequestGuard, imported late with the server
        """The :class:`~cryofastar.monitoring.request_guard.RequestGuard` of these settings."""
        from cryofastar.monitoring.request_guard import RequestGuard

        return RequestGuard(self.host, self.allow_hosts, self.allow_origins)


def connectable(address: str) -> str:
    """A bound ZeroMQ address as a local subscriber reaches it (``tcp://*:5555`` -> ``tcp://127.0.0.1:5555``)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if address.startswith(wildcard):
            return "tcp://127.0.0.1:" + address[len(wildcard):]
    return address.replace("tcp://[::]:", "tcp://[::1]:")


def serve_dashboard(settings: DashboardSettings, echo: Callable[[str], object] = print) -> None:
    """Serve the dashboard until SIGINT/SIGTERM; ``echo`` gets the :data:`READY` line with the URL.

    Parameters
    ----------
    settings: DashboardSettings
        Daemon endpoint, address and port, staleness warning.
    echo: Callable[[str], object]
        Prints a line.

    Raises
    ------
    ValueError
        The endpoint is not usable (ZeroMQ refuses it).
    OSError
        ``host:port`` cannot be bound (e.g. in use).
    """
    from cryofastar.monitoring.dashboard_server import Dashboard, bind_socket  # aiohttp: only when serving

    connect = settings.connect
    sock = bind_socket(settings.host, settings.port)
    dashboard = Dashboard(connect, settings.stale_seconds, settings.guard())

    def ready(url: str) -> None:
        echo(f"{READY}{url} (subscribed to {connect}; Ctrl-C stops)")
        sys.stdout.flush()

    async def run() -> None:
        task = asyncio.create_task(dashboard.serve(sock, ready))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(run())
    except Exception as exc:  # a bad endpoint surfaces from the subscriber task
        import zmq

        if isinstance(exc, zmq.ZMQError):
            raise ValueError(f"--connect {connect}: {exc}") from None
        raise
    finally:
        sock.close()


class DashboardProcess:
    """``cryofastar-stream dashboard`` in a child process (used by ``watch --dashboard-port`` and ``demo``).

    A separate process, so drawing the page never takes CPU time from the daemon's
    threads under the GIL. Construction waits until it listens and sets :attr:`url`.

    Raises
    ------
    OSError
        It could not start (e.g. the port is in use); the message is the child's.
    """

    def __init__(self, connect: str, port: int, host: str = "127.0.0.1", stale_seconds: float = 12.0,
                 timeout: float = 60.0, allow_hosts: tuple[str, ...] = (), allow_origins: tuple[str, ...] = ()
                 ) -> None:
        allowed = [*(a for name in allow_hosts for a in ("--allow-host", name)),
                   *(a for origin in allow_origins for a in ("--allow-origin", origin))]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cryofastar", "dashboard", "--connect", connect, "--port", str(port),
             "--host", host, "--stale-after", str(stale_seconds), *allowed],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str | None] = []
        self._pumps = [threading.Thread(target=self._pump, args=(self.process.stdout, self._lines.put), daemon=True),
                       threading.Thread(target=self._pump, args=(self.process.stderr, self._stderr.append),
                                        daemon=True)]
        for pump in self._pumps:
            pump.start()
        self.url = self._wait_ready(timeout)

    @staticmethod
    def _pump(stream, put) -> None:  # noqa: ANN001
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith(READY):
                return line[len(READY):].split()[0]
        self.stop()
        self._pumps[1].join(timeout=5)
        detail = next((line for line in reversed(self._stderr) if line), f"exit status {self.process.returncode}")
        raise OSError(f"the dashboard did not start: {str(detail).removeprefix('error: ')}")

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
