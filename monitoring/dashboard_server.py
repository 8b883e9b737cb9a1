"""The live dashboard's web server: a ZeroMQ subscriber that serves one page (aiohttp).

Routes:

- ``GET /``: the page (``static/index.html``); ``GET /static/...``: its script and
  style, and ``/static/plotly.min.js`` from the installed ``plotly`` package. Nothing
  is loaded from the internet.
- ``GET /ws``: a WebSocket. On connect the server sends ``{"snapshot": {...}}`` (every
  section of :class:`~cryofastar.monitoring.dashboard_state.DashboardState`), then one
  JSON object of changed sections per received message, and ``{"connection": {...}}``
  every second (so the page sees a silent daemon go ``stale``).
- ``GET /api/state``: the snapshot as JSON (scripts, tests).

The subscriber takes the ``volume`` and ``status`` topics only (``poses`` would cost
the daemon bandwidth for nothing shown). ZeroMQ reconnects by itself, so the page goes
on when the daemon restarts; a message that cannot be decoded is counted and shown,
never fatal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from pathlib import Path
from typing import Any

import plotly
import zmq
import zmq.asyncio
from aiohttp import WSMsgType, web
from cryofastar.protocol import ProtocolError, StatusMessage, VolumeMessage, decode

from .dashboard_state import DashboardState

__all__ = ["STATIC", "Dashboard", "bind_socket"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
TOPICS = (b"volume", b"status")
OUTBOX = 64  # messages waiting for one page before it is dropped as too slow


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

    def __init__(self, connect: str, stale_seconds: float = 12.0) -> None:
        if not PLOTLY_JS.is_file():
            raise FileNotFoundError(f"{PLOTLY_JS} is missing: reinstall the plotly package")
        self.state = DashboardState(connect, stale_seconds)
        self.connect = connect
        self._pages: dict[web.WebSocketResponse, asyncio.Queue[str]] = {}
        self.app = web.Application()
        self.app.add_routes([web.get("/", self._index), web.get("/ws", self._websocket),
                             web.get("/api/state", self._api_state),
                             web.get("/static/plotly.min.js", self._plotly),
                             web.static("/static", STATIC)])

    # ------------------------------------------------------------------ HTTP
    async def _index(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _plotly(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(PLOTLY_JS, headers={"Cache-Control": "max-age=86400"})

    async def _api_state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.state.snapshot(), dumps=_dumps)

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        page = web.WebSocketResponse(heartbeat=20, compress=False)
        await page.prepare(request)
        outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        outbox.put_nowait(_dumps({"snapshot": self.state.snapshot()}))  # first, before any update
        self._pages[page] = outbox
        sender = asyncio.create_task(self._send(page, outbox))
        try:
            async for message in page:  # the page sends nothing; this waits for it to close
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self._pages.pop(page, None)
            sender.cancel()
        return page

    @staticmethod
    async def _send(page: web.WebSocketResponse, outbox: asyncio.Queue) -> None:
        """One sender per page, in order: a slow page never holds up the subscriber or other pages."""
        try:
            while True:
                await page.send_str(await outbox.get())
        except (ConnectionError, RuntimeError):
            await page.close()

    def _broadcast(self, sections: dict[str, Any]) -> None:
        if not self._pages or not sections:
            return
        text = _dumps(sections)
        for page, outbox in list(self._pages.items()):
            try:
                outbox.put_nowait(text)
            except asyncio.QueueFull:  # a page that cannot keep up: closed; it reconnects to a fresh snapshot
                self._pages.pop(page, None)
                logger.warning("a page fell %d messages behind; closing it (it reconnects)", OUTBOX)
                asyncio.get_running_loop().create_task(page.close())

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
                if isinstance(message, VolumeMessage):  # map views take a few ms: off the loop
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
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        host, port = sock.getsockname()[:2]
        if ready is not None:
            ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}/")
        tasks = [asyncio.create_task(self._subscribe()), asyncio.create_task(self._tick())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a crashed subscriber is an error, not a silent page
        finally:
            for task in tasks:
                task.cancel()
            for page in list(self._pages):
                await page.close()
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
