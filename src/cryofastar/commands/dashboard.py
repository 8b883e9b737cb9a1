"""Serve the live dashboard of a running daemon: one web page that updates as maps arrive.

The page (monitoring/static/) shows the map's slices, projections and isosurface, the
half-map FSC and the resolution over time, throughput, queues, rejected files, the
angular distribution of views and the session's parameters, and warns when the daemon
goes silent. It is a ZeroMQ subscriber like any other (docs/protocol.md); everything it
loads is served locally, so it works with no internet. See docs/monitoring.md.

Example usage::

    cryofastar-stream dashboard --connect tcp://127.0.0.1:5555 --port 8080
    cryofastar-stream --watch /data/session42 --dashboard-port 8080    # daemon and dashboard together
    ssh -L 8080:127.0.0.1:8080 scope-pc                                 # then open http://127.0.0.1:8080/
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

logger = logging.getLogger(__name__)

__all__ = ["DashboardProcess", "connectable", "main"]

READY = "dashboard: "  # the line a started dashboard prints first, followed by its URL


def connectable(address: str) -> str:
    """A bound ZeroMQ address as a local subscriber reaches it (``tcp://*:5555`` -> ``tcp://127.0.0.1:5555``)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if address.startswith(wildcard):
            return "tcp://127.0.0.1:" + address[len(wildcard):]
    return address.replace("tcp://[::]:", "tcp://[::1]:")


def main(connect: str, host: str = "127.0.0.1", port: int = 8080, stale_seconds: float = 12.0,
         echo=print) -> None:  # noqa: ANN001
    """Serve the dashboard until SIGINT/SIGTERM.

    Raises
    ------
    ValueError
        ``connect`` is not a ZeroMQ address, or ``stale_seconds`` is not positive.
    OSError
        ``host:port`` cannot be bound (e.g. in use).
    """
    if "://" not in connect:
        raise ValueError(f"--connect {connect!r}: expected a ZeroMQ address such as tcp://127.0.0.1:5555")
    if not stale_seconds > 0:
        raise ValueError(f"--stale-after must be positive, got {stale_seconds}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {port}")
    from cryofastar.monitoring.dashboard_server import Dashboard, bind_socket  # aiohttp: only when serving

    sock = bind_socket(host, port)
    dashboard = Dashboard(connect, stale_seconds)

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
                 timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cryofastar", "dashboard", "--connect", connect, "--port", str(port),
             "--host", host, "--stale-after", str(stale_seconds)],
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
