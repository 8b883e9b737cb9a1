"""The reference subscriber: receive the published stream, print it, optionally save maps and class averages.

Reads only the wire protocol (:mod:`cryofastar.protocol`, ``docs/protocol.md``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
import zmq
from cryofastar.protocol import (
    TOPICS,
    ClassesMessage,
    Message,
    ProtocolError,
    StatusMessage,
    VolumeMessage,
    decode,
)
from cryofastar.recon.io import write_fsc_table, write_volume
from cryofastar.recon.io.class_files import write_class_files
from cryofastar.recon.io.tables import FSC_HALF_MAPS_COLUMN

from cryofastar.options import argument, option

__all__ = ["Subscriber", "describe", "run_subscriber", "save_classes", "save_volume"]

logger = logging.getLogger(__name__)


class Subscriber:
    """A ZeroMQ SUB socket connected to a publisher, decoding each message.

    Parameters
    ----------
    address: str
        Publisher endpoint, e.g. ``tcp://127.0.0.1:5555``. Connecting never fails
        for a publisher that is not up yet: ZeroMQ keeps retrying in the background.
    topics: Iterable[str]
        Topics to receive, a subset of :data:`~cryofastar.protocol.TOPICS`.
    rcvhwm: int
        ZeroMQ receive high-water mark (messages); past it messages are dropped.

    Attributes
    ----------
    last_receive: float | None
        ``time.monotonic()`` when the last message (well-formed or not) arrived.

    Raises
    ------
    ValueError
        Unknown topic or malformed address.
    """

    def __init__(self, address: str, topics: Iterable[str] = TOPICS, *, rcvhwm: int = 100) -> None:
        topics = list(topics)
        unknown = [t for t in topics if t not in TOPICS]
        if unknown or not topics:
            raise ValueError(f"topics must be among {', '.join(TOPICS)}, got {topics!r}")
        self.address = address
        self.topics = tuple(topics)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
        try:
            self._socket.connect(address)
        except zmq.ZMQError as exc:
            self.close()
            raise ValueError(f"cannot connect to {address!r}: {exc.strerror}") from None
        for topic in self.topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self.last_receive: float | None = None

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """The next message, or ``None`` if none arrives within ``timeout_s`` seconds.

        Parameters
        ----------
        timeout_s: float | None
            Seconds to wait; ``None`` waits for ever, ``0`` only looks.

        Raises
        ------
        ProtocolError
            The message received was malformed (it is consumed; the next call goes on).
        """
        timeout_ms = None if timeout_s is None else max(0, math.ceil(timeout_s * 1000))
        if not self._socket.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self._socket.recv_multipart()
        self.last_receive = time.monotonic()
        return decode(frames)

    def close(self) -> None:
        """Close the socket and its context; idempotent."""
        if not self._socket.closed:
            self._socket.close(linger=0)
        if not self._context.closed:
            self._context.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def save_volume(message: VolumeMessage, save_dir: Path) -> Path:
    """Write a volume message as MRC maps and an FSC table (each file atomically).

    Writes ``volume_<particles:08d>.mrc`` and ``volume.mrc`` (the latest), both with
    the voxel size set to ``apix``, and ``volume_fsc.tsv`` (tab-separated columns ``shell``,
    ``resolution_angstrom`` and ``fsc_half_maps``, one row per shell, ``inf`` for DC: the
    form of every FSC table the package writes, :func:`~cryofastar.recon.map_set.write_map_set`).

    Parameters
    ----------
    message: VolumeMessage
        The received map, `(B, B, B)` [z, y, x].
    save_dir: Path
        Directory, created if missing.

    Returns
    -------
    path: Path
        The numbered map written.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    volume = torch.from_numpy(np.ascontiguousarray(message.volume, dtype=np.float32))
    numbered = save_dir / f"volume_{message.particles:08d}.mrc"
    write_volume(numbered, volume, message.apix)
    write_volume(save_dir / "volume.mrc", volume, message.apix)
    write_fsc_table(save_dir / "volume_fsc.tsv", {
        "resolution_angstrom": torch.from_numpy(np.asarray(message.fsc_resolution_angstrom, dtype=np.float64)),
        FSC_HALF_MAPS_COLUMN: torch.from_numpy(np.asarray(message.fsc, dtype=np.float64))})
    return numbered



def save_classes(message: ClassesMessage, save_dir: Path) -> Path:
    """Write a classes message as an MRC stack of the averages and a RELION-style class table (each atomically).

    Writes ``class_averages_<version:06d>.mrcs`` (the `(K, B, B)` averages in class order,
    pixel size ``apix``) and ``classes_<version:06d>.star``, and the same two as
    ``class_averages.mrcs`` and ``classes.star`` (the latest), all through the package's one
    writer of class files, :func:`~cryofastar.recon.io.class_files.write_class_files`: one
    ``data_model_classes`` table, a row per class in class order (``rlnReferenceImage``
    naming the average in the stack beside it, ``rlnClassNumber``, ``rlnClassDistribution``,
    ``rlnEstimatedResolution``, ``rlnAccuracyRotations``, 999 where undefined as RELION
    writes them, ``rlnCryofastarParticleCount``, ``rlnCryofastarJunk``, ``rlnCryofastarJunkScore``).

    Parameters
    ----------
    message: ClassesMessage
        The received class set.
    save_dir: Path
        Directory, created if missing.

    Returns
    -------
    path: Path
        The numbered stack written.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    averages = torch.from_numpy(np.ascontiguousarray(message.averages, dtype=np.float32))
    classes = message.classes
    numbered = save_dir / f"class_averages_{message.version:06d}.mrcs"
    for stack, table in ((numbered, save_dir / f"classes_{message.version:06d}.star"),
                         (save_dir / "class_averages.mrcs", save_dir / "classes.star")):
        write_class_files(stack, table, averages, message.apix, [c.count for c in classes],
                          [c.resolution_angstrom for c in classes], [c.accuracy_degrees for c in classes],
                          [c.junk for c in classes], [c.junk_score for c in classes],
                          numbers=[c.number for c in classes])
    return numbered

def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def describe(message: Message, saved: Path | None = None, repeat: bool = False) -> str:
    """One human line for a message (what :func:`run_subscriber` prints)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(message.time))
    if isinstance(message, StatusMessage):
        parts = []
        for key, value in message.status.items():
            if isinstance(value, dict):
                inner = " ".join(f"{k}={_value(v)}" for k, v in value.items())
                parts.append(f"{key}: {inner}" if inner else f"{key}: -")
            else:
                parts.append(f"{key}={_value(value)}")
        return f"{stamp} status  seq {message.seq}  " + "  ".join(parts)
    if isinstance(message, VolumeMessage):
        resolution = "undefined" if message.resolution_angstrom is None else f"{message.resolution_angstrom:.2f} Å"
        line = (f"{stamp} volume  seq {message.seq}  {message.particles} particles  resolution {resolution}  "
                f"box {message.box} at {message.apix:.3g} Å/px")
        if repeat:
            return line + "  (re-sent)"
        return line + (f"  -> {saved}" if saved is not None else "")
    if isinstance(message, ClassesMessage):
        counts = message.counts
        largest = message.classes[int(np.argmax(counts))]
        resolution = ("undefined" if largest.resolution_angstrom is None
                      else f"{largest.resolution_angstrom:.1f} Å")
        line = (f"{stamp} classes seq {message.seq}  version {message.version}  {len(message.classes)} classes "
                f"({sum(c.junk for c in message.classes)} junk)  {message.particles} particles  largest: class "
                f"{largest.number}, {largest.count:.0f} particles, {resolution}  box {message.box} at "
                f"{message.apix:.3g} Å/px")
        if repeat:
            return line + "  (re-sent)"
        return line + (f"  -> {saved}" if saved is not None else "")
    confidence = float(np.mean(message.confidence)) if len(message.particle_ids) else math.nan
    return (f"{stamp} poses   seq {message.seq}  batch {message.batch}  {len(message.particle_ids)} particles  "
            f"mean confidence {confidence:.3f}")


@dataclass
class SubscribeSettings:
    """What ``cryofastar-stream subscribe`` listens to and keeps (the arguments of :func:`run_subscriber`).

    Attributes
    ----------
    address: str
        Publisher endpoint.
    save: Path | None
        Directory for the received maps, FSC table and class averages; ``None`` saves nothing.
    count: int | None
        Stop after this many messages (``None``: no limit).
    timeout: float | None
        Stop after this many seconds without a message (``None``: wait for ever).
    """

    address: str = argument("tcp://127.0.0.1:5555",
                            help="ZeroMQ endpoint of a running daemon, e.g. tcp://127.0.0.1:5555.")
    save: Path | None = option(None, help="Write every received map here as MRC (volume.mrc, "
                               "volume_<particles>.mrc, volume_fsc.tsv), and every class set as class_averages.mrcs, "
                               "classes.star and their numbered copies class_averages_<version>.mrcs, "
                               "classes_<version>.star.")
    count: int | None = option(None, help="Exit after this many messages.")
    timeout: float | None = option(None, help="Exit after this many seconds without a message.")


def run_subscriber(
    address: str,
    save_dir: Path | None,
    max_messages: int | None,
    timeout_s: float | None,
    echo: Callable[[str], None],
) -> int:
    """Receive messages, print one line each, and save every new map and class set when asked.

    Parameters
    ----------
    address: str
        Publisher endpoint, e.g. ``tcp://127.0.0.1:5555``.
    save_dir: Path | None
        Where to write each new volume (:func:`save_volume`) and class set
        (:func:`save_classes`); ``None`` saves nothing. A message re-sent by the publisher
        (same session and seq) is not written again.
    max_messages: int | None
        Stop after this many well-formed messages; ``None``: no limit.
    timeout_s: float | None
        Stop after this many seconds without a message (malformed ones count as traffic);
        ``None``: wait for ever. The publisher re-sends its map every few seconds, so a
        timeout longer than that period ends only when the daemon stops.
    echo: Callable[[str], None]
        Prints one line (e.g. ``typer.echo``).

    Returns
    -------
    received: int
        Well-formed messages received (malformed ones print a warning and do not count).
    """
    if max_messages is not None and max_messages < 1:
        raise ValueError(f"--count must be at least 1, got {max_messages}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {timeout_s}")
    received = 0
    last_volume: tuple[str, int] | None = None
    last_classes: tuple[str, int] | None = None
    with Subscriber(address) as subscriber:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while max_messages is None or received < max_messages:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                break
            try:
                message = subscriber.receive(wait)
            except ProtocolError as exc:
                message = None
                echo(f"warning: skipped a malformed message: {exc}")
            if timeout_s is not None and subscriber.last_receive is not None:
                deadline = subscriber.last_receive + timeout_s
            if message is None:
                continue
            received += 1
            if isinstance(message, VolumeMessage):
                key = (message.session, message.seq)
                repeat = key == last_volume
                saved = None
                if save_dir is not None and not repeat:
                    saved = save_volume(message, save_dir)
                last_volume = key
                echo(describe(message, saved=saved, repeat=repeat))
            elif isinstance(message, ClassesMessage):
                key = (message.session, message.seq)
                repeat = key == last_classes
                saved = None
                if save_dir is not None and not repeat:
                    saved = save_classes(message, save_dir)
                last_classes = key
                echo(describe(message, saved=saved, repeat=repeat))
            else:
                echo(describe(message))
    return received
