"""``/metrics`` over HTTP from one thread, whatever the clients do.

prometheus_client's own server is a ``ThreadingHTTPServer``: one thread and one file
descriptor per connection, held for as long as the client likes (400 idle connections
were 421 threads in the daemon). This server is one thread running a selector loop:

- at most ``max_connections`` connections (default 64) are open at a time. A new one
  past the cap closes the oldest connection that has not finished sending its request
  (a scraper sends its request at once, so only idle or slow clients are ever closed);
  if every connection is being answered, the new one is closed;
- a request must arrive whole within ``request_seconds`` (5 s) of connecting and its
  answer must be taken within ``response_seconds`` (10 s), else the connection is
  closed (idle, slowloris and never-reading clients);
- a request head is at most :data:`MAX_HEAD` bytes (431 past it); ``GET`` or ``HEAD``
  of ``/metrics`` (or ``/``) over HTTP/1.0 or 1.1 only; anything else gets a 4xx
  with a one-line reason, then the connection is closed (``Connection: close``);
- the metrics are rendered at most once per ``min_render_seconds`` (0.1 s): requests
  that arrive meanwhile wait for the next rendering (never an older one), so a flood
  of scrapes costs the pipeline's threads at most ten renderings a second;
- the thread never dies of a client: an error on one connection closes that connection.

Out of file descriptors (EMFILE), it stops accepting for half a second instead of
spinning. It answers ``Accept: application/openmetrics-text`` and
``Accept-Encoding: gzip`` as prometheus_client does.
"""

from __future__ import annotations

import gzip
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MAX_HEAD", "MetricsServer"]

logger = logging.getLogger(__name__)

MAX_HEAD = 8192
"""Bytes a request head (request line and headers) may take."""
_ACCEPT_PAUSE = 0.5  # s without accepting after EMFILE/ENFILE
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            505: "HTTP Version Not Supported"}


@dataclass(eq=False)
class _Connection:
    """One client: its socket, what it sent, what it is sent, and by when."""

    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    answer: bytes = b""
    sent: int = 0
    state: str = "reading"  # reading -> waiting (for a rendering) -> writing -> closing (answer sent)
    head_only: bool = False
    accept: str = ""
    gzip: bool = False


class MetricsServer:
    """Serve ``render(accept) -> (body, content type)`` at ``/metrics`` on ``host:port`` from one thread.

    Parameters
    ----------
    render: Callable[[str], tuple[bytes, str]]
        The metrics for a request's ``Accept`` header: body and its content type.
    host, port: str, int
        Address to bind (port 0: any free port; :attr:`server_port` gives it).
    max_connections: int
        Connections open at a time.
    request_seconds, response_seconds: float
        Time a client has to send its request, and to take the answer.
    min_render_seconds: float
        Least time between two renderings.

    Raises
    ------
    OSError
        The address cannot be bound (e.g. in use).
    """

    def __init__(self, render: Callable[[str], tuple[bytes, str]], host: str, port: int, *,
                 max_connections: int = 64, request_seconds: float = 5.0, response_seconds: float = 10.0,
                 min_render_seconds: float = 0.1) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self._render = render
        self.max_connections = max_connections
        self.request_seconds, self.response_seconds = request_seconds, response_seconds
        self.min_render_seconds = min_render_seconds
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.server_address = self._listener.getsockname()[:2]
        self.server_port = int(self.server_address[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._connections: dict[socket.socket, _Connection] = {}  # oldest first
        self._accept_paused_until = 0.0
        self._last_render = -float("inf")
        self._stopping = threading.Event()
        self.served = 0  # answers given (any status), for tests and benchmarks
        self.closed_idle = 0  # connections closed for the cap or a deadline
        self._thread = threading.Thread(target=self._run, name="cryofastar-metrics", daemon=True)
        self._thread.start()

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return len(self._connections)

    def shutdown(self) -> None:
        """Stop the server's thread (returns once it has stopped)."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=10)

    def server_close(self) -> None:
        """Close the listening socket and every connection (after :meth:`shutdown`)."""
        for conn in list(self._connections.values()):
            self._close(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                events = self._selector.select(self._timeout(now))
            except OSError as exc:  # not expected; never a dead server thread
                logger.warning("metrics server: select failed (%s)", exc)
                time.sleep(0.1)
                continue
            for key, mask in events:
                try:
                    self._event(key, mask)
                except Exception as exc:  # noqa: BLE001 - one client's fault closes its connection only
                    if isinstance(key.data, _Connection):
                        logger.debug("metrics server: closed a connection (%s)", exc)
                        self._close(key.data)
                    else:
                        logger.warning("metrics server: %s", exc)
            now = time.monotonic()
            try:
                self._render_if_due(now)
            except Exception:  # noqa: BLE001 - a failed rendering is a 500 for those waiting, not a dead server
                logger.exception("metrics server: rendering the metrics failed")
                for conn in [c for c in self._connections.values() if c.state == "waiting"]:
                    self._answer(conn, 500, b"rendering the metrics failed (see the daemon's log)\n")
            self._expire(now)
            if self._accept_paused_until and now >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                self._selector.register(self._listener, selectors.EVENT_READ, "listener")

    def _timeout(self, now: float) -> float:
        timeout = 1.0
        if any(c.state == "waiting" for c in self._connections.values()):
            timeout = min(timeout, max(0.0, self._last_render + self.min_render_seconds - now))
        if self._connections:
            timeout = min(timeout, max(0.0, min(c.deadline for c in self._connections.values()) - now))
        if self._accept_paused_until:
            timeout = min(timeout, max(0.0, self._accept_paused_until - now))
        return timeout

    def _event(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "listener":
            self._accept()
        elif key.data == "wake":
            self._wake_r.recv(64)
        elif mask & selectors.EVENT_READ:
            self._read(key.data)
        elif mask & selectors.EVENT_WRITE:
            self._write(key.data)

    # ------------------------------------------------------------------ connections
    def _accept(self) -> None:
        for _ in range(64):  # a burst at a time; the loop comes back for more
            try:
                sock, _address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait instead of spinning on a readable listener
                logger.warning("metrics server: cannot accept (%s); pausing %.1f s", exc.strerror or exc,
                               _ACCEPT_PAUSE)
                self._selector.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                return
            if len(self._connections) >= self.max_connections and not self._evict_one():
                sock.close()  # every slot is being answered: this one waits for none
                self.closed_idle += 1
                continue
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + self.request_seconds)
            self._connections[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict_one(self) -> bool:
        """Close the oldest connection still sending its request (or done); False if there is none."""
        for conn in self._connections.values():
            if conn.state in ("reading", "closing"):
                self._close(conn)
                self.closed_idle += 1
                return True
        return False

    def _close(self, conn: _Connection) -> None:
        if self._connections.pop(conn.sock, None) is None:
            return
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._connections.values() if c.deadline <= now]:
            if conn.state == "reading" and conn.received:  # sent part of a request: tell it why
                self._answer(conn, 408, b"the request did not arrive in time\n")
                conn.deadline = now + 1.0  # one second more to take that line, then closed
            else:
                self._close(conn)
                self.closed_idle += 1

    # ------------------------------------------------------------------ requests
    def _read(self, conn: _Connection) -> None:
        if conn.state != "reading":  # data after a complete request: read and ignored until the client closes
            if not conn.sock.recv(65536):
                self._close(conn)
            return
        data = conn.sock.recv(4096)
        if not data:
            self._close(conn)
            return
        conn.received += data
        self._parse(conn)

    def _parse(self, conn: _Connection) -> None:
        buf = bytes(conn.received)
        line_end = buf.find(b"\n")
        if line_end < 0:
            if len(buf) > MAX_HEAD:
                self._answer(conn, 431, f"the request line is longer than {MAX_HEAD} bytes\n".encode())
            return
        parts = buf[:line_end].rstrip(b"\r").split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._answer(conn, 400, b"expected 'GET /metrics HTTP/1.1' (HTTP/0.9 and malformed request lines "
                                    b"are not served)\n")
            return
        method, target, version = parts
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            self._answer(conn, 505, b"HTTP/1.0 or HTTP/1.1 only\n")
            return
        head_end = buf.find(b"\r\n\r\n")
        head_end = head_end if head_end >= 0 else buf.find(b"\n\n")
        if head_end < 0:
            if len(buf) > MAX_HEAD:
                self._answer(conn, 431, f"the request head is longer than {MAX_HEAD} bytes\n".encode())
            return
        if head_end > MAX_HEAD:
            self._answer(conn, 431, f"the request head is longer than {MAX_HEAD} bytes\n".encode())
            return
        headers = {}
        for raw in buf[line_end + 1:max(line_end + 1, head_end)].split(b"\n"):
            if not raw.rstrip(b"\r"):
                continue
            name, colon, value = raw.rstrip(b"\r").partition(b":")
            if not colon or not name or name != name.strip():
                self._answer(conn, 400, b"a malformed header line\n")
                return
            headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            self._answer(conn, 405, b"only GET and HEAD\n", extra=b"Allow: GET, HEAD\r\n")
            return
        if target.split(b"?")[0] not in (b"/metrics", b"/"):
            self._answer(conn, 404, b"the metrics are at /metrics\n")
            return
        conn.head_only = method == b"HEAD"
        conn.accept = headers.get("accept", "")
        conn.gzip = "gzip" in headers.get("accept-encoding", "")
        conn.state = "waiting"
        conn.deadline = time.monotonic() + self.response_seconds
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)  # still read: notice a client that leaves

    def _render_if_due(self, now: float) -> None:
        waiting = [c for c in self._connections.values() if c.state == "waiting"]
        if not waiting or now < self._last_render + self.min_render_seconds:
            return
        self._last_render = now
        rendered: dict[tuple[str, bool], tuple[bytes, str]] = {}
        for conn in waiting:
            key = (conn.accept, conn.gzip)
            if key not in rendered:
                body, content_type = self._render(conn.accept)
                rendered[key] = (gzip.compress(body, 6) if conn.gzip else body, content_type)
            body, content_type = rendered[key]
            extra = f"Content-Type: {content_type}\r\n".encode() + (b"Content-Encoding: gzip\r\n" if conn.gzip else b"")
            self._answer(conn, 200, body, extra=extra)

    def _answer(self, conn: _Connection, status: int, body: bytes, extra: bytes = b"") -> None:
        if status != 200:
            extra = b"Content-Type: text/plain; charset=utf-8\r\n" + extra
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Length: {len(body)}\r\n".encode() + extra
                + b"Connection: close\r\n\r\n")
        conn.answer = head if conn.head_only else head + body
        conn.sent = 0
        conn.state = "writing"
        conn.deadline = time.monotonic() + self.response_seconds
        self.served += 1
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        try:
            conn.sent += conn.sock.send(conn.answer[conn.sent:])
        except BlockingIOError:
            return
        except OSError:  # reset or gone: its connection only
            self._close(conn)
            return
        if conn.sent >= len(conn.answer):  # a lingering close: an RST now could discard the answer
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn)
                return
            conn.state = "closing"
            conn.deadline = time.monotonic() + 1.0
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
