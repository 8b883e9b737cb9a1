"""Publish the stream (map, poses, status, 2D classes) on a ZeroMQ PUB socket, from a thread of its own.

ZeroMQ sockets are not thread-safe, so one thread owns the socket from bind to close;
the pipeline threads hand it messages with :meth:`Publisher.publish`, which encodes
them (:mod:`cryofastar.protocol`) and returns at once. The latest map and the latest
class set (:data:`KEPT_KINDS`) are re-sent every ``republish_seconds`` so a subscriber
that connects late gets them within one period.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
import uuid
from types import TracebackType

import zmq
from cryofastar.protocol import TOPICS, Message, encode

__all__ = ["DEFAULT_ADDRESS", "KEPT_KINDS", "AddressInUseError", "Publisher", "PublisherError", "bind", "probe_address"]

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

KEPT_KINDS = ("volume", "classes")
"""Kinds of message never dropped when the queue is full, whose latest is re-sent for late subscribers."""


class PublisherError(OSError):
    """The publisher could not bind its address (the text says which and why)."""


class AddressInUseError(PublisherError):
    """Another process (or publisher) already listens on the address."""


def bind(socket: zmq.Socket, address: str) -> str:
    """Bind ``socket`` to ``address`` (a port ``0`` means any free port); return the address bound.

    Raises
    ------
    AddressInUseError
        The address is already bound by someone else (the message names it).
    PublisherError
        The address is malformed or cannot be bound.
    """
    requested = address
    scheme, sep, rest = address.partition("://")
    if sep and scheme == "tcp" and rest.rsplit(":", 1)[-1] == "0":
        address = f"{scheme}://{rest.rsplit(':', 1)[0]}:*"
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EADDRINUSE:
            raise AddressInUseError(
                f"cannot publish on {requested}: address already in use "
                "(another cryofastar-stream daemon?); choose another address"
            ) from None
        raise PublisherError(f"cannot publish on {requested!r}: {exc.strerror}") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def probe_address(address: str) -> None:
    """Raise as :class:`Publisher` would if ``address`` cannot be bound now; bind nothing lasting.

    Only ``tcp://`` addresses with a fixed port are tried (binding an ``ipc://`` path would
    take it from whoever holds it); the others pass. A second daemon asked for a port in use
    thus fails in milliseconds, before it loads its network. (Someone may still take the
    port between this probe and the real bind; :class:`Publisher` then raises the same error.)

    Raises
    ------
    AddressInUseError
        The port is in use.
    PublisherError
        The address is malformed or cannot be bound.
    """
    scheme, sep, rest = address.partition("://")
    if not sep or scheme != "tcp" or rest.rsplit(":", 1)[-1] in ("0", "*"):
        return
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    try:
        socket.setsockopt(zmq.LINGER, 0)
        bind(socket, address)
    finally:
        socket.close(linger=0)
        context.term()


def _start_zero_copy_collector() -> None:
    """Start pyzmq's zero-copy garbage collector (its own context, thread and sockets) now.

    pyzmq starts it at the first send of a frame of ``zmq.COPY_THRESHOLD`` bytes or more
    without copying (a map). Its context needs new file descriptors; started later while
    the process is out of them (``ulimit -n``), libzmq aborts the whole process
    (``Too many open files (src/epoll.cpp:38)``). Made now, at bind time, it never has to be.
    """
    zmq.Frame(bytes(zmq.COPY_THRESHOLD), copy=False)  # freed at once: the collector is up, the frame gone


HANDSHAKE_MS = 5_000
"""A connection to the PUB socket must finish ZeroMQ's handshake within this (ms) or is dropped."""

MAX_INBOUND_BYTES = 4_096
"""Largest frame a subscriber may send (its subscriptions); a larger one disconnects it."""


@dataclasses.dataclass
class _Pending:
    kind: str
    frames: list[bytes]


class Publisher:
    """A ZeroMQ PUB socket in its own thread, with a bounded send queue and map re-publishing.

    Parameters
    ----------
    address: str
        ZeroMQ endpoint to bind, e.g. ``tcp://127.0.0.1:5555`` (local only) or
        ``tcp://*:5555`` (all interfaces). Port ``0`` or ``*`` binds a free port;
        :attr:`address` then gives the one chosen.
    session: str | None
        Session id put in every header; ``None`` makes a random 12-hex-digit one.
    republish_seconds: float | None
        Period (s) of re-sending the latest volume and the latest classes; ``None`` never re-sends.
    queue_size: int
        Messages that may wait for the socket thread. When full, the oldest pending
        ``status`` is dropped first, then the oldest ``poses``; a ``volume`` or ``classes``
        message is never dropped (it is queued even past the bound).
    sndhwm: int
        ZeroMQ send high-water mark (messages queued per subscriber). Past it PUB drops
        messages for that slow subscriber. Payloads of 64 KiB or more are sent without
        copying, so re-sent maps queued for a stalled subscriber share one buffer.

    Raises
    ------
    AddressInUseError
        The address is already bound by someone else.
    PublisherError
        The address is malformed or cannot be bound.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        session: str | None = None,
        republish_seconds: float | None = 5.0,
        queue_size: int = 64,
        sndhwm: int = 100,
    ) -> None:
        if republish_seconds is not None and not republish_seconds > 0:
            raise ValueError(f"republish_seconds must be > 0 (or None), got {republish_seconds}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if sndhwm < 1:
            raise ValueError(f"sndhwm must be >= 1, got {sndhwm}")
        self.session = session if session is not None else uuid.uuid4().hex[:12]
        self.republish_seconds = republish_seconds
        self.queue_size = queue_size
        self._requested = address
        self._sndhwm = sndhwm
        self._cond = threading.Condition()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._seq = 0
        self._closing = False
        self._closed = False
        self._latest: dict[str, list[bytes]] = {}  # kind (KEPT_KINDS) -> frames of the latest sent
        self._due: dict[str, float] = {}  # kind (KEPT_KINDS) -> monotonic time its latest is re-sent
        self._sent = dict.fromkeys(TOPICS, 0)
        self._dropped = dict.fromkeys(TOPICS, 0)
        self._republished = 0
        self._address: str | None = None
        self._startup_error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cryofastar-publisher", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._closed = True
            raise self._startup_error

    # -- public API ---------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The bound endpoint, e.g. ``tcp://127.0.0.1:40123`` (the real port when 0 was asked)."""
        assert self._address is not None
        return self._address

    @property
    def sent(self) -> dict[str, int]:
        """Messages handed to the socket per kind, re-sent volumes included."""
        with self._cond:
            return dict(self._sent)

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped per kind because the internal queue was full (or a send failed)."""
        with self._cond:
            return dict(self._dropped)

    @property
    def republished(self) -> int:
        """How many messages were re-sent (the latest volume and the latest classes, each counted)."""
        with self._cond:
            return self._republished

    @property
    def pending(self) -> int:
        """Messages waiting for the socket thread."""
        with self._cond:
            return len(self._queue)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def publish(self, message: Message) -> int:
        """Queue ``message`` for sending; thread-safe, never blocks on the network.

        The message is encoded here (its arrays are copied, so the caller may reuse
        them), stamped with this publisher's ``session`` and the next ``seq`` (in the
        order messages enter the queue); ``time`` is kept as set.

        Parameters
        ----------
        message: Message
            A ``VolumeMessage``, ``PosesMessage``, ``StatusMessage`` or ``ClassesMessage``.

        Returns
        -------
        seq: int
            The sequence number given to the message.

        Raises
        ------
        RuntimeError
            The publisher is closed.
        """
        if self._closing:
            raise RuntimeError("publisher is closed")
        frames = encode(dataclasses.replace(message, seq=0, session=self.session))
        pending = _Pending(message.kind, frames)
        with self._cond:
            if self._closing:
                raise RuntimeError("publisher is closed")
            # seq is given here, under the lock, so it increases in queue (= wire) order
            seq = self._seq
            self._seq += 1
            header = json.loads(frames[1])
            header["seq"] = seq
            frames[1] = json.dumps(header, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()
            if len(self._queue) >= self.queue_size and not self._make_room():
                if pending.kind not in KEPT_KINDS:
                    self._dropped[pending.kind] += 1
                    logger.debug("publisher queue full of volumes: dropped %s seq %d", pending.kind, seq)
                    return seq
            self._queue.append(pending)
            self._cond.notify()
        return seq

    def close(self) -> None:
        """Hand what is queued to the socket, stop the thread, close the socket and context; idempotent.

        With LINGER 0, whatever the socket has not transmitted yet is discarded at once,
        so a daemon stops promptly even with a stalled subscriber.
        """
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Publisher({self._address or self._requested!r}, session={self.session!r})"

    # -- internals ----------------------------------------------------------------------------------

    def _make_room(self) -> bool:
        """Drop the oldest pending status, else the oldest pending poses; False if only volumes and classes wait."""
        for kind in ("status", "poses"):
            for index, item in enumerate(self._queue):
                if item.kind == kind:
                    del self._queue[index]
                    self._dropped[kind] += 1
                    logger.debug("publisher queue full: dropped the oldest pending %s", kind)
                    return True
        return False

    def _run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.PUB)
        try:
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, self._sndhwm)
            # hostile or broken peers: a connection that has not finished ZeroMQ's handshake within
            # HANDSHAKE_MS is dropped (libzmq's default waits 30 s, holding a descriptor each), and a
            # peer sending a frame over MAX_INBOUND_BYTES (a subscriber only ever sends short
            # subscription frames) is disconnected instead of being buffered
            socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
            socket.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)
            self._address = bind(socket, self._requested)
            _start_zero_copy_collector()
        except BaseException as exc:
            self._startup_error = exc
            socket.close(linger=0)
            context.term()
            self._ready.set()
            return
        logger.info("publishing on %s (session %s)", self._address, self.session)
        self._ready.set()
        try:
            self._loop(socket)
        finally:
            socket.close(linger=0)
            context.term()
            logger.info("publisher on %s closed: sent %s, dropped %s", self._address, self._sent, self._dropped)

    def _loop(self, socket: zmq.Socket) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    if self._latest and self.republish_seconds is not None:
                        wait = min(self._due.values()) - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._queue:
                    items = [self._queue.popleft()]
                    resend = False
                elif self._closing:
                    return
                else:
                    now = time.monotonic()
                    items = [_Pending(kind, frames) for kind, frames in self._latest.items() if self._due[kind] <= now]
                    resend = True
            for item in items:
                self._send(socket, item, resend)

    def _send(self, socket: zmq.Socket, item: _Pending, resend: bool) -> None:
        try:
            # PUB never blocks: past SNDHWM it drops for the slow subscriber itself.
            socket.send_multipart(item.frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            logger.warning("could not publish a %s message: %s", item.kind, exc)
            with self._cond:
                self._dropped[item.kind] += 1
            return
        with self._cond:
            self._sent[item.kind] += 1
            if item.kind in KEPT_KINDS:
                self._latest[item.kind] = item.frames
                if self.republish_seconds is not None:
                    self._due[item.kind] = time.monotonic() + self.republish_seconds
                if resend:
                    self._republished += 1

