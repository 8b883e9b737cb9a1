"""The dashboard's connections, bounded: a cap, idle deadlines, and an accept loop that never spins.

aiohttp keeps every accepted connection for as long as the client likes and accepts as
many as arrive, so 2,000 idle connections took the dashboard to its file-descriptor
limit (1,024) and the page no longer loaded. :class:`ConnectionLimit` accepts the
connections itself and hands each to aiohttp (``loop.connect_accepted_socket``):

- at most ``max_connections`` (default 256) are open. One past the cap closes the
  oldest *idle* connection (no request being answered, not a WebSocket page), so a
  flood of idle connections never locks out a new one; if none is idle, the new one
  gets ``503`` and is closed;
- a connection with no request in progress is closed after ``idle_seconds`` (15 s)
  since it opened or its last answer: this is also the deadline for a request's head,
  however slowly it trickles in (slowloris);
- an answer still being written after ``request_seconds`` (120 s; the largest, plotly.js,
  is 4.6 MB) is cut (a client that never reads);
- WebSocket pages are not touched here: their own heartbeat and outbox close them.

Out of file descriptors (EMFILE), accepting pauses for half a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["ConnectionLimit"]

logger = logging.getLogger(__name__)

_BUSY_BODY = b"503 Service Unavailable: every connection of the dashboard is being answered; retry soon.\n"
_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 5\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass(eq=False)
class _Connection:
    transport: asyncio.Transport
    opened: float
    last_done: float
    busy_since: float | None = None
    page: bool = False


class ConnectionLimit:
    """Accept connections on ``sock`` for ``factory`` (an aiohttp server), bounded as the module says.

    Parameters
    ----------
    factory: Callable[[], asyncio.Protocol]
        The protocol factory (``AppRunner.server``).
    max_connections: int
        Connections open at a time.
    idle_seconds, request_seconds: float
        Deadlines of an idle connection and of one answer.
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], max_connections: int = 256,
                 idle_seconds: float = 15.0, request_seconds: float = 120.0) -> None:
        self.factory = factory
        self.max_connections = max_connections
        self.idle_seconds, self.request_seconds = idle_seconds, request_seconds
        self._open: dict[Any, _Connection] = {}  # protocol -> its connection, oldest first
        self.refused = 0  # answered 503: every slot busy
        self.closed = 0  # closed for the cap or a deadline

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        self._prune()
        return len(self._open)

    # ------------------------------------------------------------------ aiohttp hooks
    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Marks the connection busy while its request is answered."""
        conn = self._open.get(request.protocol)
        if conn is None:
            return await handler(request)
        loop = asyncio.get_running_loop()
        conn.busy_since = loop.time()
        try:
            return await handler(request)
        finally:
            conn.busy_since = None
            conn.last_done = loop.time()

    def mark_page(self, request: web.Request) -> None:
        """The request's connection is now a WebSocket page (never closed as idle here)."""
        conn = self._open.get(request.protocol)
        if conn is not None:
            conn.page = True

    # ------------------------------------------------------------------ serving
    async def serve(self, sock: socket.socket) -> None:
        """Accept on the listening ``sock`` (non-blocking) until cancelled, and enforce the deadlines."""
        loop = asyncio.get_running_loop()
        sweeper = asyncio.create_task(self._sweep())
        try:
            while True:
                try:
                    client, _ = await loop.sock_accept(sock)
                except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: wait rather than spin
                    logger.warning("dashboard: cannot accept (%s); pausing 0.5 s", exc.strerror or exc)
                    await asyncio.sleep(0.5)
                    continue
                self._prune()
                if len(self._open) >= self.max_connections and not self._close_oldest_idle():
                    self.refused += 1
                    with contextlib.suppress(OSError):
                        client.setblocking(False)
                        client.send(_BUSY_REPLY)
                    client.close()
                    continue
                try:
                    transport, protocol = await loop.connect_accepted_socket(self.factory, client)
                except OSError:
                    client.close()
                    continue
                now = loop.time()
                self._open[protocol] = _Connection(transport, now, now)
        finally:
            sweeper.cancel()

    def _prune(self) -> None:
        for protocol in [p for p, c in self._open.items() if c.transport.is_closing()]:
            del self._open[protocol]

    def _close_oldest_idle(self) -> bool:
        for conn in self._open.values():
            if conn.busy_since is None and not conn.page:
                conn.transport.abort()
                self.closed += 1
                self._prune()
                return True
        return False

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            for conn in list(self._open.values()):
                if conn.page:
                    continue
                if ((conn.busy_since is None and now - conn.last_done > self.idle_seconds)
                        or (conn.busy_since is not None and now - conn.busy_since > self.request_seconds)):
                    conn.transport.abort()
                    self.closed += 1
            self._prune()
