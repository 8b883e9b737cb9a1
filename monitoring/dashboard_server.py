"""The live dashboard's web server: a ZeroMQ subscriber that serves one page (aiohttp).

Routes:

- ``GET /``: the page (``static/index.html``); ``GET /static/NAME``: its script and
  style, and ``/static/plotly.min.js`` from the installed ``plotly`` package. Nothing
  is loaded from the internet. The assets are a fixed table made at start (the regular
  files of ``static/``, symlinks left out, and plotly.js): a URL is looked up in it and
  never joined to a file-system path, so no URL (``..``, encoded or not, absolute,
  backslashes, NUL) reaches any other file.
- ``GET /ws``: a WebSocket. On connect the server sends ``{"snapshot": {...}}`` (every
  section of :class:`~cryofastar.monitoring.dashboard_state.DashboardState`), then one
  JSON object of changed sections per received message, and ``{"connection": {...}}``
  every second (so the page sees a silent daemon go ``stale``).
- ``GET /api/state``: the snapshot as JSON (scripts, tests).

Who may ask (:mod:`.request_guard`): requests whose ``Host`` is not one of the
dashboard's names get 421 (DNS rebinding), WebSocket upgrades from another site's page
403. How many may ask (:mod:`.connection_limit`): at most 256 connections, idle ones
closed after 15 s, at most :data:`MAX_PAGES` WebSocket pages; a page sends nothing, so
a frame it sends over 64 KiB closes it.

The subscriber takes the ``volume``, ``status`` and ``classes`` topics only (``poses``
would cost the daemon bandwidth for nothing shown). ZeroMQ reconnects by itself, so the page goes
on when the daemon restarts; a message that cannot be decoded is counted and shown,
never fatal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

import plotly
import zmq
import zmq.asyncio
from aiohttp import WSMsgType, web
from cryofastar.protocol import ClassesMessage, ProtocolError, StatusMessage, VolumeMessage, decode

from .connection_limit import ConnectionLimit
from .dashboard_state import DashboardState
from .request_guard import RequestGuard

__all__ = ["MAX_PAGES", "STATIC", "Dashboard", "assets", "bind_socket"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
TOPICS = (b"volume", b"status", b"classes")
OUTBOX = 64  # messages waiting for one page before it is dropped as too slow
MAX_PAGES = 64  # WebSocket pages served at a time (each holds at most OUTBOX shared messages)
MAX_FRAME = 64 * 1024  # bytes of a message a page may send (it sends none)
SEND_SECONDS = 30.0  # a page that takes no message for this long is cut (a map is ~1 MB: 30 kB/s at least)


def assets(static: Path = STATIC) -> dict[str, Path]:
    """URL name -> file of every asset served under ``/static/``: the regular files of ``static``
    (symlinks and hidden files left out) and plotly.js."""
    table = {entry.name: Path(entry.path) for entry in os.scandir(static)
             if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")}
    table["plotly.min.js"] = PLOTLY_JS
    return table


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port).

    Raises
    ------
    OSError
        The address is in use or cannot be bound (the message names it).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve the dashboard on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Dashboard:
    """Subscriber + web server; run with :meth:`serve` inside an asyncio loop.

    Parameters
    ----------
    connect: str
        The daemon's ZeroMQ PUB address, e.g. ``tcp://127.0.0.1:5555``.
    stale_seconds: float
        Silence after which the page warns that the data are stale.
    """

    def __init__(self, connect: str, stale_seconds: float = 12.0, guard: RequestGuard | None = None,
                 static: Path = STATIC) -> None:
        if not PLOTLY_JS.is_file():
            raise FileNotFoundError(f"{PLOTLY_JS} is missing: reinstall the plotly package")
        self.state = DashboardState(connect, stale_seconds)
        self.connect = connect
        self.guard = guard if guard is not None else RequestGuard("127.0.0.1")
        self.assets = assets(static)
        if "index.html" not in self.assets:
            raise FileNotFoundError(f"{static / 'index.html'} is missing: reinstall cryofastar-stream")
        self.limit: ConnectionLimit | None = None  # set by serve()
        self._pages: dict[web.WebSocketResponse, tuple[asyncio.Queue[str], asyncio.Transport]] = {}
        self.app = web.Application(middlewares=[self._check_request])
        self.app.add_routes([web.get("/", self._index), web.get("/ws", self._websocket),
                             web.get("/api/state", self._api_state), web.get("/static/{name}", self._asset)])

    # ------------------------------------------------------------------ HTTP
    @web.middleware
    async def _check_request(self, request: web.Request, handler) -> web.StreamResponse:  # noqa: ANN001
        refusal = self.guard.check_host(request.headers.getall("Host", []))
        if refusal is None and request.path == "/ws":
            refusal = self.guard.check_origin(request.headers.get("Origin"), request.headers["Host"])
            if refusal is None and (request.version < (1, 1) or request.headers.get("Sec-WebSocket-Version") != "13"):
                refusal = 400, "400 Bad Request: a WebSocket needs HTTP/1.1 and Sec-WebSocket-Version: 13 (RFC 6455).\n"
        if refusal is not None:
            status, text = refusal
            response = web.Response(status=status, text=text)
            response.force_close()  # a refused client gets no second request on this connection
            return response
        if self.limit is None:
            return await handler(request)
        return await self.limit.middleware(request, handler)

    async def _index(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.assets["index.html"], headers={"Cache-Control": "no-cache"})

    async def _asset(self, request: web.Request) -> web.FileResponse:
        path = self.assets.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound(text="404 Not Found: not an asset of the dashboard.\n")
        cache = "max-age=86400" if path == PLOTLY_JS else "no-cache"
        return web.FileResponse(path, headers={"Cache-Control": cache})

    async def _api_state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.state.snapshot(), dumps=_dumps)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if len(self._pages) >= MAX_PAGES:
            return web.Response(status=503, text=f"503 Service Unavailable: {MAX_PAGES} pages are open already.\n")
        page = web.WebSocketResponse(heartbeat=20, compress=False, max_msg_size=MAX_FRAME)
        await page.prepare(request)
        if self.limit is not None:
            self.limit.mark_page(request)
        outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        outbox.put_nowait(_dumps({"snapshot": self.state.snapshot()}))  # first, before any update
        self._pages[page] = (outbox, request.transport)
        sender = asyncio.create_task(self._send(page, outbox, request.transport))
        try:
            async for message in page:  # the page sends nothing; this waits for it to close
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self._pages.pop(page, None)
            sender.cancel()
        return page

    @staticmethod
    async def _send(page: web.WebSocketResponse, outbox: asyncio.Queue, transport: asyncio.Transport) -> None:
        """One sender per page, in order: a slow page never holds up the subscriber or other pages.

        A page that takes no message for :data:`SEND_SECONDS` is cut (``abort``: a graceful close would wait
        for it to read what is queued, which a client that never reads never does)."""
        try:
            while True:
                text = await outbox.get()
                await asyncio.wait_for(page.send_str(text), SEND_SECONDS)
        except TimeoutError:
            logger.warning("a page took nothing for %.0f s; cutting it (it reconnects)", SEND_SECONDS)
            transport.abort()
        except (ConnectionError, RuntimeError):
            transport.abort()

    def _broadcast(self, sections: dict[str, Any]) -> None:
        if not self._pages or not sections:
            return
        text = _dumps(sections)
        for page, (outbox, transport) in list(self._pages.items()):
            try:
                outbox.put_nowait(text)
            except asyncio.QueueFull:  # a page that cannot keep up: cut; it reconnects to a fresh snapshot
                self._pages.pop(page, None)
                logger.warning("a page fell %d messages behind; cutting it (it reconnects)", OUTBOX)
                transport.abort()

    # ------------------------------------------------------------------ ZeroMQ
    async def _subscribe(self) -> None:
        context = zmq.asyncio.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        for topic in TOPICS:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(self.connect)
        try:
            while True:
                frames = await sub.recv_multipart()
                try:
                    message = decode(frames)
                except ProtocolError as exc:
                    logger.warning("skipped a malformed message: %s", exc)
                    self._broadcast(self.state.note_malformed(str(exc)))
                    continue
                if isinstance(message, (VolumeMessage, ClassesMessage)):  # views and tiles take ms: off the loop
                    self._broadcast(await asyncio.to_thread(self.state.apply, message))
                elif isinstance(message, StatusMessage):
                    self._broadcast(self.state.apply(message))
        finally:
            sub.close()
            context.term()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._broadcast({"connection": self.state.connection()})

    # ------------------------------------------------------------------ run
    async def serve(self, sock: socket.socket, ready=None) -> None:  # noqa: ANN001 - callable(url) or None
        """Serve on a bound socket until cancelled; call ``ready(url)`` once listening."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, keepalive_timeout=15.0)
        await runner.setup()
        self.limit = ConnectionLimit(runner.server)
        accepting = asyncio.create_task(self.limit.serve(sock))
        host, port = sock.getsockname()[:2]
        if ready is not None:
            ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}/")
        tasks = [asyncio.create_task(self._subscribe()), asyncio.create_task(self._tick()), accepting]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a crashed subscriber is an error, not a silent page
        finally:
            for task in tasks:
                task.cancel()
            for page, (_, transport) in list(self._pages.items()):
                try:
                    await asyncio.wait_for(page.close(), 2.0)
                except TimeoutError:  # a page that does not read: its close frame never goes out
                    transport.abort()
            await runner.cleanup()


def _dumps(value: Any) -> str:
    """Strict JSON (browsers refuse NaN); a stray non-finite number becomes null."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(_finite_only(value), allow_nan=False, separators=(",", ":"))


def _finite_only(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
